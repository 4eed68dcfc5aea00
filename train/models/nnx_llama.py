"""A Llama decoder in Flax NNX, with its layers in a list or stacked and run with ``nnx.scan``.

Module paths mirror Hugging Face's PyTorch names (``model/layers/0/self_attn/q_proj`` is
``model.layers.0.self_attn.q_proj``; stacked: ``model/layers/self_attn/q_proj`` with the layer axis
first), projections are ``nnx.Linear`` (kernel (in, out) = PyTorch's weight transposed), and the
maths is transformers' ``LlamaForCausalLM``: RMSNorm, rotary embeddings with ``rope_theta``,
grouped-query causal attention, SwiGLU, optionally tied embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models.scan import DEFAULT_SCAN_REMAT, check_scan_remat, run_stacked
from vera_jax import paths

__all__ = ["LlamaConfig", "LlamaForCausalLM", "from_torch", "rope_theta"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of transformers' ``LlamaConfig`` this model reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config) -> LlamaConfig:
        """From a transformers ``LlamaConfig`` (or Mistral's) of transformers 4 or 5."""
        names = [field.name for field in dataclasses.fields(cls) if field.name != "rope_theta"]
        return cls(rope_theta=rope_theta(config), **{name: getattr(config, name) for name in names})


def rope_theta(config) -> float:
    """The rotary base of a transformers config: ``config.rope_theta`` (transformers 4) or
    ``config.rope_parameters["rope_theta"]`` (transformers 5)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters["rope_theta"] if "rope_theta" in parameters else config.rope_theta)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float):
        self.weight = nnx.Param(jnp.ones((size,)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return self.weight[...] * (x * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def _rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (batch, seq, 1, head_dim) as transformers' default rotary embedding builds them."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
        self.q_proj = linear(hidden, config.num_attention_heads * head_dim)
        self.k_proj = linear(hidden, config.num_key_value_heads * head_dim)
        self.v_proj = linear(hidden, config.num_key_value_heads * head_dim)
        self.o_proj = linear(config.num_attention_heads * head_dim, hidden)
        self.config = config

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        config = self.config
        batch, seq, _ = x.shape
        heads = lambda y, n: y.reshape(batch, seq, n, config.head_dim)  # noqa: E731
        q = heads(self.q_proj(x), config.num_attention_heads)
        k = heads(self.k_proj(x), config.num_key_value_heads)
        v = heads(self.v_proj(x), config.num_key_value_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = config.num_attention_heads // config.num_key_value_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(config.head_dim))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, -1)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(hidden, ffn, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(hidden, ffn, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(ffn, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, scan_layers: bool, scan_remat: str, rngs: nnx.Rngs):
        check_scan_remat(scan_remat)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        if scan_layers:
            @nnx.split_rngs(splits=config.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return DecoderLayer(config, rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.config, self.scan_layers, self.scan_remat = config, scan_layers, scan_remat

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        cos, sin = _rotary(positions, self.config.head_dim, self.config.rope_theta)
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        mask = causal[None, None] & attention_mask[:, None, None, :].astype(bool)
        x = self.embed_tokens(input_ids)
        if self.scan_layers:
            x = run_stacked(self.layers, x, lambda layer, x: layer(x, cos, sin, mask), self.scan_remat)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """``model(input_ids, attention_mask) -> logits (batch, seq, vocab)``.

    ``scan_layers``: stack the layers and run them with ``nnx.scan`` (else a list); ``scan_remat``: what the
    scanned stack keeps for the backward pass (a key of `train.models.scan.SCAN_REMAT`; no effect on listed layers).
    """

    def __init__(self, config: LlamaConfig, *, scan_layers: bool = False, scan_remat: str = DEFAULT_SCAN_REMAT,
                 rngs: nnx.Rngs):
        self.model = LlamaModel(config, scan_layers, scan_remat, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)
        self.config = config

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        hidden = self.model(input_ids, attention_mask)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def _leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A PyTorch state-dict entry -> (NNX path, value): Linear weights transposed into (in, out) kernels."""
    module, _, leaf = name.rpartition(".")
    path = module.replace(".", "/")
    if module.endswith("norm"):
        return f"{path}/weight", value
    if module.endswith("embed_tokens"):
        return f"{path}/embedding", value
    return f"{path}/kernel", value.T


def from_torch(state_dict: Mapping[str, np.ndarray], config: LlamaConfig, *, scan_layers: bool = False,
               scan_remat: str = DEFAULT_SCAN_REMAT) -> LlamaForCausalLM:
    """The NNX model holding a PyTorch ``LlamaForCausalLM``'s weights (numpy arrays by their PyTorch names)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, scan_layers=scan_layers, scan_remat=scan_remat,
                                                    rngs=nnx.Rngs(0)))
    flat = dict(_leaf(name, np.asarray(value)) for name, value in state_dict.items()
                if not (config.tie_word_embeddings and name == "lm_head.weight"))
    if scan_layers:
        stacked = {}
        for path, value in flat.items():
            parts = path.split("/")
            if parts[:2] == ["model", "layers"]:
                stacked.setdefault("/".join(parts[:2] + parts[3:]), {})[int(parts[2])] = value
            else:
                stacked[path] = value
        flat = {path: np.stack([value[i] for i in sorted(value)]) if isinstance(value, dict) else value
                for path, value in stacked.items()}
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    expected = set(paths.flatten(abstract))
    missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - expected)
    if missing or unexpected:
        raise ValueError(f"The weights do not fit this Llama: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    values = {path: jnp.asarray(value) for path, value in flat.items()}
    nnx.replace_by_pure_dict(state, paths.unflatten(values, like=abstract))
    nnx.update(model, state)
    return model
