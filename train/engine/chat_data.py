"""Question/answer pairs as chat-formatted token sequences, scored on the answer tokens only."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from train.engine.data import DataError, TextData

__all__ = ["use_chat_template", "prompt_text", "encode_chat", "left_padded"]


def use_chat_template(tokenizer, template_file: str | None, model_name: str) -> None:
    """Set ``tokenizer.chat_template`` from ``template_file``, or check the model ships one."""
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise DataError(f"--chat-template {template_file} is not a file; give a Jinja chat-template file.")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise DataError(f"The tokenizer of {model_name!r} has no chat template, so questions and answers cannot be "
                        "formatted as a conversation; pass --chat-template FILE (a Jinja template, e.g. ChatML).")


def prompt_text(tokenizer, question: str) -> str:
    """The conversation up to where the assistant starts answering ``question``."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _encode(tokenizer, question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (L,), scored (L,)): the whole exchange, and 1 on the answer's tokens (through the turn's end)."""
    prompt = prompt_text(tokenizer, question)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError("The chat template renders the answered conversation with a different beginning than the "
                        "question alone, so the answer tokens cannot be located; use a template whose generation "
                        "prompt is a prefix of the answered conversation (e.g. ChatML).")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    scored = np.concatenate([np.zeros(len(prompt_ids), np.float32), np.ones(len(answer_ids), np.float32)])
    return ids, scored


def encode_chat(split: datasets.Dataset, tokenizer, max_length: int) -> TextData:
    """Tokenise every (text=question, label=answer) row; rows are cut at ``max_length`` tokens.

    The prompt and the answer are tokenised apart (the boundary is never merged into one token), so
    the scored positions are exactly the answer's tokens.
    """
    ids, scored = [], []
    for question, answer in zip(split["text"], split["label"]):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"Question and answer columns must hold text, got {question!r} -> {answer!r}.")
        row_ids, row_scored = _encode(tokenizer, question, answer)
        ids.append(row_ids[:max_length])
        scored.append(row_scored[:max_length])
    if not any(s.any() for s in scored):
        raise DataError(f"No answer token fits in --max-length {max_length}; raise it.")
    return TextData(ids, scored)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (B, L): prompts right-aligned, as generation needs."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = prompt
        mask[i, length - len(prompt):] = 1
    return ids, mask
