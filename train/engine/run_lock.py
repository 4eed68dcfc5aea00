"""One run at a time in a run directory: a lock file held (``fcntl.flock``) for the run's lifetime.

The file records its owner's pid and host, for the message a second run gets. The kernel releases the lock
when its owner exits, however it exits; an owner that died without releasing it cleanly leaves its record
behind, and the next run takes the directory over with a note naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirectoryBusy", "held"]

LOCK_FILE = ".vera_jax-run.lock"


class RunDirectoryBusy(ValueError):
    """Another live run holds the run directory; the message names it and its pid."""


def _owner(fd: int) -> dict:
    """The owner recorded in the lock file: ``{"pid", "host"}``, or {} when none is (or the record is unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _record(fd: int, owner: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)


@contextlib.contextmanager
def held(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s run lock for the with-block.

    Raises:
      RunDirectoryBusy: another process holds it (a live run); nothing in ``directory`` is touched.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            raise RunDirectoryBusy(
                f"--output-dir {directory} is in use by another run (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}); wait for it to finish, or choose another --output-dir.") from None
        previous = _owner(fd)
        if previous:
            print(f"note: the run that held --output-dir {directory} (pid {previous.get('pid', '?')} on host "
                  f"{previous.get('host', '?')}) is no longer running; this run takes the directory over.",
                  file=sys.stderr)
        _record(fd, {"pid": os.getpid(), "host": socket.gethostname()})
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next run has no one to take over from
    finally:
        os.close(fd)
