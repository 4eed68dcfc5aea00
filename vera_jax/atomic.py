"""Write a directory so that readers see the old one or the new one whole, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["staged_directory"]


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds it takes ``directory``'s place.

    An older ``directory`` is first renamed aside and deleted only after the new one is in place, so
    a crash at any point leaves a complete copy (``.NAME.old`` at worst).
    """
    directory = Path(directory).absolute()
    staging = directory.parent / f".{directory.name}.partial"
    previous = directory.parent / f".{directory.name}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
