"""`HfFlaxModel`: a transformers Flax (linen) model as a `train.models.interface.Model`."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

import vera_jax
from vera_jax import export as merged_export

__all__ = ["HfFlaxModel", "config_kernel_axes"]


def config_kernel_axes(config) -> tuple[tuple[str, str], ...]:
    """Flax GPT-2's ``FlaxConv1D`` stores kernels (out, in); other Flax models' Dense kernels are (in, out)."""
    return ((".*", "oi"),) if config.model_type == "gpt2" else ()


class HfFlaxModel:
    """A sequence classifier or causal LM of transformers' Flax classes; ``module`` is the transformers model."""

    stacks = ()  # transformers' Flax layers are listed, one module each

    def __init__(self, module, base_model_name: str):
        self.module = module
        self.base_model_name = base_model_name

    @property
    def config(self):
        return self.module.config

    @property
    def params(self) -> dict:
        return self.module.params

    @property
    def kernel_axes(self) -> tuple[tuple[str, str], ...]:
        return config_kernel_axes(self.config)

    def logits(self, params: dict, batch: dict, rng: jax.Array | None) -> jax.Array:
        return self.module(batch["input_ids"], attention_mask=batch["attention_mask"], params=params,
                           train=rng is not None, dropout_rng=rng).logits

    def vera_logits(self, path: str | vera_jax.PathPlan, config: vera_jax.VeraConfig):
        """Adapted through `vera_jax.adapt` (``config`` is the adapter's own); the key splits into the model's
        dropout and VeRA's, which the merged path never draws."""
        del config

        def logits(params, adapter, batch, rng):
            model_rng, vera_rng = (None, None) if rng is None else jax.random.split(rng)
            dropout = None if path == "merged" else vera_rng
            run = vera_jax.adapt(lambda p: self.logits(p, batch, model_rng), adapter, path=path, dropout_rng=dropout)
            return run(params)

        return logits

    def mixed_logits(self, config: vera_jax.VeraConfig):
        """Through `vera_jax.adapt_mixed` (``config`` is the stack's own)."""
        del config

        def logits(params, stacked, adapter_ids, batch):
            return vera_jax.adapt_mixed(lambda p: self.logits(p, batch, None), stacked, adapter_ids)(params)

        return logits

    def hoists_merge(self, path: str | vera_jax.PathPlan) -> bool:
        return isinstance(path, str) and path == "merged"

    @functools.cached_property
    def _init_weights(self):
        return jax.jit(self.module.init_weights, static_argnums=1)

    def initial_params(self, seed: int) -> dict:
        """transformers' initialisation from ``seed`` (what it draws for a head the checkpoint lacks)."""
        return self._init_weights(jax.random.PRNGKey(seed), self.module.input_shape)

    def save_merged(self, directory: str | Path, adapter: vera_jax.Adapter, *, format: str, tokenizer,
                    overwrite: bool) -> Path:
        if format not in ("flax", "safetensors"):
            raise ValueError(f"a linen model's merged export is a transformers Flax model (--format flax or "
                             f"safetensors), not {format!r}.")
        return merged_export.save_merged(directory, adapter, self.params, self.module, tokenizer=tokenizer,
                                         safetensors=format == "safetensors", overwrite=overwrite)

    def generate(self, input_ids, attention_mask=None, params=None, **kwargs):
        return self.module.generate(input_ids, attention_mask=attention_mask, params=params, **kwargs)
