"""What a run leaves behind for people: metrics as JSON lines, a PNG of the curves, summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vera_jax.atomic import write_text

__all__ = ["MetricsLog", "plot_curves", "smoothed", "validations", "write_json", "directory_bytes"]


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


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """The exponential moving average of ``values`` (TensorBoard's smoothing: debiased, so the first point is the
    first value)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def validations(records: list[dict], run: str = "vera") -> list[dict]:
    """Each validation of ``run`` in the metrics log: its step, epoch, accuracy and loss, and the mean of the
    training losses logged since the one before (``train_loss``, None when none were)."""
    out, losses = [], []
    for record in records:
        if record.get("run", "vera") != run:
            continue
        if "loss" in record:
            losses.append(record["loss"])
        if "validation_accuracy" in record:
            out.append({key: record[key] for key in ("step", "epoch", "validation_accuracy", "validation_loss")}
                       | {"train_loss": sum(losses) / len(losses) if losses else None})
            losses = []
    return out


def plot_curves(records: list[dict], path: Path) -> None:
    """The training loss (each logged value, and smoothed) and the accuracy (each validation; the test's at the
    end) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in sorted({r.get("run", "vera") for r in records}):
        train = [r for r in records if r.get("run", "vera") == run and "loss" in r]
        line, = axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.3, linewidth=0.8)
        axes[0].plot([r["step"] for r in train], smoothed([r["loss"] for r in train]), color=line.get_color(),
                     label=f"{run} (smoothed)")
        checks = [r for r in records if r.get("run", "vera") == run and "validation_accuracy" in r]
        tests = [r for r in records if r.get("run", "vera") == run and "test_accuracy" in r]
        if checks:
            axes[1].plot([r["step"] for r in checks], [r["validation_accuracy"] for r in checks], "o-",
                         color=line.get_color(), label=f"{run} validation")
        if tests:
            axes[1].plot([r["step"] for r in tests], [r["test_accuracy"] for r in tests], "*", markersize=12,
                         color=line.get_color(), label=f"{run} test")
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss (faint: each logged step)")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy: every validation, the test at the end")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
