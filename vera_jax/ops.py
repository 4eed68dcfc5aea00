"""The VeRA math for one layer, in both forms: as a weight delta and as an added activation.

Shapes: A (r, in_max), B (out_max, r), lambda_d (r,), lambda_b (out,), x (..., in).
A layer uses the leading slices ``A[:, :in]`` and ``B[:out, :]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["delta_weight", "adapter_output", "promote_add"]


def delta_weight(a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array, in_features: int) -> jax.Array:
    """``(lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])``: the (out, in) weight delta."""
    out_features = lambda_b.shape[-1]
    return (lambda_b[:, None] * b[:out_features, :]) @ (lambda_d[:, None] * a[:, :in_features])


def adapter_output(x: jax.Array, a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array) -> jax.Array:
    """``lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x)))`` for x (..., in) -> (..., out).

    Computed in the dtype of ``a``; ``x`` is cast to it first, as PEFT casts x to the vectors' dtype.
    """
    in_features, out_features = x.shape[-1], lambda_b.shape[-1]
    hidden = lambda_d * (x.astype(a.dtype) @ a[:, :in_features].T)  # (..., r)
    return lambda_b * (hidden @ b[:out_features, :].T)


def _wider(first, second):
    """The float dtype with more bits; float32 between two different 16-bit types (bf16, f16)."""
    first_bits, second_bits = jnp.finfo(first).bits, jnp.finfo(second).bits
    if first == second or first_bits > second_bits:
        return first
    return second if second_bits > first_bits else jnp.dtype(jnp.float32)


def promote_add(base: jax.Array, delta: jax.Array) -> jax.Array:
    """``base + delta`` computed in the wider dtype of the two, returned in ``base``'s dtype."""
    wide = _wider(base.dtype, delta.dtype)
    return (base.astype(wide) + delta.astype(wide)).astype(base.dtype)
