"""How an NNX module of unknown kind holds and calls its weight, for `vera_jax.nnx.attach`.

A module of a known kind (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, tunix's ``Einsum``)
states its weight and call in `vera_jax.calls.module_call`, the registry the linen path shares. Any
other module is described by a ``VeraConfig.kernel_axes`` rule naming its weight and the einsum of its
call (`vera_jax.axes.KernelRule`); a rule of roles only serves the merged path, which never needs to know
where the output puts its axes.
"""

from __future__ import annotations

import re

from flax import nnx

from vera_jax.axes import KERNEL, KernelRule, einsum_roles
from vera_jax.calls import ModuleCall, einsum_call, module_call

__all__ = ["rule_call", "weight_of", "layer_pattern", "unknown_module_error"]


def rule_call(module: nnx.Module, path: str, rule: KernelRule) -> ModuleCall:
    """The call of a module of unknown kind, from its rule.

    Raises:
      ValueError: the module has no variable named by the rule's weight.
    """
    if not isinstance(getattr(module, rule.weight, None), nnx.Variable):
        raise ValueError(f"VeraConfig.kernel_axes gives {path!r} the weight {rule.weight!r}, but this "
                         f"{type(module).__name__} has no such variable; its weights are {_weights(module)}.")
    call = None if rule.equation is None else einsum_call(rule.equation, 1, repr(path))
    return ModuleCall(rule.weight, call, rule.roles)


def weight_of(module: nnx.Module) -> nnx.Variable | None:
    """The weight variable of a module of known kind, None for any other."""
    try:
        known = module_call(module, "")
    except ValueError:
        return getattr(module, KERNEL, None)
    return None if known is None else getattr(module, known.weight)


def layer_pattern(path: str) -> str:
    """A regex matching ``path`` in every layer: ``layers/0/attn/o_proj`` -> ``layers/\\d+/attn/o_proj``."""
    return "/".join(r"\d+" if part.isdigit() else re.escape(part) for part in path.split("/"))


def _weights(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The module's own ``nnx.Param`` variables of rank 2 or more, by attribute, with their shapes."""
    return {name: tuple(value.get_value().shape) for name, value in vars(module).items()
            if isinstance(value, nnx.Param) and getattr(value.get_value(), "ndim", 0) >= 2}


def _equations(module: nnx.Module) -> list[str]:
    return [value for value in vars(module).values() if isinstance(value, str) and "->" in value and "," in value]


def unknown_module_error(path: str, module: nnx.Module) -> ValueError:
    """The error for a target of unknown kind without a rule: its weights and equation, and the rule to add,
    computed from that equation when the module holds one, keyed by a pattern that matches every layer."""
    weights, equations = _weights(module), _equations(module)
    pattern = layer_pattern(path)
    found = f"its weights are {weights}" + (f" and it holds the einsum {equations[0]!r}" if equations else "")
    if len(weights) == 1 and len(equations) == 1:
        (weight, shape), equation = next(iter(weights.items())), equations[0]
        try:
            roles = einsum_roles(equation, 1, repr(path))
        except ValueError as err:
            return ValueError(f"Target {path!r} is a {type(module).__name__}, a module vera_jax does not know; {found}. "
                              f"{err}")
        rule = f"{weight}:{equation}" if weight != KERNEL else equation
        return ValueError(
            f"Target {path!r} is a {type(module).__name__}, a module vera_jax does not know; {found}. If its call "
            f"computes that einsum with x first (weight {shape}: roles {roles!r}), add kernel_axes={{{pattern!r}: "
            f"{rule!r}}} to the VeraConfig.")
    return ValueError(
        f"Target {path!r} is a {type(module).__name__}, a module vera_jax does not know; {found}. Add a "
        f"VeraConfig.kernel_axes rule naming its weight and the einsum its call computes, x first, e.g. "
        f"kernel_axes={{{pattern!r}: 'WEIGHT:X,KERNEL->Y'}} (or 'WEIGHT:ROLES' for the merged path only: i input, "
        "o output per weight axis).")
