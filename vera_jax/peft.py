"""Read and write the VeRA adapter directories that Hugging Face PEFT reads and writes.

A directory holds ``adapter_config.json`` (``peft_type: "VERA"``) and ``adapter_model.safetensors``:

    base_model.model.<module>.vera_lambda_b   (out,)
    base_model.model.<module>.vera_lambda_d   (r,)
    base_model.vera_A (r, in_max), base_model.vera_B (out_max, r)   when save_projection
    base_model.model.<module>.weight / .bias  modules_to_save, in PyTorch layout

Only JSON and safetensors are read, never pickle. Every key, shape, dtype and value is checked before
anything is returned, so a hostile or broken file gives one error naming the file, the key and the
fix, and never half an adapter. Files vera_jax writes also carry every tensor's sha256 in the
safetensors header (``vera_jax_sha256``, which PEFT ignores), checked on load; PEFT's own files have none.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from vera_jax import hf
from vera_jax.adapter import STORED, Adapter, layer_vectors
from vera_jax.atomic import read_stable, staged_directory, target_path
from vera_jax.config import VeraConfig
from vera_jax.errors import AdapterFileError
from vera_jax.layers import LAMBDA_B, LAMBDA_D, VECTOR_NAMES, AdaptedLayer, find_layers, vector_module
from vera_jax.paths import SEP, flatten, module_paths, split_leaf, unflatten
from vera_jax.projections import Projections, kaiming_uniform_bound, projection_shapes
from vera_jax.tensor_files import tensor_checksums, write_safetensors
from vera_jax.vectors import full_leaves

__all__ = ["load_adapter", "save_adapter", "AdapterFileError", "CONFIG_FILE", "WEIGHTS_FILE", "TORCH_GENERATOR",
           "KIND"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KIND = "peft-vera"  # the kind in the vera_jax manifest of a PEFT VeRA directory
MODEL_PREFIX = "base_model.model."
A_KEY, B_KEY = "base_model.vera_A", "base_model.vera_B"
CHECKSUMS = "vera_jax_sha256"  # safetensors header entry: every tensor's sha256 (PEFT ignores it)
TORCH_GENERATOR = "torch-cpu-generator"  # PEFT's draw from projection_prng_key, rebuilt with torch
PEFT_FIELDS = frozenset({
    "auto_mapping", "base_model_name_or_path", "bias", "d_initial", "fan_in_fan_out", "inference_mode",
    "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save", "peft_type", "peft_version",
    "projection_prng_key", "r", "revision", "save_projection", "target_modules", "task_type", "vera_dropout",
})


def _fail(file: Path, key: str, problem: str, fix: str) -> AdapterFileError:
    return AdapterFileError(f"{file}: {key}: {problem}. {fix}")


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _fail(path, "(file)", "missing", "Point to a directory written by PeftModel.save_pretrained.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, "(file)", f"not valid JSON ({err})", "Re-save the adapter.") from None
    if not isinstance(config, dict):
        raise _fail(path, "(file)", "not a JSON object", "Re-save the adapter.")
    if config.get("peft_type") != "VERA":
        raise _fail(path, "peft_type", f"is {config.get('peft_type')!r}, not 'VERA'",
                    "vera_jax reads VeRA adapters only; load other PEFT types with PEFT itself")
    unknown = sorted(set(config) - PEFT_FIELDS)
    if unknown:
        raise _fail(path, ", ".join(unknown), "unknown fields for a PEFT VeraConfig",
                    "Remove them, or re-save the adapter with a PEFT version whose fields vera_jax knows")
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "d_initial": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
        "vera_dropout": lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
        "fan_in_fan_out": lambda v: isinstance(v, bool),
        "save_projection": lambda v: isinstance(v, bool),
        "projection_prng_key": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "target_modules": lambda v: isinstance(v, str) or (isinstance(v, list) and v and
                                                           all(isinstance(t, str) and t for t in v)),
        "modules_to_save": lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
    }
    defaults = {"d_initial": 0.1, "vera_dropout": 0.0, "fan_in_fan_out": False, "save_projection": True,
                "projection_prng_key": 0, "modules_to_save": None}
    for field, valid in checks.items():
        value = config.get(field, defaults.get(field))
        if field not in config and field not in defaults or not valid(value):
            raise _fail(path, field, f"invalid value {value!r}", "Fix the field or re-save the adapter")
        config[field] = value
    if config.get("bias", "none") != "none" or config.get("layers_to_transform") is not None:
        raise _fail(path, "bias / layers_to_transform", "only bias='none' on all layers is supported",
                    "Train the adapter with PEFT's defaults for these fields")
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        fix = ("vera_jax never reads pickle files; re-save with PeftModel.save_pretrained(dir, "
               "safe_serialization=True)") if pickled else "Point to a directory written by PeftModel.save_pretrained"
        raise _fail(path, "(file)", "missing" + (f" (found {pickled})" if pickled else ""), fix)
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="flax") as file:
            for key in file.keys():
                tensors[key] = np.asarray(file.get_tensor(key))
            header = file.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupted files
        raise _fail(path, "(file)", f"truncated or corrupted ({err})", "Re-save or re-download the adapter") from None
    if CHECKSUMS in header:
        _check_checksums(path, header[CHECKSUMS], tensors)
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise _fail(path, key, f"has dtype {value.dtype}, not a float", "Re-save the adapter in float32")
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise _fail(path, key, "holds NaN or infinite values", "Re-train or re-save the adapter")
    return tensors


def _check_checksums(path: Path, recorded: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Files vera_jax wrote carry a checksum of every tensor; a tensor that differs from it is damage."""
    try:
        expected = json.loads(recorded)
    except ValueError:
        raise _fail(path, CHECKSUMS, "damaged header", "Re-save or re-download the adapter") from None
    got = json.loads(tensor_checksums(tensors))
    if expected != got:
        differing = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise _fail(path, ", ".join(differing[:4]), "does not match the checksum written with the file: the file is "
                    "damaged", "Re-save or re-download the adapter")


def _saved_module(module: str, modules_to_save: list[str] | None) -> str | None:
    """The module PEFT wrapped as a whole (PEFT's rule: the name, or a name ending with '.' + entry)."""
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(prefix == name or prefix.endswith("." + name) for name in modules_to_save or ()):
            return prefix
    return None


def _peft_projections(seed: int, r: int, in_max: int, out_max: int, file: Path) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's A and B from ``projection_prng_key``, drawn with torch's CPU generator exactly as PEFT does."""
    try:
        import torch
    except ImportError:
        raise _fail(file, "save_projection", "is false, so A and B must be rebuilt with PyTorch's generator, and "
                    "torch is not installed", "pip install torch (CPU is enough), or re-save the adapter with "
                    "save_projection=True") from None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = []
    for shape, fan_in in (((r, in_max), in_max), ((out_max, r), r)):
        bound = kaiming_uniform_bound(fan_in)
        draws.append(torch.empty(shape).uniform_(-bound, bound, generator=generator).numpy())
    return draws[0], draws[1]


def load_adapter(directory: str | os.PathLike, params: Mapping, *, dtype: str = "float32",
                 stacks: Sequence[str] = (), kernel_axes: Sequence[tuple[str, str]] | None = None) -> Adapter:
    """Read the PEFT VeRA adapter in ``directory`` for ``params``, as a `vera_jax.Adapter`.

    A and B come from the file, or (``save_projection: false``) from ``projection_prng_key`` drawn with
    torch's CPU generator exactly as PEFT draws them. With ``stacks`` (e.g. ``("model/layers",)``), the
    PyTorch layers ``model.layers.{i}...`` become the L layers of a stack in ``params`` (kernels with the
    layer axis first, as an NNX ``nnx.vmap`` stack has them): vectors (L, r) and (L, out).
    ``kernel_axes`` are the model's kernel layouts, as `VeraConfig.kernel_axes` (``((".*", "oi"),)`` for
    Flax GPT-2's (out, in) kernels); None: (in, out) kernels, Flax Dense and nn.Linear alike, a stack's
    with its layer axis first. The file's ``fan_in_fan_out`` must agree with them.

    Raises:
      AdapterFileError: anything wrong with the files or their fit to ``params``.
    """
    directory = Path(directory)
    peft_config, tensors = read_stable(directory, lambda: (_read_config(directory), _read_tensors(directory)))
    flat_params = flatten(params)
    mapped = _map_tensors(directory / WEIGHTS_FILE, tensors, peft_config, flat_params, stacks)
    config, layers = _vera_config(directory / CONFIG_FILE, peft_config, mapped, params, dtype=dtype, stacks=stacks,
                                  kernel_axes=kernel_axes)
    _check_fit(directory, peft_config, layers, mapped, flat_params, assumed_axes=kernel_axes is None)
    a, b, generator = _projections(directory, tensors, peft_config, layers)
    trainable = unflatten({p: jnp.asarray(v, dtype) for p, v in mapped.vectors.items()} |
                          {p: jnp.asarray(v, flat_params[p].dtype) for p, v in mapped.head.items()})
    adapter = Adapter(trainable=trainable, projections=Projections(A=jnp.asarray(a, dtype), B=jnp.asarray(b, dtype)),
                      config=config, generator=generator)
    try:
        layer_vectors(params, adapter, layers=layers)
    except ValueError as err:
        fix = "Check fan_in_fan_out (true for GPT-2's Conv1D layers)"
        raise _fail(directory / WEIGHTS_FILE, "vera_lambda_b", str(err), fix) from None
    return adapter


class _Mapped(NamedTuple):
    """A PEFT file's tensors under vera_jax's '/'-joined paths."""

    vectors: dict[str, np.ndarray]  # lambda_d / lambda_b by path; a stack's per-layer rows stacked, layer first
    head: dict[str, np.ndarray]  # modules_to_save leaves by path, in Flax layout
    head_modules: set[str]  # the modules the head leaves belong to
    stacked_rows: dict[str, int]  # the vectors stacked from per-layer rows: how many rows each


def _map_tensors(file: Path, tensors: Mapping[str, np.ndarray], peft_config: dict, flat_params: Mapping,
                 stacks: Sequence[str]) -> _Mapped:
    """PEFT's names (``base_model.model.<module>.<leaf>``) to the modules of ``flat_params``, vectors checked
    against ``r`` and head leaves converted to the Flax layout of the leaves they replace; A and B are left out."""
    modules = set(module_paths(flat_params))
    r = peft_config["r"]
    vectors, head, head_modules, stacked_rows = {}, {}, set(), {}
    for key, value in tensors.items():
        if key in (A_KEY, B_KEY):
            continue
        module, _, leaf = key.removeprefix(MODEL_PREFIX).rpartition(".")
        wrapped = _saved_module(module, peft_config["modules_to_save"])
        module, index = hf.split_layer_index(module, stacks) if leaf in VECTOR_NAMES else (module, None)
        if not key.startswith(MODEL_PREFIX) or not module or (leaf not in VECTOR_NAMES and wrapped is None):
            raise _fail(file, key, "unexpected key for a VeRA adapter", "Remove it or re-save the adapter")
        path = hf.resolve_module(module, modules)
        if path is None:
            raise _fail(file, key, f"names module {module!r}, which these params do not have",
                        "Load the adapter onto the model it was trained for (into a stack of its layers: pass "
                        "stacks=(the stack's path,), e.g. ('model/layers',))")
        if leaf in VECTOR_NAMES:
            expected = (r,) if leaf == LAMBDA_D else value.shape
            if value.ndim != 1 or value.shape != expected:
                raise _fail(file, key, f"has shape {value.shape}, but r={r} in {CONFIG_FILE} needs ({r},)"
                            if leaf == LAMBDA_D else f"has shape {value.shape}, not a vector",
                            "Use the adapter_config.json saved with these tensors")
            if index is None:
                vectors[path + SEP + leaf] = value
            else:
                stacked_rows.setdefault(path + SEP + leaf, {})[index] = value
            continue
        module_params = {split_leaf(p)[1]: v for p, v in flat_params.items() if split_leaf(p)[0] == path}
        try:
            name, converted = hf.to_flax_leaf(module_params, leaf, value)
        except KeyError as err:
            raise _fail(file, key, str(err), "Load the adapter onto the model it was trained for") from None
        if converted.shape != tuple(module_params[name].shape):
            raise _fail(file, key, f"has shape {value.shape}, which does not fit {path}/{name} "
                        f"{tuple(module_params[name].shape)}", "Load the adapter onto a model with the same head")
        head[path + SEP + name] = converted
        head_modules.add(hf.resolve_module(wrapped, modules) or path)

    for path, rows in stacked_rows.items():
        shapes = sorted({row.shape for row in rows.values()})
        if sorted(rows) != list(range(len(rows))) or path in vectors or len(shapes) != 1:
            raise _fail(file, f"{hf.torch_name(path)} (per layer)", f"has layers {sorted(rows)[:8]} of "
                        f"shapes {shapes[:3]}" + (" and an unstacked copy" if path in vectors else ""),
                        "Write every layer of the stack once, numbered from 0, each of one shape")
        vectors[path] = np.stack([rows[index] for index in range(len(rows))])
    return _Mapped(vectors, head, head_modules, {path: len(rows) for path, rows in stacked_rows.items()})


def _vera_config(file: Path, peft_config: dict, mapped: _Mapped, params: Mapping, *, dtype: str,
                 stacks: Sequence[str], kernel_axes: Sequence[tuple[str, str]] | None
                 ) -> tuple[VeraConfig, list[AdaptedLayer]]:
    """The `VeraConfig` of PEFT's config and the mapped tensors, and the layers of ``params`` it adapts."""
    targets = peft_config["target_modules"]
    if isinstance(targets, list):  # a stack's per-layer names are the stack's one module
        targets = tuple(dict.fromkeys(hf.flax_path(hf.split_layer_index(t, stacks)[0]) for t in targets))
    else:
        targets = "|".join(sorted({vector_module(p) for p in mapped.vectors}))
    try:
        config = VeraConfig(r=peft_config["r"], target_modules=targets, d_initial=peft_config["d_initial"],
                            dropout=peft_config["vera_dropout"], projection_seed=peft_config["projection_prng_key"],
                            save_projection=peft_config["save_projection"],
                            modules_to_save=tuple(sorted(mapped.head_modules)), dtype=dtype,
                            kernel_axes=_stack_axes(stacks) if kernel_axes is None else kernel_axes)
        return config, find_layers(params, config)
    except ValueError as err:
        raise _fail(file, "target_modules", str(err), "Load the adapter onto the model it was trained for") from None


def _check_fit(directory: Path, peft_config: dict, layers: list[AdaptedLayer], mapped: _Mapped, flat_params: Mapping,
               *, assumed_axes: bool) -> None:
    """The mapped tensors fit the ``layers`` of the base: its kernel layouts, its saved modules whole, a stack's
    layer count, and vectors for exactly the layers ``target_modules`` selects."""
    weights_file = directory / WEIGHTS_FILE
    _check_fan_in_fan_out(directory / CONFIG_FILE, peft_config["fan_in_fan_out"], layers, assumed=assumed_axes)
    _check_saved_modules(weights_file, peft_config["modules_to_save"], flat_params, mapped.head)
    for layer in layers:
        rows = {mapped.stacked_rows[key] for key in (layer.path + SEP + name for name in VECTOR_NAMES)
                if key in mapped.stacked_rows}
        if rows and rows != {layer.layers}:
            raise _fail(weights_file, f"{hf.torch_name(layer.path)} (per layer)", f"has {sorted(rows)} layers, but "
                        f"the stack in these params has {layer.layers}", "Load the adapter onto the model it was "
                        "trained for, with every layer of the stack written")
    vector_layers = sorted({vector_module(p) for p in mapped.vectors})
    missing = sorted({layer.path for layer in layers} - set(vector_layers))
    extra = sorted(set(vector_layers) - {layer.path for layer in layers})
    incomplete = sorted(p for p in vector_layers if {p + SEP + n for n in VECTOR_NAMES} - set(mapped.vectors))
    if missing or extra or incomplete:
        raise _fail(weights_file, "vera_lambda_*", f"vectors missing for {missing[:4] + incomplete[:4]}, "
                    f"or present for layers target_modules does not select {extra[:4]}",
                    "Use the adapter_config.json saved with these tensors")


def _projections(directory: Path, tensors: Mapping[str, np.ndarray], peft_config: dict,
                 layers: list[AdaptedLayer]) -> tuple[np.ndarray, np.ndarray, str]:
    """A, B and their generator: the file's, checked to cover ``layers``, or drawn from ``projection_prng_key``
    with torch's CPU generator as PEFT draws them."""
    weights_file, r = directory / WEIGHTS_FILE, peft_config["r"]
    (_, in_max), (out_max, _) = projection_shapes(layers, r)
    if (A_KEY in tensors) != (B_KEY in tensors):
        raise _fail(weights_file, A_KEY if B_KEY in tensors else B_KEY, "missing while its partner is present",
                    "Re-save the adapter")
    if peft_config["save_projection"] and A_KEY not in tensors:
        raise _fail(weights_file, f"{A_KEY}, {B_KEY}", f"missing, but {CONFIG_FILE} says save_projection: true "
                    "(PEFT refuses this file too)", "Re-save the adapter with its projections")
    if A_KEY not in tensors:
        a, b = _peft_projections(peft_config["projection_prng_key"], r, in_max, out_max, directory / CONFIG_FILE)
        return a, b, TORCH_GENERATOR
    a, b = tensors[A_KEY], tensors[B_KEY]
    if a.ndim != 2 or a.shape[0] != r or a.shape[1] < in_max:
        raise _fail(weights_file, A_KEY, f"has shape {a.shape}; r={r} and these layers need ({r}, >={in_max})",
                    "Use the adapter_config.json saved with these tensors, on the same model")
    if b.ndim != 2 or b.shape[1] != r or b.shape[0] < out_max:
        raise _fail(weights_file, B_KEY, f"has shape {b.shape}; r={r} and these layers need (>={out_max}, {r})",
                    "Use the adapter_config.json saved with these tensors, on the same model")
    return a, b, STORED


def _stack_axes(stacks: Sequence[str]) -> list[tuple[str, str]]:
    """(in, out) kernels, as PyTorch nn.Linear layers load into Flax; under a stack's root with the layer axis first."""
    return [(re.escape(root.rstrip("/")) + "/.*", "lio") for root in stacks]


def _check_fan_in_fan_out(file: Path, fan_in_fan_out: bool, layers, assumed: bool) -> None:
    """The file's ``fan_in_fan_out`` (PyTorch Conv1D weights, (in, out)) must describe the model's kernels,
    whose layouts were given as ``kernel_axes`` or, when ``assumed``, taken as (in, out)."""
    for layer in layers:
        roles = layer.axes.replace("l", "")
        if roles in ("io", "oi") and (roles == "oi") != fan_in_fan_out:
            kind = "(out, in), as Flax GPT-2's Conv1D" if roles == "oi" else "(in, out), as Flax Dense / nn.Linear"
            how = (f"no kernel_axes were given, so {layer.path}'s kernel was taken as {kind}" if assumed else
                   f"the kernel_axes given say {layer.path}'s kernel is {kind}")
            raise _fail(file, "fan_in_fan_out", f"is {str(fan_in_fan_out).lower()}, but {how}",
                        "Pass the model's kernel_axes to load_adapter (((\".*\", \"oi\"),) for Flax GPT-2's (out, in) "
                        "kernels, none for (in, out) ones); change fan_in_fan_out only if the file itself is wrong")


def _check_saved_modules(file: Path, modules_to_save: list[str] | None, flat_params: Mapping, head: Mapping) -> None:
    """Every leaf of the modules ``modules_to_save`` names must be in the file, else the base's own, untrained
    values would be used. Names no module of the params has are skipped, as PEFT skips them."""
    for name in modules_to_save or ():
        leaves = [p for p in flat_params if _saved_module(hf.torch_name(split_leaf(p)[0]), [name])]
        missing = [p for p in leaves if p not in head]
        if missing:
            raise _fail(file, name, f"listed in {CONFIG_FILE}'s modules_to_save, but {missing[:4]} are not in the "
                        "file (PEFT would use the base model's untrained values)",
                        "Re-save the adapter with its trained modules")


def module_names(patterns, torch_names: list[str]) -> list[str]:
    """PEFT's list-of-names form of ``target_modules`` / ``modules_to_save``: the config's names, or the
    exact PyTorch module names (``torch_names``) when it used a regex."""
    return [hf.torch_name(p) for p in patterns] if not isinstance(patterns, str) else torch_names


def save_adapter(directory: str | os.PathLike, adapter: Adapter, params: Mapping, *, task_type: str | None = None,
                 base_model_name_or_path: str | None = None, stacks: Sequence[str] = (), names: hf.NameMap = (),
                 overwrite: bool = False) -> Path:
    """Write ``adapter`` as a directory ``peft.PeftModel.from_pretrained`` loads.

    A and B are always written (PyTorch cannot rebuild JAX's random bits), with ``save_projection:
    true``; a vector that ``config.train_vectors`` freezes is written as its constant value. ``params``
    is the base the adapter belongs to; it is used to check the fit and is not saved. A stack of L layers
    (an NNX ``nnx.vmap`` stack, vectors (L, r) / (L, out)) is written as its L PyTorch layers, named with
    the layer index after the stack's root in ``stacks`` (``("model/layers",)``: ``model.layers.{i}...``).
    ``names`` maps module paths to PyTorch names (a `vera_jax.hf.NameMap`, e.g. ``vera_jax.hf.TUNIX_LLAMA3``);
    an einsum kernel is written as its (out, in) ``nn.Linear``.

    Raises:
      ValueError: per-layer projections, which PEFT files cannot hold; a fused kernel that ``names`` splits
        (its parts use other rows of B than PEFT gives them: export it with `vera_jax.lora.save_lora`); GPT-2
        Conv1D kernels mixed with others; an adapter that does not fit ``params``; or a stack under none of
        ``stacks`` and no name rule.
      FileExistsError: ``directory`` holds files that are not a PEFT VeRA adapter vera_jax wrote (nothing is
        written); with ``overwrite`` they are moved aside to a new ``NAME.replaced-TIME-PID-RANDOM`` once the new
        copy is in place.
      WriteError: the file system refused the write (no space, read-only); the old copy is whole.
    """
    config = adapter.config
    if config.projection_sharing != "shared":
        raise ValueError(f"PEFT's VeRA holds one shared A/B pair; an adapter with projection_sharing="
                         f"{config.projection_sharing!r} cannot be written as a PEFT adapter. Keep it as a vera_jax "
                         "checkpoint (vera_jax.checkpoint.save), or export the merged model.")
    items = layer_vectors(params, adapter)
    conv1d = hf.fan_in_fan_out([item.layer.axes for item in items])
    head = full_leaves(adapter.trainable)
    tensors = {A_KEY: adapter.projections.A, B_KEY: adapter.projections.B}
    written = []
    for item in items:
        per_layer = hf.layer_names(item.layer.path, item.layer.layers, stacks, names)
        fused = next((parts for parts in per_layer if len(parts) > 1), None)
        if fused is not None:
            raise ValueError(f"{item.layer.path!r} is a fused kernel written as {list(fused)}; each part's VeRA uses "
                             "its own rows of B, but PEFT gives every layer B[:out]. Export this adapter as LoRA "
                             "(vera_jax.lora.save_lora, or `export --format lora`), which serves the same deltas.")
        rows = zip(item.lambda_d, item.lambda_b) if item.layer.layers else [(item.lambda_d, item.lambda_b)]
        for (name,), (lambda_d, lambda_b) in zip(per_layer, rows, strict=True):
            tensors[f"{MODEL_PREFIX}{name}.{LAMBDA_D}"] = lambda_d
            tensors[f"{MODEL_PREFIX}{name}.{LAMBDA_B}"] = lambda_b
            written.append(name)
    for path, value in head.items():
        module, leaf = split_leaf(path)
        name, converted = hf.to_torch_leaf(leaf, np.asarray(value))
        tensors[f"{MODEL_PREFIX}{hf.torch_name(module)}.{name}"] = converted
    head_modules = sorted({split_leaf(p)[0] for p in head})
    peft_config = {
        "peft_type": "VERA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "target_modules": written if names else module_names(config.target_modules, written),
        "projection_prng_key": config.projection_seed, "save_projection": True, "vera_dropout": config.dropout,
        "d_initial": config.d_initial, "fan_in_fan_out": conv1d, "bias": "none",
        "modules_to_save": (module_names(config.modules_to_save, [hf.torch_name(m) for m in head_modules])
                            if head else None),
        "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    with staged_directory(directory, KIND, overwrite, format="VERA") as staging:
        arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
        write_safetensors(staging / WEIGHTS_FILE, arrays, {"format": "pt", CHECKSUMS: tensor_checksums(arrays)})
        (staging / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return target_path(directory)
