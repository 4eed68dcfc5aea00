"""Write files and directories so that readers see the old copy or the new one whole, never half of either.

A directory is written into a hidden staging directory beside it, named uniquely for its writer
(``.NAME.partial.HOST.PID.RANDOM``), then swapped into place: on Linux by one atomic exchange of the two
names (``renameat2(RENAME_EXCHANGE)``), elsewhere by renaming the old copy aside first. Every writer puts
``vera_jax_manifest.json`` (the kind of output and its format) into what it writes, and recognises its
own output by that file alone. The old copy is deleted only once the new one is in place and only when
its manifest names the same kind; anything else is refused, or, when the caller asks to overwrite it,
moved aside to a new ``NAME.replaced-TIME-PID-RANDOM`` beside it: never deleted. Readers wrap their reads
in `read_stable`, which reads again when the directory was swapped while they read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["staged_directory", "stage", "publish", "check_replaceable", "is_ours", "target_path", "recover",
           "read_stable", "write_text", "discard", "write_error", "WriteError", "MANIFEST_FILE"]

MANIFEST_FILE = "vera_jax_manifest.json"  # written by every vera_jax writer, by nothing else
READ_ATTEMPTS = 5  # reads of a directory that keeps being swapped before `read_stable` gives up
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
T = TypeVar("T")


class WriteError(OSError):
    """A write that failed (no space, no permission) and replaced nothing: the old copy is whole."""

    def __str__(self) -> str:
        return self.strerror  # the message, without OSError's "[Errno N]"


def target_path(directory: str | os.PathLike) -> Path:
    """``directory`` as an absolute path, a symbolic link replaced by what it points to (a link is never swapped)."""
    directory = Path(directory).absolute()
    return directory.resolve() if directory.is_symlink() else directory


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _staging_prefix(directory: Path) -> str:
    return f".{directory.name}.partial."


def _aside(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system offers no such call."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot exchange
            return False
        raise OSError(code, os.strerror(code), str(second))
    return True


def recover(directory: str | os.PathLike) -> None:
    """Put back an old copy left renamed aside by a crash between the two renames of `publish`, or drop
    it where a crash came after the new copy was in place."""
    directory = target_path(directory)
    aside = _aside(directory)
    if not aside.is_dir():
        return
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):  # another process put it back first
            os.replace(aside, directory)


def _manifest(kind: str, format: str) -> str:
    return json.dumps({"format": format, "kind": kind, "writer": "vera_jax"}, sort_keys=True) + "\n"


def is_ours(directory: str | os.PathLike, kind: str) -> bool:
    """Whether ``directory`` holds a vera_jax manifest naming ``kind``: an output of that writer."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("writer") == "vera_jax" and manifest.get("kind") == kind


def _replaceable(directory: Path, kind: str) -> bool:
    """Absent, empty, or an output of ``kind``'s writer: what a write may delete once replaced."""
    return not directory.exists() or (directory.is_dir() and not any(directory.iterdir())) or is_ours(directory, kind)


def check_replaceable(directory: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """Raise unless ``directory`` is absent, empty, or an earlier output of the ``kind`` writer (its manifest
    says so), or ``overwrite`` allows replacing what it holds (which `publish` then keeps aside, never deletes).

    Raises:
      FileExistsError: ``directory`` holds something else, which a write must not destroy.
    """
    directory = target_path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path.")
    if not overwrite and not _replaceable(directory, kind):
        raise FileExistsError(f"{directory} already holds files and is not a directory this writer made (it has no "
                              f"{MANIFEST_FILE} naming a {kind}); nothing was written. Choose a new or empty "
                              "directory, or overwrite (--overwrite, overwrite=True: its contents are moved aside, "
                              "not deleted).")


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the writer that named a staging directory ``name`` (``PREFIX HOST.PID.RANDOM``) may still write it."""
    host, _, rest = name[len(prefix):].partition(".")
    pid = rest.partition(".")[0]
    if host != _host() or not pid.isdigit():
        return True  # another machine's, or not named by this version: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _drop_stale_staging(directory: Path) -> None:
    """Remove staging directories that writers on this machine left when they died; never a live one's."""
    prefix = _staging_prefix(directory)
    with contextlib.suppress(FileNotFoundError):
        for path in directory.parent.iterdir():
            if path.name.startswith(prefix) and not _owner_alive(path.name, prefix):
                shutil.rmtree(path, ignore_errors=True)


def stage(directory: str | os.PathLike, kind: str, overwrite: bool = False, format: str | None = None) -> Path:
    """A new staging directory for ``directory``, unique to this call and holding the manifest of ``kind``
    (and ``format``), after checking that ``directory`` may be replaced.

    Raises:
      FileExistsError: as `check_replaceable`.
      WriteError: the staging directory cannot be made (a read-only or full file system).
    """
    directory = target_path(directory)
    recover(directory)
    check_replaceable(directory, kind, overwrite)
    if directory.is_dir() and not os.access(directory, os.W_OK):  # its old files could not be removed
        raise WriteError(errno.EACCES, f"Cannot write {directory}: it is read-only; nothing was written. Make it "
                                       "writable, or choose another path.")
    _drop_stale_staging(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(directory)}{_host()}.{os.getpid()}.",
                                        dir=directory.parent))
    except OSError as err:
        raise write_error(directory, err) from None
    try:
        (staging / MANIFEST_FILE).write_text(_manifest(kind, format or kind))
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(directory, err) from None
    return staging


def write_error(directory: Path, err: OSError) -> WriteError:
    """``err`` (no space, no permission) while writing ``directory``, before any swap, as one line."""
    reason = err.strerror or str(err)
    return WriteError(err.errno, f"Cannot write {directory}: {reason} ({err.filename or directory}); nothing was "
                                 "replaced and any old copy is whole. Free space, or choose a writable path.")


def publish(staging: Path, directory: str | os.PathLike, kind: str) -> Path:
    """Move the complete ``staging`` into ``directory``'s place. The old copy goes only after that: deleted
    when it is an output of ``kind`` (or empty), else moved to a new `_keep_aside` directory, never deleted."""
    directory = target_path(directory)
    try:
        os.rename(staging, directory)  # only where nothing is there (an empty directory is replaced)
        return directory
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR) or not directory.exists():
            raise
    if _exchange(staging, directory):
        _retire(staging, directory, kind)  # staging now holds the old copy
    else:
        aside = _aside(directory)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
        os.replace(staging, directory)  # a crash before this line leaves the old copy for `recover`
        _retire(aside, directory, kind)
    return directory


def _retire(old: Path, directory: Path, kind: str) -> None:
    """The old copy of ``directory``, once the new one is in place: deleted when it is ours, else kept aside."""
    if _replaceable(old, kind):
        shutil.rmtree(old)
    else:
        _keep_aside(old, directory)


def _keep_aside(old: Path, directory: Path) -> Path:
    """Move ``old`` to ``NAME.replaced-TIME-PID-RANDOM`` beside ``directory``, a name no other call gets."""
    kept = Path(tempfile.mkdtemp(prefix=f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-",
                                 dir=directory.parent))
    os.replace(old, kept)  # over the empty directory just made for it: atomic, and never over another's
    return kept


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, kind: str, overwrite: bool = False,
                     format: str | None = None) -> Iterator[Path]:
    """Yield a staging directory holding the manifest of ``kind``; when the block succeeds it takes
    ``directory``'s place (a symbolic link: the directory it points to).

    An existing directory that is not an output of ``kind`` is refused before anything is written, unless
    ``overwrite``: then its contents are moved aside once the new copy is in place.

    Raises:
      FileExistsError: ``directory`` holds files that are not a copy of what this writer writes.
      WriteError: a file system error (no space, read-only) while writing; the old copy is whole.
    """
    staging = stage(directory, kind, overwrite, format)
    try:
        try:
            yield staging
        except WriteError:
            raise
        except OSError as err:  # no space, no permission: nothing was swapped yet
            raise write_error(target_path(directory), err) from None
        publish(staging, directory, kind)
    finally:
        discard(staging, kind)


def discard(staging: Path, kind: str) -> None:
    """Remove ``staging`` where it still holds a copy of ``kind``: never an old copy that a failed swap left there."""
    if is_ours(staging, kind):
        shutil.rmtree(staging, ignore_errors=True)


def _identity(directory: Path) -> tuple | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def read_stable(directory: str | os.PathLike, read: Callable[[], T]) -> T:
    """``read()``, done again when ``directory`` was swapped for a new copy while it ran (what it read, or the
    error it raised, may mix two copies); a read that no swap overlapped is final."""
    directory = Path(directory).absolute()
    for attempt in range(READ_ATTEMPTS):
        before = _identity(directory)
        try:
            result = read()
        except Exception:
            if _identity(directory) == before or attempt == READ_ATTEMPTS - 1:
                raise
            continue
        if _identity(directory) == before:
            return result
    raise OSError(errno.EAGAIN, f"{directory} was replaced during each of {READ_ATTEMPTS} reads; read it again "
                                "once its writers are done.")


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
