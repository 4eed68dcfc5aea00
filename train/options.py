"""Every choice a user makes about a training run, parsed from the command line.

One `Options` serves both jobs: `python -m train` (classification, the defaults below) and
`python -m train causal-lm` (`CAUSAL_LM_DEFAULTS`), where --text-column names the prompt
(question) column and --label-column the answer column.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

__all__ = ["Options", "parse_options", "RESUME_KEYS", "CAUSAL_LM_DEFAULTS"]


@dataclasses.dataclass(frozen=True)
class Options:
    """A fine-tuning run (the defaults are the README's main job)."""

    model: str = "default"  # 'default' (packaged all-MiniLM-L6-v2), a hub id, or a local directory
    dataset: str = "default"  # 'default' (packaged movie-review sentences), a datasets hub name, or local files
    text_column: str = "text"
    label_column: str = "label"
    task: str = "classification"  # or 'regression'; 'causal-lm' for `python -m train causal-lm`
    num_labels: int | None = None  # classification: inferred from the training labels when not given
    r: int = 256
    targets: tuple[str, ...] = ("query", "value")
    head: tuple[str, ...] = ("classifier",)  # modules trained in full, like PEFT's modules_to_save
    d_initial: float = 0.1
    b_initial: float = 0.0
    dropout: float = 0.0
    # The paper's ablations (vera_jax.VeraConfig documents each): the defaults are VeRA as PEFT runs it.
    projection_init: str = "kaiming_uniform"  # or 'kaiming_normal', 'uniform'
    projection_sharing: str = "shared"  # or 'per_layer'
    train_vectors: str = "both"  # or 'lambda_d', 'lambda_b'
    lr_vectors: float = 1e-2
    lr_head: float = 4e-3
    schedule: str = "linear"  # 'linear' | 'cosine' | 'constant', after a linear warmup
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 64
    test_fraction: float = 0.2
    seed: int = 0
    mesh: str = "auto"  # 'DATAxFSDP', e.g. '8x1' or '4x2'; 'auto' puts every device on the data axis
    strategy: str = "merged"  # 'merged' | 'activation' | 'activation-lean' | 'auto' (the faster whole step, timed)
    output_dir: str = "runs/latest"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    baseline: bool = False  # also train the head alone on the same split and report it
    base_dtype: str = "float32"  # causal-lm: 'bfloat16' stores and runs the frozen base in bfloat16
    chat_template: str | None = None  # causal-lm: a Jinja chat-template file, for models that ship none
    answers: int = 4  # causal-lm: held-out questions answered greedily before and after tuning
    max_new_tokens: int = 48  # causal-lm: length limit of those answers
    log_every: int = 10
    eval_batch_size: int = 128
    coordinator: str | None = None  # multi-host: 'HOST:PORT' of process 0, with num_processes and process_id
    num_processes: int = 1
    process_id: int = 0


# The options a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "dataset", "text_column", "label_column", "task", "num_labels", "r", "targets", "head",
               "d_initial", "b_initial", "dropout", "projection_init", "projection_sharing", "train_vectors",
               "lr_vectors", "lr_head", "schedule", "warmup_ratio", "weight_decay", "epochs", "max_steps",
               "batch_size", "max_length", "test_fraction", "seed", "strategy", "base_dtype", "chat_template")

# `python -m train causal-lm`: SmolLM2-135M-Instruct on the chatterbot question/answer pairs, VeRA on
# every linear layer of every decoder block, loss on the answer tokens only.
CAUSAL_LM_DEFAULTS = Options(
    model="smollm2", dataset="chatterbot", text_column="question", label_column="answer", task="causal-lm",
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), head=(),
    lr_vectors=1e-2, epochs=1, batch_size=8, max_length=128, eval_batch_size=16, test_fraction=0.1,
    output_dir="runs/causal-lm", checkpoint_every=50, log_every=5,
)


def _parser(defaults: Options, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune a Hugging Face Flax model with VeRA.")
    for field in dataclasses.fields(Options):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=list(default), metavar="NAME")
        else:
            kind = {"num_labels": int, "max_steps": int, "coordinator": str, "chat_template": str}.get(
                field.name, type(default))
            parser.add_argument(flag, type=kind, default=default)
    return parser


def parse_options(argv: Sequence[str] | None = None, defaults: Options = Options(),
                  prog: str = "python -m train") -> Options:
    values = vars(_parser(defaults, prog).parse_args(argv))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return Options(**values)
