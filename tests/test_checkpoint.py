"""Adapter checkpoints: round trip with and without A/B, projections rebuilt and checked, clear refusals."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import families
import vera_jax
from vera_jax import checkpoint
from vera_jax.paths import flatten


@pytest.fixture(scope="module")
def bert():
    return families.bert()


def _save(bert, directory, save_projection=False):
    config = dataclasses.replace(bert.config, save_projection=save_projection)
    key = jax.random.key(11)
    projections = vera_jax.init_projections(bert.params, key, config)
    trainable = families.random_trainable(families.Family("bert", bert.params, bert.apply, bert.inputs, config))
    checkpoint.save(directory, trainable, projections, key)
    return trainable, projections


@pytest.mark.parametrize("save_projection", [False, True])
def test_round_trip_from_a_relative_path(bert, tmp_path, monkeypatch, save_projection):
    monkeypatch.chdir(tmp_path)
    trainable, projections = _save(bert, "adapter", save_projection)
    stored = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert stored == {"trainable", "vera_adapter.json"}
    restored, rebuilt = checkpoint.restore("adapter", bert.params)
    jax.tree.map(np.testing.assert_array_equal, restored, trainable)
    np.testing.assert_array_equal(rebuilt.A, projections.A)
    np.testing.assert_array_equal(rebuilt.B, projections.B)
    assert rebuilt.config == projections.config
    with_ab = checkpoint.projection_recipe(projections, jax.random.key(11))
    assert json.loads((tmp_path / "adapter" / "vera_adapter.json").read_text())["projection"] == with_ab


def test_projections_are_stored_only_on_request(bert, tmp_path):
    _save(bert, tmp_path / "lean")
    _save(bert, tmp_path / "full", save_projection=True)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    ab_bytes = (8 * 32 + 32 * 8) * 4
    assert size(tmp_path / "full") > size(tmp_path / "lean") + ab_bytes / 2


def test_a_tampered_fingerprint_is_refused(bert, tmp_path):
    _save(bert, tmp_path / "adapter")
    meta_path = tmp_path / "adapter" / "vera_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["projection"]["key"][1] += 1  # another key: other A and B than the vectors were trained with
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_another_model_is_refused(bert, tmp_path):
    _save(bert, tmp_path / "adapter")
    other = families.roberta()
    with pytest.raises(ValueError, match="matches no module|does not fit these params"):
        checkpoint.restore(tmp_path / "adapter", other.params)
    wider = jax.tree.map(lambda x: x, bert.params)
    wider["classifier"] = {"kernel": np.zeros((32, 5), np.float32), "bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="does not fit these params"):
        checkpoint.restore(tmp_path / "adapter", wider)


def test_missing_or_broken_metadata(bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a vera_jax adapter checkpoint"):
        checkpoint.restore(tmp_path, bert.params)
    _save(bert, tmp_path / "adapter")
    (tmp_path / "adapter" / "vera_adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_saving_again_replaces_the_adapter_whole(bert, tmp_path):
    first, _ = _save(bert, tmp_path / "adapter")
    second = jax.tree.map(lambda x: x + 1.0, first)
    projections = vera_jax.init_projections(bert.params, jax.random.key(11), bert.config)
    checkpoint.save(tmp_path / "adapter", second, projections, jax.random.key(11))
    restored, _ = checkpoint.restore(tmp_path / "adapter", bert.params)
    np.testing.assert_array_equal(flatten(restored)["classifier/bias"], flatten(second)["classifier/bias"])
    assert not list(tmp_path.glob(".adapter*"))


def test_a_failed_write_leaves_the_previous_directory_whole(tmp_path):
    from vera_jax.atomic import staged_directory

    target = tmp_path / "adapter"
    with staged_directory(target) as staging:
        (staging / "weights").write_text("first")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(target) as staging:
            (staging / "weights").write_text("half of the second")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "first"
    with staged_directory(target) as staging:
        (staging / "weights").write_text("second")
    assert (target / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup left behind
