"""tunix's own NNX models (google/tunix: Llama 3, Qwen 3, Gemma, Gemma 3), unedited, with the Hugging Face
PyTorch model of the same weights beside each (`tunix_families`).

VeRA attaches to every attention and MLP projection with no rule and no alias; the adapted model is the
base model at initialisation and equals a reference whose kernels were merged by hand (each einsum
layout written out below) on both paths; tunix's PeftTrainer trains exactly the vectors; a scanned stack
of tunix decoder layers runs unchanged; and the LoRA export (and, where no kernel is fused, the PEFT
VeRA export) gives the tunix model's logits in PEFT on the Hugging Face model."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from conftest import max_rel_error, randomise_vectors
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import peft_trainer

import tunix_families
import vera_jax
import vera_jax.nnx as vera_nnx
from train.models import nnx_llama
from vera_jax import hf
from vera_jax.lora import save_lora
from vera_jax.peft import save_adapter

NAMES = {"llama3": hf.TUNIX_LLAMA3, "qwen3": hf.TUNIX_QWEN3, "gemma": hf.TUNIX_GEMMA, "gemma_qkv": hf.TUNIX_GEMMA,
         "gemma3": hf.TUNIX_GEMMA}
FUSED = {"gemma": "kv_einsum", "gemma_qkv": "qkv_einsum", "gemma3": "kv_einsum"}  # PyTorch's k/v (q/k/v) projections
R = 8
TOL = 1e-5  # float32 (JAX against PyTorch measured 2e-7 to 2e-6 relative)


@pytest.fixture(scope="module", params=tunix_families.FAMILIES)
def pair(request, tmp_path_factory):
    return request.param, tunix_families.build_pair(request.param, tmp_path_factory.mktemp(request.param))


def attached(pair, path: str = "merged") -> nnx.Module:
    family, models = pair
    model = nnx.clone(models.tunix_model)
    return vera_nnx.attach(model, vera_jax.VeraConfig(r=R, target_modules=tunix_families.PROJECTIONS[family]),
                           path=path)


# Each tunix einsum's weight delta from VeRA's (out, in) matrix, written out by hand (s: the weight's shape).
HAND_LAYOUTS = {
    "BTD,DNH->BTNH": lambda delta, s: delta.T.reshape(s),  # q (D, N, H)
    "BSD,DKH->BSKH": lambda delta, s: delta.T.reshape(s),  # k, v (D, K, H)
    "BTNH,NHD->BTD": lambda delta, s: delta.T.reshape(s),  # o (N, H, D)
    "BTD,NDH->BTNH": lambda delta, s: delta.reshape(s[0], s[2], s[1]).transpose(0, 2, 1),  # Gemma q (N, D, H)
    "BSD,CKDH->CBSKH": lambda delta, s: delta.reshape(s[0], s[1], s[3], s[2]).transpose(0, 1, 3, 2),  # kv
    "BTD,SNDH->SBTNH": lambda delta, s: delta.reshape(s[0], s[1], s[3], s[2]).transpose(0, 1, 3, 2),  # qkv
    None: lambda delta, s: delta.T,  # nnx.Linear (in, out)
}


def hand_merged(model: nnx.Module) -> nnx.Module:
    """The base model with every adapted weight W + delta_W, delta_W built here in float64 from A, B and the
    module's vectors, laid out by `HAND_LAYOUTS`."""
    graphdef, params, _ = vera_nnx.split(model)
    a, b = (np.asarray(m.get_value(), np.float64) for m in (model.vera_projections.A, model.vera_projections.B))
    for path, module in vera_nnx.adapted_modules(model).items():
        name = "w" if hasattr(module, "einsum_str") else "kernel"
        weight = np.asarray(getattr(module, name).get_value(), np.float64)
        lambda_d = np.asarray(module.vera_lambda_d.get_value(), np.float64)
        lambda_b = np.asarray(module.vera_lambda_b.get_value(), np.float64)
        in_features = weight.size // lambda_b.size
        delta = (lambda_b[:, None] * b[: lambda_b.size]) @ (lambda_d[:, None] * a[:, :in_features])
        node = params
        for key in path.split("/"):
            node = node[int(key) if key.isdigit() else key]
        node[name] = jnp.asarray(weight + HAND_LAYOUTS[getattr(module, "einsum_str", None)](delta, weight.shape),
                                 jnp.float32)
    return nnx.merge(graphdef, params)


@pytest.mark.parametrize("path", vera_nnx.PATHS)
def test_every_projection_takes_vera_and_equals_a_hand_merged_reference(pair, path):
    family, models = pair
    base = models.tunix_logits(models.tunix_model, models.tokens)
    model = attached(pair, path)
    adapted = vera_nnx.adapted_modules(model)
    assert sorted({name.rsplit("/", 1)[1] for name in adapted}) == sorted(tunix_families.PROJECTIONS[family])
    assert len(adapted) == len(tunix_families.PROJECTIONS[family]) * len(models.tunix_model.layers)
    np.testing.assert_array_equal(models.tunix_logits(model, models.tokens), base)  # lambda_b starts at 0
    randomise_vectors(model)
    logits = models.tunix_logits(model, models.tokens)
    assert max_rel_error(logits, base) > 100 * TOL
    assert max_rel_error(logits, models.tunix_logits(hand_merged(model), models.tokens)) < TOL


def next_token_loss(logits_fn):
    def loss(model, input_tokens, input_mask):
        logits = logits_fn(model, input_tokens)[:, :-1]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, input_tokens[:, 1:])
        weights = input_mask[:, 1:].astype(nll.dtype)
        return jnp.sum(nll * weights) / jnp.sum(weights)
    return loss


def test_peft_trainer_trains_the_vectors_and_peft_serves_the_lora_export(pair, tmp_path):
    family, models = pair
    model = attached(pair)
    others = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(vera_nnx.VeraVector)))
    vectors = jax.tree.map(np.asarray, nnx.state(model, vera_nnx.VeraVector))
    loss = next_token_loss(models.tunix_logits)
    batch = {"input_tokens": models.tokens, "input_mask": jnp.ones_like(models.tokens)}
    loss_before = float(loss(model, **batch))
    trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2),
                                       peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=6))
    trainer.with_loss_fn(loss).train([batch] * 6)
    assert trainer.train_steps == 6 and float(loss(model, **batch)) < loss_before
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Not(
        vera_nnx.VeraVector))), others)  # base weights, A and B bit-identical
    assert all(not np.array_equal(before, after) for before, after in zip(
        jax.tree.leaves(vectors), jax.tree.leaves(nnx.state(model, vera_nnx.VeraVector))))

    _, params, adapter = vera_nnx.split(model)
    expected = np.asarray(models.tunix_logits(model, models.tokens))
    _, factors = save_lora(tmp_path / "lora", adapter, params, names=NAMES[family], task_type="CAUSAL_LM")
    torch_names = {name for name, _ in models.torch_model.named_modules()}
    assert {factor.name for factor in factors} <= torch_names
    served = peft.PeftModel.from_pretrained(copy.deepcopy(models.torch_model), tmp_path / "lora").eval()
    assert isinstance(served.base_model, peft.LoraModel)
    assert max_rel_error(models.torch_logits(served, np.asarray(models.tokens)), expected) < TOL

    if family in FUSED:  # PEFT's VeRA gives every layer B[:out]: a split kv cannot be written as VeRA
        with pytest.raises(ValueError, match=rf"{FUSED[family]}' is a fused kernel .* Export this adapter as LoRA"):
            save_adapter(tmp_path / "vera", adapter, params, names=NAMES[family])
        return
    save_adapter(tmp_path / "vera", adapter, params, names=NAMES[family], task_type="CAUSAL_LM")
    assert set(json.loads((tmp_path / "vera" / "adapter_config.json").read_text())["target_modules"]) <= torch_names
    served = peft.PeftModel.from_pretrained(copy.deepcopy(models.torch_model), tmp_path / "vera").eval()
    assert isinstance(served.base_model, peft.VeraModel)
    assert max_rel_error(models.torch_logits(served, np.asarray(models.tokens)), expected) < TOL


class ScannedDecoder(nnx.Module):
    """tunix Llama 3 decoder layers stacked by ``nnx.vmap`` and run by ``nnx.scan``."""

    def __init__(self, config: llama3.ModelConfig, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return llama3.DecoderLayer(config, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x, positions, mask):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x, positions, None, mask)[1]

        return body(x, self.layers)


def test_a_scanned_stack_of_tunix_decoder_layers_with_as_many_layers_as_heads():
    """o_proj is (L, N, H, D) with L = N: the layer axis is axis 0 by NNX's rule, never ambiguous."""
    config = llama3.ModelConfig(num_layers=4, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
    x = jax.random.normal(jax.random.key(1), (2, 6, config.embed_dim))
    positions, mask = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.tril(jnp.ones((2, 6, 6), bool))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    outputs = {}
    for path in vera_nnx.PATHS:
        model = ScannedDecoder(config, nnx.Rngs(0))
        base = model(x, positions, mask)
        vera_nnx.attach(model, vera_jax.VeraConfig(r=R, target_modules=targets), path=path)
        assert model.layers.attn.o_proj.vera_lambda_b.shape == (4, config.embed_dim)
        assert model.layers.attn.q_proj.vera_lambda_d.shape == (4, R)
        np.testing.assert_array_equal(model(x, positions, mask), base)
        randomise_vectors(model)
        outputs[path] = model(x, positions, mask)
        assert max_rel_error(outputs[path], base) > 100 * TOL
        graphdef, params, adapter = vera_nnx.split(model)
        pure = nnx.merge(graphdef, vera_jax.merge(params, adapter))(x, positions, mask)
        assert max_rel_error(outputs[path], pure) < TOL
    assert max_rel_error(outputs["activation"], outputs["merged"]) < TOL


LLAMA_CONFIG = nnx_llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, tie_word_embeddings=True)
LLAMA_TOKENS = jax.random.randint(jax.random.key(3), (4, 12), 1, LLAMA_CONFIG.vocab_size)


llama_loss = next_token_loss(lambda model, tokens: model(tokens))


def test_peft_trainer_trains_only_the_vera_vectors_of_a_scanned_nnx_llama():
    model = nnx_llama.LlamaForCausalLM(LLAMA_CONFIG, scan_layers=True, rngs=nnx.Rngs(0))
    vera_nnx.attach(model, vera_jax.VeraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    others = nnx.Not(vera_nnx.VeraVector)
    before = jax.tree.map(np.asarray, nnx.state(model, others))
    vectors_before = jax.tree.map(np.asarray, nnx.state(model, vera_nnx.VeraVector))
    batch = {"input_tokens": LLAMA_TOKENS, "input_mask": jnp.ones_like(LLAMA_TOKENS)}
    loss_before = float(llama_loss(model, **batch))

    trainer = peft_trainer.PeftTrainer(model, optax.adam(3e-2),
                                       peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=8))
    trainer = trainer.with_loss_fn(llama_loss)
    trainer.train([batch] * 8)

    assert trainer.train_steps == 8
    assert float(llama_loss(model, **batch)) < loss_before
    after = jax.tree.map(np.asarray, nnx.state(model, others))
    leaves_before, leaves_after = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(leaves_after) == len(leaves_before) > 0
    assert all(np.array_equal(a, b) for a, b in zip(leaves_before, leaves_after))  # base weights, A and B
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(vectors_before),
                                                          jax.tree.leaves(nnx.state(model, vera_nnx.VeraVector)))]
    assert len(changed) == 6 and all(changed)
