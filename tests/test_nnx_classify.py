"""The main job on the NNX encoder (``--backend nnx``, the default; ``nnx-listed``): on the same weights it trains
as the linen job does, head included; the model's dropout draws from each step's key; the interface's paths agree;
its PEFT export is PyTorch PEFT's model with the run's logits; a missing linen class is one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import max_rel_error, random_like

import tiny_run
import vera_jax
from train.__main__ import main
from train.models.load import load_classifier
from vera_jax import checkpoint
from vera_jax.paths import flatten

BACKENDS = ("linen", "nnx", "nnx-listed")
STEPS = ("--max-steps", "6", "--lr-vectors", "0.05", "--lr-head", "0.05")


def _still(root, weights: tuple[str, ...]):
    """A tiny BERT without dropout in ``weights``, and its data."""
    return tiny_run.make_model(root / "model", weights=weights, dropout=0.0), tiny_run.make_csv(root / "data.csv")


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    return _still(tmp_path_factory.mktemp("still"), ("pytorch",))


@pytest.fixture(scope="module")
def still_both(tmp_path_factory):
    """In Flax and PyTorch weights of the same values (transformers<5)."""
    return _still(tmp_path_factory.mktemp("still-both"), ("pytorch", "flax"))


def _trained(model_dir, out, backend: str) -> tuple[dict, vera_jax.Adapter]:
    """The run's trainable leaves by path (a scanned stack's split into PyTorch's layers) and its adapter."""
    model = load_classifier(str(model_dir), 2, backend=backend)[0]
    adapter = checkpoint.restore(out / "adapter", model.params)
    leaves = {}
    for path, leaf in flatten(adapter.trainable).items():
        root = next((stack for stack in model.stacks if path.startswith(stack + "/")), None)
        if root is None:
            leaves[path] = np.asarray(leaf)
        else:
            for index, row in enumerate(np.asarray(leaf)):
                leaves[f"{root}/{index}{path[len(root):]}"] = row
    return leaves, adapter


@pytest.mark.hf_flax
@pytest.mark.standard_promotion  # the linen run: transformers' Flax BERT mixes dtypes (conftest)
def test_the_nnx_job_trains_as_the_linen_job_on_the_same_weights(still_both, tmp_path):
    model_dir, data = still_both
    runs = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        assert main(tiny_run.train_args(model_dir, data, out, *STEPS, "--backend", backend)) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"] == backend
        assert summary["scan_remat"] == ("dots" if backend == "nnx" else None)  # the scanned stack's default
        runs[backend] = (_trained(model_dir, out, backend)[0], summary, tiny_run.losses(out))
    out = tmp_path / "full"  # the layers rerun in the backward pass: the same training
    assert main(tiny_run.train_args(model_dir, data, out, *STEPS, "--backend", "nnx", "--scan-remat", "full")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scan_remat"] == "full"
    runs["nnx --scan-remat full"] = (_trained(model_dir, out, "nnx")[0], summary, tiny_run.losses(out))
    linen, linen_summary, linen_losses = runs["linen"]
    first_head = load_classifier(str(model_dir), 2, backend="linen")[0].params["classifier"]["kernel"]
    assert float(np.max(np.abs(linen["classifier/kernel"] - np.asarray(first_head)))) > 1e-3  # the head trained
    for backend in ("nnx", "nnx-listed", "nnx --scan-remat full"):
        leaves, summary, losses = runs[backend]
        assert leaves.keys() == linen.keys()
        for path in linen:
            np.testing.assert_allclose(leaves[path], linen[path], rtol=1e-4, atol=1e-5, err_msg=f"{backend} {path}")
        np.testing.assert_allclose(losses, linen_losses, rtol=1e-4)
        assert summary["test_accuracy"] == linen_summary["test_accuracy"]
        assert summary["trainable_params"] == linen_summary["trainable_params"]


@pytest.mark.parametrize("backend", ["nnx", "nnx-listed"])
def test_the_models_paths_agree_and_its_dropout_draws_from_the_key(tmp_path_factory, backend):
    """Activation and merged paths, and the merge hoisted out of the step (`logits` on merged params), give one
    model; dropout is off without a key, and each key draws its own masks."""
    model_dir = tiny_run.make_model(tmp_path_factory.mktemp("drop") / "model", weights=("pytorch",))
    model = load_classifier(str(model_dir), 2, backend=backend)[0]
    config = vera_jax.VeraConfig(r=8, target_modules=("query", "value"), modules_to_save=("classifier",),
                                 kernel_axes=model.kernel_axes)
    adapter = vera_jax.init_adapter(model.params, config)
    adapter = adapter.replace(trainable=random_like(adapter.trainable, jax.random.key(1), 0.5))
    ids = np.random.default_rng(0).integers(5, 25, (4, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    merged, activation = (jax.jit(model.vera_logits(path, config)) for path in ("merged", "activation"))
    reference = activation(model.params, adapter, batch, None)
    assert max_rel_error(merged(model.params, adapter, batch, None), reference) < 1e-5
    hoisted = model.logits(vera_jax.merge(model.params, adapter), batch, None)
    assert max_rel_error(hoisted, reference) < 1e-5
    assert model.hoists_merge("merged") and not model.hoists_merge("activation")
    assert max_rel_error(model.logits(model.params, batch, None), reference) > 1e-3  # vectors and head both count
    one, again, other = (activation(model.params, adapter, batch, jax.random.key(k)) for k in (7, 7, 8))
    np.testing.assert_array_equal(one, again)
    assert float(np.max(np.abs(one - other))) > 1e-3 and float(np.max(np.abs(one - reference))) > 1e-3


@pytest.mark.standard_promotion  # trains with optax's AdamW (conftest)
def test_an_nnx_runs_exports_load_in_pytorch_with_the_runs_logits(still, tmp_path):
    """The run's peft_adapter/ through PyTorch PEFT, and its ``export --format hf`` through transformers alone."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    model_dir, data = still
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model_dir, data, out, *STEPS, "--backend", "nnx")) == 0
    model = load_classifier(str(model_dir), 2, backend="nnx")[0]
    adapter = checkpoint.restore(out / "adapter", model.params)
    ids = np.random.default_rng(1).integers(5, 25, (3, 10)).astype(np.int32)
    ours = model.vera_logits("merged", adapter.config)(model.params, adapter, {
        "input_ids": ids, "attention_mask": np.ones_like(ids)}, None)
    base = BertForSequenceClassification.from_pretrained(model_dir).eval()
    served = peft.PeftModel.from_pretrained(base, out / "peft_adapter").eval()
    with torch.no_grad():
        theirs = served(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert max_rel_error(theirs, ours) < 1e-5
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]

    merged = tmp_path / "merged"
    assert main(["export", "--adapter", str(out / "adapter"), "--model", str(model_dir), "--format", "hf",
                 "--output", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        theirs = plain(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert max_rel_error(theirs, ours) < 1e-5
    base = BertForSequenceClassification.from_pretrained(model_dir).eval()  # PEFT adapted the first one in place
    with torch.no_grad():
        base_logits = base(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert max_rel_error(theirs, base_logits) > 1e-3  # the adapter (and trained head) are in the weights


def test_without_transformers_flax_classes_linen_is_one_line(still, tmp_path, monkeypatch, capsys):
    import sys

    model_dir, data = still
    monkeypatch.setitem(sys.modules, "transformers.models.auto.modeling_flax_auto", None)  # as transformers 5 has
    assert main(tiny_run.train_args(model_dir, data, tmp_path / "run", "--backend", "linen")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # datasets' progress lines aside, as in test_run_safety
    assert last.startswith("error: ") and err.count("error") == 1 and "Traceback" not in err, err
    assert "pip install 'vera_jax[hf-flax]'" in last and "--backend nnx" in last, last
    assert not (tmp_path / "run" / "adapter").exists()

