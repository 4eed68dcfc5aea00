"""The device mesh (data x fsdp), the shardings of the batch, the frozen base and the small trees, and placing
host values on it."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vera_jax.host import to_host
from vera_jax.paths import compile_rules, first_match, flatten, unflatten

__all__ = ["AXES", "make_mesh", "one_device_mesh", "batch_sharding", "replicated", "base_shardings", "MeshError",
           "BASE_RULES", "place", "global_batch"]

AXES = ("data", "fsdp")
# FSDP for the frozen base: matrices are split along their first dimension over the fsdp axis.
BASE_RULES = ((r".*/(kernel|embedding)", PartitionSpec("fsdp", None)), (r".*", PartitionSpec()))


class MeshError(ValueError):
    """The mesh does not fit the devices or the batch."""


def make_mesh(spec: str, batch_size: int) -> Mesh:
    """``'DATAxFSDP'`` (or 'auto': all devices on data) over every device of every process.

    The global batch is split over both axes, so it must divide by DATA * FSDP.
    """
    devices = jax.devices()
    if spec == "auto":
        shape = (len(devices), 1)
    else:
        try:
            shape = tuple(int(part) for part in spec.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 2 or min(shape) < 1:
            raise MeshError(f"--mesh must look like '8x1' (data x fsdp), got {spec!r}.")
    if shape[0] * shape[1] != len(devices):
        raise MeshError(f"Mesh {shape[0]}x{shape[1]} needs {shape[0] * shape[1]} devices, but there are "
                        f"{len(devices)}; choose DATA x FSDP = {len(devices)}.")
    if batch_size % (shape[0] * shape[1]) != 0:
        raise MeshError(f"Batch size {batch_size} does not divide over the {shape[0] * shape[1]} devices of mesh "
                        f"{shape[0]}x{shape[1]}; use a multiple of {shape[0] * shape[1]}.")
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def one_device_mesh() -> Mesh:
    """A 1x1 mesh of this process's first device (a sweep's)."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def base_shardings(params: Mapping, mesh: Mesh, rules=BASE_RULES) -> dict:
    """A sharding per frozen leaf from path rules; a dimension that does not divide stays replicated, and a
    stack's leaf (one axis more than its rule's spec: the layer axis first) keeps that axis whole."""
    compiled = compile_rules(rules)
    fsdp = mesh.shape["fsdp"]

    def sharding(path, leaf):
        spec = first_match(compiled, path) or PartitionSpec()
        if len(spec) and leaf.ndim == len(spec) + 1:
            spec = PartitionSpec(None, *spec)
        if len(spec) > leaf.ndim or any(axis and leaf.shape[i] % fsdp for i, axis in enumerate(spec)):
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return unflatten({path: sharding(path, leaf) for path, leaf in flatten(params).items()}, like=params)


def place(tree, sharding):
    """Host values (or replicated arrays) -> fresh global arrays with ``sharding`` (one sharding, or a tree)."""
    shardings = sharding if isinstance(sharding, dict) else jax.tree.map(lambda _: sharding, tree)

    def put(x, s):
        x = np.asarray(to_host(x))
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(batch: dict, sharding) -> dict:
    """Every process holds the global batch (cheap for text) and supplies its own contiguous rows."""
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(sharding, np.split(v, count)[index], v.shape)
            for k, v in batch.items()}
