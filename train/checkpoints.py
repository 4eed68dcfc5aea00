"""Resumable run state with Orbax's CheckpointManager: trainable tree, optimizer state, step, data
position, and the projection key with its recipe and fingerprint. Never the base model; A and B only
when ``save_projection`` asks. Orbax commits a step only once it is whole, so a run killed mid-write
restarts from the previous complete step.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

__all__ = ["RunCheckpoints", "CheckpointMismatch"]


class CheckpointMismatch(ValueError):
    """The checkpoint in the run directory belongs to another model, dataset or config."""


class RunCheckpoints:
    """The last ``keep`` steps of one run directory."""

    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """``state``: {'trainable', 'opt_state'[, 'projections']}; ``meta``: JSON (position, options, recipe)."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, abstract_state: dict, expected_meta: dict) -> tuple[int, dict, dict] | None:
        """The latest step, its state (placed as ``abstract_state``'s shardings) and meta; None if no checkpoint.

        Raises:
          CheckpointMismatch: the stored options or projection recipe differ from ``expected_meta``.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        for key in ("options", "projection"):
            if meta.get(key) != expected_meta[key]:
                stored, wanted = meta.get(key) or {}, expected_meta[key]
                differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                raise CheckpointMismatch(
                    f"The checkpoint at step {step} in {self._manager.directory} was written with different {key} "
                    f"({differing}). Use another --output-dir, or the same settings to resume."
                )
        state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return step, state["state"], meta

    def close(self) -> None:
        self._manager.close()
