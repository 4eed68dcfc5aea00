"""The NNX BERT and RoBERTa encoders (train/models/nnx_encoder.py), loaded from a PyTorch model's safetensors: the
logits of transformers' PyTorch classifiers, listed and scanned; dropout only in training; VeRA on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from conftest import max_rel_error, randomise_vectors

import vera_jax
import vera_jax.nnx as vera_nnx
from train.models import nnx_encoder, scan

TOL = 1e-5  # float32, JAX against PyTorch (measured 1e-7 to 3e-7)
KINDS = {
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def saved(request, tmp_path_factory):
    """(kind, directory of a tiny random PyTorch classifier, its inputs and logits)."""
    config_cls, model_cls = KINDS[request.param]
    config = config_cls(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, num_labels=3, type_vocab_size=2)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    ids = np.random.default_rng(0).integers(3, 99, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 7:], ids[1, 7:] = 0, config.pad_token_id  # a padded row
    token_types = np.zeros_like(ids)
    token_types[0, 5:] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}
    with torch.no_grad():
        logits = model(**{name: torch.from_numpy(value) for name, value in inputs.items()}).logits.numpy()
    return request.param, directory, {name: jnp.asarray(value) for name, value in inputs.items()}, logits


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_equal_pytorch_and_dropout_runs_in_training_only(saved, scan_layers):
    kind, directory, inputs, expected = saved
    model = nnx_encoder.load(directory, scan_layers=scan_layers)
    assert model.config.kind == kind and model.config.num_labels == 3
    logits = model(**inputs)
    assert max_rel_error(logits, expected) < TOL
    np.testing.assert_array_equal(model(**inputs), logits)  # evaluation is deterministic
    first, second = model(**inputs, train=True), model(**inputs, train=True)
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3 and float(jnp.max(jnp.abs(first - logits))) > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_to_torch_gives_back_every_pytorch_weight(saved, scan_layers):
    """`to_torch` inverts the load: the model's params by PyTorch names are the checkpoint's state dict."""
    from safetensors.numpy import load_file

    kind, directory, _, _ = saved
    state_dict = load_file(directory / "model.safetensors")
    model = nnx_encoder.load(directory, scan_layers=scan_layers)
    leaves = vera_jax.paths.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    named = nnx_encoder.to_torch(leaves, model.config, scan_layers=scan_layers)
    expected = {name: value for name, value in state_dict.items() if not name.endswith("position_ids")}
    assert sorted(named) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(named[name], value, err_msg=name)


def test_the_stack_is_the_list_and_vera_adapts_it_on_both_paths(saved):
    kind, directory, inputs, _ = saved
    listed, scanned = (nnx_encoder.load(directory, scan_layers=scan) for scan in (False, True))
    query = getattr(scanned, kind).encoder.layer.attention.self.query.kernel
    assert query.shape == (3, 32, 32)  # (L, in, out)
    np.testing.assert_array_equal(query[1], getattr(listed, kind).encoder.layer[1].attention.self.query.kernel[...])
    config = vera_jax.VeraConfig(r=8, target_modules=("query", "value"))
    outputs = {}
    for path in vera_nnx.PATHS:
        model = vera_nnx.attach(nnx_encoder.load(directory, scan_layers=True), config, path=path)
        base = listed(**inputs)
        np.testing.assert_array_equal(model(**inputs), scanned(**inputs))  # lambda_b starts at 0
        randomise_vectors(model)
        outputs[path] = model(**inputs)
        assert max_rel_error(outputs[path], base) > 100 * TOL
    assert max_rel_error(outputs["activation"], outputs["merged"]) < TOL


def test_a_head_the_checkpoint_lacks_is_drawn_and_other_models_are_refused(saved, tmp_path):
    kind, directory, inputs, _ = saved
    from safetensors.numpy import load_file

    weights = {name: value for name, value in load_file(directory / "model.safetensors").items()
               if not name.startswith("classifier.")}
    base = {name.removeprefix(kind + "."): value for name, value in weights.items()}  # a base model's names
    config = nnx_encoder.EncoderConfig.from_hf({"model_type": kind, **{
        name: getattr(nnx_encoder.load(directory).config, name) for name in
        ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
         "max_position_embeddings", "type_vocab_size", "pad_token_id")}}, num_labels=5)
    model = nnx_encoder.from_torch(base, config, seed=1)
    assert model(**inputs).shape == (2, 5)
    with pytest.raises(ValueError, match=r"The weights do not fit this .* model: missing \[.*encoder/layer/2"):
        nnx_encoder.from_torch({name: value for name, value in base.items() if ".2." not in name}, config)
    with pytest.raises(ValueError, match=r"builds \('bert', 'roberta'\) models with GELU; this config is a 'gpt2'"):
        nnx_encoder.EncoderConfig.from_hf({"model_type": "gpt2"})


def test_scan_remat_changes_what_the_backward_pass_keeps_not_what_it_computes(saved):
    """With dropout on (the same streams), each policy of the scanned stack gives the logits and the VeRA gradient
    of the stack without rematerialisation; the compiled gradient keeps less the less the policy saves."""
    _, directory, inputs, _ = saved
    config = vera_jax.VeraConfig(r=8, target_modules=("query", "value"), projection_seed=3)
    grads, temp_bytes = {}, {}
    for policy in scan.SCAN_REMAT:
        model = vera_nnx.attach(nnx_encoder.load(directory, scan_layers=True, scan_remat=policy), config)
        randomise_vectors(model)
        _, params, adapter = vera_nnx.split(model)
        call = vera_nnx.functional(model)

        def loss(trainable):
            return jnp.mean(jnp.square(call(params, adapter.replace(trainable=trainable), **inputs, train=True)))

        compiled = jax.jit(jax.grad(loss)).lower(adapter.trainable).compile()
        temp_bytes[policy] = compiled.memory_analysis().temp_size_in_bytes
        grads[policy] = compiled(adapter.trainable)
    for policy in ("dots", "full"):
        for got, want in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"]), strict=True):
            assert max_rel_error(got, want) < TOL, policy
    assert temp_bytes["full"] < temp_bytes["dots"] < temp_bytes["none"], temp_bytes
    with pytest.raises(ValueError, match="scan_remat must be one of"):
        nnx_encoder.load(directory, scan_layers=True, scan_remat="some")


def test_the_encoders_dropout_draws_nnx_dropouts_masks_and_names_them():
    """The same mask as ``nnx.Dropout`` from the same stream; the mask is named for the remat policy to keep."""
    x = jnp.arange(1.0, 241.0).reshape(4, 6, 10)
    ours, theirs = nnx_encoder.Dropout(0.3, rngs=nnx.Rngs(dropout=7)), nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=7))
    for _ in range(2):  # each call draws the stream's next key
        got = ours(x, deterministic=False)
        np.testing.assert_array_equal(got, theirs(x, deterministic=False))
        assert 0.5 < float(jnp.mean(got == 0)) / 0.3 < 1.5
    np.testing.assert_array_equal(ours(x, deterministic=True), x)
    draw = lambda y: nnx_encoder.Dropout(0.3, rngs=nnx.Rngs(dropout=7))(y, deterministic=False)  # noqa: E731
    assert f"name={scan.DROPOUT_MASK}" in str(jax.make_jaxpr(draw)(x))
