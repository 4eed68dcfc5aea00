"""``python -m train bench-multi --workload smollm2``: mixed-adapter serving on the scanned NNX SmolLM2.

One batch in which each example uses its own adapter of a stack of N (the model's ``mixed_logits``, which
runs `vera_jax.nnx.mixed`), against the same batch with one adapter (``vera_logits``), both on the activation
path through the model's ``nnx.scan``: time (in rounds) and XLA's compiled peak memory. The base is one copy
whatever N: only the vectors are stacked and gathered per example.
"""

from __future__ import annotations

import statistics

import jax
import numpy as np

import vera_jax
from train.bench.compiled import CompiledStep
from train.bench_flags import LLAMA_LINEAR
from train.models.load import load_causal_lm
from vera_jax.timing import time_in_rounds

__all__ = ["bench_multi_smollm2", "CHECKED_ADAPTERS"]

CHECKED_ADAPTERS = 3  # adapters whose rows of the mixed batch are checked against the adapter alone


def bench_multi_smollm2(args) -> dict:
    model = load_causal_lm(args.model, max_positions=args.serve_seq_len, backend="nnx")[0]
    config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets or LLAMA_LINEAR),
                                 kernel_axes=model.kernel_axes)
    adapter = vera_jax.init_adapter(model.params, config)
    one, mixed = model.vera_logits("activation", config), model.mixed_logits(config)
    rng = np.random.default_rng(1)
    shape = (args.serve_batch, args.serve_seq_len)
    batch = jax.device_put({"input_ids": rng.integers(min(1000, model.config.vocab_size // 2),
                                                      model.config.vocab_size, shape, np.int32),
                            "attention_mask": np.ones(shape, np.int32)})

    programs = {"one adapter": CompiledStep(one, args=(model.params, adapter, batch, None))}
    stacks = {}
    for n in args.ns:  # n distinct adapters: each vector drawn around the initial one
        keys = iter(jax.random.split(jax.random.key(n), len(jax.tree.leaves(adapter.trainable))))
        stacked = adapter.replace(trainable=jax.tree.map(
            lambda x: x[None] + 0.1 * jax.random.normal(next(keys), (n, *x.shape), x.dtype), adapter.trainable))
        adapter_ids = jax.device_put(np.arange(args.serve_batch) % n)
        stacks[n] = (stacked, adapter_ids)
        programs[f"mixed {n}"] = CompiledStep(mixed, args=(model.params, stacked, adapter_ids, batch))
    median = {name: statistics.median(t) for name, t in time_in_rounds(programs, args.repeats).items()}
    serving = {}
    for n, (stacked, adapter_ids) in stacks.items():
        serving[n] = {"mixed_seconds": median[f"mixed {n}"], "one_adapter_seconds": median["one adapter"],
                      "time_ratio": median[f"mixed {n}"] / median["one adapter"],
                      "mixed_peak_bytes": programs[f"mixed {n}"].peak_bytes,
                      "one_adapter_peak_bytes": programs["one adapter"].peak_bytes,
                      "memory_ratio": programs[f"mixed {n}"].peak_bytes / programs["one adapter"].peak_bytes,
                      "max_difference_from_one_adapter": _difference(programs[f"mixed {n}"](), programs["one adapter"],
                                                                     model.params, batch, stacked,
                                                                     np.asarray(adapter_ids))}
    results = {
        "workload": {"name": "smollm2", "model": args.model, "backend": "nnx (scanned)", "r": args.r,
                     "targets": list(config.target_modules), "serve_batch": [args.serve_batch, args.serve_seq_len],
                     "repeats": args.repeats},
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "serving": serving,
    }
    results |= {f"mixed_time_ratio_{n}": row["time_ratio"] for n, row in serving.items()}
    results |= {f"mixed_memory_ratio_{n}": row["memory_ratio"] for n, row in serving.items()}
    return results


def _difference(logits, one: CompiledStep, params, batch: dict, stacked, adapter_ids) -> float:
    """How far the mixed batch's rows are from the same rows run with their adapter alone (a few adapters)."""
    logits = np.asarray(logits)
    difference = 0.0
    for index, single in enumerate(vera_jax.unstack(stacked)[:CHECKED_ADAPTERS]):
        alone = np.asarray(one.once(params, single, batch, None))
        difference = max(difference, float(np.max(np.abs(logits[adapter_ids == index] - alone[adapter_ids == index]))))
    return difference
