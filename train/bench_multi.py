"""``python -m train bench-multi``: many adapters at once, against one adapter at a time.

- Training: K adapters (K = 1, 4, 16) trained by one ``jax.vmap``-ed step against one frozen base and
  one A/B, against K sequential steps of one adapter (time, and XLA's compiled peak memory).
- Serving: one batch in which N distinct adapters (N = 1, 16, 256) are mixed, one per example id,
  against the same batch run with a single adapter on the activation path.
Medians over timed repeats after a compiling call; written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax

import vera_jax
from train.bench import _peak_bytes
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
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 16, 256], help="distinct adapters in a batch")
    parser.add_argument("--serve-batch", type=int, default=256)
    parser.add_argument("--serve-seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def _median_seconds(run, repeats: int) -> float:
    jax.block_until_ready(run())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)
    return {"input_ids": rng.integers(low, vocab, (batch, seq_len), np.int32),
            "attention_mask": np.ones((batch, seq_len), np.int32),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}


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

    train_batch = jax.device_put(_batch(model.config.vocab_size, args.train_batch, args.train_seq_len))
    single = jax.jit(train_step)
    single_state = (base, tx.init(base))
    single_seconds = _median_seconds(lambda: single(*single_state, train_batch), args.repeats)
    single_peak = _peak_bytes(single.lower(*single_state, train_batch).compile())
    training = {}
    for k in args.ks:
        stacked = vera_jax.stack([base] * k)
        state = (stacked, jax.vmap(tx.init)(stacked))
        vmapped = jax.jit(jax.vmap(train_step, in_axes=(0, 0, None)))
        seconds = _median_seconds(lambda: vmapped(*state, train_batch), args.repeats)
        training[k] = {"vmapped_seconds": seconds, "sequential_seconds": k * single_seconds,
                       "speedup": k * single_seconds / seconds,
                       "vmapped_peak_bytes": _peak_bytes(vmapped.lower(*state, train_batch).compile()),
                       "sequential_peak_bytes": single_peak}

    serve_batch = jax.device_put(_batch(model.config.vocab_size, args.serve_batch, args.serve_seq_len, seed=1))
    one = jax.jit(lambda p, b: vera_jax.adapt(call, base, projections, path="activation")(p, b))
    one_seconds = _median_seconds(lambda: one(params, serve_batch), args.repeats)
    serving = {}
    for n in args.ns:
        stacked = vera_jax.stack([base] * n)
        ids = jax.device_put(np.arange(args.serve_batch) % n)
        mixed = jax.jit(lambda p, b, s, i: vera_jax.adapt_mixed(call, s, projections, i)(p, b))
        seconds = _median_seconds(lambda: mixed(params, serve_batch, stacked, ids), args.repeats)
        serving[n] = {"mixed_seconds": seconds, "single_adapter_seconds": one_seconds, "ratio": seconds / one_seconds}

    results = {
        "workload": {"model": args.model, "r": args.r, "targets": list(args.targets),
                     "train_batch": [args.train_batch, args.train_seq_len],
                     "serve_batch": [args.serve_batch, args.serve_seq_len], "repeats": args.repeats},
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "training": training, "serving": serving,
    }
    results |= {f"vmap_speedup_k{k}": v["speedup"] for k, v in training.items()}
    results |= {f"mixed_batch_ratio_{n}": v["ratio"] for n, v in serving.items()}
    _print(results)
    if args.json:
        write_json(args.json, results)
    return results


def _print(results: dict) -> None:
    print(f"{results['workload']} on {results['device']}")
    print(f"{'K adapters':<12}{'vmapped step':>14}{'K sequential':>14}{'speedup':>9}{'peak vmapped':>14}")
    for k, row in results["training"].items():
        print(f"{k:<12}{row['vmapped_seconds'] * 1e3:>11.1f} ms{row['sequential_seconds'] * 1e3:>11.1f} ms"
              f"{row['speedup']:>9.2f}{row['vmapped_peak_bytes'] / 2**20:>10.0f} MiB")
    print(f"{'N in batch':<12}{'mixed':>14}{'one adapter':>14}{'ratio':>9}")
    for n, row in results["serving"].items():
        print(f"{n:<12}{row['mixed_seconds'] * 1e3:>11.1f} ms{row['single_adapter_seconds'] * 1e3:>11.1f} ms"
              f"{row['ratio']:>9.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items() if k.startswith(("vmap_", "mixed_"))}))
