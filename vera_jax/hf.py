"""Hugging Face PyTorch module names <-> Flax parameter paths, and leaf conversions: done once, here.

Transformers' Flax models (BERT, RoBERTa, GPT-2, Llama, ViT, ...) mirror their PyTorch module trees,
so ``bert.encoder.layer.0.attention.self.query`` is ``bert/encoder/layer/0/attention/self/query``.
Leaves differ in name and layout: a PyTorch ``weight`` is a Flax ``kernel`` (2-D: transposed, for
``nn.Linear`` (out, in) -> ``Dense`` (in, out) and for GPT-2's ``Conv1D`` (in, out) -> ``FlaxConv1D``
(out, in)), a LayerNorm ``scale`` or an Embed ``embedding``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

__all__ = ["flax_path", "torch_name", "resolve_module", "to_flax_leaf", "to_torch_leaf", "layer_names",
           "split_layer_index"]


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


def layer_names(path: str, layers: int | None, stacks: Sequence[str]) -> list[str]:
    """The PyTorch module names of the Flax module at ``path``: one, or, for a stack of ``layers`` layers
    under one of ``stacks`` (e.g. ``"model/layers"``), one per layer with its index after the stack's root.

    Raises:
      ValueError: a stack under none of ``stacks``.
    """
    if layers is None:
        return [torch_name(path)]
    found = _stack_of(path, stacks)
    if found is None:
        parts = path.split("/")
        root = next(("/".join(parts[: k + 1]) for k, part in enumerate(parts) if part in _STACK_NAMES),
                    "/".join(parts[:-2]) or parts[0])
        raise ValueError(f"{path!r} is a stack of {layers} layers, and PyTorch names each layer: pass the path after "
                         f"which the layer index goes, e.g. stacks=({root!r},) for {torch_name(root)}.0...")
    root, rest = found
    return [f"{torch_name(root)}.{index}.{torch_name(rest)}" for index in range(layers)]


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
