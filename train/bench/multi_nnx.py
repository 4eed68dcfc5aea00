"""``python -m train bench-multi --workload smollm2``: mixed-adapter serving on the scanned NNX SmolLM2.

One batch in which each example uses its own adapter of a stack of N (`vera_jax.nnx.mixed`), against
the same batch with one adapter, both on the activation path through the model's ``nnx.scan``: time
(in rounds) and XLA's compiled peak memory. The base is one copy whatever N: only the vectors are
stacked and gathered per example.
"""

from __future__ import annotations

import statistics

import jax
import numpy as np
from flax import nnx

import vera_jax
import vera_jax.nnx as vera_nnx
from train.bench.step import peak_bytes, time_in_rounds
from train.bench_flags import LLAMA_LINEAR
from train.models.load import load_causal_lm

__all__ = ["bench_multi_smollm2", "CHECKED_ADAPTERS"]

CHECKED_ADAPTERS = 3  # adapters whose rows of the mixed batch are checked against the adapter alone


class _Program:
    """A compiled pure call over the adapted model's state; its compiled peak bytes."""

    def __init__(self, function, *args):
        self.args = args
        compiled = jax.jit(function).lower(*args).compile()
        self.compiled, self.peak_bytes = compiled, peak_bytes(compiled)

    def __call__(self):
        return jax.block_until_ready(self.compiled(*self.args))


def bench_multi_smollm2(args) -> dict:
    model = load_causal_lm(args.model, max_positions=args.serve_seq_len, backend="nnx")[0]
    config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets or LLAMA_LINEAR),
                                 kernel_axes=model.kernel_axes)
    adapted = vera_nnx.attach(model.module(model.params), config, path="activation")
    graphdef, state = nnx.split(adapted)
    adapter = vera_nnx.split(adapted)[2]
    rng = np.random.default_rng(1)
    ids = jax.device_put(rng.integers(1000, model.config.vocab_size, (args.serve_batch, args.serve_seq_len),
                                      np.int32))

    def one(state, input_ids):
        return nnx.merge(graphdef, state)(input_ids)

    def mixed(state, stacked, adapter_ids, input_ids):
        module = nnx.merge(graphdef, state)
        with vera_nnx.mixed(module, stacked, adapter_ids):
            return module(input_ids)

    programs = {"one adapter": _Program(one, state, ids)}
    stacks = {}
    for n in args.ns:  # n distinct adapters: each vector drawn around the initial one
        keys = iter(jax.random.split(jax.random.key(n), len(jax.tree.leaves(adapter.trainable))))
        stacked = adapter.replace(trainable=jax.tree.map(
            lambda x: x[None] + 0.1 * jax.random.normal(next(keys), (n, *x.shape), x.dtype), adapter.trainable))
        adapter_ids = jax.device_put(np.arange(args.serve_batch) % n)
        stacks[n] = (stacked, adapter_ids)
        programs[f"mixed {n}"] = _Program(mixed, state, stacked, adapter_ids, ids)
    median = {name: statistics.median(t) for name, t in time_in_rounds(programs, args.repeats).items()}
    serving = {}
    for n, (stacked, adapter_ids) in stacks.items():
        serving[n] = {"mixed_seconds": median[f"mixed {n}"], "one_adapter_seconds": median["one adapter"],
                      "time_ratio": median[f"mixed {n}"] / median["one adapter"],
                      "mixed_peak_bytes": programs[f"mixed {n}"].peak_bytes,
                      "one_adapter_peak_bytes": programs["one adapter"].peak_bytes,
                      "memory_ratio": programs[f"mixed {n}"].peak_bytes / programs["one adapter"].peak_bytes,
                      "max_difference_from_one_adapter": _difference(programs[f"mixed {n}"](), one, graphdef,
                                                                     adapted, stacked, np.asarray(adapter_ids), ids)}
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


def _difference(logits, one, graphdef, adapted, stacked, adapter_ids, ids) -> float:
    """How far the mixed batch's rows are from the same rows run with their adapter alone (a few adapters)."""
    logits = np.asarray(logits)
    difference = 0.0
    for index, single in enumerate(vera_jax.unstack(stacked)[:CHECKED_ADAPTERS]):
        vera_nnx.update(adapted, single)
        alone = np.asarray(jax.jit(one)(nnx.state(adapted), ids))
        difference = max(difference, float(np.max(np.abs(logits[adapter_ids == index] - alone[adapter_ids == index]))))
    return difference
