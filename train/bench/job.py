"""``python -m train bench --job``: the whole main job against PEFT's VeRA and PEFT's LoRA, one after the other on
the same split, for one training seed or several (``--seeds 0 1 2``: mean and standard deviation of each).

Ours runs as a user starts it, ``python -m train [flags]`` in a fresh interpreter with an empty compilation
cache; PEFT's runs the same recipe in PyTorch (`train.bench.peft_job`). Both wall times count from reading the
data to the end of the evaluation (our ``summary.json``'s ``wall_seconds``, which also counts saving the adapters).
Ours is split by the phases its summary profiles (`train.engine.profile.JobProfile`: loading, training, checkpoints,
evaluation, saving; the compiling inside each, by function and program; the shapes its groups of rows ran and
their real and padded tokens) and by its metrics log (the time to the first logged step, training, and what
follows the last step); PEFT's into loading, training, validation and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.bench.peft_job import LoraRecipe, run_peft_job
from train.bench_flags import JOB_PEERS
from train.engine import compile_cache
from train.options import CLASSIFY, Parser, add_options, from_args

__all__ = ["job_bench", "LoraRecipe", "METHODS", "PEERS"]

PHASES = ("loading", "training", "validation", "checkpoints", "evaluation", "saving")  # the main job's, in order


def _our_job(flags: list[str], out: Path, cache: Path) -> dict:
    """Run ``python -m train FLAGS`` and read its summary and metrics log."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "train", *flags, "--output-dir", str(out)],
                          env={**os.environ, compile_cache.ENV: str(cache)}, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"python -m train {shlex.join(flags)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"test_accuracy": summary["test_accuracy"], "wall_seconds": summary["wall_seconds"],
            "trainable_params": summary["trainable_params"], "validation_accuracy": summary["validation_accuracy"],
            "validations": summary["validations"], "adapter_step": summary["adapter_step"],
            "process_seconds": ended - started, "steps": summary.get("steps", steps[-1]["step"]),
            "profile": {**summary["profile"],
                        "first_logged_step": steps[0]["step"],
                        "launch_to_first_logged_step": steps[0]["time"] - started,
                        "first_to_last_logged_step": steps[-1]["time"] - steps[0]["time"],
                        "after_the_last_step": ended - steps[-1]["time"]}}


def _table(ours: dict, peft: dict) -> str:
    """Our wall time by phase (and its compiling) beside PEFT's."""
    phases, compiles = ours["profile"]["seconds"], ours["profile"]["compiles"]
    compiling = {phase: sum(e["seconds"] for e in functions.values()) for phase, functions in compiles.items()}
    peft_phases = {"loading": peft["wall_seconds"] - peft["train_seconds"] - peft["validation_seconds"]
                   - peft["eval_seconds"], "training": peft["train_seconds"],
                   "validation": peft["validation_seconds"], "evaluation": peft["eval_seconds"]}
    lines = [f"{'phase':<14}{'vera_jax':>10}{'compiling':>11}{'PEFT':>10}"]
    for phase in sorted(phases, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES)):
        seconds, peer = phases[phase], peft_phases.get(phase)
        lines.append(f"{phase:<14}{seconds:>9.1f}s{compiling.get(phase, 0.0):>10.1f}s"
                     + (f"{peer:>9.1f}s" if peer is not None else f"{'-':>10}"))
    lines.append(f"{'wall':<14}{ours['wall_seconds']:>9.1f}s{sum(compiling.values()):>10.1f}s"
                 f"{peft['wall_seconds']:>9.1f}s")
    tokens = ours["profile"]["tokens"]
    lines.append(f"training tokens: {tokens['real']:,d} real in {tokens['padded']:,d} padded (ours); groups run "
                 + ", ".join(f"{shape} x{n}" for shape, n in ours["profile"]["shapes"].items()))
    return "\n".join(lines)


PEERS = JOB_PEERS  # the jobs in PyTorch beside ours (PEFT VeRA, PEFT LoRA), named where the flags are
METHODS = ("vera_jax", *PEERS)  # the jobs of each seed, in the order they run


def _spread(values: list[float]) -> dict:
    """Each value, their mean and sample standard deviation (0 for one value)."""
    return {"values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _methods_table(methods: dict, seeds: int) -> str:
    """Accuracy and wall time (mean +- std over the seeds) and trainable parameters of each job."""
    lines = [f"{'job':<12}{'trainable':>11}{'test accuracy':>22}{'wall time':>22}   (over {seeds} seed(s))"]
    for name, row in methods.items():
        accuracy, wall = row["test_accuracy"], row["wall_seconds"]
        lines.append(f"{name:<12}{row['trainable_params']:>11,d}{accuracy['mean']:>13.4f} +- {accuracy['std']:.4f}"
                     f"{wall['mean']:>13.1f} +- {wall['std']:.1f}s")
    return "\n".join(lines)


def job_bench(job_flags: str = "", seeds: list[int] | None = None, lora: LoraRecipe = LoraRecipe(),
              peers: tuple[str, ...] = PEERS) -> dict:
    """Each seed's jobs (``runs``): ours and each of ``peers`` (of `PEERS`); per job (``methods``) the test
    accuracy and wall time over the seeds and the trainable parameters; the mean accuracies ``job_accuracy`` and,
    with its peer, ``peft_job_accuracy`` and ``job_speedup_vs_peft`` (PEFT VeRA's mean wall over ours), and
    ``lora_job_accuracy``.

    ``seeds``: training seeds (``--seed``: data order, dropout, projections, a new head), each job run once with
    each on the one split of ``--data-seed``; None: the flags' own seed.
    """
    base_flags = ["classify", *shlex.split(job_flags)]  # as the user runs it: logging at its own cadence
    parser = Parser(prog="python -m train classify")
    add_options(parser, CLASSIFY)
    runs = []
    for seed in seeds or [None]:
        flags = base_flags + ([] if seed is None else ["--seed", str(seed)])
        options = from_args(parser.parse_args(flags[1:]))
        with tempfile.TemporaryDirectory(prefix="vera_jax_job_") as scratch:
            ours = _our_job(flags, Path(scratch) / "run", Path(scratch) / "xla")
        print(f"[seed {options.run.seed}] vera_jax:  {ours['wall_seconds']:.1f} s, test accuracy "
              f"{ours['test_accuracy']:.4f}", flush=True)
        run = {"seed": options.run.seed, "vera_jax": ours}
        if "peft_vera" in peers:
            run["peft_vera"] = peft = run_peft_job(options)
            print(f"[seed {options.run.seed}] PEFT VeRA: {peft['wall_seconds']:.1f} s, test accuracy "
                  f"{peft['test_accuracy']:.4f}", flush=True)
            print(_table(ours, peft), flush=True)
        if "peft_lora" in peers:
            run["peft_lora"] = peft_lora = run_peft_job(options, lora)
            print(f"[seed {options.run.seed}] PEFT LoRA r={lora.rank}: {peft_lora['wall_seconds']:.1f} s, test "
                  f"accuracy {peft_lora['test_accuracy']:.4f}", flush=True)
        runs.append(run)
    names = [name for name in METHODS if name in runs[0]]
    methods = {name: {"test_accuracy": _spread([run[name]["test_accuracy"] for run in runs]),
                      "wall_seconds": _spread([run[name]["wall_seconds"] for run in runs]),
                      "trainable_params": runs[0][name]["trainable_params"]} for name in names}
    print(_methods_table(methods, len(runs)), flush=True)
    mean = {name: {key: methods[name][key]["mean"] for key in ("test_accuracy", "wall_seconds")} for name in names}
    results = {"job_flags": job_flags, "seeds": [run["seed"] for run in runs], "lora": dataclasses.asdict(lora),
               "runs": runs, "methods": methods, "job_accuracy": mean["vera_jax"]["test_accuracy"]}
    if "peft_vera" in mean:
        results |= {"job_speedup_vs_peft": mean["peft_vera"]["wall_seconds"] / mean["vera_jax"]["wall_seconds"],
                    "peft_job_accuracy": mean["peft_vera"]["test_accuracy"]}
    if "peft_lora" in mean:
        results["lora_job_accuracy"] = mean["peft_lora"]["test_accuracy"]
    return results
