"""What every training job shares: one run preparation (`start`) and what a run writes at its end.

A job (classification in `train.jobs.classify`, causal LM in `train.jobs.causal_lm`, a sweep in
`train.jobs.sweep`) hands `start` its options and a loader of its model and tokenised splits. `start` checks and
prepares everything in one order: processes, output directory, mesh, model and data, the adapter the flags
describe, its path ('auto' timed here), the parameter report, then (on the mesh) the frozen base
placed FSDP by path rules, the checkpoints and the metrics log. The job then calls `train.engine.loop.fit`
and `train.engine.evaluation.Evaluator`; the loss and metrics follow ``options.data.task`` (`train.engine.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import vera_jax
from train.engine import data as data_lib
from train.engine import mesh as mesh_lib
from train.engine import run_lock
from train.engine.checkpoints import RunCheckpoints
from train.engine.errors import RunError
from train.engine.loop import Context, group_count
from train.engine.metrics import MetricsLog, plot_curves, write_json
from train.options import RESUME_KEYS, OptimOptions, Options, RunOptions, vera_config
from vera_jax import atomic
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax import peft as vera_peft
from vera_jax.layers import find_full_leaves, find_layers
from vera_jax.host import to_host
from vera_jax.paths import SEP, flatten

__all__ = ["Prepared", "Run", "start", "locked_run", "init_distributed", "output_dir", "check_adapter_directories",
           "count_steps", "model_config", "vera_setup", "check_targets", "resolve_path", "save_adapters", "publish"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A job's model and tokenised splits, checked against each other.

    Attributes:
      model: a `train.models.interface.Model` (a sequence classifier or a causal LM).
      tokenizer: its tokenizer.
      train_data, test_data: the tokenised splits.
      pad_id: the token that pads a batch.
      test_split: the held-out rows as loaded (the causal LM answers some of its questions).
      validation_data: the tokenised validation rows, or None.
    """

    model: object
    tokenizer: object
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int
    test_split: object = None
    validation_data: data_lib.TextData | None = None


@dataclasses.dataclass
class Run:
    """A prepared run: its options, directory, model and data, initial adapter and path, its context placed on
    the mesh, its metrics log and (on the mesh) its checkpoints."""

    options: Options
    out: Path
    job: Prepared
    adapter: vera_jax.Adapter  # the initial adapter, on the host
    path: str | vera_jax.PathPlan
    path_detail: str
    ctx: Context
    log: MetricsLog
    checkpoints: RunCheckpoints | None = None
    data_sha256: str | None = None  # of the dataset's files (`train.engine.data.dataset_sha256`), on the mesh

    @property
    def total_steps(self) -> int:
        return self.ctx.total_steps

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
    return {k: v for k, v in options.flat().items() if k in RESUME_KEYS}


def locked_run(job: Callable[..., dict]) -> Callable[..., dict]:
    """``job(options, ...)`` run holding its --output-dir's run lock (`train.engine.run_lock`), taken before anything
    loads; process 0 of a multi-process run holds it for all of them."""

    @functools.wraps(job)
    def run(options: Options, *args) -> dict:
        out = output_dir(options.run.output_dir)
        if options.run.process_id != 0:
            return job(options, *args)
        with run_lock.held(out):
            return job(options, *args)

    return run


def start(options: Options, load: Callable[[Options], Prepared], *, on_mesh: bool = True) -> Run:
    """Prepare the run ``options`` describe; ``load`` loads and checks its model and data.

    ``on_mesh=False`` (a sweep) runs on one device without checkpoints: it skips the processes, the ``--mesh``
    and the checkpoints.

    Raises:
      RunError (and the loaders' errors): anything that stops the run, before any training.
    """
    if on_mesh:
        init_distributed(options.run)
    out = output_dir(options.run.output_dir)
    mesh = mesh_lib.make_mesh(options.run.mesh, options.optim.batch_size) if on_mesh else mesh_lib.one_device_mesh()
    if on_mesh:
        check_adapter_directories(out, "--output-dir")
        if (out / "checkpoints").is_dir():  # a resume with other flags is refused before anything loads
            early = RunCheckpoints(out / "checkpoints", options.run.keep_checkpoints)
            try:
                early.check_settings({"options": resume_options(options)})
            finally:
                early.close()
    job = load(options)
    steps_per_epoch, total_steps = count_steps(options.optim, len(job.train_data))
    adapter = vera_setup(options, job.model)
    path, path_detail = resolve_path(options, job.model, adapter)
    primary = jax.process_index() == 0
    if primary:
        print(vera_jax.parameter_report(job.model.params, adapter))
    params = job.model.params
    ctx = Context(options, mesh, mesh_lib.place(params, mesh_lib.base_shardings(params, mesh)), job.train_data,
                  job.test_data, job.pad_id, steps_per_epoch, total_steps, group_count(options.optim, mesh.size),
                  job.validation_data)
    checkpoints = data_sha256 = None
    resume_step = 0
    if on_mesh:
        data_sha256 = data_lib.dataset_sha256(options.data)
        checkpoints = RunCheckpoints(out / "checkpoints", options.run.keep_checkpoints)
        resume_step = checkpoints.latest_step() or 0
    log = MetricsLog(out / "metrics.jsonl", resume_step, enabled=primary)
    return Run(options, out, job, adapter, path, path_detail, ctx, log, checkpoints, data_sha256)


def check_adapter_directories(out: Path, flag: str) -> None:
    """A RunError when ``out/adapter`` or ``out/peft_adapter`` holds something vera_jax did not write there (a run
    replaces only its own), before anything loads; ``flag`` names the option that chose ``out``."""
    for name, kind in (("adapter", adapter_checkpoint.KIND), ("peft_adapter", vera_peft.KIND)):
        try:
            atomic.check_replaceable(out / name, kind)
        except FileExistsError as err:
            raise RunError(f"{err} (the run writes its adapter there; choose another {flag})") from None


def count_steps(optim: OptimOptions, train_rows: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; a RunError when the split is smaller than one batch."""
    steps_per_epoch = train_rows // optim.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"The training split has {train_rows} rows, fewer than one batch of "
                       f"{optim.batch_size}; lower --batch-size.")
    total_steps = steps_per_epoch * optim.epochs
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
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
        layers = find_layers(shapes, config)
        find_full_leaves(shapes, config, layers=layers)
    except ValueError as err:
        raise _misfit(options, shapes, err) from None


def _misfit(options: Options, params: dict, err: Exception) -> RunError:
    """One line: the first sentence of ``err`` (VeRA's errors list every module on lines of their own) and the
    names the model's linear layers end in."""
    first = re.split(r"\. |; its leaves are:", str(err).strip().splitlines()[0])[0].rstrip(".")
    names = sorted({path.rsplit(SEP, 2)[-2] for path, leaf in flatten(params).items()
                    if path.endswith(SEP + "kernel") and len(getattr(leaf, "shape", ())) >= 2})
    return RunError(f"VeRA settings do not fit {options.model.name!r}: {first}. Its linear layers' names end in "
                    f"{', '.join(names)}: choose --targets and --head among them, or give a regex of whole paths.")


def resolve_path(options: Options, model, adapter: vera_jax.Adapter) -> tuple[str | vera_jax.PathPlan, str]:
    """``--path`` and a line saying what it is; 'auto' is the path whose whole training step runs faster here.

    `vera_jax.whole_step_plan` times the model's gradient step on each path for a batch of this shape.
    Process 0 measures and every process takes its numbers, so that all of them compile one program.
    With --dropout, auto is the activation path: the merged path never computes the activations
    dropout acts on.
    """
    if options.model.path != "auto":
        return options.model.path, options.model.path
    primary = jax.process_index() == 0
    if options.model.dropout > 0:
        detail = f"auto: every layer activation, the path on which --dropout {options.model.dropout:g} acts"
        if primary:
            print(detail)
        return "activation", detail
    tokens = options.optim.batch_size * options.data.max_length
    if primary:
        ids = np.ones((options.optim.batch_size, options.data.max_length), np.int32)
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


def init_distributed(run: RunOptions) -> None:
    if run.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(run.coordinator, run.num_processes, run.process_id)


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # one per process: no races
            pass
    except OSError as err:
        raise RunError(f"Cannot write to --output-dir {out}: {err.strerror}. Choose a writable directory.") from None
    return out
