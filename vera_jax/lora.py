"""VeRA adapters served as LoRA.

delta_W = (lambda_b * B[:out]) @ (lambda_d * A[:, :in]) is a rank-r product, so every VeRA adapter is
also a LoRA adapter: lora_A = lambda_d * A[:, :in] (r, in), lora_B = lambda_b * B[:out] (out, r),
lora_alpha = r (scaling 1). `save_lora` writes it as a standard PEFT LoRA directory, which every engine
that serves LoRA runs (PEFT, vLLM, SGLang), though none of them runs VeRA.

With ``rank=k`` each delta is replaced by its best rank-k approximation (Eckart-Young), computed through
the small r x r core: with P = lambda_b * B[:out] = Q_p R_p and Q^T = (lambda_d * A[:, :in])^T = Q_q R_q,
delta = Q_p (R_p R_q^T) Q_q^T, and the SVD of the r x r core gives the factors; the relative error
(Frobenius) of each layer is reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vera_jax import hf
from vera_jax.adapter import Adapter, LayerVectors, layer_vectors
from vera_jax.atomic import staged_directory, target_path
from vera_jax.paths import split_leaf
from vera_jax.peft import CHECKSUMS, CONFIG_FILE, MODEL_PREFIX, WEIGHTS_FILE, module_names
from vera_jax.tensor_files import tensor_checksums, write_safetensors
from vera_jax.vectors import full_leaves

__all__ = ["LoraFactors", "lora_factors", "save_lora", "KIND"]

KIND = "peft-lora"  # the kind in the vera_jax manifest of a PEFT LoRA directory


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One PyTorch layer's LoRA: ``lora_a`` (k, in), ``lora_b`` (out, k); ``relative_error`` of lora_b @ lora_a
    against VeRA's delta (0 at full rank)."""

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray
    relative_error: float


def _factors(a: np.ndarray, b: np.ndarray, lambda_d: np.ndarray, lambda_b: np.ndarray, in_features: int,
             rank: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(lora_A (k, in), lora_B (out, k), relative error) of one layer's delta, in float64."""
    left = lambda_b[:, None] * b[: lambda_b.shape[0]]  # (out, r)
    right = lambda_d[:, None] * a[:, :in_features]  # (r, in)
    if rank is None or rank >= left.shape[1]:
        return right, left, 0.0
    q_left, r_left = np.linalg.qr(left)  # (out, r), (r, r)
    q_right, r_right = np.linalg.qr(right.T)  # (in, r), (r, r)
    u, s, vt = np.linalg.svd(r_left @ r_right.T)
    root = np.sqrt(s[:rank])
    total = float(np.sqrt(np.sum(np.square(s))))
    error = float(np.sqrt(np.sum(np.square(s[rank:])))) / total if total > 0 else 0.0
    return (root[:, None] * vt[:rank]) @ q_right.T, q_left @ (u[:, :rank] * root), error


def _split(factor: tuple[np.ndarray, np.ndarray, float], names: tuple[str, ...], layer) -> list[LoraFactors]:
    """One kernel's factors as the PyTorch layers ``names``: a fused kernel's lora_B split along its first
    output axis into ``len(names)`` parts, each with the whole lora_A."""
    lora_a, lora_b, error = factor
    if len(names) == 1:
        return [LoraFactors(names[0], lora_a, lora_b, error)]
    first = next(size for size, role in zip(layer.layer_kernel_shape, layer.axes.replace("l", "")) if role == "o")
    if first != len(names):
        raise ValueError(f"The name map splits {layer.path!r} into {len(names)} PyTorch layers {list(names)}, but its "
                         f"first output axis has {first} entries (kernel {layer.kernel_shape}, roles {layer.axes!r}).")
    return [LoraFactors(name, lora_a, part, error) for name, part in zip(names, np.split(lora_b, len(names)))]


def lora_factors(adapter: Adapter, params: Mapping, *, rank: int | None = None, stacks: Sequence[str] = (),
                 names: hf.NameMap = ()) -> list[LoraFactors]:
    """The LoRA factors of every adapted layer, named as PyTorch names it: by ``names`` (a `vera_jax.hf.NameMap`,
    e.g. ``vera_jax.hf.TUNIX_GEMMA``, which also splits fused kernels), else by the params path (a stack per
    layer, see `vera_jax.peft.save_adapter`'s ``stacks``). An N-D kernel is its (out, in) matrix, as
    `vera_jax.hf` describes; a split part keeps the whole kernel's ``relative_error``.

    Args:
      rank: the LoRA rank k; None (or k >= r) is VeRA's exact rank r.

    Raises:
      ValueError: a rank below 1, per-layer projections, GPT-2 Conv1D kernels mixed with others, a stack
        under none of ``stacks`` and no name rule, a name rule that does not fit, or an adapter that does not fit.
    """
    _check_rank(rank)
    return _layer_factors(layer_vectors(params, adapter), adapter, rank, stacks, names)


def _check_rank(rank: int | None) -> None:
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer (or None for VeRA's rank r), got {rank}.")


def _layer_factors(items: tuple[LayerVectors, ...], adapter: Adapter, rank: int | None, stacks: Sequence[str],
                   names: hf.NameMap) -> list[LoraFactors]:
    """`lora_factors` of layers already paired with their vectors."""
    hf.fan_in_fan_out([item.layer.axes for item in items])
    factors = []
    for item in items:
        a, b = (np.asarray(m, np.float64) for m in adapter.projections.pair(item.layer.path))
        per_layer = hf.layer_names(item.layer.path, item.layer.layers, stacks, names)
        rows = zip(item.lambda_d, item.lambda_b) if item.layer.layers else [(item.lambda_d, item.lambda_b)]
        for parts, (lambda_d, lambda_b) in zip(per_layer, rows, strict=True):
            factor = _factors(a, b, np.asarray(lambda_d, np.float64), np.asarray(lambda_b, np.float64),
                              item.layer.in_features, rank)
            factors.extend(_split(factor, parts, item.layer))
    return factors


def save_lora(directory: str | os.PathLike, adapter: Adapter, params: Mapping, *, rank: int | None = None,
              stacks: Sequence[str] = (), names: hf.NameMap = (), task_type: str | None = None,
              base_model_name_or_path: str | None = None, overwrite: bool = False
              ) -> tuple[Path, list[LoraFactors]]:
    """Write ``adapter`` as a PEFT LoRA directory (``peft.PeftModel.from_pretrained`` loads it); returns the
    directory and the factors written (each with its relative error).

    Leaves trained in full (``modules_to_save``) are written as PEFT writes them. See `lora_factors`.

    Raises:
      ValueError: as `lora_factors`.
      FileExistsError: ``directory`` holds files that are not a LoRA adapter vera_jax wrote (nothing is
        written); with ``overwrite`` they are moved aside to a new ``NAME.replaced-TIME-PID-RANDOM`` once the new
        copy is in place.
      WriteError: the file system refused the write (no space, read-only); the old copy is whole.
    """
    _check_rank(rank)
    items = layer_vectors(params, adapter)
    factors = _layer_factors(items, adapter, rank, stacks, names)
    k = factors[0].lora_a.shape[0]
    tensors = {}
    for factor in factors:
        tensors[f"{MODEL_PREFIX}{factor.name}.lora_A.weight"] = factor.lora_a
        tensors[f"{MODEL_PREFIX}{factor.name}.lora_B.weight"] = factor.lora_b
    head = full_leaves(adapter.trainable)
    for path, value in head.items():
        module, leaf = split_leaf(path)
        name, converted = hf.to_torch_leaf(leaf, np.asarray(value))
        tensors[f"{MODEL_PREFIX}{hf.torch_name(module)}.{name}"] = converted
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": k, "lora_alpha": k, "lora_dropout": 0.0, "target_modules": [factor.name for factor in factors],
        "fan_in_fan_out": hf.fan_in_fan_out([item.layer.axes for item in items]),
        "bias": "none", "modules_to_save": module_names(adapter.config.modules_to_save, sorted(
            {hf.torch_name(split_leaf(p)[0]) for p in head})) if head else None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    with staged_directory(directory, KIND, overwrite, format="LORA") as staging:
        arrays = {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}
        write_safetensors(staging / WEIGHTS_FILE, arrays, {"format": "pt", CHECKSUMS: tensor_checksums(arrays)})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return target_path(directory), factors
