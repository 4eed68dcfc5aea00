"""Tiny random-weight models of every family VeRA must handle, with their usual targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import vera_jax

SEQ = 12


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    params: dict
    apply: Callable  # apply(params, inputs) -> logits
    inputs: jax.Array
    config: vera_jax.VeraConfig
    model: object = None  # the Hugging Face Flax model, for the families that have one


def _ids(vocab: int, low: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(7), (2, SEQ), low, vocab)


def bert(dtype=jnp.float32) -> Family:
    from transformers import BertConfig, FlaxBertForSequenceClassification

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    model = FlaxBertForSequenceClassification(cfg, seed=0, dtype=dtype)
    return Family("bert", model.params, lambda p, x: model(x, params=p).logits, _ids(99),
                  vera_jax.VeraConfig(r=8, target_modules=("query", "value"), modules_to_save=("classifier",)),
                  model=model)


def roberta() -> Family:
    """Token ids start at 2: 0 and 1 are RoBERTa's <s> and <pad>."""
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    cfg = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=2)
    model = FlaxRobertaForSequenceClassification(cfg, seed=0)
    return Family("roberta", model.params, lambda p, x: model(x, params=p).logits, _ids(99, low=2),
                  vera_jax.VeraConfig(r=8, target_modules=("query", "value"), modules_to_save=("classifier",)),
                  model=model)


def gpt2() -> Family:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = FlaxGPT2LMHeadModel(cfg, seed=0)
    return Family("gpt2", model.params, lambda p, x: model(x, params=p).logits, _ids(99),
                  vera_jax.VeraConfig(r=8, target_modules=("c_attn", "c_proj", "c_fc"), kernel_axes={".*": "oi"}),
                  model=model)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama() -> Family:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = FlaxLlamaForCausalLM(cfg, seed=0)
    return Family("llama", model.params, lambda p, x: model(x, params=p).logits, _ids(99),
                  vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS), model=model)


def vit() -> Family:
    from transformers import FlaxViTForImageClassification, ViTConfig

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    model = FlaxViTForImageClassification(cfg, seed=0)
    pixels = jax.random.normal(jax.random.key(3), (2, 3, 16, 16))
    return Family("vit", model.params, lambda p, x: model(x, params=p).logits, pixels,
                  vera_jax.VeraConfig(r=8, target_modules=("query", "value"), modules_to_save=("classifier",)),
                  model=model)


class SmallCNN(nn.Module):
    """A plain flax.linen classifier: two convolutions, then dense layers of different shapes."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(40, name="hidden")(x))
        return nn.Dense(10, name="logits")(x)


def cnn() -> Family:
    images = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    model = SmallCNN()
    params = model.init(jax.random.key(0), images)["params"]
    return Family("cnn", params, lambda p, x: model.apply({"params": p}, x), images,
                  vera_jax.VeraConfig(r=8, target_modules=("hidden", "logits")))


ALL = (bert, roberta, gpt2, llama, vit, cnn)


def random_adapter(family: Family, seed: int = 1, config: vera_jax.VeraConfig | None = None) -> vera_jax.Adapter:
    """A new adapter for ``config`` (default: the family's) with every vector (and head leaf) replaced by
    N(0, 1) draws, so that it changes the model's output."""
    adapter = vera_jax.init_adapter(family.params, config or family.config)
    leaves, treedef = jax.tree.flatten(adapter.trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return adapter.replace(trainable=jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)
