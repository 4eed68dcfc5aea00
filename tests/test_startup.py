"""Start-up: the classifier loaded from PyTorch-named safetensors without transformers' eager init equals
transformers' own conversion, and the command line keeps compiled programs in JAX's persistent cache."""

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import tiny_run
from train.__main__ import main
from train.engine import compile_cache
from train.models.load import load_classifier

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.hf_flax
@pytest.mark.parametrize("num_labels, seed", [(2, 0), (3, 7)])  # the file's head, and a new head of another size
def test_safetensors_load_equals_transformers_conversion(tmp_path, num_labels, seed):
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefgh")))
    model, _ = load_classifier(str(tmp_path), num_labels, seed)
    # transformers' own way: its conversion of the file (head as stored), then a head of another size drawn anew
    flax_class = transformers.FlaxBertForSequenceClassification
    flax_class.from_pretrained(tmp_path, from_pt=True).save_pretrained(tmp_path / "flax")
    config.num_labels = num_labels
    expected = flax_class.from_pretrained(tmp_path / "flax", config=config, ignore_mismatched_sizes=True, seed=seed)
    got, want = flatten_dict(model.params), flatten_dict(expected.params)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    ids = np.array([[2, 7, 8, 3]])
    np.testing.assert_array_equal(model.module(ids).logits, expected(ids).logits)
    assert model.params["classifier"]["kernel"].shape == (16, num_labels)


@pytest.mark.hf_flax
def test_the_command_line_fills_the_compile_cache(tmp_path):
    model = tiny_run.make_model(tmp_path / "model")
    args = tiny_run.train_args(model, tiny_run.make_csv(tmp_path / "data.csv"), tmp_path / "run", "--max-steps", "1")
    done = tiny_run.run_subprocess(args, env_extra={"VERA_JAX_COMPILE_CACHE": str(tmp_path / "xla")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "xla").iterdir())) >= 2  # the training and evaluation steps at least


@pytest.mark.parametrize("flags, enabled", [((), True), (("--no-compile-cache",), False)])
def test_no_compile_cache_leaves_it_off(tmp_path, monkeypatch, flags, enabled):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda: calls.append(True))
    assert main(["--dataset", str(tmp_path / "missing.csv"), *flags]) == 2  # stops before anything loads
    assert calls == ([True] if enabled else [])

