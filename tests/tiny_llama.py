"""A tiny random Llama written as a llama.cpp GGUF file, the way llama.cpp's converter writes one.

The reference is a PyTorch ``LlamaForCausalLM``; its tensors go to the GGUF with the q/k rows permuted
per head (llama.cpp's ``permute``) and the output embedding tied, with a small byte-level BPE
tokenizer and a ChatML template in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.models import nnx_llama

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a"]
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, CONTEXT = 64, 4, 2, 2, 96, 256


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the converter under test undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _vocab() -> tuple[list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL + sorted(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES]
    return tokens, [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))


def torch_llama(rope_theta: float = 1e5, seed: int = 0):
    """The reference model: random, tied embeddings, grouped-query attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(_vocab()[0]), hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=CONTEXT, rope_theta=rope_theta, tie_word_embeddings=True,
                         rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def write_gguf(path: Path, model, *, architecture: str = "llama", chat_template: str | None = CHATML,
               raw_tensors: dict | None = None) -> Path:
    """``model`` (a torch LlamaForCausalLM) as a GGUF file.

    ``raw_tensors``: GGUF name -> (bytes array, quant type), added or replacing the model's tensor.
    """
    import gguf

    config = model.config
    tokens, types = _vocab()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(nnx_llama.rope_theta(config))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp stores the embedding once
        name = names.get_name(hf_name.removesuffix(".weight")) + ".weight"
        if name in (raw_tensors or {}):
            continue
        value = tensor.numpy().astype(np.float32)
        if ".q_proj." in hf_name:
            value = permute_rows(value, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            value = permute_rows(value, config.num_key_value_heads)
        writer.add_tensor(name, value)
    for name, (data, qtype) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def converted_model(directory: Path, rope_theta: float = 1e5) -> Path:
    """A tiny Hugging Face Llama directory made by the converter under test from a tiny GGUF."""
    from train.models.gguf_llama import convert

    directory.mkdir(parents=True, exist_ok=True)
    source = write_gguf(directory.parent / f"{directory.name}.gguf", torch_llama(rope_theta))
    return convert(source, directory)


def write_pairs(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """A JSON-lines file of (question, answer) pairs with a learnable rule: the answer repeats the question."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "is", "a", "hat", "sat", "that", "this"]
    with path.open("w") as file:
        for _ in range(rows):
            question = " ".join(rng.choice(words, size=int(rng.integers(2, 5))))
            file.write(json.dumps({"question": question, "answer": question + " is"}) + "\n")
    return path
