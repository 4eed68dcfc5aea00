"""Time to the first training step, with JAX's persistent compilation cache cold and warm.

Each job runs as a user starts it, ``python -m train [COMMAND] ...`` in a fresh interpreter: once with an
empty compilation cache (cold), then again with the cache the first run filled (warm). The time runs
from launching the process to the first logged loss (the end of the first step); the process is then
stopped. Nothing else changes between the two runs: the model and data are read from the asset cache both
times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.engine import compile_cache

__all__ = ["JOBS", "measure_startup"]

# The main job and the causal LM, each with its own defaults, stopped after the first logged step.
JOBS = {
    "classify": ["classify", "--log-every", "1"],
    "causal_lm": ["causal-lm", "--log-every", "1"],
}


def _first_step_seconds(argv: list[str], out: Path, cache: Path, timeout: float) -> float:
    """Seconds from launching ``python -m train ARGV`` to its first logged loss."""
    env = {**os.environ, compile_cache.ENV: str(cache)}
    log = out / "metrics.jsonl"
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "train", *argv, "--output-dir", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.time() - started < timeout:
            records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
            losses = [r for r in records if "loss" in r]
            if losses:
                return losses[0]["time"] - started
            if process.poll() is not None:
                raise RuntimeError(f"python -m train {' '.join(argv)} exited before its first step:\n"
                                   f"{process.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"python -m train {' '.join(argv)} took over {timeout:.0f} s to its first step.")
    finally:
        process.kill()
        process.wait()


def measure_startup(jobs: dict[str, list[str]] = JOBS, timeout: float = 900) -> dict:
    """``{job: {"cold_s", "warm_s", "warm_over_cold"}}`` plus ``startup_cold_s`` / ``startup_warm_s`` (the
    main job's), each job with its own empty cache first."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="vera_jax_startup_") as scratch:
        for name, argv in jobs.items():
            cache = Path(scratch) / name / "xla"
            cold = _first_step_seconds(argv, Path(scratch) / name / "cold", cache, timeout)
            warm = _first_step_seconds(argv, Path(scratch) / name / "warm", cache, timeout)
            results[name] = {"cold_s": cold, "warm_s": warm, "warm_over_cold": warm / cold}
            print(f"{name}: first step after {cold:.1f} s cold, {warm:.1f} s warm ({warm / cold:.2f}x)", flush=True)
    main = results[next(iter(jobs))]
    return {"jobs": results, "startup_cold_s": main["cold_s"], "startup_warm_s": main["warm_s"]}
