"""A tiny BERT classifier directory and a small CSV, for running the real entry point quickly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "superb", "lovely", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring", "clumsy"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "quite", "story", "a"]


def make_model(directory: Path, weights: tuple[str, ...] = ("flax",), dropout: float = 0.1) -> Path:
    """A random tiny BERT classifier with ``weights``: ``"flax"`` (``flax_model.msgpack``, for ``--backend linen``;
    transformers<5) and/or ``"pytorch"`` (``model.safetensors``, for the NNX backends and PEFT), the same values
    when both; a tokenizer, and ``dropout`` in its hidden and attention layers."""
    from transformers import BertConfig, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    if "pytorch" in weights:
        import torch
        from transformers import BertForSequenceClassification

        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(directory)
    if "flax" in weights:
        from transformers import FlaxBertForSequenceClassification

        if "pytorch" in weights:
            FlaxBertForSequenceClassification.from_pretrained(directory, from_pt=True).save_pretrained(directory)
        else:
            FlaxBertForSequenceClassification(config, seed=0).save_pretrained(directory)
    return directory


def make_csv(path: Path, rows: int = 160, seed: int = 0, label_column: str = "label") -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", label_column])
        for _ in range(rows):
            label = int(rng.integers(2))
            words = list(rng.choice(FILLER, size=int(rng.integers(3, 9))))
            words.insert(int(rng.integers(len(words) + 1)), rng.choice(POSITIVE if label else NEGATIVE))
            writer.writerow([" ".join(words), label])
    return path


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A small job's flags on the linen backend (the tiny models carry Flax weights); ``extra`` may override any."""
    return ["--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--backend", "linen", "--r", "8",
            "--batch-size", "8", "--max-length", "16", "--log-every", "1", "--eval-batch-size", "16", *extra]


UNOPTIMISED = "--xla_backend_optimization_level=0"  # the suite's XLA flag (conftest): tiny models compile faster


def xla_flags(devices: int, optimised: bool = False) -> str:
    """This run's XLA flags (conftest's) with ``devices`` simulated CPU devices, for a subprocess; ``optimised``
    drops `UNOPTIMISED`, for a subprocess whose compute outweighs its compiling (a real model's training)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if optimised:
        flags = flags.replace(UNOPTIMISED, "")
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def run_subprocess(args: list[str], devices: int = 1, timeout: float = 600, env_extra: dict | None = None,
                   optimised: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in a fresh interpreter with ``devices`` simulated CPU devices (and ``env_extra``
    in its environment; ``optimised``: see `xla_flags`)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices, optimised), "JAX_PLATFORMS": "cpu",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def losses(out: Path, run: str = "vera") -> list[float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r and r["run"] == run]
