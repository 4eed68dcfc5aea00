"""Resumable run state with Orbax's CheckpointManager: trainable tree, optimizer state, step, data
position, and the projection key with its recipe and fingerprint. Never the base model; A and B only
when ``save_projection`` asks. Orbax commits a step only once it is whole, so a run killed mid-write
restarts from the previous complete step.

Each step's JSON meta also holds the sha256 of every tensor of its state, and its own. A step that cannot be read,
or whose tensors do not match their sums (a truncated file, a flipped bit), is damaged: a resume takes
the newest sound step instead, and moves the damaged newer ones aside so that the run can write those
steps again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vera_jax.atomic import write_error
from vera_jax.checkpoint import closed_loop_errors_dropped
from vera_jax.checksums import canonical_json_sha256, tensor_records

__all__ = ["RunCheckpoints", "CheckpointMismatch", "CheckpointDamaged"]

SUMS_KEY = "tensor_sha256"  # the meta entry of the state's sums: {tensor path: sha256 of its bytes}
META_SUM_KEY = "meta_sha256"  # the sha256 of the rest of the meta, as `canonical_json_sha256` writes it
_FIXES = {"data": "the dataset files it was trained on"}  # how to resume, by meta entry; else the same settings


class CheckpointMismatch(ValueError):
    """The checkpoint in the run directory belongs to another model, dataset or config."""


class CheckpointDamaged(CheckpointMismatch):
    """No checkpoint in the run directory can be read whole; the message names the folders to remove."""


def _tensor_sums(state: dict) -> dict[str, str]:
    """The sha256 of each tensor of a (replicated) state, by its path in the tree."""
    return {path: record["sha256"] for path, record in tensor_records(state).items()}


class RunCheckpoints:
    """The last ``keep`` steps of one run directory."""

    def __init__(self, directory: Path, keep: int):
        # lightweight: Orbax reads no step's own metadata up front, where a damaged one would stop it
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                     lightweight_initialize=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=self._options)

    @property
    def directory(self) -> Path:
        return Path(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """``state``: {'trainable', 'opt_state'[, 'projections']}; ``meta``: JSON (position, options, recipe),
        stored with the sums of ``state``'s tensors.

        Raises:
          WriteError: the file system refused the write (no space, read-only); the earlier steps are whole.
        """
        meta = {**meta, SUMS_KEY: _tensor_sums(state)}
        meta[META_SUM_KEY] = canonical_json_sha256(meta)
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)))
            self._manager.wait_until_finished()
        except OSError as err:  # Orbax commits a step only once whole: the earlier ones stay as they were
            raise write_error(self.directory / str(step), err) from None

    def restore(self, abstract_state: dict, expected_meta: dict) -> tuple[int, dict, dict] | None:
        """The newest sound step, its state (placed as ``abstract_state``'s shardings) and meta; None if no checkpoint.

        Damaged steps newer than it are named in a warning and moved to ``checkpoints-damaged/`` beside the
        checkpoints (never deleted).

        Raises:
          CheckpointMismatch: the newest readable meta's entries (options, data, projection recipe) differ
            from ``expected_meta``'s.
          CheckpointDamaged: there are checkpoints, and none of them is sound.
        """
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._read_meta(step)
            except Exception as err:  # whatever Orbax or tensorstore raise on a broken step: it is damaged
                damaged.append((step, err))
                continue
            self._check_matches(step, meta, expected_meta)
            try:
                state = self._read_state(step, abstract_state, meta)
            except Exception as err:
                damaged.append((step, err))
                continue
            self._set_aside(step, damaged)
            return step, state, meta
        if damaged:
            listed = "; ".join(f"{self.directory / str(s)}: {_reason(e)}" for s, e in damaged)
            raise CheckpointDamaged(f"Every checkpoint in {self.directory} is damaged ({listed}). Remove those step "
                                    f"folders (or all of {self.directory}) to train from the start, or choose "
                                    "another --output-dir.")
        return None

    def check_settings(self, expected: dict) -> None:
        """A cheap check before anything loads: the newest readable step's meta entries named in ``expected``
        (damaged steps are left for `restore`).

        Raises:
          CheckpointMismatch: they differ from ``expected``'s.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._read_meta(step)
            except Exception:  # noqa: BLE001 - a damaged step; `restore` reports it
                continue
            self._check_matches(step, meta, expected)
            return

    def _read_meta(self, step: int) -> dict:
        with closed_loop_errors_dropped():  # a damaged step's reads can end after Orbax closed its loop
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"its meta is {type(meta).__name__}, not an object")
        meta = dict(meta)
        if meta.pop(META_SUM_KEY, None) != canonical_json_sha256(meta):
            raise ValueError("its meta does not match its sha256")
        return meta

    def _check_matches(self, step: int, meta: dict, expected_meta: dict) -> None:
        for key, wanted in expected_meta.items():
            if meta.get(key) != wanted:
                stored = meta.get(key) or {}
                differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                raise CheckpointMismatch(
                    f"The checkpoint at step {step} in {self.directory} was written with different {key} "
                    f"({differing}). Use another --output-dir, or {_FIXES.get(key, 'the same settings')} to resume."
                )

    def _read_state(self, step: int, abstract_state: dict, meta: dict) -> dict:
        with closed_loop_errors_dropped():  # a damaged step's reads can end after Orbax closed its loop
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        sums, stored = _tensor_sums(state), meta.get(SUMS_KEY) or {}
        differing = sorted(path for path in sums.keys() | stored.keys() if sums.get(path) != stored.get(path))
        if differing:
            raise ValueError(f"{len(differing)} of its tensors differ from their sha256, first {differing[0]}")
        return state

    def _set_aside(self, resumed: int, damaged: list[tuple[int, Exception]]) -> None:
        """Warn of the damaged steps (all newer than ``resumed``) and move them out of Orbax's sight."""
        if not damaged:
            return
        aside = self.directory.parent / f"{self.directory.name}-damaged"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step, err in damaged:
            source, target = self.directory / str(step), aside / f"{step}-{stamp}"
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                source.rename(target)
                print(f"warning: the checkpoint {source} is damaged ({_reason(err)}); moved it to {target} and "
                      f"resuming from step {resumed}.", file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.close()  # a new manager, as lightweight as the first (a reload would read every step's metadata)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def close(self) -> None:
        self._manager.close()


def _reason(err: Exception) -> str:
    """An error in one line with its type: tensorstore's runs long, its cause last and its spec after it."""
    text = " ".join(str(err).split("tensorstore_spec")[0].removesuffix("[").split())
    return f"{type(err).__name__}: {text if len(text) <= 240 else '...' + text[-240:]}"
