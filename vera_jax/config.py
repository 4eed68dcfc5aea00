"""`VeraConfig`: the frozen, validated, JSON round-trippable description of one VeRA adapter."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Literal

import jax.numpy as jnp
import numpy as np

from vera_jax.axes import parse_rule

__all__ = ["VeraConfig", "PROJECTION_INITS", "PROJECTION_SHARINGS", "TRAIN_VECTORS"]

PROJECTION_INITS = ("kaiming_uniform", "kaiming_normal", "uniform")
PROJECTION_SHARINGS = ("shared", "per_layer")
TRAIN_VECTORS = ("both", "lambda_d", "lambda_b")


def _as_patterns(value, field: str) -> str | tuple[str, ...]:
    """A single regex stays a string; any other sequence becomes a tuple of module names."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"VeraConfig.{field}={value!r} is not a valid regular expression: {err}.") from None
        return value
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(
            f"VeraConfig.{field} must be a regex string or a sequence of module names, got {type(value).__name__}."
        ) from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"VeraConfig.{field} names must be non-empty strings, got {bad!r}.")
    return names


def _as_axis_rules(value) -> tuple[tuple[str, str], ...]:
    """``{regex: roles}`` or ``[(regex, roles), ...]`` -> a tuple of checked pairs, in order."""
    pairs = tuple(value.items()) if isinstance(value, dict) else tuple(tuple(pair) for pair in value)
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise TypeError(f"VeraConfig.kernel_axes must map path regexes to roles strings, got {pair!r}; "
                            "e.g. kernel_axes={'.*/c_attn': 'oi'}.")
        try:
            re.compile(pair[0])
        except re.error as err:
            raise ValueError(f"VeraConfig.kernel_axes pattern {pair[0]!r} is not a valid regular expression: {err}.") \
                from None
        parse_rule(pair[1], f"VeraConfig.kernel_axes[{pair[0]!r}]")
    return pairs


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig:
    """What to adapt and how; hashable, so it can be a static argument to `jax.jit`.

    Attributes:
      target_modules: which layers get VeRA, matched against '/'-joined module paths of the params tree
        (e.g. ``bert/encoder/layer/3/attention/self/query``). A string is a regex that must match the
        whole path; a sequence holds module names, each matching a path that ends with it
        (``("query", "value")`` or ``("self/query",)``), exactly like PEFT's ``target_modules``.
      r: rank of the shared projections: A is (r, in_max), B is (out_max, r).
      d_initial: initial value of every lambda_d entry (lambda_b starts at zero).
      dropout: dropout rate on the layer input before A (activation path only).
      projection_seed: seed of the key A and B are drawn from (``projection_key(config)``).
      save_projection: whether checkpoints carry A and B themselves; by default they hold only the key and
        recipe, from which A and B are rebuilt exactly (PEFT-format files always carry them).
      modules_to_save: modules trained in full, as PEFT's field of that name (e.g. a new classifier
        head); same syntax as ``target_modules``, and every leaf below a matched module is trained.
      dtype: dtype of the adapter path (A, B, the vectors and the VeRA matmuls), float32 by default
        even when the base model runs in bfloat16.
      kernel_axes: rules ``{path regex: roles}`` (first full match wins) saying which axes of an adapted
        kernel are inputs (``i``), outputs (``o``) and the layer axis of a stack (``l``); see `vera_jax.axes`.
        A module that states its axes (``nnx.Linear``, ``nnx.Einsum``, ...) needs no rule; a 2-D kernel in a
        params tree that no rule describes is a Flax ``Dense`` (in, out). GPT-2's ``FlaxConv1D`` (out, in)
        takes ``{".*": "oi"}``; a MaxText-style ``nn.scan`` stack of Dense layers ``{".*": "ilo"}``. A rule may
        name the module's weight leaf and give the einsum its call computes instead of roles
        (``{"layers/[0-9]+/attn/o": "w:BTNH,NHD->BTD"}``; see `vera_jax.axes.KernelRule`): the activation
        path of a module of unknown kind needs the einsum, to know where its output puts the output axes.

    The paper's ablations (section 5 of Kopiczko et al.); the defaults are VeRA as PEFT runs it:
      projection_init: ``"kaiming_uniform"`` (PEFT's), ``"kaiming_normal"`` (N(0, 2 / fan_in)) or
        ``"uniform"`` (U[0, 0.1), the paper's third choice).
      projection_sharing: ``"shared"``, one pair for every layer; ``"per_layer"``, a pair of its own for
        each adapted layer, drawn with that layer's fan-in (PEFT files cannot hold it).
      train_vectors: ``"both"``; ``"lambda_d"`` keeps lambda_b frozen at ``b_initial``; ``"lambda_b"``
        keeps lambda_d frozen at ``d_initial``. Frozen vectors are constants of the config: they are not
        in the trainable tree, so they get no gradient, no optimizer state and no bytes on disk.
      b_initial: initial value of every lambda_b entry, 0 by default so the adapted model starts as the
        base model; a frozen lambda_b (``train_vectors="lambda_d"``) needs it non-zero (e.g. 1.0, with
        ``d_initial=0.0`` to start from the base model).
    """

    target_modules: str | tuple[str, ...]
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0
    save_projection: bool = False
    modules_to_save: str | tuple[str, ...] = ()
    dtype: str = "float32"
    kernel_axes: tuple[tuple[str, str], ...] = ()
    projection_init: Literal["kaiming_uniform", "kaiming_normal", "uniform"] = "kaiming_uniform"
    projection_sharing: Literal["shared", "per_layer"] = "shared"
    train_vectors: Literal["both", "lambda_d", "lambda_b"] = "both"
    b_initial: float = 0.0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("target_modules", _as_patterns(self.target_modules, "target_modules"))
        set_("modules_to_save", _as_patterns(self.modules_to_save, "modules_to_save"))
        if not self.target_modules:
            raise ValueError("VeraConfig.target_modules is empty: name the layers to adapt, e.g. ('query', 'value').")
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ValueError(f"VeraConfig.r must be a positive integer, got {self.r!r}; PEFT's default is 256.")
        set_("r", int(self.r))
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ValueError(f"VeraConfig.d_initial must be a finite number, got {self.d_initial!r}; the default is 0.1.")
        set_("d_initial", float(self.d_initial))
        if isinstance(self.b_initial, bool) or not isinstance(self.b_initial, (int, float)) or not math.isfinite(
                self.b_initial):
            raise ValueError(f"VeraConfig.b_initial must be a finite number, got {self.b_initial!r}; the default is 0.")
        set_("b_initial", float(self.b_initial))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VeraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        set_("dropout", float(self.dropout))
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, (int, np.integer)):
            raise TypeError(f"VeraConfig.projection_seed must be an integer, got {self.projection_seed!r}.")
        set_("projection_seed", int(self.projection_seed))
        if not isinstance(self.save_projection, bool):
            raise TypeError(f"VeraConfig.save_projection must be True or False, got {self.save_projection!r}.")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"VeraConfig.dtype must name a floating dtype such as 'float32', got {self.dtype!r}.")
        set_("dtype", dtype.name)
        set_("kernel_axes", _as_axis_rules(self.kernel_axes))
        for name, allowed in (("projection_init", PROJECTION_INITS), ("projection_sharing", PROJECTION_SHARINGS),
                              ("train_vectors", TRAIN_VECTORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VeraConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.train_vectors == "lambda_d" and self.b_initial == 0.0:
            raise ValueError(
                "VeraConfig(train_vectors='lambda_d') freezes lambda_b at b_initial=0.0, which switches the adapter "
                "off for good; set b_initial to a non-zero value (e.g. b_initial=1.0 with d_initial=0.0)."
            )
        if self.train_vectors == "lambda_b" and self.d_initial == 0.0:
            raise ValueError(
                "VeraConfig(train_vectors='lambda_b') freezes lambda_d at d_initial=0.0, which switches the adapter "
                "off for good; set d_initial to a non-zero value (the default is 0.1)."
            )

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in ("target_modules", "modules_to_save"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        out["kernel_axes"] = [list(pair) for pair in self.kernel_axes]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> VeraConfig:
        """Inverse of `to_dict`; unknown fields are an error, not silently dropped."""
        data = dict(data)
        if "kernel_layout" in data and "kernel_axes" not in data:  # files written before kernel_axes existed
            data["kernel_axes"] = [(".*", "oi")] if data.pop("kernel_layout") == "out_in" else []
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VeraConfig got unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> VeraConfig:
        return cls.from_dict(json.loads(text))
