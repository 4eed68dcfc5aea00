"""VeRA (Vector-based Random Matrix Adaptation) for JAX and Flax, exact to Hugging Face PEFT.

Saving, loading and NNX live in submodules, imported on first use so that ``import vera_jax`` stays
light: `vera_jax.checkpoint` (Orbax), `vera_jax.peft` (PEFT's files), `vera_jax.lora` (LoRA files),
`vera_jax.export` (merged Hugging Face models), `vera_jax.hf` (PyTorch names) and `vera_jax.nnx`.
"""

import importlib

from vera_jax.activation import adapt
from vera_jax.adapter import Adapter, init_adapter
from vera_jax.config import VeraConfig
from vera_jax.errors import AdapterFileError
from vera_jax.input_groups import shared_input_groups
from vera_jax.layers import AdaptedLayer, find_layers, is_vector_path
from vera_jax.merge import merge, unmerge
from vera_jax.multi import adapt_mixed, adapters_per_pass, map_adapters, num_adapters, stack, unstack
from vera_jax.partition import combine, combined_optimizer, split
from vera_jax.plan import PathPlan, plan_paths
from vera_jax.report import count_parameters, layer_table, parameter_report
from vera_jax.timing import measured_plan, whole_step_plan

SUBMODULES = ("checkpoint", "export", "hf", "lora", "nnx", "peft")


def __getattr__(name: str):
    """``vera_jax.peft`` and the other `SUBMODULES`, imported when first named."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaptedLayer",
    "Adapter",
    "AdapterFileError",
    "PathPlan",
    "VeraConfig",
    "adapt",
    "adapt_mixed",
    "adapters_per_pass",
    "combine",
    "combined_optimizer",
    "count_parameters",
    "find_layers",
    "init_adapter",
    "is_vector_path",
    "layer_table",
    "map_adapters",
    "measured_plan",
    "merge",
    "num_adapters",
    "parameter_report",
    "plan_paths",
    "shared_input_groups",
    "split",
    "stack",
    "unmerge",
    "unstack",
    "whole_step_plan",
]
