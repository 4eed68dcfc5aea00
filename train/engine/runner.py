"""What every training job shares: one run preparation (`start`), the resumable training loop, evaluation.

A job (classification in `train.jobs.classify`, causal LM in `train.jobs.causal_lm`, a sweep in
`train.jobs.sweep`) hands `start` its options and a loader of its model and tokenised splits. `start` checks and
prepares everything in one order: processes, output directory, mesh, model and data, the adapter the flags
describe, its path ('auto' timed here), the parameter report, then (on the mesh) the frozen base
placed FSDP by path rules, the checkpoints and the metrics log. The job then calls `fit` and
`evaluate`; the loss and metrics follow ``options.task`` (`train.engine.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import vera_jax
from train.engine import data as data_lib
from train.engine import mesh as mesh_lib
from train.engine import run_lock, steps
from train.engine.checkpoints import RunCheckpoints
from train.engine.metrics import MetricsLog, plot_curves, write_json
from train.engine.profile import JobProfile
from train.options import RESUME_KEYS, Options, vera_config
from vera_jax import atomic
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax import peft as vera_peft
from vera_jax.host import to_host
from vera_jax.layers import find_full_leaves, find_layers
from vera_jax.paths import SEP, flatten

__all__ = ["Prepared", "Run", "Context", "RunError", "TrainingDiverged", "start", "init_distributed", "output_dir",
           "place", "global_batch", "group_count", "train_groups", "fit", "evaluate", "all_finite",
           "learning_rate_flags", "count_steps", "model_config", "vera_setup", "check_targets", "resolve_path",
           "dropout_key", "step_key", "save_adapters", "publish", "DROPOUT_STREAM", "locked_run"]

DROPOUT_STREAM = 2**31  # fold_in offset for the dropout key: disjoint from the projection stream's blocks


class RunError(ValueError):
    """A run cannot start as configured; the message names the setting to change."""


class TrainingDiverged(RunError):
    """The loss or the trained state stopped being finite; the last checkpoint kept is the last finite one."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A job's model and tokenised splits, checked against each other.

    Attributes:
      model: a `train.models.interface.Model` (a sequence classifier or a causal LM).
      tokenizer: its tokenizer.
      train_data, test_data: the tokenised splits.
      pad_id: the token that pads a batch.
      test_split: the held-out rows as loaded (the causal LM answers some of its questions).
    """

    model: object
    tokenizer: object
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int
    test_split: object = None


@dataclasses.dataclass
class Context:
    """Everything the training loop reads, placed on the mesh."""

    options: Options
    mesh: jax.sharding.Mesh
    params: dict
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    dropout_key: jax.Array
    length_groups: int = 1  # groups of rows a batch runs as (`group_count`)


@dataclasses.dataclass
class Run:
    """A prepared run: its options, directory, model and data, initial adapter and path, and (on the mesh)
    its placed context, checkpoints and metrics log."""

    options: Options
    out: Path
    job: Prepared
    adapter: vera_jax.Adapter  # the initial adapter, on the host
    path: str | vera_jax.PathPlan
    path_detail: str
    steps_per_epoch: int
    total_steps: int
    log: MetricsLog
    ctx: Context | None = None
    checkpoints: RunCheckpoints | None = None
    data_sha256: str | None = None  # of the dataset's files (`train.engine.data.dataset_sha256`), on the mesh

    @property
    def model(self):
        return self.job.model

    @property
    def params(self) -> dict:
        return self.job.model.params

    def logits(self) -> Callable:
        """The adapted model's ``logits(params, adapter, batch, rng)`` on the run's path."""
        return self.model.vera_logits(self.path, self.adapter.config)

    @property
    def hoist(self):
        """`fit`'s ``hoist``: the model when its merge can run once a step on the run's path, else None."""
        return self.model if self.model.hoists_merge(self.path) else None

    @property
    def primary(self) -> bool:
        return jax.process_index() == 0

    def meta(self) -> dict:
        """What a checkpoint records and a resumed run must match: the options that shape it (the split's
        among them), the dataset files' sha256, and the projections' recipe."""
        return {"options": resume_options(self.options), "data": {"sha256": self.data_sha256},
                "projection": adapter_checkpoint.projection_recipe(self.adapter)}


def resume_options(options: Options) -> dict:
    """The options a checkpoint records and a resumed run must match (JSON: tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()
            if k in RESUME_KEYS}


def locked_run(job: Callable[..., dict]) -> Callable[..., dict]:
    """``job(options, ...)`` run holding its --output-dir's run lock (`train.engine.run_lock`), taken before anything
    loads; process 0 of a multi-process run holds it for all of them."""

    @functools.wraps(job)
    def run(options: Options, *args) -> dict:
        out = output_dir(options.output_dir)
        if options.process_id != 0:
            return job(options, *args)
        with run_lock.held(out):
            return job(options, *args)

    return run


def start(options: Options, load: Callable[[Options], Prepared], *, on_mesh: bool = True) -> Run:
    """Prepare the run ``options`` describe; ``load`` loads and checks its model and data.

    ``on_mesh=False`` (a sweep: one device, no checkpoints) skips the processes, the mesh and the checkpoints.

    Raises:
      RunError (and the loaders' errors): anything that stops the run, before any training.
    """
    if on_mesh:
        init_distributed(options)
    out = output_dir(options.output_dir)
    mesh = mesh_lib.make_mesh(options.mesh, options.batch_size) if on_mesh else None
    if on_mesh:
        for name, kind in (("adapter", adapter_checkpoint.KIND), ("peft_adapter", vera_peft.KIND)):
            try:
                atomic.check_replaceable(out / name, kind)
            except FileExistsError as err:
                raise RunError(f"{err} (the run writes its adapter there; choose another --output-dir)") from None
        if (out / "checkpoints").is_dir():  # a resume with other flags is refused before anything loads
            early = RunCheckpoints(out / "checkpoints", options.keep_checkpoints)
            try:
                early.check_settings({"options": resume_options(options)})
            finally:
                early.close()
    job = load(options)
    steps_per_epoch, total_steps = count_steps(options, len(job.train_data))
    adapter = vera_setup(options, job.model)
    path, path_detail = resolve_path(options, job.model, adapter)
    primary = jax.process_index() == 0
    if primary:
        print(vera_jax.parameter_report(job.model.params, adapter))
    ctx = checkpoints = data_sha256 = None
    resume_step = 0
    if on_mesh:
        data_sha256 = data_lib.dataset_sha256(options.dataset)
        params = job.model.params
        ctx = Context(options, mesh, place(params, mesh_lib.base_shardings(params, mesh)), job.train_data,
                      job.test_data, job.pad_id, steps_per_epoch, total_steps, dropout_key(options.seed),
                      group_count(options, mesh.size))
        checkpoints = RunCheckpoints(out / "checkpoints", options.keep_checkpoints)
        resume_step = checkpoints.latest_step() or 0
    log = MetricsLog(out / "metrics.jsonl", resume_step, enabled=primary)
    return Run(options, out, job, adapter, path, path_detail, steps_per_epoch, total_steps, log, ctx, checkpoints,
               data_sha256)


def dropout_key(seed: int) -> jax.Array:
    """The key of a run's dropout (the model's and VeRA's): a stream of ``--seed``'s key that the
    projections never draw from. A sweep's adapter with seed s uses ``dropout_key(s)``, as the run would."""
    return jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), DROPOUT_STREAM)


def step_key(key: jax.Array, step, group) -> jax.Array:
    """The dropout key of one group of rows of training step ``step`` (`train_groups`), from the run's `dropout_key`."""
    return jax.random.fold_in(jax.random.fold_in(key, step), group)


def count_steps(options: Options, train_rows: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; a RunError when the split is smaller than one batch."""
    steps_per_epoch = train_rows // options.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"The training split has {train_rows} rows, fewer than one batch of "
                       f"{options.batch_size}; lower --batch-size.")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    return steps_per_epoch, total_steps


def model_config(options: Options, model) -> vera_jax.VeraConfig:
    """The adapter the flags describe, for this model's kernel layouts."""
    return vera_config(options, model.kernel_axes)


def vera_setup(options: Options, model) -> vera_jax.Adapter:
    """The initial adapter; targets or a head that do not fit the model are a RunError."""
    try:
        return vera_jax.init_adapter(model.params, model_config(options, model))
    except (TypeError, ValueError) as err:
        raise _misfit(options, model.params, err) from None


def check_targets(options: Options, shapes: dict, axes: tuple[tuple[str, str], ...]) -> None:
    """A RunError in one line when --targets or --head select nothing (or no linear layer) in the parameter tree
    ``shapes`` (shapes only: checked before the weights load)."""
    config = vera_config(options, axes)
    try:
        find_layers(shapes, config)
        find_full_leaves(shapes, config)
    except ValueError as err:
        raise _misfit(options, shapes, err) from None


def _misfit(options: Options, params: dict, err: Exception) -> RunError:
    """One line: the first sentence of ``err`` (VeRA's errors list every module on lines of their own) and the
    names the model's linear layers end in."""
    first = re.split(r"\. |; its leaves are:", str(err).strip().splitlines()[0])[0].rstrip(".")
    names = sorted({path.rsplit(SEP, 2)[-2] for path, leaf in flatten(params).items()
                    if path.endswith(SEP + "kernel") and len(getattr(leaf, "shape", ())) >= 2})
    return RunError(f"VeRA settings do not fit {options.model!r}: {first}. Its linear layers' names end in "
                    f"{', '.join(names)}: choose --targets and --head among them, or give a regex of whole paths.")


def resolve_path(options: Options, model, adapter: vera_jax.Adapter) -> tuple[str | vera_jax.PathPlan, str]:
    """``--path`` and a line saying what it is; 'auto' is the path whose whole training step runs faster here.

    `vera_jax.whole_step_plan` times the model's gradient step on each path for a batch of this shape.
    Process 0 measures and every process takes its numbers, so that all of them compile one program.
    With --dropout, auto is the activation path: the merged path never computes the activations
    dropout acts on.
    """
    if options.path != "auto":
        return options.path, options.path
    primary = jax.process_index() == 0
    if options.dropout > 0:
        detail = f"auto: every layer activation, the path on which --dropout {options.dropout:g} acts"
        if primary:
            print(detail)
        return "activation", detail
    tokens = options.batch_size * options.max_length
    if primary:
        ids = np.ones((options.batch_size, options.max_length), np.int32)
        plan = vera_jax.whole_step_plan(_base_logits(model), model.params, adapter, ids, tokens=tokens)
    if jax.process_count() > 1:
        totals = np.array(plan.totals if primary else (0.0, 0.0), np.float32)
        merged, activation = map(float, multihost_utils.broadcast_one_to_all(totals))
        plan = vera_jax.PathPlan.from_whole_steps(model.params, adapter.config, merged, activation, tokens)
    if primary:
        print(plan.summary())
    return plan, plan.summary()


def _base_logits(model) -> Callable:
    """``logits(params, ids)`` of the model in eval mode on unpadded rows, as `vera_jax.whole_step_plan` times it."""
    return lambda params, ids: model.logits(params, {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}, None)


def save_adapters(run: Run, adapter: vera_jax.Adapter, task_type: str) -> Path:
    """``out/adapter`` (Orbax, every process) and ``out/peft_adapter`` (PEFT format, process 0, when PEFT can
    hold the adapter: one shared pair); returns the first."""
    adapter_dir = adapter_checkpoint.save(run.out / "adapter", adapter, run.params)
    if run.primary and adapter.config.projection_sharing == "shared":
        vera_peft.save_adapter(run.out / "peft_adapter", to_host(adapter), run.params, task_type=task_type,
                               base_model_name_or_path=run.model.base_model_name, stacks=run.model.stacks)
    return adapter_dir


def publish(out: Path, summary: dict, log: MetricsLog, report: str) -> None:
    """On process 0: ``summary.json``, ``curves.png`` from the metrics, and the report on stdout."""
    if jax.process_index() == 0:
        write_json(out / "summary.json", summary)
        plot_curves(log.records(), out / "curves.png")
        print(report)


def init_distributed(options: Options) -> None:
    if options.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id)


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # one per process: no races
            pass
    except OSError as err:
        raise RunError(f"Cannot write to --output-dir {out}: {err.strerror}. Choose a writable directory.") from None
    return out


def place(tree, sharding):
    """Host values (or replicated arrays) -> fresh global arrays with ``sharding`` (one sharding, or a tree)."""
    shardings = sharding if isinstance(sharding, dict) else jax.tree.map(lambda _: sharding, tree)

    def put(x, s):
        x = np.asarray(to_host(x))
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(batch: dict, sharding) -> dict:
    """Every process holds the global batch (cheap for text) and supplies its own contiguous rows."""
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(sharding, np.split(v, count)[index], v.shape)
            for k, v in batch.items()}


def group_count(options: Options, devices: int) -> int:
    """The groups of rows a batch runs as: ``--length-groups``, lowered (with a note) to the most that split the
    batch into whole rows on every device."""
    groups = next(k for k in range(options.length_groups, 0, -1) if options.batch_size % (k * devices) == 0)
    if groups < options.length_groups and jax.process_index() == 0:
        print(f"--length-groups {options.length_groups} lowered to {groups}: a batch of {options.batch_size} rows "
              f"over {devices} device(s) splits into at most {groups} equal groups with whole rows on each device; "
              f"the run is that of --length-groups {groups}")
    return groups


def train_groups(ctx: Context, step: int) -> list[dict]:
    """Training step ``step``'s batch as ``ctx.length_groups`` collated groups of rows
    (`train.engine.data.length_groups`)."""
    indices = data_lib.batch_indices(len(ctx.train_data), ctx.options.seed, step, ctx.steps_per_epoch,
                                     ctx.options.batch_size)
    return [data_lib.collate(ctx.train_data, group, ctx.pad_id, ctx.options.max_length, ctx.options.pad_multiple)
            for group in data_lib.length_groups(ctx.train_data, indices, ctx.length_groups)]


def fit(ctx: Context, name: str, adapter, logits_fn: Callable, log: MetricsLog,
        checkpoints: RunCheckpoints | None = None, meta: dict | None = None, profile: JobProfile | None = None,
        hoist=None):
    """Train ``adapter.trainable`` for ``ctx.total_steps`` (resuming from ``checkpoints``); returns the
    trained adapter (replicated on the mesh) and the tokens/s. ``adapter`` itself is left as it was.
    ``profile`` counts the groups' shapes and times the checkpoints. ``hoist``: the model of a merged-path
    ``logits_fn`` whose merge then runs once a step (`Run.hoist`) rather than once a group of rows
    (`train.engine.steps.make_merged_group_gradients`)."""
    options, profile = ctx.options, profile or JobProfile()
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    tx = steps.make_optimizer(options, ctx.total_steps)
    adapter = place(adapter, replicated)  # its own buffers: the step donates them
    state = place({"trainable": adapter.trainable, "opt_state": tx.init(adapter.trainable)}, replicated)
    start = 0
    if checkpoints is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpoints.restore(abstract, meta)
        if restored is not None:
            start, state, _ = restored
            log = MetricsLog(log.path, start, enabled=log.enabled)  # drops records past an older step resumed
            print(f"[{name}] resumed from the checkpoint at step {start}")

    base_shardings = jax.tree.map(lambda x: x.sharding, ctx.params)
    if hoist is None:  # the groups differentiate the adapter's trainable tree
        gradients, prepare = steps.make_group_gradients(logits_fn, options.task), lambda adapter, params: adapter
    else:  # the groups differentiate the merged leaves, merged once a step
        gradients = steps.make_merged_group_gradients(hoist, options.task)
        prepare = jax.jit(lambda adapter, params: steps.merged_leaves(params, adapter),
                          in_shardings=(replicated, base_shardings))

    def group_fn(inputs, params, group, step, index):
        return gradients(inputs, params, group, step_key(ctx.dropout_key, step, index))

    group_fn = jax.jit(group_fn, in_shardings=(None, base_shardings, batch_sharding, None, None),
                       out_shardings=replicated)
    apply_fn = jax.jit(steps.make_apply_gradients(tx, hoisted=hoist is not None),
                       in_shardings=(replicated, replicated, replicated, base_shardings), out_shardings=replicated,
                       donate_argnums=(0, 1))
    adapter, opt_state = adapter.replace(trainable=state["trainable"]), state["opt_state"]
    tokens, started = 0, time.perf_counter()
    progress = tqdm(total=ctx.total_steps, initial=start, desc=name, disable=jax.process_index() != 0)
    for step in range(start, ctx.total_steps):
        groups = train_groups(ctx, step)
        for group in groups:
            tokens += int(group["attention_mask"].sum())
            profile.ran(group["attention_mask"])
        inputs = prepare(adapter, ctx.params)
        parts = tuple(group_fn(inputs, ctx.params, global_batch(group, batch_sharding), np.uint32(step), np.uint32(i))
                      for i, group in enumerate(groups))
        adapter, opt_state, loss = apply_fn(adapter, opt_state, parts, ctx.params)
        done = step + 1
        if done % options.log_every == 0 or done == ctx.total_steps:
            loss = float(loss)
            if not math.isfinite(loss):
                raise _diverged(options, done, f"the training loss is {loss}", checkpoints)
            log.write(run=name, step=done, epoch=step // ctx.steps_per_epoch, loss=loss)
            progress.set_postfix(loss=f"{loss:.4f}")
        if checkpoints is not None and (done % options.checkpoint_every == 0 or done == ctx.total_steps):
            state = {"trainable": adapter.trainable, "opt_state": opt_state}
            if not all_finite(state):
                raise _diverged(options, done, "the trained state is not finite", checkpoints)
            epoch, position = divmod(done, ctx.steps_per_epoch)
            with profile.phase("checkpoints"):
                checkpoints.save(done, state, {**meta, "step": done, "epoch": epoch, "batch_in_epoch": position})
        progress.update(1)
    progress.close()
    if not all_finite(adapter.trainable):
        raise _diverged(options, ctx.total_steps, "the trained state is not finite", checkpoints)
    seconds = time.perf_counter() - started
    return adapter, (tokens / seconds if tokens else 0.0)


def all_finite(tree) -> bool:
    """Whether every entry of a (replicated) tree is finite: one host copy of an adapter-sized tree."""
    return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(to_host(tree)))


def learning_rate_flags(options: Options) -> str:
    """The flags of the learning rates in use, for an error that asks to lower them."""
    return f"--lr-vectors {options.lr_vectors:g}" + (f", --lr-head {options.lr_head:g}" if options.head else "")


def _diverged(options: Options, step: int, what: str, checkpoints: RunCheckpoints | None) -> TrainingDiverged:
    kept = checkpoints.latest_step() if checkpoints is not None else None
    return TrainingDiverged(f"Training stopped at step {step}: {what}. Lower the learning rate "
                            f"({learning_rate_flags(options)}) and train "
                            "in a new --output-dir" + (f"; the last checkpoint here, step {kept}, is finite."
                                                       if kept is not None else "."))


def evaluate(ctx: Context, adapter, logits_fn: Callable) -> tuple[float, float]:
    """(accuracy, mean loss) on the held-out split, in batches of rows of like length; the last batch is padded
    with zero-weight rows. The batches' sums stay on the devices until the last is dispatched (one wait, not one
    a batch), then add up in float64."""
    devices = ctx.mesh.size
    size = -(-ctx.options.eval_batch_size // devices) * devices
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    eval_fn = jax.jit(steps.make_eval_step(logits_fn, ctx.options.task),
                      in_shardings=(replicated, jax.tree.map(lambda x: x.sharding, ctx.params), batch_sharding))
    adapter = place(adapter, replicated)
    sums = []
    n = len(ctx.test_data)
    by_length = data_lib.by_length(ctx.test_data, np.arange(n))
    for start in range(0, n, size):
        positions = np.arange(start, start + size)
        weights = (positions < n).astype(np.float32)
        batch = data_lib.collate(ctx.test_data, by_length[np.minimum(positions, n - 1)], ctx.pad_id,
                                 ctx.options.max_length, ctx.options.pad_multiple)
        batch["weights"] = weights
        sums.append(eval_fn(adapter, ctx.params, global_batch(batch, batch_sharding)))
    correct, loss, count = (sum(float(x) for x in column) for column in zip(*jax.device_get(sums)))
    return correct / count, loss / count
