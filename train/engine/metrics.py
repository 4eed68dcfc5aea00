"""What a run leaves behind for people: metrics as JSON lines, a PNG of the curves, summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vera_jax.atomic import write_text

__all__ = ["MetricsLog", "plot_curves", "write_json", "directory_bytes"]


def write_json(path: Path, value: dict) -> None:
    """Write through a temporary file and an atomic rename: a reader never sees half a file."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class MetricsLog:
    """Append-only JSON lines; a resumed run first drops the records past its checkpoint."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        """One line: ``record`` and ``time``, the Unix time it was written."""
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: Path) -> None:
    """Training loss and held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in sorted({r.get("run", "vera") for r in records}):
        train = [r for r in records if r.get("run", "vera") == run and "loss" in r]
        evals = [r for r in records if r.get("run", "vera") == run and "test_accuracy" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=run)
        axes[1].plot([r["step"] for r in evals], [r["test_accuracy"] for r in evals], "o-", label=run)
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="accuracy", title="held-out accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
