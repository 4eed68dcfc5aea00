"""The sha256 checksums every vera_jax file and run checkpoint records and its reader checks: of tensors' bytes, of a
tree's leaves, and of JSON in its canonical form."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from vera_jax.host import to_host

__all__ = ["tensor_sha256", "tensor_records", "canonical_json", "canonical_json_sha256"]


def tensor_sha256(*arrays) -> str:
    """sha256 of the host arrays' bytes, row-major, one array after another."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def tensor_records(tree) -> dict[str, dict]:
    """``{leaf path: {"shape", "dtype", "sha256"}}`` of every leaf of ``tree`` (its host copy, `vera_jax.host.to_host`,
    as `numpy.ascontiguousarray` makes it: a scalar has shape [1]), paths as `jax.tree_util.keystr` writes them."""
    records = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(to_host(tree)):
        value = np.ascontiguousarray(leaf)
        records[jax.tree_util.keystr(path)] = {"shape": list(value.shape), "dtype": str(value.dtype),
                                               "sha256": tensor_sha256(value)}
    return records


def canonical_json(value) -> str:
    """``value`` as canonical JSON: keys sorted, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_json_sha256(value) -> str:
    """sha256 of ``value``'s `canonical_json`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()
