"""Merged export: the adapted model as a plain Hugging Face Flax model that needs no vera_jax to load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from vera_jax.adapter import Adapter
from vera_jax.atomic import staged_directory, target_path
from vera_jax.merge import merge

__all__ = ["save_merged", "KIND"]

KIND = "merged"  # the kind in the vera_jax manifest of a merged model directory


def save_merged(directory: str | os.PathLike, adapter: Adapter, params: Mapping, model, *,
                safetensors: bool = False, overwrite: bool = False, tokenizer=None) -> Path:
    """Write ``model`` with W0 + delta_W (and the leaves trained in full) via ``model.save_pretrained``, and
    ``tokenizer`` (when given) beside it.

    ``safetensors=False`` writes ``flax_model.msgpack``, ``True`` writes ``model.safetensors``; either
    loads with ``FlaxAutoModel....from_pretrained(directory)``. The directory appears only once whole,
    tokenizer included.

    Raises:
      FileExistsError: ``directory`` holds files that are not a merged model vera_jax wrote (nothing is
        written); with ``overwrite`` they are moved aside to a new ``NAME.replaced-TIME-PID-RANDOM`` once the
        new copy is in place.
      WriteError: the file system refused the write (no space, read-only); the old copy is whole.
    """
    merged = merge(params, adapter)
    with staged_directory(directory, KIND, overwrite, format="safetensors" if safetensors else "flax") as staging:
        model.save_pretrained(staging, params=merged, safe_serialization=safetensors)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return target_path(directory)
