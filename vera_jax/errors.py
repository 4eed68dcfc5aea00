"""The one error for adapter files and directories that cannot be used."""

from __future__ import annotations

__all__ = ["AdapterFileError"]


class AdapterFileError(ValueError):
    """An adapter file that cannot be used: damaged, malformed, or not for these params.

    The message names the file (and the key or field where there is one) and the fix.
    """
