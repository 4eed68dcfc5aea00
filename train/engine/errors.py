"""The errors that stop a run: each message names the setting to change."""

from __future__ import annotations

__all__ = ["RunError", "TrainingDiverged"]


class RunError(ValueError):
    """A run cannot start as configured; the message names the setting to change."""


class TrainingDiverged(RunError):
    """The loss or the trained state stopped being finite; the last checkpoint kept is the last finite one.

    ``diverged_at``: per adapter trained, the step at which it stopped being finite.
    """

    def __init__(self, message: str, diverged_at: tuple[int, ...] = ()):
        super().__init__(message)
        self.diverged_at = diverged_at
