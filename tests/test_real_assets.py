"""Integration: the packaged all-MiniLM-L6-v2 and movie-review sentences, through the real entry point."""

import json

import numpy as np
import pytest

import tiny_run
from train import assets
from train.engine.data import load_splits
from train.models.load import load_classifier
from train.options import DataOptions
from vera_jax import checkpoint


def test_a_few_steps_on_the_default_assets_beat_chance(tmp_path):
    """The packaged MiniLM (on the NNX encoder) and movie reviews through the main job with no command: 30 steps at
    high learning rates, scored on a fixed held-out 5% (529 sentences, fixed by --data-seed 0); rows cut and padded to 40
    tokens, so the groups compile one shape. A subprocess with XLA's optimisations: its compute outweighs compiling."""
    out = tmp_path / "run"
    done = tiny_run.run_subprocess(["--output-dir", str(out), "--max-steps", "30", "--test-fraction", "0.05",
                                    "--lr-vectors", "0.1", "--lr-head", "0.05", "--schedule", "constant",
                                    "--warmup-ratio", "0", "--log-every", "5", "--max-length", "40",
                                    "--pad-multiple", "40"], optimised=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # 6 layers x (query, value) x (r=256 + out=384), plus the 384 x 2 head and its bias.
    assert summary["trainable_params"] == 12 * (256 + 384) + 384 * 2 + 2
    # 10,605 rows less 37 neutral ones: 5% to test, then 10% of the rest to validate.
    assert summary["train_examples"] + summary["validation_examples"] + summary["test_examples"] == 10_568
    assert (summary["test_examples"], summary["validation_examples"]) == (529, 1004)
    assert [v["step"] for v in summary["validations"]] == [30]
    # Chance on this slice is its majority class; the adapted model is well above it.
    test = load_splits(DataOptions(test_fraction=0.05), batch_size=32).test
    positive = float(np.mean(test["label"]))
    assert summary["test_accuracy"] > max(positive, 1 - positive) + 0.1, (summary["test_accuracy"], positive)
    assert summary["test_loss"] < np.log(2)
    assert summary["adapter_bytes"] <= 2 * 4 * summary["trainable_params"] + 64 * 1024

    assert summary["backend"] == "nnx"  # the default: the NNX encoder, its 6 layers stacked
    model = load_classifier("default", 2, backend="nnx")[0]
    adapter = checkpoint.restore(out / "adapter", model.params)
    assert adapter.projections.A.shape == (256, 384) and adapter.projections.B.shape == (384, 256)
    assert adapter.trainable["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["vera_lambda_d"].shape == (
        6, 256)


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
