"""Merged export: the adapted model as a plain Hugging Face Flax model that needs no vera_jax to load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from vera_jax.atomic import staged_directory
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
    with staged_directory(directory) as staging:
        model.save_pretrained(staging, params=merged, safe_serialization=safetensors)
    return Path(directory).absolute()
