"""Many adapters at once: ``python -m train bench-multi``, as `train.bench_flags.BENCH_MULTI` describes it."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vera_jax
from train.bench.compiled import CompiledStep
from train.bench_flags import MULTI_WORKLOADS
from train.engine import steps
from train.engine.metrics import write_json
from train.models.load import lacks_torch_weights, load_classifier, model_source
from vera_jax.timing import time_in_rounds

__all__ = ["command", "bench_multi"]

CHECKED_ADAPTERS = 4  # serving: adapters whose rows of the mixed batch are checked against the adapter alone


def command(args: argparse.Namespace) -> None:
    for name, value in MULTI_WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.workload == "smollm2":
        from train.bench.multi_nnx import bench_multi_smollm2

        results = bench_multi_smollm2(args)
        _print_serving(results)
        if args.json:
            write_json(args.json, results)
        return
    bench_multi(args)


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    low = min(1000, vocab // 2)
    return {"input_ids": rng.integers(low, vocab, (batch, seq_len), np.int32),
            "attention_mask": np.ones((batch, seq_len), np.int32),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}


def _max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _training(train_step: Callable, adapter: vera_jax.Adapter, tx, params, batch: dict, k: int | None,
              per_pass: int | None, shared: bool = False) -> CompiledStep:
    """The training step (`train.engine.steps.make_train_step`) of one adapter (k=None) or of k stacked adapters,
    each on its own batch (stacked on the adapter axis, as a sweep over seeds feeds them) or all on one
    (``shared``: a grid over one data order; the work before the first adapted layer runs once)."""
    if k is None:
        return CompiledStep(train_step, (adapter, tx.init(adapter.trainable)), (params, batch, None))
    stacked = vera_jax.stack([adapter] * k)
    step = vera_jax.map_adapters(train_step, (0, 0, None, None if shared else 0, None), per_pass)
    return CompiledStep(step, (stacked, jax.vmap(tx.init)(stacked.trainable)), (params, batch, None))


def bench_multi(args: argparse.Namespace) -> dict:
    model, _ = load_classifier(args.model, 2)
    params = model.params
    config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets), modules_to_save=("classifier",))
    adapter = vera_jax.init_adapter(params, config)
    tx = optax.adam(1e-3)
    # Runs and sweeps train with this step; the base model in eval mode (rng None), as serving runs it.
    train_step = steps.make_train_step(model.vera_logits("merged", config), tx, "classification")

    def train_batches(k: int) -> dict:  # k distinct batches on a leading adapter axis
        batches = [_batch(model.config.vocab_size, args.train_batch, args.train_seq_len, seed) for seed in range(k)]
        return jax.device_put(jax.tree.map(lambda *rows: np.stack(rows), *batches))

    per_pass = args.adapters_per_pass or vera_jax.adapters_per_pass(args.train_batch * args.train_seq_len)
    single_batch = jax.tree.map(lambda x: x[0], train_batches(1))
    runners = {"single": _training(train_step, adapter, tx, params, single_batch, None, None)}
    for k in args.ks:
        runners[f"passes {k}"] = _training(train_step, adapter, tx, params, train_batches(k), k, per_pass)
        if per_pass is not None and per_pass < k:
            runners[f"at once {k}"] = _training(train_step, adapter, tx, params, train_batches(k), k, None)
        if k > 1:
            runners[f"shared {k}"] = _training(train_step, adapter, tx, params, single_batch, k, per_pass, shared=True)

    serve_batch = jax.device_put(_batch(model.config.vocab_size, args.serve_batch, args.serve_seq_len, seed=1))
    # Serving: the model in eval mode, one adapter for the whole batch or one per example.
    one, mixed = model.vera_logits("activation", config), model.mixed_logits(config)
    runners["one adapter"] = CompiledStep(one, args=(params, adapter, serve_batch, None))
    served = {}
    for n in args.ns:  # n distinct adapters: each vector and head leaf drawn around the initial one
        keys = iter(jax.random.split(jax.random.key(n), len(jax.tree.leaves(adapter.trainable))))
        stacked = adapter.replace(trainable=jax.tree.map(
            lambda x: x[None] + 0.1 * jax.random.normal(next(keys), (n, *x.shape), x.dtype), adapter.trainable))
        ids = jax.device_put(np.arange(args.serve_batch) % n)
        served[n] = (stacked, ids)
        runners[f"mixed {n}"] = CompiledStep(mixed, args=(params, stacked, ids, serve_batch))

    peers = _peft_peers(args, params, serve_batch, served) if not args.no_peft else {}
    runners |= {f"peft {n}": peer for n, peer in peers.items()}
    sweepers = _peft_sweepers(args, {k: _batch_of(runners[f"passes {k}"]) for k in args.ks}) if not args.no_peft else {}
    runners |= {f"peft sweep {k}": sweeper for k, sweeper in sweepers.items()}
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
                       "sequential_peak_bytes": runners["single"].peak_bytes,
                       "max_difference_from_single_steps": _training_difference(runners, k, params)}
        if k > 1:
            training[k] |= {"shared_batch_seconds": median[f"shared {k}"],
                            "shared_batch_speedup": sequential / median[f"shared {k}"]}
        if k in sweepers:
            training[k] |= {"peft_seconds": median[f"peft sweep {k}"], "vs_peft": median[f"peft sweep {k}"] / seconds}
            if k > 1:  # PEFT's K steps cost the same whoever's batch each one runs
                training[k]["shared_vs_peft"] = median[f"peft sweep {k}"] / median[f"shared {k}"]
    serving = {n: {"mixed_seconds": median[f"mixed {n}"], "single_adapter_seconds": median["one adapter"],
                   "ratio": median[f"mixed {n}"] / median["one adapter"],
                   "max_difference_from_one_adapter": _serving_difference(runners["one adapter"],
                                                                          runners[f"mixed {n}"])}
               for n in args.ns}
    for n, peer in peers.items():
        ours = np.asarray(runners[f"mixed {n}"].once())
        peft_seconds = median[f"peft {n}"]
        serving[n] |= {"peft_grouped_seconds": peft_seconds, "vs_peft": peft_seconds / median[f"mixed {n}"],
                       "max_difference_from_peft": float(np.max(np.abs(peer.logits() - ours)))}

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
    results |= {f"serve_vs_peft_n{n}": v["vs_peft"] for n, v in serving.items() if "vs_peft" in v}
    results |= {f"sweep_vs_peft_k{k}": v["vs_peft"] for k, v in training.items() if "vs_peft" in v}
    results |= {f"shared_batch_speedup_k{k}": v["shared_batch_speedup"] for k, v in training.items() if k > 1}
    results |= {f"sweep_shared_vs_peft_k{k}": v["shared_vs_peft"] for k, v in training.items() if "shared_vs_peft" in v}
    _print(results)
    if args.json:
        write_json(args.json, results)
    return results


def _torch_source(args) -> str | None:
    """The model's directory or hub id when PEFT can run it (torch and peft import, PyTorch weights exist)."""
    source = model_source(args.model)
    if lacks_torch_weights(source):
        print(f"PEFT skipped: {source} has no PyTorch weights")
        return None
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        print(f"PEFT skipped: {err}")
        return None
    return source


def _peft_peers(args, params, batch: dict, served: dict) -> dict:
    """``{n: PeftGroupedServer}`` holding the same n adapters as the mixed batches."""
    from train.bench.multi_peft import PeftGroupedServer

    source = _torch_source(args)
    host_batch = jax.device_get(batch)
    return {} if source is None else {n: PeftGroupedServer(source, params, stacked, host_batch, np.asarray(ids))
                                      for n, (stacked, ids) in served.items()}


def _peft_sweepers(args, batches: dict) -> dict:
    """``{k: PeftSweepTrainer}`` training k adapters on the batches of the timed k-adapter program."""
    from train.bench.multi_peft import PeftSweepTrainer

    source = _torch_source(args)
    return {} if source is None else {k: PeftSweepTrainer(source, args.r, args.targets, jax.device_get(b))
                                      for k, b in batches.items()}


def _training_difference(runners: dict, k: int, params) -> float:
    """How far the timed K-adapter programs' first step is from K single steps, each on its adapter's batch."""
    single = runners["single"]
    difference = 0.0
    for name in (f"passes {k}", f"at once {k}", f"shared {k}"):
        if name not in runners:
            continue
        program, batch = runners[name], _batch_of(runners[name])
        trained = vera_jax.unstack(program.once()[0])
        for index, one in enumerate(trained):
            own = batch if name.startswith("shared") else jax.tree.map(lambda x: x[index], batch)
            alone = single.once(params, own, None)[0]
            difference = max(difference, _max_difference(one.trainable, alone.trainable))
    return difference


def _batch_of(program: CompiledStep) -> dict:
    """The batch a training program of `_training` is timed on."""
    return program.args[1]


def _serving_difference(one: CompiledStep, mixed: CompiledStep) -> float:
    """How far the mixed batch's rows are from the same rows run with their adapter alone (a few adapters)."""
    logits = np.asarray(mixed.once())
    params, stacked, ids, batch = mixed.args
    ids = np.asarray(ids)
    difference = 0.0
    for index, adapter in enumerate(vera_jax.unstack(stacked)[:CHECKED_ADAPTERS]):
        alone = np.asarray(one.once(params, adapter, batch, None))
        difference = max(difference, float(np.max(np.abs(logits[ids == index] - alone[ids == index]))))
    return difference


def _print(results: dict) -> None:
    print(f"{results['workload']} on {results['device']}")
    print(f"{'K adapters':<12}{'per pass':>9}{'one program':>14}{'K sequential':>14}{'speedup':>9}{'peak':>10}"
          f"{'all at once':>14}{'speedup':>9}{'peak':>10}{'PEFT, K steps':>15}{'vs PEFT':>9}")
    for k, row in results["training"].items():
        peft = f"{row['peft_seconds'] * 1e3:>12.1f} ms{row['vs_peft']:>9.2f}" if "vs_peft" in row else ""
        print(f"{k:<12}{row['adapters_per_pass']:>9}{row['vmapped_seconds'] * 1e3:>11.1f} ms"
              f"{row['sequential_seconds'] * 1e3:>11.1f} ms{row['speedup']:>9.2f}"
              f"{row['vmapped_peak_bytes'] / 2**20:>6.0f} MiB{row['all_at_once_seconds'] * 1e3:>11.1f} ms"
              f"{row['all_at_once_speedup']:>9.2f}{row['all_at_once_peak_bytes'] / 2**20:>6.0f} MiB{peft}")
        if "shared_batch_seconds" in row:
            versus = f", {row['shared_vs_peft']:.2f}x PEFT's K steps" if "shared_vs_peft" in row else ""
            print(f"{'':<12}one batch for all K: {row['shared_batch_seconds'] * 1e3:.1f} ms, "
                  f"{row['shared_batch_speedup']:.2f}x K sequential steps{versus}")
    print(f"{'N in batch':<12}{'mixed':>14}{'one adapter':>14}{'ratio':>9}{'PEFT grouped':>15}{'vs PEFT':>9}")
    for n, row in results["serving"].items():
        peft = (f"{row['peft_grouped_seconds'] * 1e3:>12.1f} ms{row['vs_peft']:>9.2f}" if "vs_peft" in row else "")
        print(f"{n:<12}{row['mixed_seconds'] * 1e3:>11.1f} ms{row['single_adapter_seconds'] * 1e3:>11.1f} ms"
              f"{row['ratio']:>9.2f}{peft}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()
                      if k.startswith(("vmap_", "all_at", "mixed_", "serve_vs_peft", "sweep_", "shared_"))}))


def _print_serving(results: dict) -> None:
    print(f"{results['workload']} on {results['device']}")
    print(f"{'adapters in the batch':<24}{'time vs one':>12}{'peak memory vs one':>20}{'max |difference|':>18}")
    for n, row in results["serving"].items():
        print(f"{n:<24}{row['time_ratio']:>11.2f}x{row['memory_ratio']:>19.3f}x"
              f"{row['max_difference_from_one_adapter']:>18.2e}")
