"""Which layers of a params tree VeRA adapts, and which leaves are trained in full."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vera_jax.axes import DENSE, KERNEL, KernelRule, features, parse_rule
from vera_jax.config import VeraConfig
from vera_jax.paths import SEP, compile_rules, first_match, flatten, module_paths, patterns_regex, split_leaf

__all__ = ["AdaptedLayer", "find_layers", "find_full_leaves", "trained_vectors", "is_vector_path", "vector_module",
           "LAMBDA_D", "LAMBDA_B", "VECTOR_NAMES", "LAYER_INDEX"]

LAMBDA_D = "vera_lambda_d"  # (r,): scales the r-sized side, between A and B
LAMBDA_B = "vera_lambda_b"  # (out,): scales the layer's output side, after B
VECTOR_NAMES = (LAMBDA_D, LAMBDA_B)
# (L,) 0..L-1 beside a stack's vectors (linen: a leaf; NNX: a `VeraLayerIndex`): which layer a scan iteration runs,
# for VeRA's dropout key.
LAYER_INDEX = "vera_layer_index"
_VECTOR_RULES = compile_rules([(patterns_regex(VECTOR_NAMES).pattern, True)])
_MAX_LISTED = 40


def is_vector_path(path: str) -> bool:
    """Whether a '/'-joined leaf path names a VeRA vector (``.../vera_lambda_d`` or ``.../vera_lambda_b``)."""
    return first_match(_VECTOR_RULES, path) is not None


def vector_module(path: str) -> str | None:
    """The adapted module a vector leaf belongs to (``'a/query/vera_lambda_d'`` -> ``'a/query'``); None for
    any other leaf."""
    return split_leaf(path)[0] if is_vector_path(path) else None


def trained_vectors(config: VeraConfig) -> tuple[str, ...]:
    """The vector names the trainable tree holds under ``config.train_vectors``; the others are constants."""
    return {"both": VECTOR_NAMES, "lambda_d": (LAMBDA_D,), "lambda_b": (LAMBDA_B,)}[config.train_vectors]


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One adapted linear layer, or a stack of them.

    Attributes:
      path: '/'-joined module path in the params tree; its kernel is at ``kernel_path``.
      kernel_shape: shape of the stored kernel, any rank.
      axes: the kernel's axis roles (`vera_jax.axes`), e.g. ``"io"`` for (in, out), ``"lio"`` for a stack.
      in_features: columns of A it uses, ``A[:, :in_features]``: the product of the input axes.
      out_features: rows of B it uses, ``B[:out_features, :]``: the product of the output axes; also the
        size of lambda_b.
      layers: L, the size of the layer axis of a stack (its vectors are lambda_d (L, r), lambda_b (L, out));
        None for a single layer.
      weight: the kernel's leaf name in its module (``kernel``; ``w`` for tunix's ``Einsum``).
      equation: the einsum the module's call computes (x first), when a rule gave one.
    """

    path: str
    kernel_shape: tuple[int, ...]
    axes: str
    in_features: int
    out_features: int
    layers: int | None = None
    weight: str = KERNEL
    equation: str | None = None

    @property
    def kernel_path(self) -> str:
        return self.path + SEP + self.weight

    def vector_shape(self, name: str, r: int) -> tuple[int, ...]:
        """lambda_d: (r,) or (L, r); lambda_b: (out,) or (L, out)."""
        size = r if name == LAMBDA_D else self.out_features
        return (size,) if self.layers is None else (self.layers, size)

    @property
    def layer_kernel_shape(self) -> tuple[int, ...]:
        """One layer's kernel shape: ``kernel_shape`` without the layer axis (what a scan iteration sees)."""
        return tuple(size for size, role in zip(self.kernel_shape, self.axes) if role != "l")


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _listing(paths: list[str]) -> str:
    shown = "\n  ".join(paths[:_MAX_LISTED])
    more = f"\n  ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _kernel_roles(path: str, shape: tuple[int, ...], rule: KernelRule | None) -> str:
    """The axis roles of the kernel at ``path``: by its ``VeraConfig.kernel_axes`` rule, else Dense's for a
    2-D kernel; checked against the kernel's rank.

    Raises:
      ValueError: no rule describes a kernel of rank other than 2, or the roles do not fit its rank.
    """
    roles = None if rule is None else rule.roles_for(len(shape))
    if roles is None:
        if len(shape) != 2:
            raise ValueError(
                f"Target {path!r} has a kernel of shape {shape} whose input and output axes no module or rule "
                f"states; add a VeraConfig.kernel_axes rule for it, e.g. kernel_axes={{{path!r}: "
                f"{'i' + 'o' * (len(shape) - 1)!r}}} (one letter per axis: i input, o output, l layer axis).")
        roles = DENSE
    if len(roles) != len(shape):
        raise ValueError(
            f"Kernel axis roles {roles!r} for {path!r} name {len(roles)} axes, but its kernel has shape {shape}; "
            "give one letter per kernel axis (a stack's layer axis included, as 'l').")
    return roles


def find_layers(params: Mapping, config: VeraConfig) -> tuple[AdaptedLayer, ...]:
    """The layers ``config.target_modules`` selects, in params order, with their kernels' axis roles
    (by ``config.kernel_axes``; ``vera_jax.nnx`` writes the roles its modules state into ``config.kernel_axes``).

    Only shapes are read, so ``params`` may be a tree of ``jax.ShapeDtypeStruct``.

    Raises:
      ValueError: nothing matches (the error lists the linear layers it saw), a match has no
        ``kernel``, or its kernel's axes are unknown or do not fit its shape.
    """
    flat = flatten(params)
    regex = patterns_regex(config.target_modules)
    matched = [path for path in module_paths(flat) if regex.fullmatch(path)]
    if not matched:
        candidates = [p[: -len("/kernel")] for p, leaf in flat.items() if p.endswith("/kernel") and len(_shape(leaf)) >= 2]
        hint = ""
        if set(params) == {"params"}:
            hint = "\nThe tree has a single top-level 'params' key: pass variables['params'], not the variables dict."
        raise ValueError(
            f"VeraConfig.target_modules={config.target_modules!r} matches no module of the params tree. "
            f"Module paths with a kernel are:{_listing(candidates)}\n"
            "Use names that end such paths (e.g. ('query', 'value')) or a regex matching whole paths." + hint
        )
    rules = compile_rules([(pattern, parse_rule(text, pattern)) for pattern, text in config.kernel_axes])
    layers = []
    for path in matched:
        rule = first_match(rules, path)
        weight = KERNEL if rule is None else rule.weight
        kernel = flat.get(path + SEP + weight)
        if kernel is None or len(_shape(kernel)) < 2:
            leaves = [f"{p} {_shape(leaf)}" for p, leaf in flat.items() if p.startswith(path + SEP)]
            raise ValueError(
                f"Target {path!r} is not a linear layer with a {weight!r} of rank 2 or more; its leaves are:"
                f"{_listing(leaves)}\nNarrow VeraConfig.target_modules so it selects linear layers only, or name "
                "a module's weight in its VeraConfig.kernel_axes rule (e.g. 'w:ioo').")
        shape = _shape(kernel)
        roles = _kernel_roles(path, shape, rule)
        layers.append(AdaptedLayer(path, shape, roles, *features(shape, roles), weight=weight,
                                   equation=None if rule is None else rule.equation))
    return tuple(layers)


def find_full_leaves(params: Mapping, config: VeraConfig, *,
                     layers: tuple[AdaptedLayer, ...] | None = None) -> tuple[str, ...]:
    """Leaf paths trained in full (``config.modules_to_save``), e.g. ``('classifier/bias', 'classifier/kernel')``.

    Args:
      layers: ``find_layers(params, config)``, where the caller has it already.

    Raises:
      ValueError: ``config.modules_to_save`` is set but matches no leaf, or it overlaps an adapted kernel.
    """
    if not config.modules_to_save:
        return ()
    flat = flatten(params)
    regex = patterns_regex(config.modules_to_save, with_leaves=True)
    leaves = tuple(path for path in flat if regex.fullmatch(path))
    if not leaves:
        raise ValueError(
            f"VeraConfig.modules_to_save={config.modules_to_save!r} matches no parameter. Module paths are:"
            f"{_listing(module_paths(flat))}"
        )
    adapted_kernels = {layer.kernel_path for layer in (find_layers(params, config) if layers is None else layers)}
    overlap = sorted(adapted_kernels.intersection(leaves))
    if overlap:
        raise ValueError(
            f"{overlap} are both adapted by VeRA and trained in full; drop them from VeraConfig.modules_to_save "
            "or from VeraConfig.target_modules."
        )
    return leaves
