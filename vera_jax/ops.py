"""The VeRA math for one layer, in both forms: as a weight delta and as an added activation.

Shapes: A (r, in_max), B (out_max, r), lambda_d (r,), lambda_b (out,), x (..., in).
A layer uses the leading slices ``A[:, :in]`` and ``B[:out, :]``. A stack of L layers has vectors
(L, r) and (L, out), and its delta is (L, out, in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["delta_weight", "adapter_output", "adapter_output_lean", "promote_add", "dropout"]


def delta_weight(a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array, in_features: int) -> jax.Array:
    """``(lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])``: the (out, in) weight delta.

    With stacked vectors (L, r) and (L, out): all L deltas (L, out, in) in one batched contraction.
    """
    out_features = lambda_b.shape[-1]
    return (lambda_b[..., :, None] * b[:out_features, :]) @ (lambda_d[..., :, None] * a[:, :in_features])


def adapter_output(x: jax.Array, a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array) -> jax.Array:
    """``lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x)))`` for x (..., in) -> (..., out).

    Computed in the dtype of ``a``; ``x`` is cast to it first, as PEFT casts x to the vectors' dtype.
    """
    in_features, out_features = x.shape[-1], lambda_b.shape[-1]
    hidden = lambda_d * (x.astype(a.dtype) @ a[:, :in_features].T)  # (..., r)
    return lambda_b * (hidden @ b[:out_features, :].T)


@jax.custom_vjp
def adapter_output_lean(x: jax.Array, a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array):
    """`adapter_output` whose backward pass keeps only the r-sized ``x @ A[:, :in].T`` (..., r).

    Autodiff would also keep the (..., out) product before lambda_b; this recomputes it. A and B are
    frozen by construction in VeRA: their cotangents are zero.
    """
    return adapter_output(x, a, b, lambda_d, lambda_b)


def _lean_forward(x, a, b, lambda_d, lambda_b):
    hidden = x.astype(a.dtype) @ a[:, : x.shape[-1]].T  # (..., r): the only activation kept
    out = lambda_b * ((lambda_d * hidden) @ b[: lambda_b.shape[-1], :].T)
    x_like = jnp.zeros((0, x.shape[-1]), x.dtype)  # x's width and dtype, without keeping x
    return out, (hidden, x_like, a, b, lambda_d, lambda_b)


def _lean_backward(saved, cotangent):
    hidden, x_like, a, b, lambda_d, lambda_b = saved
    b_used = b[: lambda_b.shape[-1], :]  # (out, r)
    batch_axes = tuple(range(cotangent.ndim - 1))
    d_lambda_b = jnp.sum(cotangent * ((lambda_d * hidden) @ b_used.T), axis=batch_axes)  # recomputed (..., out)
    d_scaled = (cotangent * lambda_b) @ b_used  # (..., r)
    d_lambda_d = jnp.sum(d_scaled * hidden, axis=batch_axes)
    d_x = ((d_scaled * lambda_d) @ a[:, : x_like.shape[-1]]).astype(x_like.dtype)
    return d_x, jnp.zeros_like(a), jnp.zeros_like(b), d_lambda_d, d_lambda_b


adapter_output_lean.defvjp(_lean_forward, _lean_backward)


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


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """VeRA's dropout on a layer's input (as PEFT's ``vera_dropout``): each element zeroed with probability
    ``rate``, the rest scaled by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
