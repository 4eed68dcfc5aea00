"""``python -m train bench --job``: the whole main job against PEFT's, one after the other on the same split.

Ours runs as a user starts it, ``python -m train [flags]`` in a fresh interpreter with an empty compilation
cache; PEFT's runs the same recipe in PyTorch (`train.bench.peft_job`). Both wall times count from reading the
data to the end of the evaluation (our ``summary.json``'s ``wall_seconds``, which also counts saving the adapters).
Ours is split by the phases its summary profiles (`train.engine.profile.JobProfile`: loading, training, checkpoints,
evaluation, saving; the compiling inside each, by function and program; the shapes its groups of rows ran and
their real and padded tokens) and by its metrics log (the time to the first logged step, training, and what
follows the last step); PEFT's into loading, training and evaluation.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.bench.peft_job import run_peft_job
from train.engine import compile_cache
from train.options import CLASSIFY, Parser, add_options, from_args

__all__ = ["job_bench"]

PHASES = ("loading", "training", "checkpoints", "evaluation", "saving")  # the main job's, in order


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
    peft_phases = {"loading": peft["wall_seconds"] - peft["train_seconds"] - peft["eval_seconds"],
                   "training": peft["train_seconds"], "evaluation": peft["eval_seconds"]}
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


def job_bench(job_flags: str = "") -> dict:
    """``job_speedup_vs_peft`` (PEFT's wall / ours), ``job_accuracy``, ``peft_job_accuracy`` and both runs."""
    flags = ["classify", *shlex.split(job_flags)]  # as the user runs it: logging at its own cadence
    parser = Parser(prog="python -m train classify")
    add_options(parser, CLASSIFY)
    options = from_args(parser.parse_args(flags[1:]))
    with tempfile.TemporaryDirectory(prefix="vera_jax_job_") as scratch:
        ours = _our_job(flags, Path(scratch) / "run", Path(scratch) / "xla")
    print(f"vera_jax: {ours['wall_seconds']:.1f} s, test accuracy {ours['test_accuracy']:.4f}", flush=True)
    peft = run_peft_job(options)
    print(f"PEFT:     {peft['wall_seconds']:.1f} s, test accuracy {peft['test_accuracy']:.4f}", flush=True)
    print(_table(ours, peft), flush=True)
    return {"job_flags": job_flags, "ours": ours, "peft": peft,
            "job_speedup_vs_peft": peft["wall_seconds"] / ours["wall_seconds"],
            "job_accuracy": ours["test_accuracy"], "peft_job_accuracy": peft["test_accuracy"]}
