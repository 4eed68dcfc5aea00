"""Hugging Face PyTorch module names <-> Flax parameter paths, and leaf conversions: done once, here.

Transformers' Flax models (BERT, RoBERTa, GPT-2, Llama, ViT, ...) mirror their PyTorch module trees,
so ``bert.encoder.layer.0.attention.self.query`` is ``bert/encoder/layer/0/attention/self/query``.
Leaves differ in name and layout: a PyTorch ``weight`` is a Flax ``kernel`` (2-D: transposed, for
``nn.Linear`` (out, in) -> ``Dense`` (in, out) and for GPT-2's ``Conv1D`` (in, out) -> ``FlaxConv1D``
(out, in)), a LayerNorm ``scale`` or an Embed ``embedding``.

NNX models written apart from transformers (tunix's Llama 3, Qwen 3, Gemma) name their modules their own
way and keep attention weights as einsum kernels ((D, N, H) for q, Gemma's fused (2, K, D, H) kv): a
name map (`NameMap`: ``(path regex, PyTorch name template(s))`` rules, first full match wins) gives each
adapted module's Hugging Face ``nn.Linear`` name(s). A template may use the regex's named groups and
``{layer}``: the ``layer`` group of a listed layer's path, or each index of a stacked one. Several
templates split a fused kernel along its first output axis, in order. The Hugging Face weight of an
einsum kernel is its (out, in) matrix: the output axes flattened row-major in kernel order, the input
axes likewise (tunix's loaders reshape them so). `TUNIX_LLAMA3`, `TUNIX_QWEN3` and `TUNIX_GEMMA`
(Gemma and Gemma 3) are supplied.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np

__all__ = ["flax_path", "torch_name", "resolve_module", "to_flax_leaf", "to_torch_leaf", "layer_names",
           "split_layer_index", "fan_in_fan_out", "NameMap", "TUNIX_LLAMA3", "TUNIX_QWEN3", "TUNIX_GEMMA"]

NameMap = Sequence[tuple[str, str | Sequence[str]]]
_LAYER = r"layers/(?:(?P<layer>\d+)/)?"  # a listed layer's index, or none in a stacked (nnx.vmap) one
_TORCH_LAYER = "model.layers.{layer}."
TUNIX_LLAMA3: NameMap = (
    (_LAYER + r"attn/(?P<name>[qkvo]_proj)", _TORCH_LAYER + "self_attn.{name}"),
    (_LAYER + r"mlp/(?P<name>(?:gate|up|down)_proj)", _TORCH_LAYER + "mlp.{name}"),
)
TUNIX_QWEN3: NameMap = TUNIX_LLAMA3
TUNIX_GEMMA: NameMap = (
    (_LAYER + r"attn/q_einsum", _TORCH_LAYER + "self_attn.q_proj"),
    (_LAYER + r"attn/kv_einsum", (_TORCH_LAYER + "self_attn.k_proj", _TORCH_LAYER + "self_attn.v_proj")),
    (_LAYER + r"attn/qkv_einsum", tuple(_TORCH_LAYER + f"self_attn.{p}_proj" for p in "qkv")),
    (_LAYER + r"attn/attn_vec_einsum", _TORCH_LAYER + "self_attn.o_proj"),
    (_LAYER + r"mlp/(?P<name>(?:gate|up|down)_proj)", _TORCH_LAYER + "mlp.{name}"),
)


_STACK_NAMES = ("layers", "layer", "h", "blocks")  # only to suggest a stack's root in an error


def flax_path(torch_module: str) -> str:
    return torch_module.replace(".", "/")


def torch_name(flax_module: str) -> str:
    return flax_module.replace("/", ".")


def _stack_of(path: str, stacks: Sequence[str]) -> tuple[str, str] | None:
    """(root, rest) of a Flax path inside one of ``stacks``, or None."""
    for root in stacks:
        if path.startswith(root.rstrip("/") + "/"):
            return root.rstrip("/"), path[len(root.rstrip("/")) + 1:]
    return None


def _mapped_names(path: str, layers: int | None, names: NameMap) -> list[tuple[str, ...]] | None:
    """The PyTorch names of ``path`` by the first rule of ``names`` that matches it (see the module
    docstring), one tuple of parts per layer; None when no rule matches.

    Raises:
      ValueError: a template names a group the rule's regex lacks, or a stack's rule names no ``{layer}``.
    """
    for pattern, templates in names:
        found = re.fullmatch(pattern, path)
        if found is None:
            continue
        templates = (templates,) if isinstance(templates, str) else tuple(templates)
        groups = {key: value for key, value in found.groupdict().items() if value is not None}
        indices = [groups.get("layer")] if layers is None else range(layers)
        if layers is not None and not all("{layer}" in t for t in templates):
            raise ValueError(f"{path!r} is a stack of {layers} layers, but the name map's templates {templates} have "
                             "no '{layer}' for the index PyTorch gives each layer.")
        try:
            return [tuple(t.format(**(groups | {"layer": index})) for t in templates) for index in indices]
        except KeyError as err:
            raise ValueError(f"The name map's template for {pattern!r} uses {err}, which its regex does not capture "
                             f"in {path!r}.") from None
    return None


def layer_names(path: str, layers: int | None, stacks: Sequence[str], names: NameMap = ()) -> list[tuple[str, ...]]:
    """The PyTorch module names of the Flax or NNX module at ``path``: one tuple per layer (several for a stack
    of ``layers`` layers), holding the modules the kernel's parts become (one, or more for a fused kernel).

    A ``names`` rule that matches decides (see the module docstring); otherwise the path's own names, and
    a stack under one of ``stacks`` (e.g. ``"model/layers"``) gets its index after the stack's root.

    Raises:
      ValueError: a stack under none of ``stacks`` and no rule, or a rule that does not fit.
    """
    mapped = _mapped_names(path, layers, names)
    if mapped is not None:
        return mapped
    if layers is None:
        return [(torch_name(path),)]
    found = _stack_of(path, stacks)
    if found is None:
        parts = path.split("/")
        root = next(("/".join(parts[: k + 1]) for k, part in enumerate(parts) if part in _STACK_NAMES),
                    "/".join(parts[:-2]) or parts[0])
        raise ValueError(f"{path!r} is a stack of {layers} layers, and PyTorch names each layer: pass the path after "
                         f"which the layer index goes, e.g. stacks=({root!r},) for {torch_name(root)}.0..., or a "
                         "name map with '{layer}'.")
    root, rest = found
    return [(f"{torch_name(root)}.{index}.{torch_name(rest)}",) for index in range(layers)]


def fan_in_fan_out(roles: Collection[str]) -> bool:
    """PEFT's ``fan_in_fan_out`` for kernels of these roles: true when all are GPT-2's Conv1D (out, in) kernels
    (``"oi"``), false when none is (Dense (in, out) and einsum kernels alike, written as nn.Linear).

    Raises:
      ValueError: both kinds, which PEFT's one flag cannot describe.
    """
    kinds = {one.replace("l", "") == "oi" for one in roles}
    if len(kinds) != 1:
        raise ValueError(f"PEFT's files give every layer one layout (fan_in_fan_out), but these kernels mix GPT-2's "
                         f"Conv1D (out, in) with others: {sorted(set(roles))}. Export the two kinds as two adapters.")
    return kinds.pop()


def split_layer_index(torch_module: str, stacks: Sequence[str]) -> tuple[str, int | None]:
    """A PyTorch module name -> (the name without its layer index, the index) when a stack holds it:
    ``model.layers.3.self_attn.q_proj`` -> (``model.layers.self_attn.q_proj``, 3) with stacks ``("model/layers",)``;
    (the name, None) otherwise."""
    for root in (torch_name(root.rstrip("/")) for root in stacks):
        if not torch_module.startswith(root + "."):
            continue
        index, _, inner = torch_module[len(root) + 1:].partition(".")
        if index.isdigit() and inner:
            return f"{root}.{inner}", int(index)
    return torch_module, None


def resolve_module(torch_module: str, modules: Collection[str]) -> str | None:
    """The Flax module path for a PyTorch module name, allowing for a base-model prefix on either side.

    ``bert.encoder.layer.0...`` finds ``encoder/layer/0/...`` in a ``FlaxBertModel`` (no ``bert``
    prefix) and vice versa. Returns None when no single module fits.
    """
    path = flax_path(torch_module)
    if path in modules:
        return path
    candidates = {path.split("/", 1)[1]} if "/" in path else set()
    candidates |= {f"{top}/{path}" for top in {m.split("/", 1)[0] for m in modules}}
    found = sorted(c for c in candidates if c in modules)
    return found[0] if len(found) == 1 else None


def to_flax_leaf(module_params: Mapping, torch_leaf: str, tensor: np.ndarray) -> tuple[str, np.ndarray]:
    """A PyTorch state-dict leaf of one module -> (Flax leaf name, value in Flax layout).

    Raises:
      KeyError: the module has no Flax leaf that corresponds.
    """
    if torch_leaf == "bias" and "bias" in module_params:
        return "bias", tensor
    if torch_leaf == "weight":
        if "kernel" in module_params:
            return "kernel", tensor.T if tensor.ndim == 2 else np.transpose(tensor, (2, 3, 1, 0))
        for name in ("scale", "embedding"):
            if name in module_params:
                return name, tensor
    raise KeyError(f"no Flax leaf for PyTorch '{torch_leaf}' among {sorted(module_params)}")


def to_torch_leaf(flax_leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """(Flax leaf name, value) -> (PyTorch leaf name, value in PyTorch layout); inverse of `to_flax_leaf`."""
    if flax_leaf == "kernel":
        return "weight", value.T if value.ndim == 2 else np.transpose(value, (3, 2, 0, 1))
    if flax_leaf in ("scale", "embedding"):
        return "weight", value
    if flax_leaf == "bias":
        return "bias", value
    raise KeyError(f"no PyTorch leaf for Flax '{flax_leaf}'")
