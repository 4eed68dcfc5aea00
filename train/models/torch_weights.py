"""A checkpoint directory's PyTorch-named safetensors, read as numpy arrays: the weights our NNX models load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["read_safetensors"]


def read_safetensors(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the ``*.safetensors`` files in ``directory`` (one file, or a model's shards) by its name.

    Raises:
      ValueError: no safetensors file there.
    """
    from safetensors.numpy import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no .safetensors weights; the NNX backend reads PyTorch-named "
                         "safetensors (use --backend linen for other checkpoints).")
    state_dict = {}
    for file in files:
        state_dict |= load_file(file)
    return state_dict
