"""Merged export: the adapted model as a plain Hugging Face Flax model that needs no vera_jax to load."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from vera_jax.merge import merge
from vera_jax.projections import Projections

__all__ = ["save_merged"]


def save_merged(model, params: Mapping, trainable: Mapping, projections: Projections,
                directory: str | os.PathLike, *, safetensors: bool = False) -> Path:
    """Write ``model`` with W0 + delta_W (and trained head leaves) via ``model.save_pretrained``.

    ``safetensors=False`` writes ``flax_model.msgpack``, ``True`` writes ``model.safetensors``; either
    loads with ``FlaxAutoModel....from_pretrained(directory)``. The directory appears only once whole.
    """
    merged = merge(params, trainable, projections)
    directory = Path(directory).absolute()
    staging = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, params=merged, safe_serialization=safetensors)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
