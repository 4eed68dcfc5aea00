"""JAX's persistent compilation cache for the command line: a rerun loads its compiled programs from disk
instead of compiling them again.

On by default in every command (``--no-compile-cache`` turns it off), in ``<cache dir>/xla`` (the
project's cache directory, `train.assets.cache_dir`) or where ``VERA_JAX_COMPILE_CACHE`` points. JAX's
size limit is left off: its eviction needs a timestamp file beside each entry, and one missing (a crash
between the two writes) makes every later write fail; the whole test suite leaves about 15 MB, and the
folder can be deleted at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from train.assets import cache_dir

__all__ = ["enable", "directory", "ENV"]

ENV = "VERA_JAX_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.2  # programs that compile faster are not worth a file


def directory() -> Path:
    return Path(os.environ.get(ENV, cache_dir() / "xla"))


def enable() -> Path:
    """Turn the cache on for this process (before its first compilation); returns its directory."""
    path = directory()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
