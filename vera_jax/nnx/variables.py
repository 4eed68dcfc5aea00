"""VeRA's NNX variable types, and their sharding, which follows the adapted kernel's.

A kernel annotated with ``nnx.with_partitioning`` (its ``out_sharding`` metadata) gives its vectors:
a stack's layer axis sharded as the kernel's layer axis; lambda_b (out,) sharded as the kernel's leading
output axis when the output axes after it are not sharded (out flattens the output axes, so its
contiguous blocks are then the kernel's), otherwise replicated; lambda_d (r,) replicated. A and B are
replicated. When the kernel's value is already placed on a mesh, the new variables are placed on it too.
"""

from __future__ import annotations

import jax
from flax import nnx

from vera_jax.layers import LAMBDA_B
from vera_jax.projections import Projections

__all__ = ["VeraVector", "VeraProjection", "VeraProjections", "VeraLayerIndex", "vector_like_kernel"]


class VeraVector(nnx.LoRAParam):
    """lambda_d (r,) or lambda_b (out,) of one adapted module; (L, r) / (L, out) for a stack of L layers."""


class VeraProjection(nnx.Variable):
    """A (r, in_max) or B (out_max, r): frozen, shared by every adapted layer, and not an ``nnx.Param``."""


class VeraLayerIndex(nnx.Variable):
    """(L,) int32 0..L-1 on an adapted stack with VeRA dropout: each scan iteration slices its layer's index,
    which its dropout key folds in. Not trained, not an ``nnx.Param``."""


class VeraProjections(nnx.Module):
    """The model's one pair of projections, replicated on ``mesh`` when one is given."""

    def __init__(self, projections: Projections, mesh: jax.sharding.Mesh | None = None):
        self.A = _variable(VeraProjection, projections.A, (None,) * projections.A.ndim, mesh)
        self.B = _variable(VeraProjection, projections.B, (None,) * projections.B.ndim, mesh)


def kernel_mesh(kernel: nnx.Variable) -> jax.sharding.Mesh | None:
    """The mesh the kernel is placed on or annotated with, if any."""
    mesh = kernel.get_metadata().get("mesh")
    sharding = getattr(kernel.get_value(), "sharding", None)
    if mesh is None and isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh,
                                                                                          jax.sharding.Mesh):
        mesh = sharding.mesh
    return mesh


def vector_like_kernel(value: jax.Array, name: str, kernel: nnx.Variable, roles: str) -> VeraVector:
    """The `VeraVector` ``name`` of a kernel with these roles, sharded with it (see the module docstring).

    Args:
      value: (r,) / (out,), or (L, r) / (L, out) for a stack (its layer axis first).
      roles: the kernel's axis roles, 'l' at a stack's layer axis.
    """
    names = kernel.get_metadata().get("out_sharding")
    if not names:
        return VeraVector(value)
    names = tuple(names) + (None,) * (len(roles) - len(names))
    layer = tuple(axis for axis, role in zip(names, roles) if role == "l")
    outputs = [axis for axis, role in zip(names, roles) if role == "o"]
    out = outputs[0] if all(axis is None for axis in outputs[1:]) else None
    spec = layer + ((out,) if name == LAMBDA_B else (None,))
    rules = {"sharding_rules": kernel.get_metadata()["sharding_rules"]} if kernel.has_metadata("sharding_rules") else {}
    return _variable(VeraVector, value, spec, kernel_mesh(kernel), **rules)


def _variable(cls: type[nnx.Variable], value: jax.Array, spec: tuple, mesh: jax.sharding.Mesh | None,
              **metadata) -> nnx.Variable:
    """A variable annotated with ``spec``, placed on ``mesh`` when there is one (otherwise only annotated)."""
    return cls(value, out_sharding=spec, mesh=mesh, eager_sharding=mesh is not None, **metadata)
