"""Write files and directories so that readers see the old copy or the new one whole, never half of either.

A directory is written into a hidden staging directory beside it, then swapped into place: on Linux
by one atomic exchange of the two names (``renameat2(RENAME_EXCHANGE)``), elsewhere by renaming the old
copy aside first. The old copy is deleted only once the new one is in place, and a directory that
does not hold the file marking it as ours (e.g. ``vera_adapter.json``) is refused, or, when the caller
asks to overwrite it, moved aside to ``NAME.replaced-TIME-PID`` beside it: never deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["staged_directory", "stage", "staging_path", "publish", "check_replaceable", "holds_foreign",
           "replaced_path", "recover", "write_text"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_path(directory: str | os.PathLike) -> Path:
    """Where `stage` puts ``directory``'s new copy while it is written."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.partial"


def _aside(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system offers no such call."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
            return False
        raise OSError(errno, os.strerror(errno), str(second))
    return True


def recover(directory: str | os.PathLike) -> None:
    """Put back an old copy left renamed aside by a crash between the two renames of `publish`, or drop
    it where a crash came after the new copy was in place."""
    directory = Path(directory).absolute()
    aside = _aside(directory)
    if not aside.is_dir():
        return
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):  # another process put it back first
            os.replace(aside, directory)


def holds_foreign(directory: str | os.PathLike, marker: str) -> bool:
    """Whether ``directory`` holds files and not ``marker``: something our writers did not make."""
    directory = Path(directory).absolute()
    return directory.is_dir() and any(directory.iterdir()) and not (directory / marker).is_file()


def check_replaceable(directory: str | os.PathLike, marker: str, overwrite: bool = False) -> None:
    """Raise unless ``directory`` is absent, empty, or holds ``marker`` (a file our writers put there), or
    ``overwrite`` allows replacing what it holds (which `publish` then keeps aside, never deletes).

    Raises:
      FileExistsError: ``directory`` holds something else, which a write must not destroy.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path.")
    if holds_foreign(directory, marker) and not overwrite:
        raise FileExistsError(f"{directory} already holds files and is not a directory this writer made (it has no "
                              f"{marker}); nothing was written. Choose a new or empty directory, or overwrite "
                              "(--overwrite, overwrite=True: its contents are moved aside, not deleted).")


def replaced_path(directory: Path) -> Path:
    """Where `publish` keeps a directory's old contents that our writers did not make."""
    return directory.parent / f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def stage(directory: str | os.PathLike, marker: str, overwrite: bool = False) -> Path:
    """A new, empty staging directory for ``directory``, after checking that it may be replaced."""
    directory = Path(directory).absolute()
    recover(directory)
    check_replaceable(directory, marker, overwrite)
    staging = staging_path(directory)
    shutil.rmtree(staging, ignore_errors=True)  # a stale staging directory of an interrupted write
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, directory: str | os.PathLike, keep_old: bool = False) -> Path:
    """Move the complete ``staging`` into ``directory``'s place; the old copy goes only after that, and with
    ``keep_old`` it is moved to `replaced_path` instead of deleted."""
    directory = Path(directory).absolute()
    if not directory.exists():
        os.replace(staging, directory)
    elif _exchange(staging, directory):
        _retire(staging, directory, keep_old)  # staging now holds the old copy
    else:
        aside = _aside(directory)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
        os.replace(staging, directory)  # a crash before this line leaves the old copy for `recover`
        _retire(aside, directory, keep_old)
    return directory


def _retire(old: Path, directory: Path, keep: bool) -> None:
    """The old copy of ``directory``, once the new one is in place: kept at `replaced_path`, or deleted."""
    if keep:
        os.replace(old, replaced_path(directory))
    else:
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds it takes ``directory``'s place.

    ``marker`` names a file the block writes, which marks the directory as one this writer may replace
    later; an existing directory without it is refused before anything is written, unless ``overwrite``:
    then its contents are moved to `replaced_path` once the new copy is in place.

    Raises:
      FileExistsError: ``directory`` holds files that are not a copy of what this writer writes.
    """
    foreign = holds_foreign(directory, marker)
    staging = stage(directory, marker, overwrite)
    try:
        yield staging
        if not (staging / marker).is_file():
            raise RuntimeError(f"The staged directory holds no {marker}; nothing was published.")
        publish(staging, directory, keep_old=foreign)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary file and an atomic rename: a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
