"""Where a job's wall time goes: the seconds of its phases, each compilation JAX reports, the shapes it ran."""

from __future__ import annotations

import collections
import contextlib
import re
import time
from collections.abc import Iterator

import jax

__all__ = ["JobProfile"]

# JAX's duration events of one compilation: tracing to a jaxpr, lowering it, compiling it (or reading it from the
# persistent cache).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
MINOR_SECONDS = 0.2  # a function compiled in less, all its shapes together, counts as "other"


class JobProfile:
    """Seconds by phase (`phase`), compile seconds by phase and function (while `watching`), and counts of the
    (rows x tokens) shapes a loop ran (`ran`); `summary` is JSON."""

    def __init__(self):
        self.phases: dict[str, float] = collections.defaultdict(float)
        self.compiles: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])  # [seconds, programs]
        self.shapes: collections.Counter = collections.Counter()
        self.tokens = {"real": 0, "padded": 0}
        self._current = "other"

    @contextlib.contextmanager
    def watching(self) -> Iterator[JobProfile]:
        """Count JAX's compilations into the phase running at the time."""
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._on_duration)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (a phase inside another is taken out of the outer one's seconds)."""
        outer, self._current = self._current, name
        self.phases[name] += 0.0  # phases list in the order they start
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.phases[name] += seconds
            if outer != "other":
                self.phases[outer] -= seconds
            self._current = outer

    def ran(self, mask) -> None:
        """One batch (or group of rows) with attention mask ``mask`` (rows, tokens) ran."""
        self.shapes[f"{mask.shape[0]}x{mask.shape[1]}"] += 1
        self.tokens["real"] += int(mask.sum())
        self.tokens["padded"] += int(mask.size)

    def summary(self) -> dict:
        """``{"seconds": by phase, "compiles": {phase: {function: {"seconds", "programs"}}}, "shapes": counts,
        "tokens": real and padded}``; a function's programs are its compiled shapes (or persistent-cache reads);
        functions under `MINOR_SECONDS` in a phase (JAX's eager operations) add up as ``"other"``."""
        compiles: dict[str, dict[str, dict]] = collections.defaultdict(dict)
        for (phase, function), (seconds, programs) in sorted(self.compiles.items()):
            name = function if seconds >= MINOR_SECONDS else "other"
            entry = compiles[phase].setdefault(name, {"seconds": 0.0, "programs": 0})
            entry["seconds"] = round(entry["seconds"] + seconds, 3)
            entry["programs"] += programs
        return {"seconds": {k: round(v, 3) for k, v in self.phases.items()}, "compiles": dict(compiles),
                "shapes": dict(sorted(self.shapes.items())), "tokens": dict(self.tokens)}

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:  # traced as 'f', lowered and compiled as 'jit(f)'
            name = re.sub(r"^jit\((.*)\)$", r"\1", kwargs.get("fun_name", "?"))
            entry = self.compiles[self._current, name]
            entry[0] += duration
            entry[1] += event == COMPILE_EVENTS[-1]
