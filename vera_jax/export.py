"""Merged export: the adapted model as a plain Hugging Face Flax model that needs no vera_jax to load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from vera_jax.adapter import Adapter
from vera_jax.atomic import staged_directory
from vera_jax.merge import merge

__all__ = ["save_merged"]

CONFIG_FILE = "config.json"  # every Hugging Face model directory has one


def save_merged(directory: str | os.PathLike, adapter: Adapter, params: Mapping, model, *,
                safetensors: bool = False, overwrite: bool = False) -> Path:
    """Write ``model`` with W0 + delta_W (and the leaves trained in full) via ``model.save_pretrained``.

    ``safetensors=False`` writes ``flax_model.msgpack``, ``True`` writes ``model.safetensors``; either
    loads with ``FlaxAutoModel....from_pretrained(directory)``. The directory appears only once whole.

    Raises:
      FileExistsError: ``directory`` holds files that are not a model directory (nothing is written); with
        ``overwrite`` they are moved aside to ``NAME.replaced-TIME-PID`` once the new copy is in place.
    """
    merged = merge(params, adapter)
    with staged_directory(directory, CONFIG_FILE, overwrite) as staging:
        model.save_pretrained(staging, params=merged, safe_serialization=safetensors)
    return Path(directory).absolute()
