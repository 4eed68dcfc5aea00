"""A Llama-architecture causal LM as a Flax NNX model (`train.models.nnx_llama`), presented to the jobs as a
`train.models.interface.CausalLM`: the adapted model is a pure function of (params, adapter) on either path
(`vera_jax.nnx.functional`).

Weights come from a directory of PyTorch-named safetensors (the packaged SmolLM2, converted from its
GGUF, or any Llama checkpoint); layers are stacked and run with ``nnx.scan`` by default, or kept in a list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vera_jax
import vera_jax.nnx
from train.models import nnx_llama, scan
from train.models import nnx_state
from train.models.nnx_state import holding
from train.models.torch_weights import read_safetensors

__all__ = ["NnxCausalLM", "load_nnx_causal_lm", "STACK"]

STACK = "model/layers"  # where a scanned model's stacked layers live; PyTorch numbers them model.layers.{i}


@dataclasses.dataclass(frozen=True)
class Output:
    logits: jax.Array


@dataclasses.dataclass(frozen=True)
class Generated:
    sequences: jax.Array  # (batch, prompt + new tokens)


class NnxCausalLM:
    """An `nnx_llama.LlamaForCausalLM` split into its graphdef and params (a plain nested dict)."""

    def __init__(self, model: nnx_llama.LlamaForCausalLM, config, base_model_name: str):
        """``config``: the transformers config of the checkpoint (``model_type``, positions, ...);
        ``base_model_name``: what a PEFT adapter records as its base."""
        self.config = config
        self.base_model_name = base_model_name
        self.scan_layers = model.model.scan_layers
        self.scan_remat = model.model.scan_remat if self.scan_layers else None
        self.graphdef, self._state = nnx.split(model)
        self.params = nnx.to_pure_dict(self._state)

    @property
    def stacks(self) -> tuple[str, ...]:
        """Stacked layer roots, for PEFT's per-layer names."""
        return (STACK,) if self.scan_layers else ()

    @property
    def kernel_axes(self) -> tuple[tuple[str, str], ...]:
        """VeRA's kernel roles: ``nnx.Linear`` kernels (in, out), a stack's with its layer axis first."""
        return ((f"{STACK}/.*", "lio"),) if self.scan_layers else ()

    def module(self, params) -> nnx_llama.LlamaForCausalLM:
        """The NNX model holding ``params`` (its own variables; nothing is copied eagerly under jit)."""
        return holding(self.graphdef, self._state, params)

    def __call__(self, input_ids, attention_mask=None, params=None, train: bool = False, dropout_rng=None) -> Output:
        del train, dropout_rng  # the Llama has no dropout
        return Output(self.module(self.params if params is None else params)(input_ids, attention_mask))

    def logits(self, params, batch: dict, rng: jax.Array | None) -> jax.Array:
        del rng  # the Llama has no dropout
        return self(batch["input_ids"], batch["attention_mask"], params=params).logits

    def vera_logits(self, path: str, config: vera_jax.VeraConfig) -> Callable:
        """``logits(params, adapter, batch, rng)`` of the model adapted with ``config`` on ``path``; ``rng`` draws
        VeRA's dropout (``config.dropout``; the model has none of its own), which the merged path never draws."""
        template = vera_jax.nnx.attach(self.module(self.params), config, path=path)
        call = vera_jax.nnx.functional(template)

        def logits(params, adapter, batch, rng):
            return call(params, adapter, batch["input_ids"], batch["attention_mask"],
                        dropout_key=None if path == "merged" else rng)

        return logits

    def mixed_logits(self, config: vera_jax.VeraConfig) -> Callable:
        """Through `vera_jax.nnx.mixed` on a template adapted with ``config``, whose own vectors and A/B are never
        read (the stack's are)."""
        return nnx_state.mixed_logits(self.module(self.params), config)

    def hoists_merge(self, path) -> bool:
        """Never: NNX models merge inside their own modules."""
        return False

    def initial_params(self, seed: int) -> dict:
        """The params as loaded: every leaf comes from the checkpoint, whatever the seed."""
        del seed
        return self.params

    def save_merged(self, directory, adapter, *, format: str, tokenizer, overwrite: bool) -> Path:
        raise ValueError("an NNX causal LM's adapter exports as a PEFT or LoRA adapter (--format peft or lora); "
                         "merged exports are written for NNX classifiers (--format hf) and linen models.")

    def generate(self, input_ids, attention_mask=None, params=None, max_new_tokens: int = 32, do_sample: bool = False,
                 pad_token_id: int = 0, eos_token_id: int | None = None) -> Generated:
        """Greedy continuation of left-padded prompts (batch, prompt); each step runs the whole buffer (no
        KV cache: answers of a few dozen tokens), and a row that emitted ``eos_token_id`` pads from then on."""
        if do_sample:
            raise ValueError("NnxCausalLM.generate decodes greedily only (do_sample=False).")
        ids = jnp.asarray(input_ids)
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
        batch, prompt = ids.shape
        total = prompt + max_new_tokens
        ids = jnp.concatenate([ids, jnp.full((batch, max_new_tokens), pad_token_id, ids.dtype)], axis=1)
        mask = jnp.concatenate([mask, jnp.zeros((batch, max_new_tokens), mask.dtype)], axis=1)
        step = jax.jit(_greedy_step, static_argnums=0)
        done = jnp.zeros((batch,), bool)
        params = self.params if params is None else params
        for position in range(prompt, total):
            ids, mask, done = step(self, params, ids, mask, done, position, pad_token_id,
                                   -1 if eos_token_id is None else eos_token_id)
        return Generated(ids)


def _greedy_step(model: NnxCausalLM, params, ids, mask, done, position, pad_id, eos_id):
    """Writes each row's next token at ``position`` (pad once a row is done)."""
    logits = model(ids, mask, params=params).logits
    token = jnp.argmax(jnp.take(logits, position - 1, axis=1), axis=-1).astype(ids.dtype)
    token = jnp.where(done, pad_id, token)
    ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None], position, axis=1)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, (~done)[:, None].astype(mask.dtype), position, axis=1)
    return ids, mask, done | (token == eos_id)


def load_nnx_causal_lm(directory: Path, config, base_model_name: str, *, dtype: str = "float32",
                       scan_layers: bool = True, scan_remat: str | None = None) -> NnxCausalLM:
    """The Llama checkpoint in ``directory`` (``model.safetensors`` or shards, PyTorch names) as an NNX model
    (``scan_remat``: see `train.models.nnx_llama.LlamaForCausalLM`; None: its default).

    Raises:
      ValueError: no safetensors weights there, or weights that do not fit ``config``.
    """
    state_dict = read_safetensors(directory)
    if dtype != "float32":
        state_dict = {name: value.astype(np.float32).astype(jnp.dtype(dtype)) for name, value in state_dict.items()}
    model = nnx_llama.from_torch(state_dict, nnx_llama.LlamaConfig.from_hf(config), scan_layers=scan_layers,
                                 scan_remat=scan_remat or scan.DEFAULT_SCAN_REMAT)
    return NnxCausalLM(model, config, base_model_name)
