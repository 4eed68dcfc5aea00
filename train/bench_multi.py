"""``python -m train bench-multi``: many adapters at once, against one adapter at a time.

- Training: K adapters (K = 1, 4, 16), each on its own batch, trained by one compiled step against one
  frozen base and one A/B, against K sequential steps of one adapter (time, and XLA's compiled peak
  memory). The step is measured as ``python -m train sweep`` runs it (`vera_jax.map_adapters`,
  vmapped ``--adapters-per-pass`` at a time, by default `vera_jax.adapters_per_pass`) and with all K
  vmapped at once.
- Serving: one batch in which N distinct adapters (N = 1, 16, 256) are mixed, one per example id,
  against the same batch run with a single adapter on the activation path.
Every program is compiled and run once first; then all are timed in rounds (one call each per round,
shuffled), and the medians are printed and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vera_jax
from train.bench import peak_bytes, time_in_rounds
from train.metrics import write_json
from train.model import load_classifier

__all__ = ["parse_args", "bench_multi"]


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train bench-multi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--targets", nargs="+", default=["query", "value"])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="adapters trained at once")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=64)
    parser.add_argument("--adapters-per-pass", type=int, help="adapters vmapped together (default: chosen for "
                        "the device by vera_jax.adapters_per_pass)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 16, 256], help="distinct adapters in a batch")
    parser.add_argument("--serve-batch", type=int, default=256)
    parser.add_argument("--serve-seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.adapters_per_pass is not None and args.adapters_per_pass < 1:
        parser.error(f"--adapters-per-pass must be at least 1, got {args.adapters_per_pass}.")
    return args


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)
    return {"input_ids": rng.integers(low, vocab, (batch, seq_len), np.int32),
            "attention_mask": np.ones((batch, seq_len), np.int32),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}


class _Training:
    """A jitted, donated training step of one adapter (k=None) or of k stacked adapters, each on its own
    batch (stacked on the adapter axis, as a sweep feeds them), and its state."""

    def __init__(self, train_step: Callable, base: dict, tx, batch: dict, k: int | None, per_pass: int | None):
        if k is None:
            trainable, step = jax.tree.map(jnp.copy, base), train_step  # its own buffers: the step donates them
        else:
            trainable, step = vera_jax.stack([base] * k), vera_jax.map_adapters(train_step, (0, 0, 0), per_pass)
        self.state = (trainable, (tx.init if k is None else jax.vmap(tx.init))(trainable))
        self.step, self.batch = jax.jit(step, donate_argnums=(0, 1)), batch
        self.peak_bytes = peak_bytes(self.step.lower(*self.state, batch).compile())

    def __call__(self) -> None:
        self.state = jax.block_until_ready(self.step(*self.state, self.batch))


def bench_multi(args: argparse.Namespace) -> dict:
    model, _ = load_classifier(args.model, 2)
    params = model.params
    config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets), trainable=("classifier",))
    projections = vera_jax.init_projections(params, vera_jax.projection_key(config), config)
    base = vera_jax.init_trainable(params, config)
    tx = optax.adam(1e-3)

    def call(p, batch):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], params=p).logits

    def train_step(trainable, opt_state, batch):
        def loss_fn(t):
            logits = vera_jax.adapt(call, t, projections, path="merged")(params, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    def train_batches(k: int) -> dict:  # k distinct batches on a leading adapter axis
        return jax.device_put(vera_jax.stack([_batch(model.config.vocab_size, args.train_batch, args.train_seq_len,
                                                     seed) for seed in range(k)]))

    per_pass = args.adapters_per_pass or vera_jax.adapters_per_pass(args.train_batch * args.train_seq_len)
    runners = {"single": _Training(train_step, base, tx, vera_jax.unstack(train_batches(1))[0], None, None)}
    for k in args.ks:
        runners[f"passes {k}"] = _Training(train_step, base, tx, train_batches(k), k, per_pass)
        if per_pass is not None and per_pass < k:
            runners[f"at once {k}"] = _Training(train_step, base, tx, train_batches(k), k, None)

    serve_batch = jax.device_put(_batch(model.config.vocab_size, args.serve_batch, args.serve_seq_len, seed=1))
    one = jax.jit(lambda p, b: vera_jax.adapt(call, base, projections, path="activation")(p, b))
    runners["one adapter"] = lambda: jax.block_until_ready(one(params, serve_batch))
    mixed = jax.jit(lambda p, b, s, i: vera_jax.adapt_mixed(call, s, projections, i)(p, b))
    for n in args.ns:
        stacked, ids = vera_jax.stack([base] * n), jax.device_put(np.arange(args.serve_batch) % n)
        runners[f"mixed {n}"] = (lambda s, i: lambda: jax.block_until_ready(mixed(params, serve_batch, s, i)))(
            stacked, ids)

    median = {name: statistics.median(t) for name, t in time_in_rounds(runners, args.repeats).items()}
    training = {}
    for k in args.ks:
        passes, at_once = runners[f"passes {k}"], runners.get(f"at once {k}", runners[f"passes {k}"])
        seconds, at_once_seconds = median[f"passes {k}"], median.get(f"at once {k}", median[f"passes {k}"])
        sequential = k * median["single"]
        training[k] = {"adapters_per_pass": min(per_pass or k, k), "vmapped_seconds": seconds,
                       "sequential_seconds": sequential, "speedup": sequential / seconds,
                       "all_at_once_seconds": at_once_seconds, "all_at_once_speedup": sequential / at_once_seconds,
                       "vmapped_peak_bytes": passes.peak_bytes, "all_at_once_peak_bytes": at_once.peak_bytes,
                       "sequential_peak_bytes": runners["single"].peak_bytes}
    serving = {n: {"mixed_seconds": median[f"mixed {n}"], "single_adapter_seconds": median["one adapter"],
                   "ratio": median[f"mixed {n}"] / median["one adapter"]} for n in args.ns}

    results = {
        "workload": {"model": args.model, "r": args.r, "targets": list(args.targets),
                     "train_batch": [args.train_batch, args.train_seq_len],
                     "serve_batch": [args.serve_batch, args.serve_seq_len], "repeats": args.repeats},
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "training": training, "serving": serving,
    }
    results |= {f"vmap_speedup_k{k}": v["speedup"] for k, v in training.items()}
    results |= {f"all_at_once_speedup_k{k}": v["all_at_once_speedup"] for k, v in training.items()}
    results |= {f"mixed_batch_ratio_{n}": v["ratio"] for n, v in serving.items()}
    _print(results)
    if args.json:
        write_json(args.json, results)
    return results


def _print(results: dict) -> None:
    print(f"{results['workload']} on {results['device']}")
    print(f"{'K adapters':<12}{'per pass':>9}{'one program':>14}{'K sequential':>14}{'speedup':>9}{'peak':>10}"
          f"{'all at once':>14}{'speedup':>9}{'peak':>10}")
    for k, row in results["training"].items():
        print(f"{k:<12}{row['adapters_per_pass']:>9}{row['vmapped_seconds'] * 1e3:>11.1f} ms"
              f"{row['sequential_seconds'] * 1e3:>11.1f} ms{row['speedup']:>9.2f}"
              f"{row['vmapped_peak_bytes'] / 2**20:>6.0f} MiB{row['all_at_once_seconds'] * 1e3:>11.1f} ms"
              f"{row['all_at_once_speedup']:>9.2f}{row['all_at_once_peak_bytes'] / 2**20:>6.0f} MiB")
    print(f"{'N in batch':<12}{'mixed':>14}{'one adapter':>14}{'ratio':>9}")
    for n, row in results["serving"].items():
        print(f"{n:<12}{row['mixed_seconds'] * 1e3:>11.1f} ms{row['single_adapter_seconds'] * 1e3:>11.1f} ms"
              f"{row['ratio']:>9.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items() if k.startswith(("vmap_", "all_at", "mixed_"))}))
