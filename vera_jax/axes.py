"""Kernel axis roles: which axes of an adapted kernel are inputs, outputs, or the layer axis of a stack.

A roles string has one letter per kernel axis: ``i`` an input axis (contracted with x), ``o`` an output
axis, ``l`` the layer axis of stacked layers (at most one). VeRA sees any kernel as in = the product
of its input axes and out = the product of its output axes, and reshapes its (out, in) delta into the
kernel's own layout. Examples: ``nn.Dense``/``nnx.Linear`` (in, out) ``"io"``; GPT-2's ``FlaxConv1D``
(out, in) ``"oi"``; Qwen 3 ``q_proj`` ``BTD,DNH->BTNH`` (D, N, H) ``"ioo"``; an output projection
``BTNH,NHD->BTD`` (N, H, D) ``"iio"``; Gemma's fused ``kv_einsum`` (2, N, D, H) ``"ooio"``; a Dense
kernel stacked by ``nnx.vmap`` (L, in, out) ``"lio"`` or by a MaxText-style ``nn.scan`` (in, L, out) ``"ilo"``.

A `KernelRule` (the value of a ``VeraConfig.kernel_axes`` rule) is written ``"[weight:]roles"`` or
``"[weight:]x,kernel->y"``: the module's weight leaf (``kernel`` unless named, e.g. ``w`` for tunix's
``Einsum``) and either its roles or the einsum its call computes, from which the roles and, on the
activation path, where y puts the output axes are read (``"w:BTNH,NHD->BTD"``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

__all__ = ["DENSE", "KERNEL", "KernelRule", "parse_rule", "check_roles", "features", "layer_axis", "delta_to_kernel",
           "einsum_roles", "parse_einsum"]

DENSE = "io"  # a Flax Dense kernel (in, out): the default for a 2-D kernel that no module or rule describes
KERNEL = "kernel"  # the weight leaf of Flax's linear modules, the default a rule's weight
_ROLES = frozenset("iol")
_WEIGHT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_roles(roles: str, where: str) -> str:
    """``roles`` if it is a valid roles string (letters i/o/l, at least one i and one o, at most one l).

    Raises:
      ValueError: naming ``where`` the roles came from.
    """
    if (not isinstance(roles, str) or not roles or set(roles) - _ROLES or "i" not in roles or "o" not in roles
            or roles.count("l") > 1):
        raise ValueError(
            f"Kernel axis roles {roles!r} ({where}) are not valid: write one letter per kernel axis, 'i' for an "
            "input axis, 'o' for an output axis and at most one 'l' for the layer axis of a stack, with at least "
            "one 'i' and one 'o' (e.g. 'io' for a Dense kernel (in, out), 'ioo' for (D, N, H), 'lio' for a stack).")
    return roles


@dataclasses.dataclass(frozen=True)
class KernelRule:
    """A parsed ``kernel_axes`` rule: the weight leaf, its roles (one layer's when read from an einsum) and
    the einsum its call computes (None for a roles rule)."""

    weight: str
    roles: str
    equation: str | None = None

    def roles_for(self, rank: int) -> str:
        """The roles of a kernel of ``rank`` axes: an einsum's, with a stack's layer axis first when the kernel
        has one axis more (NNX's ``nnx.vmap``/``nnx.scan`` layout; write roles with 'l' for another place)."""
        if self.equation is not None and rank == len(self.roles) + 1:
            return "l" + self.roles
        return self.roles

    def __str__(self) -> str:
        spec = self.equation or self.roles
        return spec if self.weight == KERNEL else f"{self.weight}:{spec}"


def parse_rule(text: str, where: str) -> KernelRule:
    """``"ioo"``, ``"w:ioo"``, ``"BTD,DNH->BTNH"`` or ``"w:BTD,DNH->BTNH"`` -> a `KernelRule`.

    Raises:
      ValueError: naming ``where``: a bad weight name, roles or einsum (see `check_roles`, `einsum_roles`).
    """
    weight, colon, spec = text.rpartition(":") if isinstance(text, str) else ("", "", text)
    if colon and not _WEIGHT.fullmatch(weight):
        raise ValueError(f"Kernel rule {text!r} ({where}) names the weight {weight!r}, which is not an attribute name; "
                         "write 'weight:roles' or 'weight:x,kernel->y', e.g. 'w:ioo' or 'w:BTD,DNH->BTNH'.")
    weight = weight or KERNEL
    if isinstance(spec, str) and "->" in spec:
        return KernelRule(weight, einsum_roles(spec, 1, where), spec.replace(" ", ""))
    return KernelRule(weight, check_roles(spec, where))


def features(shape: tuple[int, ...], roles: str) -> tuple[int, int, int | None]:
    """``(in_features, out_features, layers)`` of a kernel: products of its input and output axes, and the
    size of its layer axis (None when it has none)."""
    in_features = math.prod(size for size, role in zip(shape, roles) if role == "i")
    out_features = math.prod(size for size, role in zip(shape, roles) if role == "o")
    layers = next((size for size, role in zip(shape, roles) if role == "l"), None)
    return in_features, out_features, layers


def layer_axis(roles: str) -> int | None:
    """The position of the layer axis in the kernel, or None."""
    return roles.index("l") if "l" in roles else None


def delta_to_kernel(delta: jax.Array, roles: str, shape: tuple[int, ...]) -> jax.Array:
    """A VeRA delta (out, in), or (L, out, in) for a stack, laid out as the kernel: ``shape``.

    The out index runs over the output axes row-major in kernel order, the in index likewise over the
    input axes, so a (D, N, H) kernel with roles ``"ioo"`` gets ``delta.T.reshape(D, N, H)``.
    """
    order = [k for k, role in enumerate(roles) if role == "l"]
    order += [k for k, role in enumerate(roles) if role == "o"]
    order += [k for k, role in enumerate(roles) if role == "i"]
    grouped = delta.reshape(tuple(shape[k] for k in order))
    return jnp.transpose(grouped, [order.index(k) for k in range(len(roles))])


def parse_einsum(equation: str) -> tuple[str, str, str]:
    """``"BTD,DNH->BTNH"`` -> ``("BTD", "DNH", "BTNH")``, with '...' kept as is.

    Raises:
      ValueError: not a two-operand einsum with an explicit output.
    """
    operands, arrow, output = equation.replace(" ", "").partition("->")
    parts = operands.split(",")
    if not arrow or len(parts) != 2:
        raise ValueError(f"Einsum {equation!r} is not of the form 'x,kernel->y' with an explicit output; VeRA reads "
                         "the kernel's input and output axes from it.")
    return parts[0], parts[1], output


def einsum_roles(equation: str, kernel_operand: int, where: str) -> str:
    """The roles of the kernel operand of a two-operand einsum: a kernel letter found in the other operand
    is an input axis, one found only in the output is an output axis.

    Raises:
      ValueError: a kernel letter is in both the input and the output (a batch-like axis, whose split into
        input and output is ambiguous), in neither (summed away), or the kernel has '...'.
    """
    operands = parse_einsum(equation)
    x_spec, kernel_spec, y_spec = operands[1 - kernel_operand], operands[kernel_operand], operands[2]
    if "." in kernel_spec:
        raise ValueError(f"{where}: einsum {equation!r} gives its kernel an ellipsis; VeRA needs every kernel axis "
                         "named. Add a VeraConfig.kernel_axes rule for this module.")
    roles = []
    for letter in kernel_spec:
        in_x, in_y = letter in x_spec, letter in y_spec
        if in_x == in_y:
            problem = "both the input and the output" if in_x else "neither the input nor the output"
            raise ValueError(
                f"{where}: einsum {equation!r} has kernel axis {letter!r} in {problem}, so its split into input and "
                "output axes is ambiguous; add a VeraConfig.kernel_axes rule for this module (e.g. {'<path>': 'ioo'}).")
        roles.append("i" if in_x else "o")
    return "".join(roles)
