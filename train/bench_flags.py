"""The flags and descriptions of ``python -m train bench`` and ``bench-multi``: what the command line needs of the
benchmarks without importing one (`train.__main__` loads a benchmark only when its command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.options import non_negative_float, non_negative_int, positive_float, positive_int, seed_int

__all__ = ["BENCH", "BENCH_MULTI", "BenchError", "LLAMA_LINEAR", "WORKLOADS", "MULTI_WORKLOADS", "add_bench_arguments",
           "add_multi_arguments"]

BENCH = """``python -m train bench``: VeRA training step time and memory, side by side in one run.

Variants, all on the same model, batch and sequence length, each one jitted step with donated state:
merged, activation, activation-lean (custom VJP), auto (the path whose whole gradient step
`vera_jax.whole_step_plan` timed faster here), the floor
(the frozen model with gradients flowing back through every layer but no weight gradients: only a
vector scaling the embedding output is trained) and, when torch and peft import, PEFT's VeRA in
PyTorch. The model's own dropout is on in every variant, PEFT's included, as when training
(``--no-dropout`` runs them all in eval mode). Steps are timed in rounds (one step of each variant
per round, in a shuffled order, after a short idle pause) so that machine noise falls on all of them
alike; the medians and their ratios are printed and written as JSON.

Workloads (``--workload``): ``minilm`` (all-MiniLM-L6-v2 classification, VeRA on query/value, batch
32 x 128) and ``smollm2`` (SmolLM2-135M causal LM, VeRA on every linear layer, batch 8 x 128,
next-token loss on every position); each flag below overrides the workload's value. The causal-LM
workload also times the NNX backend's compile, step and memory, layers listed against scanned with each
rematerialisation policy (`train.bench.nnx`).
"""

BENCH_MULTI = """``python -m train bench-multi``: many adapters at once, against one adapter at a time.

- Training: K adapters (K = 1, 4, 16), each on its own batch, trained by one compiled step against one
  frozen base and one A/B, against K sequential steps of one adapter (time, and XLA's compiled peak
  memory). The step is measured as ``python -m train sweep`` runs it (`vera_jax.map_adapters`,
  vmapped ``--adapters-per-pass`` at a time, by default `vera_jax.adapters_per_pass`) and with all K
  vmapped at once; and against PEFT in PyTorch training K adapters as its users do (one PeftModel,
  ``set_adapter`` in turn, each on its own batch, an optimizer per adapter). A grid over one data order
  (learning rates, d_initial) feeds all K the same batch: that program is timed too (``shared``).
- Serving: one batch in which N distinct adapters (N = 1, 16, 256) are mixed, one per example id,
  against the same batch run with a single adapter on the activation path, and against PEFT in PyTorch
  serving the same adapters as it serves VeRA: grouped by adapter, one forward each
  (`train.bench.multi_peft`).
Every program is compiled and run once first; then all are timed in rounds (one call each per round,
shuffled), and the medians are printed and written as JSON with ``--json``.
"""

JOB_PEERS = ("peft_vera", "peft_lora")  # bench --job: the jobs in PyTorch beside ours
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKLOADS = {  # bench: flags left unset take the workload's values
    "minilm": {"model": "default", "task": "classification", "targets": ["query", "value"], "batch_size": 32,
               "seq_len": 128},
    "smollm2": {"model": "smollm2", "task": "causal-lm", "targets": LLAMA_LINEAR, "batch_size": 8, "seq_len": 128},
}
MULTI_WORKLOADS = {  # bench-multi: flags left unset take the workload's values
    "minilm": {"model": "default", "targets": ["query", "value"], "ns": [1, 16, 256], "serve_batch": 256,
               "serve_seq_len": 32},
    "smollm2": {"model": "smollm2", "targets": LLAMA_LINEAR, "ns": [1, 16], "serve_batch": 16, "serve_seq_len": 64},
}


class BenchError(ValueError):
    """The benchmark cannot run as asked."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--model", help="'default' (all-MiniLM-L6-v2), 'smollm2', a hub id or a directory "
                        "(default: the workload's)")
    parser.add_argument("--task", choices=["classification", "causal-lm"], help="default: the workload's")
    parser.add_argument("--batch-size", type=positive_int, help="default: the workload's")
    parser.add_argument("--seq-len", type=positive_int, help="default: the workload's")
    parser.add_argument("--r", type=positive_int, default=256, help="VeRA rank")
    parser.add_argument("--targets", nargs="+", help="default: the workload's")
    parser.add_argument("--base-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the frozen base (the adapter path stays float32)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per variant after compiling")
    parser.add_argument("--settle", type=non_negative_float, default=0.3, help="idle seconds before each timed step")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT in PyTorch")
    parser.add_argument("--no-nnx", action="store_true",
                        help="causal-lm: skip the NNX table (compile and step, layers listed vs scanned)")
    parser.add_argument("--no-dropout", action="store_true",
                        help="run every variant, PEFT's too, in eval mode: no dropout in the model (by default "
                             "the model's own dropout is on in all of them, as when training)")
    parser.add_argument("--startup", action="store_true",
                        help="instead: time to the first training step of the main job and the causal LM, each "
                             "launched twice as a user would, with JAX's compilation cache cold then warm "
                             "(`train.bench.startup`; about 2 minutes here)")
    parser.add_argument("--job", action="store_true",
                        help="instead: the whole main job (python -m train) against the same recipe with PEFT's VeRA "
                             "and PEFT's LoRA in PyTorch, one after the other (`train.bench.job`; about 20 minutes "
                             "a seed here)")
    parser.add_argument("--job-flags", default="", help="--job: flags for every job, as python -m train takes them")
    parser.add_argument("--seeds", type=seed_int, nargs="+",
                        help="--job: run every job once with each training seed (--seed) and report mean and "
                             "standard deviation (default: the --job-flags' seed, once)")
    parser.add_argument("--peers", nargs="*", choices=JOB_PEERS, default=list(JOB_PEERS),
                        help="--job: the jobs in PyTorch run beside ours (default: both)")
    parser.add_argument("--lora-rank", type=positive_int, default=8, help="--job: the rank of PEFT's LoRA peer")
    parser.add_argument("--lora-lr", type=positive_float, default=5e-4,
                        help="--job: the learning rate of PEFT's LoRA peer (the head's: --lr-head)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def add_multi_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(MULTI_WORKLOADS), default="minilm",
                        help="minilm: training and serving on all-MiniLM-L6-v2 (linen); smollm2: mixed-adapter "
                        "serving on the scanned NNX SmolLM2")
    parser.add_argument("--model", help="'default' (all-MiniLM-L6-v2), 'smollm2', a hub id or a directory")
    parser.add_argument("--r", type=positive_int, default=256, help="VeRA rank")
    parser.add_argument("--targets", nargs="+", help="modules VeRA adapts")
    parser.add_argument("--ks", type=positive_int, nargs="+", default=[1, 4, 16], help="adapters trained at once")
    parser.add_argument("--train-batch", type=positive_int, default=8, help="examples per adapter per step")
    parser.add_argument("--train-seq-len", type=positive_int, default=64)
    parser.add_argument("--adapters-per-pass", type=positive_int, help="adapters vmapped together (default: chosen "
                        "for the device by vera_jax.adapters_per_pass)")
    parser.add_argument("--ns", type=positive_int, nargs="+", help="distinct adapters in a batch")
    parser.add_argument("--serve-batch", type=positive_int)
    parser.add_argument("--serve-seq-len", type=positive_int)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT in PyTorch as the serving peer (it groups "
                        "a batch by adapter: one forward per adapter, as PEFT serves VeRA)")
    parser.add_argument("--json", type=Path, help="also write the results here")
