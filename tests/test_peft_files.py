"""Hostile and broken PEFT adapter files: one clear error each, never a crash deep in JAX or half an adapter."""

import json
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vera_jax import peft as vera_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

WEIGHTS, CONFIG = vera_peft.WEIGHTS_FILE, vera_peft.CONFIG_FILE
QUERY = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory of a valid PEFT VeRA adapter with projections, the Flax params it belongs to)."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "base")
    params = transformers.FlaxBertForSequenceClassification.from_pretrained(root / "base", from_pt=True).params
    peft_model = peft.get_peft_model(model, peft.VeraConfig(r=4, target_modules=["query", "value"],
                                                            task_type="SEQ_CLS", save_projection=True))
    peft_model.save_pretrained(root / "adapter")
    return root / "adapter", params


@pytest.fixture
def copy(saved, tmp_path):
    directory, params = saved
    target = tmp_path / "adapter"
    shutil.copytree(directory, target)
    return target, params


def _edit_config(directory, **changes):
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


def test_the_valid_adapter_loads(saved):
    directory, params = saved
    adapter = vera_peft.load_adapter(directory, params)
    assert adapter.projections.A.shape == (4, 16) and adapter.trainable["classifier"]["kernel"].shape == (16, 2)
    tensors = load_file(directory / WEIGHTS)
    np.testing.assert_array_equal(adapter.projections.A, tensors["base_model.vera_A"])
    np.testing.assert_array_equal(adapter.trainable["classifier"]["kernel"],
                                  tensors["base_model.model.classifier.weight"].T)  # PyTorch (out, in) -> Dense
    assert adapter.generator == "stored" and not adapter.redrawable  # A and B came from the file
    assert adapter.config.r == 4 and adapter.config.modules_to_save == ("classifier",)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "LORA"}, r"peft_type: is 'LORA', not 'VERA'"),
    ({"lora_alpha": 16}, r"lora_alpha: unknown fields"),
    ({"r": 0}, r"r: invalid value 0"),
    ({"r": 8}, r"has shape \(4,\), but r=8 in adapter_config.json needs \(8,\)"),
    ({"target_modules": ["query"]}, r"vectors missing .* or present for layers target_modules does not select"),
    ({"target_modules": ["q_proj"]}, r"target_modules: .*matches no module"),
    ({"bias": "all"}, r"only bias='none'"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out: is true, but no kernel_axes were given, so "
                               r"bert/encoder/layer/0/attention/self/query's kernel was taken as \(in, out\), as Flax Dense / "
                               r"nn.Linear. Pass the model's kernel_axes to load_adapter"),
])
def test_bad_config_fields(copy, changes, message):
    directory, params = copy
    _edit_config(directory, **changes)
    with pytest.raises(vera_peft.AdapterFileError, match=message):
        vera_peft.load_adapter(directory, params)


def test_config_that_is_not_json(copy):
    directory, params = copy
    (directory / CONFIG).write_text("{'peft_type': VERA")
    with pytest.raises(vera_peft.AdapterFileError, match=r"adapter_config.json: \(file\): not valid JSON"):
        vera_peft.load_adapter(directory, params)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(QUERY + ".vera_lambda_b"), r"vectors missing for \['bert/encoder/layer/0/attention/self/query'"),
    (lambda t: t.update({QUERY + ".vera_lambda_q": np.zeros(4, np.float32)}), r"vera_lambda_q: unexpected key"),
    (lambda t: t.update({"base_model.model.bert.pooler.dense.weight": np.zeros((16, 16), np.float32)}),
     r"pooler.dense.weight: unexpected key"),
    (lambda t: t.update({QUERY + ".vera_lambda_b": np.zeros(9, np.float32)}), r"needs lambda_d \(4,\) and lambda_b \(16,\)"),
    (lambda t: t.update({"base_model.model.classifier.weight": np.zeros((3, 16), np.float32)}),
     r"classifier.weight: has shape \(3, 16\), which does not fit classifier/kernel \(16, 2\)"),
    (lambda t: t.update({"base_model.vera_A": np.zeros((4, 8), np.float32)}), r"vera_A: has shape \(4, 8\)"),
    (lambda t: t.pop("base_model.vera_B"), r"vera_B: missing while its partner is present"),
    (lambda t: (t.pop("base_model.vera_A"), t.pop("base_model.vera_B")),
     r"vera_A, base_model.vera_B: missing, but adapter_config.json says save_projection: true \(PEFT refuses"),
    (lambda t: (t.pop("base_model.model.classifier.weight"), t.pop("base_model.model.classifier.bias")),
     r"classifier: listed in adapter_config.json's modules_to_save, but \['classifier/bias', 'classifier/kernel'\]"),
    (lambda t: t.pop("base_model.model.classifier.bias"), r"modules_to_save, but \['classifier/bias'\] are not in"),
    (lambda t: t.update({QUERY + ".vera_lambda_d": np.array([0.1, np.nan, 0.1, 0.1], np.float32)}),
     r"vera_lambda_d: holds NaN or infinite values"),
    (lambda t: t.update({QUERY + ".vera_lambda_d": np.array([1, 2, 3, 4], np.int32)}), r"has dtype int32, not a float"),
    (lambda t: t.update({"base_model.model.bert.encoder.layer.0.attention.self.missing.vera_lambda_d":
                         np.zeros(4, np.float32)}), r"names module .*missing', which these params do not have"),
])
def test_bad_tensors(copy, edit, message):
    directory, params = copy
    _edit_tensors(directory, edit)
    with pytest.raises(vera_peft.AdapterFileError, match=message):
        vera_peft.load_adapter(directory, params)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_safetensors(copy, damage):
    directory, params = copy
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(vera_peft.AdapterFileError, match=r"adapter_model.safetensors: \(file\): truncated or corrupted"):
        vera_peft.load_adapter(directory, params)


def test_pickle_is_never_read(copy):
    directory, params = copy
    (directory / WEIGHTS).rename(directory / "adapter_model.bin")
    with pytest.raises(vera_peft.AdapterFileError, match="never reads pickle files"):
        vera_peft.load_adapter(directory, params)


def test_missing_projections_without_torch(copy, monkeypatch):
    directory, params = copy
    _edit_tensors(directory, lambda t: (t.pop("base_model.vera_A"), t.pop("base_model.vera_B")))
    _edit_config(directory, save_projection=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(vera_peft.AdapterFileError, match=r"save_projection: is false.*pip install torch"):
        vera_peft.load_adapter(directory, params)
