"""GGUF -> Hugging Face Llama: the converted model computes what the PyTorch original computes."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_llama import CHATML, converted_model, permute_rows, torch_llama, write_gguf
from transformers import AutoTokenizer, FlaxLlamaForCausalLM

from train.__main__ import main
from train.models.gguf_llama import GGUFError, convert, unpermute_rows
from train.models.llama_rope import FlaxLlamaForCausalLMRopeTheta, needs_rope_theta

IDS = np.random.default_rng(0).integers(3, 250, (2, 40))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return converted_model(tmp_path_factory.mktemp("gguf") / "model")


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3, 6):
        permuted = permute_rows(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rows(permuted, heads), weight)


def test_converted_model_matches_the_pytorch_original(tiny):
    reference = _torch_logits(torch_llama())
    logits = np.asarray(FlaxLlamaForCausalLMRopeTheta.from_pretrained(tiny, from_pt=True)(IDS).logits)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-5)
    config = json.loads((tiny / "config.json").read_text())
    assert config["rope_theta"] == 1e5 and config["num_key_value_heads"] == 2 and config["tie_word_embeddings"]
    weights = load_file(tiny / "model.safetensors")
    np.testing.assert_array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_stock_flax_llama_uses_the_wrong_rotary_base_and_the_fix_is_scoped(tiny):
    reference = _torch_logits(torch_llama())
    stock = FlaxLlamaForCausalLM.from_pretrained(tiny, from_pt=True)
    fixed = FlaxLlamaForCausalLMRopeTheta.from_pretrained(tiny, from_pt=True)
    assert needs_rope_theta(stock.config)
    assert np.abs(np.asarray(stock(IDS).logits) - reference).max() > 1e-3  # base 10000, not the config's 1e5
    assert np.abs(np.asarray(fixed(IDS).logits) - reference).max() < 1e-4
    # Using the fixed class changed nothing for the stock class in the same process.
    stock_again = FlaxLlamaForCausalLM.from_pretrained(tiny, from_pt=True)
    np.testing.assert_array_equal(np.asarray(stock_again(IDS).logits), np.asarray(stock(IDS).logits))


def test_fixed_class_equals_stock_at_the_hard_coded_base(tmp_path):
    directory = converted_model(tmp_path / "base10k", rope_theta=10000.0)
    stock = FlaxLlamaForCausalLM.from_pretrained(directory, from_pt=True)
    fixed = FlaxLlamaForCausalLMRopeTheta.from_pretrained(directory, from_pt=True)
    assert not needs_rope_theta(stock.config)
    np.testing.assert_array_equal(np.asarray(fixed(IDS).logits), np.asarray(stock(IDS).logits))
    np.testing.assert_allclose(np.asarray(fixed(IDS).logits), _torch_logits(torch_llama(10000.0)), rtol=1e-4,
                               atol=1e-5)


def test_tokenizer_round_trips_and_keeps_gguf_ids(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    reader = gguf.GGUFReader(tiny.parent / "model.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    text = "the cat is 1234 ünïcode  spaces\ttabs\n<|im_start|>x<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[ids.index(1) + 2] == 2  # control tokens are single ids
    assert [tokenizer.decode([i]) for i in tokenizer("1234")["input_ids"]] == ["1", "2", "3", "4"]  # digits split
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"


def test_quantised_tensor_dequantises_like_an_independent_q8_0_decoder(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(8, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", torch_llama(),
                      raw_tensors={"extra.weight": (gguf.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                                                    gguf.GGMLQuantizationType.Q8_0)})
    from train.models.gguf_llama import _dequantize

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "extra.weight")
    blocks = np.asarray(tensor.data).reshape(-1, 34)  # Q8_0: float16 scale, then 32 int8 values
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    expected = (scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(8, 64)
    np.testing.assert_array_equal(_dequantize(tensor), expected)
    np.testing.assert_allclose(_dequantize(tensor), weight, atol=np.abs(weight).max() / 100)
    with pytest.raises(GGUFError, match="tensors a Llama model does not have"):
        convert(path, tmp_path / "out")


@pytest.mark.parametrize("case, message", [
    ("architecture", "holds a 'gpt2' model; this converter supports 'llama'"),
    ("quantisation", "stored as Q8_1, which the gguf package cannot dequantise"),
    ("not gguf", "is not a readable GGUF file"),
])
def test_unsupported_files_are_clear_errors(tmp_path, capsys, case, message):
    path = tmp_path / "bad.gguf"
    if case == "architecture":
        write_gguf(path, torch_llama(), architecture="gpt2")
    elif case == "quantisation":
        q8_1 = gguf.GGMLQuantizationType.Q8_1  # 40-byte blocks of 32 values; attn_v is (32, 64)
        write_gguf(path, torch_llama(), raw_tensors={"blk.0.attn_v.weight": (np.zeros((32, 80), np.uint8), q8_1)})
    else:
        path.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["convert-gguf", str(path), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_convert_command_writes_a_loadable_directory(tmp_path, capsys):
    source = write_gguf(tmp_path / "m.gguf", torch_llama())
    assert main(["convert-gguf", str(source), str(tmp_path / "hf"), "--max-positions", "128"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 128
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == CHATML
