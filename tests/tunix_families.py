"""tunix's NNX model families, each beside the Hugging Face PyTorch model of the same weights.

`build_pair(family, directory)` builds a tiny float32 Hugging Face model (seeded, with every norm weight
perturbed so that a wrong norm convention shows), saves it as safetensors in `directory` and loads it with
tunix's own safetensors loader into the matching tunix model:

- llama3: `tunix.models.llama3` from `LlamaForCausalLM` (untied lm_head).
- qwen3: `tunix.models.qwen3` from `Qwen3ForCausalLM` (q_norm / k_norm, tied embeddings).
- gemma: `tunix.models.gemma` from `Gemma2ForCausalLM`: tunix's safetensors mapping is Gemma 2's (HF
  ``post_attention_layernorm`` goes to ``post_attn_norm``), so a Gemma 1 checkpoint leaves ``pre_ffw_norm``
  unloaded. Sliding then global layers, attention and final logit soft-capping; separate ``q_einsum`` and
  fused ``kv_einsum`` (2 kv heads of 4).
- gemma_qkv: as gemma with 4 kv heads of 4, where tunix fuses q, k and v into ``qkv_einsum``.
- gemma3: `tunix.models.gemma3` (text only) from `Gemma3ForCausalLM` (`Gemma3TextConfig`).

What tunix fixes and the Hugging Face config must follow: Llama 3's and Qwen 3's attention call
``apply_rope`` without ``rope_theta``, so their rope base is 1e6 whatever the tunix config says; Gemma scales
queries by ``head_dim ** -0.5`` (``query_pre_attn_scalar = head_dim``) and normalises with eps 1e-6; tunix
Gemma's rope base is 10 000; tunix Gemma 3 cycles five sliding layers then one global one (as Hugging Face's
default ``sliding_window_pattern`` 6) and has no soft-capping. `SEQ` is shorter than every sliding window,
and Gemma 3's bfloat16 default ``param_dtype`` is overridden to float32.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

FAMILIES = ("llama3", "qwen3", "gemma", "gemma_qkv", "gemma3")

_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = {
    "llama3": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": ("q_einsum", "kv_einsum", "attn_vec_einsum") + _MLP,
    "gemma_qkv": ("qkv_einsum", "attn_vec_einsum") + _MLP,
    "gemma3": ("q_einsum", "kv_einsum", "attn_vec_einsum") + _MLP,
}

BATCH, SEQ = 2, 8
VOCAB, EMBED, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 96, 48, 80, 2, 4, 2, 16
WINDOW = 16  # sliding window, longer than SEQ
ROPE_THETA = 1_000_000  # what tunix Llama 3 and Qwen 3 really use
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Pair:
    """One family's tunix model, its Hugging Face twin, a logits function for each, and a token batch."""

    tunix_model: nnx.Module
    torch_model: torch.nn.Module
    tunix_logits: Callable[[nnx.Module, jax.Array], jax.Array]  # (model, (batch, seq) int32) -> (b, s, vocab)
    torch_logits: Callable[[torch.nn.Module, np.ndarray], np.ndarray]
    tokens: jax.Array


def _hf_config(family: str) -> transformers.PretrainedConfig:
    """The tiny Hugging Face config that tunix's model and loader reproduce for `family`."""
    common = dict(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=EPS,
                  attn_implementation="eager", dtype="float32")
    if family == "llama3":
        return transformers.LlamaConfig(**common, rope_theta=ROPE_THETA, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, rope_theta=ROPE_THETA, tie_word_embeddings=True)
    gemma = dict(common, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW, rope_theta=10_000)
    if family == "gemma_qkv":
        gemma["num_key_value_heads"] = HEADS
    if family in ("gemma", "gemma_qkv"):
        return transformers.Gemma2Config(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    return transformers.Gemma3TextConfig(**gemma, rope_local_base_freq=10_000)


def _torch_model(family: str) -> torch.nn.Module:
    """The seeded float32 Hugging Face model, in eval mode."""
    torch.manual_seed(0)
    config = _hf_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms start all equal, where one loaded into the wrong slot would not show
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def _load_tunix(family: str, directory: pathlib.Path) -> nnx.Module:
    """The tunix model of the safetensors in `directory`, by tunix's own loader, in float32."""
    kv_heads = HEADS if family == "gemma_qkv" else KV_HEADS
    if family in ("llama3", "qwen3"):
        model_lib = importlib.import_module(f"tunix.models.{family}.model")
        params_lib = importlib.import_module(f"tunix.models.{family}.params")
        tied = {"llama3": {"weight_tying": False}, "qwen3": {"use_tied_embedding": True}}[family]
        config = model_lib.ModelConfig(num_layers=LAYERS, vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN,
                                       num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=kv_heads,
                                       rope_theta=ROPE_THETA, norm_eps=EPS, **tied)
        return params_lib.create_model_from_safe_tensors(str(directory), config, dtype=jnp.float32)
    if family in ("gemma", "gemma_qkv"):
        from tunix.models.gemma import model as model_lib
        from tunix.models.gemma import params_safetensors as params_lib

        kinds = model_lib.AttentionType
        config = model_lib.ModelConfig(
            num_layers=LAYERS, num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
            head_dim=HEAD_DIM, num_kv_heads=kv_heads, final_logit_softcap=30.0, use_post_attn_norm=True,
            use_post_ffw_norm=True, attention_types=(kinds.LOCAL_SLIDING, kinds.GLOBAL) * (LAYERS // 2),
            attn_logits_soft_cap=50.0, sliding_window_size=WINDOW)
        return params_lib.create_model_from_safe_tensors(str(directory), config, dtype=jnp.float32)
    from tunix.models.gemma3 import model as model_lib
    from tunix.models.gemma3 import params_safetensors as params_lib

    config = model_lib.ModelConfig(num_layers=LAYERS, num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN,
                                   num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=kv_heads,
                                   sliding_window_size=WINDOW, local_base_frequency=10_000,
                                   global_base_frequency=10_000, param_dtype=jnp.float32)
    return params_lib.create_model_from_safe_tensors(str(directory), config, dtype=jnp.float32)


def tunix_logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Any tunix family's logits for unpadded `tokens`: positions 0..seq-1 and a causal mask."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), dtype=jnp.bool_)), (batch, seq, seq))
    logits, _ = model(tokens, positions, None, mask)
    return logits


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """The Hugging Face model's logits for unpadded `tokens`."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def build_pair(family: str, directory: pathlib.Path) -> Pair:
    """The tunix `family` model and its Hugging Face twin, of the same weights, saved in `directory`."""
    torch_model = _torch_model(family)
    torch_model.save_pretrained(directory, safe_serialization=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    return Pair(_load_tunix(family, directory), torch_model, tunix_logits, torch_logits, tokens)
