"""Convert a llama.cpp GGUF file of a Llama model into a Hugging Face directory, without torch.

The output is what ``LlamaForCausalLM`` / ``FlaxLlamaForCausalLM.from_pretrained(dir, from_pt=True)``
and ``AutoTokenizer.from_pretrained(dir)`` read: ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32) and the tokenizer files with the chat template. The ``gguf`` package
reads the file and dequantises every tensor; this module undoes what llama.cpp's converter changed:

- the rows of q_proj and k_proj are permuted per head (llama.cpp interleaves the rotary halves);
- a tied output embedding is stored once (``lm_head.weight`` is written explicitly, because
  transformers' Flax Llama never ties it);
- the tokenizer is metadata (vocab, merges, token types, chat template), rebuilt here as a byte-level
  BPE ``tokenizers.Tokenizer``.

``max_positions`` caps ``max_position_embeddings``: transformers' Flax Llama allocates a
positions x positions causal mask in every layer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from train.options import positive_int

__all__ = ["convert", "add_arguments", "command", "GGUFError", "unpermute_rows", "CONVERSION_FILE"]

ARCHITECTURE = "llama"
DEFAULT_MAX_POSITIONS = 2048
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # the name transformers 4 and 5 both resolve
CONVERSION_FILE = "conversion.json"  # records the GGUF file a directory was converted from
# llama.cpp pre-tokenizer names -> whether digits are split one by one before the GPT-2 regex.
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that become added (special) tokens


class GGUFError(ValueError):
    """The GGUF file cannot be converted; the message says what it holds and what is supported."""


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a q/k projection; weight (heads * head_dim, in)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"The GGUF metadata has no {key!r}; it is not a complete llama.cpp model file.")
        return default
    return field.contents()


def _config(reader, max_positions: int) -> dict:
    """The Hugging Face LlamaConfig fields, read from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"The GGUF holds a {arch!r} model; this converter supports {ARCHITECTURE!r} only "
                        "(Llama, SmolLM2 and other Llama-architecture models).")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = hidden // heads
    rotary = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise GGUFError(f"The GGUF rotates {rotary} of {head_dim} head dimensions; only full rotary is supported.")
    if "llama.rope.scaling.type" in reader.fields:
        raise GGUFError("The GGUF uses rotary scaling, which transformers' Flax Llama does not implement.")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    context = int(_field(reader, "llama.context_length"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))), "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": min(context, max_positions), "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors), "torch_dtype": "float32",
    }


def _hf_names(layers: int) -> list[str]:
    """Every module of LlamaForCausalLM that holds a weight, in Hugging Face naming."""
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    return ["model.embed_tokens", "model.norm", "lm_head"] + [f"model.layers.{i}.{m}" for i in range(layers)
                                                                 for m in per_layer]


def _dequantize(tensor) -> np.ndarray:
    """float32 (out, in) values of one GGUF tensor, through the gguf package's numpy dequantisation."""
    import gguf

    try:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"Tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf package "
                        "cannot dequantise; re-quantise the model as F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 or a "
                        "k-quant.") from None
    return np.ascontiguousarray(values, np.float32).reshape([int(n) for n in reversed(tensor.shape)])


def _weights(reader, config: dict) -> dict[str, np.ndarray]:
    """Hugging Face state-dict name -> float32 array, with q/k rows restored and lm_head written out."""
    import gguf

    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    by_gguf = {names.get_name(hf) + ".weight": hf + ".weight" for hf in _hf_names(layers)}
    unknown = [t.name for t in reader.tensors if t.name not in by_gguf]
    if unknown:
        raise GGUFError(f"The GGUF holds tensors a Llama model does not have: {unknown[:5]}.")
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for tensor in reader.tensors:
        name = by_gguf[tensor.name]
        value = _dequantize(tensor)
        module = name.split(".")[-2]
        weights[name] = unpermute_rows(value, heads[module]) if module in heads else value
    if config["tie_word_embeddings"]:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing = sorted(hf + ".weight" for hf in _hf_names(layers) if hf + ".weight" not in weights)
    if missing:
        raise GGUFError(f"The GGUF lacks tensors of a {layers}-layer Llama: {missing[:5]}.")
    return weights


def _tokenizer(reader):
    """A PreTrainedTokenizerFast rebuilt from the GGUF's byte-level BPE metadata and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFError(f"The GGUF tokenizer is {kind!r} with pre-tokenizer {pre!r}; supported: byte-level BPE "
                        f"('gpt2') with pre-tokenizer one of {sorted(PRE_TOKENIZERS)}.")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if PRE_TOKENIZERS[pre] else byte_level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=kind_ == CONTROL, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ in (CONTROL, USER_DEFINED)])
    template = reader.fields.get("tokenizer.chat_template")
    template = template.contents() if template is not None else None
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    if template and "<|im_end|>" in template and "<|im_end|>" in tokens:
        eos = "<|im_end|>"  # ChatML: a turn ends with <|im_end|> (llama.cpp files often record bos as eos)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos,
                                   chat_template=template, clean_up_tokenization_spaces=False)


def convert(gguf_path: str | Path, out_dir: str | Path, max_positions: int = DEFAULT_MAX_POSITIONS) -> Path:
    """Write the Hugging Face Llama directory for ``gguf_path`` into ``out_dir`` (which must be empty or new)."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as err:
        raise GGUFError(f"{gguf_path} is not a readable GGUF file: {err}") from None
    config = _config(reader, max_positions)
    tokenizer = _tokenizer(reader)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    weights = _weights(reader, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(out_dir)
    _name_portable_tokenizer_class(out_dir)
    source = {"gguf": gguf_path.name, "sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
              "context_length": int(_field(reader, "llama.context_length")), "max_positions": max_positions}
    (out_dir / CONVERSION_FILE).write_text(json.dumps(source, indent=2))
    return out_dir


def _name_portable_tokenizer_class(out_dir: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load: transformers 5
    saves its own ``TokenizersBackend``, which transformers 4 cannot, and a converted directory (like the shared
    asset cache) may be read by either."""
    path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="a llama.cpp GGUF file of a Llama-architecture model")
    parser.add_argument("output", help="the Hugging Face directory to write (new, empty, or an earlier conversion, "
                        "which is replaced whole)")
    parser.add_argument("--max-positions", type=positive_int, default=DEFAULT_MAX_POSITIONS,
                        help="positions the model is configured for")


def command(args: argparse.Namespace) -> None:
    """``python -m train convert-gguf FILE.gguf OUT_DIR [--max-positions N]``."""
    from vera_jax.atomic import staged_directory

    try:
        with staged_directory(args.output, "gguf-conversion") as staging:
            convert(args.gguf, staging, args.max_positions)
    except FileExistsError as err:
        raise GGUFError(str(err)) from None
    print(f"wrote {Path(args.output)}")
