"""tunix's PeftTrainer (google/tunix: it trains exactly a model's nnx.LoRAParams) trains VeRA's vectors on
a tiny NNX Llama, scanned, and leaves every other variable bit-identical."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.sft import peft_trainer

import vera_jax
import vera_jax.nnx as vera_nnx
from train import nnx_llama

CONFIG = nnx_llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, tie_word_embeddings=True)
TOKENS = jax.random.randint(jax.random.key(3), (4, 12), 1, CONFIG.vocab_size)


def next_token_loss(model, input_tokens, input_mask):
    logits = model(input_tokens, input_mask)[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, input_tokens[:, 1:])
    weights = input_mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * weights) / jnp.sum(weights)


def test_tunix_peft_trainer_trains_only_the_vera_vectors(tmp_path):
    model = nnx_llama.LlamaForCausalLM(CONFIG, scan_layers=True, rngs=nnx.Rngs(0))
    vera_nnx.attach(model, vera_jax.VeraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    others = nnx.Not(vera_nnx.VeraVector)
    before = jax.tree.map(np.asarray, nnx.state(model, others))
    vectors_before = jax.tree.map(np.asarray, nnx.state(model, vera_nnx.VeraVector))
    batch = {"input_tokens": TOKENS, "input_mask": jnp.ones_like(TOKENS)}
    loss_before = float(next_token_loss(model, **batch))

    trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2),
                                       peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=8))
    trainer = trainer.with_loss_fn(next_token_loss)
    trainer.train([batch] * 8)

    assert trainer.train_steps == 8
    assert float(next_token_loss(model, **batch)) < loss_before
    after = jax.tree.map(np.asarray, nnx.state(model, others))
    leaves_before, leaves_after = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(leaves_after) == len(leaves_before) > 0
    assert all(np.array_equal(a, b) for a, b in zip(leaves_before, leaves_after))  # base weights, A and B
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(vectors_before),
                                                          jax.tree.leaves(nnx.state(model, vera_nnx.VeraVector)))]
    assert len(changed) == 6 and all(changed)
