"""Compile time, step time and peak memory of a causal LM on the NNX backend, its layers in a list against
stacked and run with ``nnx.scan`` (with each of the scan's rematerialisation policies,
`train.models.scan.SCAN_REMAT`),
on the merged and activation paths: one table, side by side in one run.

Compile seconds are what a user waits before the first step: tracing, lowering and XLA compilation of
the jitted training step (`train.bench.compiled.training_step`). Steps are timed in rounds
(`vera_jax.timing.time_in_rounds`); peak memory is XLA's compiled figure (`train.bench.compiled.peak_bytes`).
"""

from __future__ import annotations

import statistics

import vera_jax
from train.bench.compiled import training_step
from train.models.load import load_causal_lm
from train.models.scan import DEFAULT_SCAN_REMAT, SCAN_REMAT
from vera_jax.timing import time_in_rounds

__all__ = ["compile_table", "print_table", "FORMS", "PATHS"]

# form -> (backend, scan_remat): the listed layers, then the scanned stack with each policy, the default as "scanned"
FORMS = {"listed": ("nnx-listed", DEFAULT_SCAN_REMAT)} | {
    "scanned" if policy == DEFAULT_SCAN_REMAT else f"scanned, remat {policy}": ("nnx", policy) for policy in SCAN_REMAT}
PATHS = ("merged", "activation")


def compile_table(args, batch) -> dict:
    """``{form: {"merged"|"activation": {"compile_seconds", "median_step_seconds", "peak_bytes"}}}`` for each
    of `FORMS`, plus the ratios ``scanned_compile_speedup`` (listed compile / scanned compile, per path) and
    ``scanned_step_ratio`` (scanned step / listed step) of the default scanned form."""
    variants = {}
    for form, (backend, scan_remat) in FORMS.items():
        model = load_causal_lm(args.model, args.base_dtype, max_positions=args.seq_len, backend=backend,
                               scan_remat=scan_remat)[0]
        config = vera_jax.VeraConfig(r=args.r, target_modules=tuple(args.targets), kernel_axes=model.kernel_axes)
        adapter = vera_jax.init_adapter(model.params, config)
        for path in PATHS:
            variants[(form, path)] = training_step(model.vera_logits(path, config), adapter, model.params, batch,
                                                   "causal-lm", dropout=False)
    times = time_in_rounds({f"{form}/{path}": variant for (form, path), variant in variants.items()}, args.steps,
                           args.warmup, args.settle)
    table = {form: {path: {"compile_seconds": variants[(form, path)].compile_seconds,
                           "median_step_seconds": statistics.median(times[f"{form}/{path}"]),
                           "peak_bytes": variants[(form, path)].peak_bytes}
                    for path in PATHS} for form in FORMS}
    ratios = {path: (table["listed"][path]["compile_seconds"] / table["scanned"][path]["compile_seconds"],
                     table["scanned"][path]["median_step_seconds"] / table["listed"][path]["median_step_seconds"])
              for path in PATHS}
    return {"table": table,
            "scanned_compile_speedup": {path: compile for path, (compile, _) in ratios.items()},
            "scanned_step_ratio": {path: step for path, (_, step) in ratios.items()}}


def print_table(nnx: dict, layers: int) -> None:
    print(f"NNX model, {layers} layers: compile (first step), median step and peak memory, layers listed vs scanned "
          f"(scanned: remat {DEFAULT_SCAN_REMAT}, the default)")
    print(f"{'form':<22}{'path':<12}{'compile':>10}{'median step':>14}{'peak memory':>14}")
    for form, paths in nnx["table"].items():
        for path, row in paths.items():
            memory = f"{row['peak_bytes'] / 2**20:.0f} MiB" if row["peak_bytes"] else "n/a"
            print(f"{form:<22}{path:<12}{row['compile_seconds']:>9.1f}s{row['median_step_seconds'] * 1e3:>11.1f} ms"
                  f"{memory:>14}")
    for path in PATHS:
        print(f"{path}: scanned compiles {nnx['scanned_compile_speedup'][path]:.1f}x faster, "
              f"steps at {nnx['scanned_step_ratio'][path]:.2f}x the listed model's")
