"""How a layer's call lays out its input and output around the kernel, and VeRA's output in that layout.

A `CallSpec` names the axes of one call in einsum letters: the input x, the kernel of one layer (no
layer axis: inside a scan each iteration sees its own slice) and the output y. A Dense-like call
(``nn.Dense``, ``nnx.Linear``, GPT-2's ``FlaxConv1D``, ``DenseGeneral``) contracts x's trailing axes
with the kernel's input axes and puts the kernel's output axes last in y; an einsum says it all itself.

`module_call` is the one registry of the modules whose call is known, linen and NNX alike: the linen
activation path and `vera_jax.nnx` both ask it.
"""

from __future__ import annotations

import dataclasses
import math
import string
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vera_jax.axes import KERNEL, einsum_roles, parse_einsum
from vera_jax.ops import adapter_output, adapter_output_lean

__all__ = ["CallSpec", "ModuleCall", "module_call", "einsum_call", "adapter_call_output"]

_LETTERS = string.ascii_letters
TUNIX_WEIGHT = "w"  # the weight of tunix's Einsum


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """Einsum letters of one call: ``x``, ``kernel`` and ``y`` (``x`` and ``y`` may start with '...')."""

    x: str
    kernel: str
    y: str

    @property
    def roles(self) -> str:
        """The kernel's axis roles this call implies (no layer axis)."""
        return "".join("i" if letter in self.x else "o" for letter in self.kernel)


def dense_call(roles: str) -> CallSpec:
    """A Dense-like call of a kernel with these roles (layer axis dropped): x (..., *in), y (..., *out),
    both in kernel order."""
    roles = roles.replace("l", "")
    kernel = _LETTERS[: len(roles)]
    inputs = "".join(letter for letter, role in zip(kernel, roles) if role == "i")
    outputs = "".join(letter for letter, role in zip(kernel, roles) if role == "o")
    return CallSpec("..." + inputs, kernel, "..." + outputs)


def einsum_call(equation: str, kernel_operand: int, where: str) -> CallSpec:
    """The call of ``jnp.einsum(equation, x, kernel)`` (``kernel_operand=1``) or of ``(kernel, x)`` (0).

    Raises:
      ValueError: the kernel's input/output split is ambiguous (see `vera_jax.axes.einsum_roles`).
    """
    einsum_roles(equation, kernel_operand, where)
    operands = parse_einsum(equation)
    return CallSpec(operands[1 - kernel_operand], operands[kernel_operand], operands[2])


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """How one module calls its weight: the weight's attribute, the call (None: not known, merged path only)
    and one layer's roles and, where the module states it, weight shape."""

    weight: str
    call: CallSpec | None
    roles: str
    own_shape: tuple[int, ...] | None = None


def _nnx(module: Any, name: str) -> bool:
    """``isinstance(module, flax.nnx.<name>)``, without importing NNX: until it is imported, nothing is one."""
    cls = getattr(sys.modules.get("flax.nnx"), name, None)
    return cls is not None and isinstance(module, cls)


def _dense(roles: str, own_shape: tuple[int, ...] | None = None) -> ModuleCall:
    return ModuleCall(KERNEL, dense_call(roles), roles, own_shape)


def _einsum(weight: str, equation: str, path: str, own_shape: tuple[int, ...] | None = None) -> ModuleCall:
    call = einsum_call(equation, 1, repr(path))
    return ModuleCall(weight, call, call.roles, own_shape)


def _is_tunix_einsum(module: Any) -> bool:
    cls = type(module)
    return (cls.__name__ == "Einsum" and cls.__module__.split(".")[0] == "tunix"
            and isinstance(getattr(module, "einsum_str", None), str)
            and _nnx(getattr(module, TUNIX_WEIGHT, None), "Variable"))


def module_call(module: Any, path: str) -> ModuleCall | None:
    """How a module of known kind calls its weight, None for any other.

    Linen: ``nn.Dense`` (in, out), GPT-2's ``FlaxConv1D`` (out, in), ``nn.DenseGeneral`` (x's trailing axes
    in, the output axes last), ``nn.Einsum`` (its ``einsum_str``). NNX: ``nnx.Linear``, ``nnx.LinearGeneral``
    and ``nnx.Einsum`` likewise, and tunix's ``Einsum`` (weight ``w``; every tunix model family defines its
    own class of that name).

    Raises:
      ValueError: a ``DenseGeneral`` or ``nnx.LinearGeneral`` over other axes than x's trailing ones, or an
        einsum whose input/output split is ambiguous.
    """
    if isinstance(module, nn.Dense):
        return _dense("io")
    if type(module).__name__ == "FlaxConv1D":
        return _dense("oi")
    if isinstance(module, nn.DenseGeneral):
        axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
        if module.batch_dims or sorted(axes) != list(range(-len(axes), 0)):
            raise ValueError(f"{path!r} is a DenseGeneral over axes {module.axis} with batch_dims "
                             f"{module.batch_dims}; VeRA adapts a DenseGeneral over x's trailing axes only.")
        return _dense("i" * len(axes) + "o" * len(features))
    if isinstance(module, nn.Einsum):
        return _einsum(KERNEL, module.einsum_str, path)
    if _nnx(module, "Linear"):
        return _dense("io", (module.in_features, module.out_features))
    if _nnx(module, "LinearGeneral"):
        if module.batch_axis or sorted(module.axis) != list(range(-len(module.axis), 0)):
            raise ValueError(f"{path!r} is an nnx.LinearGeneral over axes {module.axis} with batch axes "
                             f"{dict(module.batch_axis)}; VeRA adapts it over x's trailing axes only.")
        return _dense("i" * len(module.in_features) + "o" * len(module.out_features),
                      tuple(module.in_features) + tuple(module.out_features))
    if _nnx(module, "Einsum"):
        return _einsum(KERNEL, module.einsum_str, path, tuple(module.kernel_shape))
    if _is_tunix_einsum(module):
        return _einsum(TUNIX_WEIGHT, module.einsum_str, path)
    return None


def _expand(spec: str, ndim: int, fill: str) -> str:
    """``spec`` with '...' replaced by the first letters of ``fill`` for an array of rank ``ndim``."""
    if "..." not in spec:
        return spec
    return spec.replace("...", fill[: ndim - (len(spec) - 3)])


def _per_example(vector: jax.Array, batch_ndim: int) -> jax.Array:
    """(n, k) -> (n, 1, ..., 1, k), broadcastable against (*batch, k) whose first axis is the examples'."""
    return vector.reshape(vector.shape[:1] + (1,) * (batch_ndim - 1) + vector.shape[1:])


def adapter_call_output(x: jax.Array, spec: CallSpec, kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array,
                        lambda_d: jax.Array, lambda_b: jax.Array, *, lean: bool = False) -> jax.Array:
    """VeRA's output for one call, laid out as the call's y.

    x's input axes (in kernel order) are moved last and flattened to ``in``; the (..., out) result is
    unflattened into the kernel's output axes and moved to where y has them.

    Args:
      kernel_shape: one layer's kernel shape, in ``spec.kernel`` letters.
      lambda_d: (r,), or (n, r) per example: one row for each index of x's leading axis.
      lambda_b: (out,), or (n, out) per example.
      lean: use `vera_jax.ops.adapter_output_lean` (vectors of one adapter only).

    Raises:
      ValueError: x's axes do not fit the spec or the kernel.
    """
    free = "".join(letter for letter in _LETTERS if letter not in spec.x + spec.kernel + spec.y)
    x_letters = _expand(spec.x, x.ndim, free)
    sizes = dict(zip(spec.kernel, kernel_shape))
    inputs = [letter for letter in spec.kernel if letter in spec.x]
    outputs = [letter for letter in spec.kernel if letter not in spec.x]
    if len(x_letters) != x.ndim or any(sizes[letter] != x.shape[x_letters.index(letter)] for letter in inputs):
        raise ValueError(f"An input of shape {x.shape} does not fit the call {spec.x},{spec.kernel}->{spec.y} of a "
                         f"kernel {tuple(kernel_shape)}; apply the model to the params the adapter was built for.")
    batch = [letter for letter in x_letters if letter not in inputs]
    order = [x_letters.index(letter) for letter in batch + inputs]
    batch_shape = tuple(x.shape[x_letters.index(letter)] for letter in batch)
    flat_x = jnp.transpose(x, order).reshape(batch_shape + (math.prod(sizes[c] for c in inputs),))
    per_example = [vector.ndim == 2 for vector in (lambda_d, lambda_b)]
    if any(per_example) and x_letters[0] not in batch:
        raise ValueError(f"Per-example vectors need x's leading axis to be its batch, but the call "
                         f"{spec.x},{spec.kernel}->{spec.y} contracts it with the kernel.")
    lambda_d, lambda_b = (_per_example(vector, len(batch)) if flag else vector
                          for vector, flag in zip((lambda_d, lambda_b), per_example))
    output = adapter_output_lean if lean else adapter_output
    delta = output(flat_x, a, b, lambda_d, lambda_b)  # (*batch, out)
    delta = delta.reshape(batch_shape + tuple(sizes[letter] for letter in outputs))
    y_letters = _expand(spec.y, len(batch) + len(outputs), free)
    current = batch + outputs
    return jnp.transpose(delta, [current.index(letter) for letter in y_letters])
