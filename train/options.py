"""Every choice a user makes about a training run: `Options`, its flags, and their checks.

One `Options` serves three commands: ``python -m train classify`` (the main job, the defaults below),
``python -m train causal-lm`` (`CAUSAL_LM_DEFAULTS`; --text-column names the prompt column and
--label-column the answer column) and ``python -m train sweep``. Each field declares its flag: its
check (a bad value is a one-line error naming the flag and what it accepts, before anything loads)
and the commands that take it. `from_args` also builds the `vera_jax.VeraConfig` the flags describe,
so that settings which do not fit together fail as early.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import vera_jax
from vera_jax import config as vera_config_lib
from vera_jax.plan import NNX_PATHS

__all__ = ["Options", "DataOptions", "ModelOptions", "OptimOptions", "RunOptions", "FLAG_FIELDS", "FlagError",
           "RESUME_KEYS", "CAUSAL_LM_DEFAULTS", "PATHS", "SCHEDULES", "add_options",
           "from_args", "vera_config", "check_options", "positive_int", "non_negative_int", "finite_float",
           "non_negative_float", "positive_float", "seed_int", "Parser"]

BACKENDS = ("nnx", "nnx-listed", "linen")  # model implementations: our NNX models, or transformers' linen ones
SCAN_REMATS = ("dots", "full", "none")  # the keys of train.models.scan.SCAN_REMAT, its default first
PATHS = (*vera_jax.plan.PATHS, "auto")  # how adapted layers run; 'auto' times a whole step of each and picks
SCHEDULES = ("linear", "cosine", "constant")
BASE_DTYPES = ("float32", "bfloat16")
CLASSIFY, CAUSAL_LM, SWEEP = "classify", "causal-lm", "sweep"
ALL = frozenset({CLASSIFY, CAUSAL_LM, SWEEP})
ON_MESH = frozenset({CLASSIFY, CAUSAL_LM})  # a sweep runs on one device and keeps no checkpoints
SEED_LIMIT = 2**32  # JAX keys take 32-bit seeds (larger ones wrap silently)


class FlagError(ValueError):
    """Flags that are each valid but do not fit together; the message names them."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: argument --x: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ---- value checks, used as argparse ``type=``: the message follows "argument --flag: " ----

def _number(text: str, kind: Callable, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    value = _number(text, int, "an integer in [0, 2**32)")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float, "a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a finite number >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _in_range(low: float, high: float, low_open: bool) -> Callable[[str], float]:
    what = f"a number in {'(' if low_open else '['}{low:g}, {high:g})"

    def check(text: str) -> float:
        value = _number(text, float, what)
        if not ((low < value) if low_open else (low <= value)) or not value < high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return check


def _mesh(text: str) -> str:
    parts = text.lower().split("x")
    if text != "auto" and not (len(parts) == 2 and all(p.isdigit() and int(p) >= 1 for p in parts)):
        raise argparse.ArgumentTypeError(f"must be 'auto' or DATAxFSDP with positive sizes, such as '8x1' or '4x2', "
                                         f"got {text!r}")
    return text.lower()


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, such as 10.0.0.1:1234, got {text!r}")
    return text


def _flag(default, help: str, *, type: Callable | None = None, choices: Iterable[str] | None = None,
          nargs: str | None = None, commands: frozenset = ALL, dest: str | None = None):
    """A field of a part of `Options` and its flag: ``type`` checks a value, ``commands`` take the flag, ``dest``
    names the flag when the field's name does not."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "nargs": nargs,
                                                        "commands": commands, "dest": dest,
                                                        "choices": tuple(choices) if choices else None})


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where the rows come from, how they are split and how they are tokenised."""

    dataset: str = _flag("default", "'default' (packaged movie-review sentences), 'chatterbot', a datasets hub name, "
                         "or local .csv/.tsv/.json/.jsonl/.parquet files (comma-separated)")
    text_column: str = _flag("text", "the input text column (causal-lm: the question)")
    label_column: str = _flag("label", "the label column (causal-lm: the answer)")
    task: str = _flag("classification", "what the head learns", choices=("classification", "regression"),
                      commands=frozenset({CLASSIFY, SWEEP}))
    num_labels: int | None = _flag(None, "classes of the head (default: inferred from the training labels)",
                                   type=positive_int, commands=frozenset({CLASSIFY, SWEEP}))
    test_fraction: float = _flag(0.2, "rows held out for the final test when the dataset has no test split",
                                 type=_in_range(0.0, 1.0, low_open=True))
    validation_fraction: float = _flag(0.1, "training rows held out to validate every epoch (and to choose "
                                       "--keep-best's adapter or a sweep's point) when the dataset has no validation "
                                       "split; 0: none",
                                       type=_in_range(0.0, 1.0, low_open=False), commands=frozenset({CLASSIFY, SWEEP}))
    test_files: str | None = _flag(None, "local files (comma-separated) holding the test rows of a local --dataset",
                                   commands=frozenset({CLASSIFY, SWEEP}))
    validation_files: str | None = _flag(None, "local files (comma-separated) holding the validation rows of a "
                                         "local --dataset", commands=frozenset({CLASSIFY, SWEEP}))
    data_seed: int = _flag(0, "seed of the held-out test and validation splits (apart from --seed)", type=seed_int)
    max_length: int = _flag(64, "tokens per example at most", type=positive_int)
    pad_multiple: int = _flag(8, "a batch (or group of rows) pads to its longest row rounded up to a multiple of "
                              "this: each padded length compiles once, so fewer lengths compile less but pad more",
                              type=positive_int)
    chat_template: str | None = _flag(None, "a Jinja chat-template file, for models that ship none",
                                      commands=frozenset({CAUSAL_LM}))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model, how it runs, and the VeRA adapter on it."""

    name: str = _flag("default", "'default' (the packaged all-MiniLM-L6-v2), 'smollm2', a hub id or a local directory",
                      dest="model")
    backend: str = _flag("nnx", "the model's implementation: Flax NNX (BERT and RoBERTa classifiers, Llama causal "
                         "LMs; layers stacked and scanned), nnx-listed (layers in a list), or linen (transformers' "
                         "Flax classes, transformers<5: GPT-2, Mistral, ELECTRA, ...)", choices=BACKENDS)
    base_dtype: str = _flag("float32", "dtype of the frozen base (bfloat16 halves its memory)", choices=BASE_DTYPES,
                            commands=frozenset({CAUSAL_LM}))
    scan_remat: str | None = _flag(None, "what the scanned NNX stack keeps for the backward pass: dots (the "
                                   "projections' outputs; the default), full (each layer's input only: least "
                                   "memory) or none (every intermediate)", choices=SCAN_REMATS)
    path: str = _flag("merged", "how adapted layers run: merged, activation, activation-lean, or auto (the faster "
                      "whole training step, timed here)", choices=PATHS)
    r: int = _flag(256, "rank of the shared projections A (r, in) and B (out, r)", type=positive_int)
    targets: tuple[str, ...] = _flag(("query", "value"), "module names (or one regex) VeRA adapts", nargs="+")
    head: tuple[str, ...] = _flag(("classifier",), "modules trained in full, like PEFT's modules_to_save", nargs="*")
    d_initial: float = _flag(0.1, "initial value of every lambda_d entry", type=finite_float)
    b_initial: float = _flag(0.0, "initial value of every lambda_b entry (0: start as the base model)",
                             type=finite_float)
    dropout: float = _flag(0.0, "VeRA dropout on each adapted layer's input (needs a --path other than merged)",
                           type=_in_range(0.0, 1.0, low_open=False))
    # The paper's ablations (vera_jax.VeraConfig documents each): the defaults are VeRA as PEFT runs it.
    projection_init: str = _flag("kaiming_uniform", "how A and B are drawn",
                                 choices=vera_config_lib.PROJECTION_INITS)
    projection_sharing: str = _flag("shared", "one A/B pair for all layers, or one per layer",
                                    choices=vera_config_lib.PROJECTION_SHARINGS)
    train_vectors: str = _flag("both", "which vectors train (a frozen one stays at its initial value)",
                               choices=vera_config_lib.TRAIN_VECTORS)


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """The optimisation: learning rates, schedule, batches and length."""

    # The main job's recipe: the best validation accuracy of `python -m train sweep --epochs 3 --lr-vectors 0.01 0.03
    # --lr-head 0.004 0.012 --seeds 0`, and 4 epochs over 3 by the validation mean of training seeds 0, 1, 2
    # (docs/performance.md, "The recipe" and "Three seeds for what won on one").
    lr_vectors: float = _flag(3e-2, "peak learning rate of the VeRA vectors", type=positive_float)
    lr_head: float = _flag(1.2e-2, "peak learning rate of the modules trained in full", type=positive_float)
    schedule: str = _flag("linear", "learning-rate decay after a linear warmup", choices=SCHEDULES)
    warmup_ratio: float = _flag(0.06, "fraction of the steps spent warming up", type=_in_range(0.0, 1.0, False))
    weight_decay: float = _flag(0.0, "AdamW weight decay", type=non_negative_float)
    epochs: int = _flag(4, "passes over the training split", type=positive_int)
    max_steps: int | None = _flag(None, "stop after this many steps (default: all epochs)", type=positive_int)
    batch_size: int = _flag(32, "examples per step (global, over every device)", type=positive_int)
    length_groups: int = _flag(4, "each batch is sorted by length and run as this many groups of rows, each padded "
                               "to its own longest row: the same gradient over fewer padded tokens (1: one group)",
                               type=positive_int)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The run itself: its seed, directory, devices and processes, checkpoints, logging and reports."""

    seed: int = _flag(0, "seed of the projections, the data order, dropout and a new head (the split's: "
                      "--data-seed)", type=seed_int)
    output_dir: str = _flag("runs/latest", "the run directory (a run there resumes from its last checkpoint)")
    mesh: str = _flag("auto", "devices as DATAxFSDP, e.g. '8x1' or '4x2'; 'auto' puts every device on data",
                      type=_mesh, commands=ON_MESH)
    checkpoint_every: int = _flag(100, "steps between checkpoints", type=positive_int, commands=ON_MESH)
    keep_checkpoints: int = _flag(2, "checkpoints kept", type=positive_int, commands=ON_MESH)
    log_every: int = _flag(10, "steps between logged losses", type=positive_int)
    eval_batch_size: int = _flag(128, "examples per evaluation batch", type=positive_int)
    eval_every: int | None = _flag(None, "steps between validations, besides the one at the end of every epoch",
                                   type=positive_int, commands=frozenset({CLASSIFY}))
    keep_best: bool = _flag(False, "keep the adapter of the best validation accuracy, not the last one",
                            commands=frozenset({CLASSIFY}))
    baseline: bool = _flag(False, "also train the head alone on the same split and report it",
                           commands=frozenset({CLASSIFY}))
    answers: int = _flag(4, "held-out questions answered greedily before and after tuning", type=positive_int,
                         commands=frozenset({CAUSAL_LM}))
    max_new_tokens: int = _flag(48, "length limit of those answers", type=positive_int,
                                commands=frozenset({CAUSAL_LM}))
    coordinator: str | None = _flag(None, "multi-host: HOST:PORT of process 0 (with --num-processes, --process-id)",
                                    type=_address, commands=ON_MESH)
    num_processes: int = _flag(1, "multi-host: number of processes", type=positive_int, commands=ON_MESH)
    process_id: int = _flag(0, "multi-host: this process's index", type=non_negative_int, commands=ON_MESH)


PARTS = {"data": DataOptions, "model": ModelOptions, "optim": OptimOptions, "run": RunOptions}
PART_TITLES = {"data": "data", "model": "model and adapter", "optim": "optimisation", "run": "run"}  # --help's groups


def _flag_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """``{flag dest: (part, field)}`` of every flag: the dest is the field's name unless its metadata names one."""
    return {field.metadata["dest"] or field.name: (part, field)
            for part, cls in PARTS.items() for field in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class Options:
    """A fine-tuning run (the defaults are the README's main job), in four parts built when the flags are parsed;
    each function takes the part it needs. `get`, `replace` and `flat` name a setting by its flag (``"d_initial"``
    for ``--d-initial``)."""

    data: DataOptions = DataOptions()
    model: ModelOptions = ModelOptions()
    optim: OptimOptions = OptimOptions()
    run: RunOptions = RunOptions()

    def get(self, dest: str):
        """The value of flag ``dest``."""
        part, field = FLAG_FIELDS[dest]
        return getattr(getattr(self, part), field.name)

    def replace(self, **values) -> Options:
        """A copy with the flags named by ``values`` (dests) set."""
        by_part: dict[str, dict] = {}
        for dest, value in values.items():
            part, field = FLAG_FIELDS[dest]
            by_part.setdefault(part, {})[field.name] = value
        return dataclasses.replace(self, **{part: dataclasses.replace(getattr(self, part), **changes)
                                            for part, changes in by_part.items()})

    def flat(self) -> dict:
        """``{flag dest: value}`` of every flag (JSON-ready: tuples as lists)."""
        return {dest: list(value) if isinstance(value, tuple) else value
                for dest, value in ((dest, self.get(dest)) for dest in FLAG_FIELDS)}


FLAG_FIELDS = _flag_fields()


# The options a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "dataset", "text_column", "label_column", "task", "num_labels", "r", "targets", "head",
               "d_initial", "b_initial", "dropout", "projection_init", "projection_sharing", "train_vectors",
               "lr_vectors", "lr_head", "schedule", "warmup_ratio", "weight_decay", "epochs", "max_steps",
               "batch_size", "length_groups", "max_length", "pad_multiple", "test_fraction", "validation_fraction",
               "test_files", "validation_files", "data_seed", "seed", "path", "base_dtype", "chat_template",
               "backend", "eval_every", "keep_best")

# `python -m train causal-lm`: SmolLM2-135M-Instruct on the chatterbot question/answer pairs, VeRA on
# every linear layer of every decoder block, loss on the answer tokens only. Whole batches (one length group,
# padded to a multiple of 16): the README's causal-LM numbers are measured so.
CAUSAL_LM_DEFAULTS = Options().replace(
    model="smollm2", dataset="chatterbot", text_column="question", label_column="answer", task="causal-lm",
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), head=(),
    lr_vectors=1e-2, epochs=1, batch_size=8, max_length=128, eval_batch_size=16, test_fraction=0.1,
    validation_fraction=0.0,
    output_dir="runs/causal-lm", checkpoint_every=50, log_every=5, length_groups=1, pad_multiple=16,
)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def add_options(parser: argparse.ArgumentParser, command: str, defaults: Options = Options(),
                several: Iterable[str] = ()) -> None:
    """The flags ``command`` takes, with ``defaults``; the fields in ``several`` take one or more values
    (a sweep's grid axes), also spelled in the plural (``--projection-inits``)."""
    several = set(several)
    groups = {part: parser.add_argument_group(title) for part, title in PART_TITLES.items()}
    for dest, (part, field) in FLAG_FIELDS.items():
        spec = field.metadata
        if command not in spec["commands"]:
            continue
        flag, default = flag_name(dest), defaults.get(dest)
        names = [flag] + ([flag + "s"] if dest in several and not flag.endswith("s") else [])
        kwargs = {"help": spec["help"], "default": default}
        if isinstance(default, bool):
            groups[part].add_argument(*names, action="store_true", **kwargs)
            continue
        if spec["choices"]:
            kwargs["choices"] = spec["choices"]
        if spec["type"]:
            kwargs["type"] = spec["type"]
        if dest in several:
            kwargs.update(nargs="+", default=[default], metavar=dest.upper())
            if spec["choices"]:
                kwargs["help"] += f"; one or more of {', '.join(spec['choices'])}"
        elif spec["nargs"]:
            kwargs.update(nargs=spec["nargs"], default=list(default), metavar="NAME")
        groups[part].add_argument(*names, dest=dest, **kwargs)


def from_args(args: argparse.Namespace, defaults: Options = Options(), check: bool = True) -> Options:
    """The `Options` of parsed flags (fields a command does not take keep ``defaults``), checked together.

    Raises:
      FlagError: flags that do not fit together (`check_options`).
    """
    values = {dest: getattr(args, dest) for dest in FLAG_FIELDS if hasattr(args, dest)}
    options = defaults.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if check:
        check_options(options)
    return options


# VeraConfig fields -> the Options fields that set them, to name the flags in VeraConfig's errors.
_CONFIG_FIELDS = {"target_modules": "targets", "modules_to_save": "head", "projection_seed": "seed", "r": "r",
                  "d_initial": "d_initial", "b_initial": "b_initial", "dropout": "dropout",
                  "projection_init": "projection_init", "projection_sharing": "projection_sharing",
                  "train_vectors": "train_vectors"}


def vera_config(options: Options, kernel_axes: tuple[tuple[str, str], ...] = ()) -> vera_jax.VeraConfig:
    """The adapter the flags describe (``kernel_axes``: GPT-2's ``FlaxConv1D`` kernels are (out, in), ``"oi"``).

    Raises:
      FlagError: VeraConfig refuses the combination (e.g. --train-vectors lambda_d with --b-initial 0).
    """
    model = options.model
    try:
        return vera_jax.VeraConfig(
            r=model.r, target_modules=model.targets, modules_to_save=model.head, d_initial=model.d_initial,
            b_initial=model.b_initial, dropout=model.dropout, projection_seed=options.run.seed,
            projection_init=model.projection_init, projection_sharing=model.projection_sharing,
            train_vectors=model.train_vectors, kernel_axes=kernel_axes)
    except (TypeError, ValueError) as err:
        named = [name for field, name in _CONFIG_FIELDS.items() if re.search(rf"\b{field}\b", str(err))]
        flags = ", ".join(f"{flag_name(name)} {_shown(options.get(name))}" for name in named) or "the VeRA flags"
        raise FlagError(f"{flags}: {err}") from None


def check_options(options: Options) -> None:
    """Checks across flags, before any model or data loads.

    Raises:
      FlagError: naming the flags and what would work.
    """
    vera_config(options)
    data, model, run = options.data, options.model, options.run
    if not run.output_dir.strip():
        raise FlagError("--output-dir is empty, which would write the run into the current directory; name a run "
                        "directory, such as runs/latest.")
    if not data.dataset.strip():
        raise FlagError("--dataset is empty; give 'default', 'chatterbot', a datasets hub name or local files.")
    if model.backend != "linen":
        if model.path not in NNX_PATHS:
            raise FlagError(f"--path {model.path} is not offered with --backend {model.backend}; use one of "
                            f"{', '.join(NNX_PATHS)}, or --backend linen.")
        if data.task == "causal-lm" and model.head:
            raise FlagError(f"--backend {model.backend} trains no causal LM's modules in full (--head); drop it, or "
                            "use --backend linen.")
    if model.scan_remat is not None and model.backend != "nnx":
        raise FlagError(f"--scan-remat {model.scan_remat} applies to the scanned NNX model (--backend nnx); drop it "
                        f"with --backend {model.backend}.")
    if model.dropout > 0 and model.path == "merged":
        raise FlagError(f"--dropout {model.dropout:g} acts on each adapted layer's input, which --path merged "
                        "never computes; use --path activation, activation-lean or auto.")
    if run.process_id >= run.num_processes:
        raise FlagError(f"--process-id {run.process_id} must be below --num-processes {run.num_processes}.")
    if run.num_processes > 1 and not run.coordinator:
        raise FlagError(f"--num-processes {run.num_processes} needs --coordinator HOST:PORT (process 0's address).")
    if data.chat_template is not None and not Path(data.chat_template).is_file():
        raise FlagError(f"--chat-template {data.chat_template} is not a file; give a Jinja chat-template file.")
    if run.baseline and not model.head:
        raise FlagError("--baseline trains the head alone, but --head names no module to train.")
