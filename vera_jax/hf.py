"""Hugging Face PyTorch module names <-> Flax parameter paths, and leaf conversions: done once, here.

Transformers' Flax models (BERT, RoBERTa, GPT-2, Llama, ViT, ...) mirror their PyTorch module trees,
so ``bert.encoder.layer.0.attention.self.query`` is ``bert/encoder/layer/0/attention/self/query``.
Leaves differ in name and layout: a PyTorch ``weight`` is a Flax ``kernel`` (2-D: transposed, for
``nn.Linear`` (out, in) -> ``Dense`` (in, out) and for GPT-2's ``Conv1D`` (in, out) -> ``FlaxConv1D``
(out, in)), a LayerNorm ``scale`` or an Embed ``embedding``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

__all__ = ["flax_path", "torch_name", "resolve_module", "to_flax_leaf", "to_torch_leaf"]


def flax_path(torch_module: str) -> str:
    return torch_module.replace(".", "/")


def torch_name(flax_module: str) -> str:
    return flax_module.replace("/", ".")


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
