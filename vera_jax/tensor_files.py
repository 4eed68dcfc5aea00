"""Safetensors files written the same, byte for byte, for the same tensors: keys in sorted order, the metadata
sorted, no time or random state; with every tensor's sha256 for the header, which readers check.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from vera_jax.checksums import tensor_sha256

__all__ = ["write_safetensors", "tensor_checksums"]

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def tensor_checksums(tensors: Mapping[str, np.ndarray]) -> str:
    """JSON ``{key: sha256 of the tensor's bytes}``, keys sorted, as the header's checksum entry holds it."""
    return json.dumps({key: tensor_sha256(value) for key, value in sorted(tensors.items())})


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (little-endian, row-major) and ``metadata`` to ``path`` in the safetensors format.

    Raises:
      ValueError: a tensor of a dtype safetensors has no name for.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    arrays, offset = [], 0
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        if value.dtype.name not in _DTYPES:
            raise ValueError(f"Tensor {key} has dtype {value.dtype}, which safetensors cannot hold; cast it to "
                             "float32.")
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        header[key] = {"dtype": _DTYPES[value.dtype.name], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}
        arrays.append(value)
        offset += value.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for value in arrays:
            file.write(value.tobytes())
