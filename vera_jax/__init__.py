"""VeRA (Vector-based Random Matrix Adaptation) for JAX and Flax, exact to Hugging Face PEFT."""

from vera_jax.activation import activation_path, adapt
from vera_jax.config import VeraConfig
from vera_jax.layers import LAMBDA_B, LAMBDA_D, AdaptedLayer, find_layers, find_trainable_leaves
from vera_jax.merge import merge, unmerge
from vera_jax.multi import adapt_mixed, adapters_per_pass, map_adapters, num_adapters, stack, unstack
from vera_jax.ops import adapter_output, adapter_output_lean, delta_weight
from vera_jax.partition import combine, combined_optimizer, split, trainable_labels
from vera_jax.projections import Projections, init_projections, kaiming_uniform_bound, projection_key
from vera_jax.report import count_parameters, layer_table, lora_parameters, parameter_report
from vera_jax.strategy import PathPlan, plan_paths, shared_input_groups, whole_step_plan
from vera_jax.vectors import init_trainable, init_vectors

__all__ = [
    "LAMBDA_B",
    "LAMBDA_D",
    "AdaptedLayer",
    "Projections",
    "VeraConfig",
    "activation_path",
    "adapt",
    "adapt_mixed",
    "adapters_per_pass",
    "PathPlan",
    "adapter_output",
    "adapter_output_lean",
    "combine",
    "combined_optimizer",
    "count_parameters",
    "delta_weight",
    "find_layers",
    "find_trainable_leaves",
    "init_projections",
    "init_trainable",
    "init_vectors",
    "kaiming_uniform_bound",
    "layer_table",
    "merge",
    "num_adapters",
    "parameter_report",
    "lora_parameters",
    "map_adapters",
    "plan_paths",
    "projection_key",
    "shared_input_groups",
    "split",
    "stack",
    "trainable_labels",
    "unmerge",
    "unstack",
    "whole_step_plan",
]
