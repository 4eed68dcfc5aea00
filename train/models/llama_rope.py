"""transformers' Flax Llama and Mistral with the config's rotary base, for models whose base is not 10000.

``FlaxLlamaRotaryEmbedding`` (and its copy ``FlaxMistralRotaryEmbedding``) builds its sine/cosine
table with a hard-coded base of 10000 and ignores ``config.rope_theta`` (SmolLM2 uses 1e5, Llama 3
5e5, Mistral 7B v0.2 1e6). `FlaxLlamaForCausalLMRopeTheta` and `FlaxMistralForCausalLMRopeTheta` are
subclasses whose modules intercept only their own rotary embeddings (``flax.linen.intercept_methods``
around their ``__call__``) and apply the table built with ``rope_theta``. Nothing global is patched:
every other model in the process, stock or not, behaves as before.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from transformers import FlaxLlamaForCausalLM, FlaxMistralForCausalLM
from transformers.models.llama import modeling_flax_llama as flax_llama
from transformers.models.mistral import modeling_flax_mistral as flax_mistral

__all__ = ["FlaxLlamaForCausalLMRopeTheta", "FlaxMistralForCausalLMRopeTheta", "ROPE_THETA_CLASSES",
           "needs_rope_theta", "sincos_table"]

HARD_CODED_BASE = 10000.0
_ROTARY_MODULES = (flax_llama.FlaxLlamaRotaryEmbedding, flax_mistral.FlaxMistralRotaryEmbedding)


def needs_rope_theta(config) -> bool:
    """Whether stock Flax Llama or Mistral would rotate this config's positions with the wrong base."""
    return (config.model_type in ROPE_THETA_CLASSES
            and float(getattr(config, "rope_theta", HARD_CODED_BASE)) != HARD_CODED_BASE)


@functools.lru_cache(maxsize=8)
def sincos_table(num_positions: int, head_dim: int, base: float) -> np.ndarray:
    """(positions, 1, 2 * head_dim) float32: sin then cos of position * base^(-2i/head_dim), halves repeated.

    The same table as transformers' ``create_sinusoidal_positions`` except for the base.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2) / head_dim))
    freqs = np.einsum("i,j->ij", np.arange(num_positions), inv_freq).astype("float32")
    angles = np.concatenate((freqs, freqs), axis=-1)
    return np.concatenate((np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]), axis=-1)


def _rotary_with_theta(next_fun, args, kwargs, context):
    """Interceptor: a Llama/Mistral rotary-embedding call, redone with the table for ``config.rope_theta``."""
    module = context.module
    if not isinstance(module, _ROTARY_MODULES) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    key, query, position_ids = args
    config = module.config
    head_dim = config.hidden_size // config.num_attention_heads
    table = sincos_table(config.max_position_embeddings, head_dim, float(config.rope_theta))
    sin, cos = jnp.split(jnp.asarray(table)[position_ids], 2, axis=-1)
    key = flax_llama.apply_rotary_pos_emb(key, sin, cos)
    query = flax_llama.apply_rotary_pos_emb(query, sin, cos)
    return jnp.asarray(key, module.dtype), jnp.asarray(query, module.dtype)


class _RopeThetaCausalLMModule(flax_llama.FlaxLlamaForCausalLMModule):
    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_rotary_with_theta):
            return super().__call__(*args, **kwargs)


class FlaxLlamaForCausalLMRopeTheta(FlaxLlamaForCausalLM):
    """``FlaxLlamaForCausalLM`` that honours ``config.rope_theta`` (loads and saves like its parent)."""

    module_class = _RopeThetaCausalLMModule


class _RopeThetaMistralCausalLMModule(flax_mistral.FlaxMistralForCausalLMModule):
    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_rotary_with_theta):
            return super().__call__(*args, **kwargs)


class FlaxMistralForCausalLMRopeTheta(FlaxMistralForCausalLM):
    """``FlaxMistralForCausalLM`` that honours ``config.rope_theta`` (loads and saves like its parent)."""

    module_class = _RopeThetaMistralCausalLMModule


# model_type -> the Flax causal-LM class that honours rope_theta.
ROPE_THETA_CLASSES = {"llama": FlaxLlamaForCausalLMRopeTheta, "mistral": FlaxMistralForCausalLMRopeTheta}
