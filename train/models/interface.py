"""`Model`: what the jobs, the engine and the benchmarks ask of a model, whatever implements it (transformers' linen
classes through `train.models.hf_flax.HfFlaxModel`, our NNX models themselves)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax

import vera_jax

__all__ = ["Model", "CausalLM", "Logits", "MixedLogits"]

Logits = Callable[[dict, vera_jax.Adapter, dict, "jax.Array | None"], jax.Array]  # (params, adapter, batch, rng)
MixedLogits = Callable[[dict, vera_jax.Adapter, jax.Array, dict], jax.Array]  # (params, stacked, adapter_ids, batch)


class Model(Protocol):
    """A frozen base model that VeRA adapts.

    ``batch`` holds ``input_ids`` and ``attention_mask`` (B, L); ``rng`` is the key of the model's own dropout
    (and VeRA's), None evaluates.
    """

    config: Any  # the checkpoint's transformers config (model_type, positions, labels, sizes)
    base_model_name: str  # what a PEFT adapter records as its base (the hub id of a packaged model)

    @property
    def params(self) -> dict:
        """The frozen base, a nested dict of arrays (a classifier's head included)."""

    @property
    def kernel_axes(self) -> tuple[tuple[str, str], ...]:
        """VeRA's kernel roles (`vera_jax.VeraConfig.kernel_axes`) for this model's layouts."""

    @property
    def stacks(self) -> tuple[str, ...]:
        """The roots of stacked layers, which PEFT names one layer at a time."""

    def logits(self, params: dict, batch: dict, rng: jax.Array | None) -> jax.Array:
        """The model with ``params`` (no adapter; the trained head swapped in by the caller, if any) on ``batch``."""

    def vera_logits(self, path: str | vera_jax.PathPlan, config: vera_jax.VeraConfig) -> Logits:
        """``logits(params, adapter, batch, rng)``: the model adapted with ``config``, its layers on ``path`` (a path
        of `vera_jax.adapt` or a `vera_jax.PathPlan`); leaves in ``config.modules_to_save`` are trained in full."""

    def mixed_logits(self, config: vera_jax.VeraConfig) -> MixedLogits:
        """``logits(params, stacked, adapter_ids, batch)``: serving many adapters in one batch, the model in eval mode
        with example i adapted by adapter ``adapter_ids[i]`` (batch,) of ``stacked`` (`vera_jax.stack` of adapters of
        ``config``), on the activation path; row i equals ``vera_logits("activation", config)`` with that adapter."""

    def hoists_merge(self, path: str | vera_jax.PathPlan) -> bool:
        """Whether a run may merge once a step and differentiate the merged kernels
        (`train.engine.steps.make_merged_group_gradients`, on `logits`)."""

    def initial_params(self, seed: int) -> dict:
        """The params a load with ``seed`` would draw for the leaves the checkpoint lacks (a new head); the others
        as loaded."""

    def save_merged(self, directory: str | Path, adapter: vera_jax.Adapter, *, format: str, tokenizer,
                    overwrite: bool) -> Path:
        """Write the model with ``adapter`` merged into its weights as a Hugging Face model directory of ``format``
        (``flax``, ``safetensors``: a transformers Flax model; ``hf``: a transformers PyTorch model); a ValueError
        when this kind of model has no such format."""


class CausalLM(Model, Protocol):
    """A `Model` that continues prompts."""

    def generate(self, input_ids, attention_mask=None, params=None, max_new_tokens: int = 32, do_sample: bool = False,
                 pad_token_id: int = 0, eos_token_id: int | None = None):
        """Greedy continuation of left-padded prompts; ``.sequences`` holds prompt and new tokens."""
