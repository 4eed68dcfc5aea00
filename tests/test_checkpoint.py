"""Adapter checkpoints: round trip with and without A/B, projections rebuilt and checked, clear refusals."""

import dataclasses
import hashlib
import json
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import families
import vera_jax
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.adapter import STORED
from vera_jax.paths import flatten
from vera_jax.projections import init_projections


@pytest.fixture(scope="module")
def bert():
    return families.bert()


def _save(bert, directory, save_projection=False, seed=1):
    config = dataclasses.replace(bert.config, save_projection=save_projection, projection_seed=11)
    adapter = families.random_adapter(bert, seed=seed, config=config)
    checkpoint.save(directory, adapter)
    return adapter


def _edit_metadata(directory, edit):
    """Edit vera_adapter.json and seal it again with its checksum, as a consistent file of other content."""
    path = directory / "vera_adapter.json"
    meta = json.loads(path.read_text())
    del meta["sha256"]
    edit(meta)
    meta["sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(meta))


def _assert_same_adapter(got, want):
    assert got.config == want.config
    assert jax.tree.structure(got.trainable) == jax.tree.structure(want.trainable)
    jax.tree.map(np.testing.assert_array_equal, got.trainable, want.trainable)
    for name in ("A", "B"):
        assert getattr(got.projections, name).dtype == getattr(want.projections, name).dtype
        np.testing.assert_array_equal(getattr(got.projections, name), getattr(want.projections, name))


@pytest.mark.parametrize("save_projection", [False, True])
def test_round_trip_from_a_relative_path(bert, tmp_path, monkeypatch, save_projection):
    monkeypatch.chdir(tmp_path)
    adapter = _save(bert, "adapter", save_projection)
    stored = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert stored == {"trainable", "vera_adapter.json", "vera_jax_manifest.json"}
    restored = checkpoint.restore("adapter", bert.params)
    _assert_same_adapter(restored, adapter)
    assert restored.generator == adapter.generator and restored.redrawable
    recipe = json.loads((tmp_path / "adapter" / "vera_adapter.json").read_text())["projection"]
    assert recipe == checkpoint.projection_recipe(restored)
    assert recipe["key"] == [int(w) for w in np.asarray(jax.random.key_data(jax.random.key(11)))]
    logits = vera_jax.adapt(bert.apply, restored)(bert.params, bert.inputs)
    np.testing.assert_array_equal(logits, vera_jax.adapt(bert.apply, adapter)(bert.params, bert.inputs))


def test_projections_are_stored_only_on_request(bert, tmp_path):
    _save(bert, tmp_path / "lean")
    _save(bert, tmp_path / "full", save_projection=True)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    ab_bytes = (8 * 32 + 32 * 8) * 4
    assert size(tmp_path / "full") > size(tmp_path / "lean") + ab_bytes / 2


def _peft_file_with_other_projections(bert, directory):
    """A PEFT adapter file whose A and B are not what the key draws, under save_projection: false."""
    adapter = families.random_adapter(bert, seed=4)
    vera_peft.save_adapter(directory, adapter, bert.params)
    tensors = load_file(directory / vera_peft.WEIGHTS_FILE)
    for name, key in (("A", 21), ("B", 22)):  # e.g. drawn by PyTorch: this library cannot draw them again
        full = f"base_model.vera_{name}"
        tensors[full] = np.asarray(jax.random.uniform(jax.random.key(key), tensors[full].shape, minval=-0.5,
                                                      maxval=0.5))
    save_file(tensors, directory / vera_peft.WEIGHTS_FILE, metadata={"format": "pt"})
    peft_config = json.loads((directory / vera_peft.CONFIG_FILE).read_text())
    (directory / vera_peft.CONFIG_FILE).write_text(json.dumps(peft_config | {"save_projection": False}))
    return tensors


def test_an_adapter_loaded_from_peft_keeps_its_projections_in_a_checkpoint(bert, tmp_path):
    tensors = _peft_file_with_other_projections(bert, tmp_path / "peft")
    loaded = vera_peft.load_adapter(tmp_path / "peft", bert.params)
    assert loaded.generator == STORED and not loaded.redrawable and not loaded.config.save_projection
    np.testing.assert_array_equal(loaded.projections.A, tensors["base_model.vera_A"])
    drawn = init_projections(bert.params, loaded.key, loaded.config)
    assert not np.array_equal(drawn.A, loaded.projections.A)  # the key cannot give them back

    checkpoint.save(tmp_path / "adapter", loaded)
    restored = checkpoint.restore(tmp_path / "adapter", bert.params)
    _assert_same_adapter(restored, loaded)
    assert restored.generator == STORED and not restored.redrawable
    np.testing.assert_array_equal(vera_jax.adapt(bert.apply, restored)(bert.params, bert.inputs),
                                  vera_jax.adapt(bert.apply, loaded)(bert.params, bert.inputs))
    # A and B travel with the vectors: a checkpoint written again from the restored adapter holds them too.
    checkpoint.save(tmp_path / "again", restored)
    _assert_same_adapter(checkpoint.restore(tmp_path / "again", bert.params), loaded)


def test_a_tampered_fingerprint_is_refused(bert, tmp_path):
    _save(bert, tmp_path / "adapter")
    meta_path = tmp_path / "adapter" / "vera_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["projection"]["key"][1] += 1  # another key: other A and B than the vectors were trained with
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(vera_jax.AdapterFileError, match="does not match its own checksum: it was edited or damaged"):
        checkpoint.restore(tmp_path / "adapter", bert.params)

    def another_key(meta):
        meta["projection"]["key"][1] += 1

    _edit_metadata(tmp_path / "adapter", another_key)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_tampered_stored_projections_are_refused(bert, tmp_path):
    _save(bert, tmp_path / "adapter", save_projection=True)
    _edit_metadata(tmp_path / "adapter", lambda meta: meta["projection"].update(fingerprint="0" * 64))
    with pytest.raises(ValueError, match="do not match their fingerprint; the adapter is damaged"):
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
    with pytest.raises(vera_jax.AdapterFileError, match=r"vera_adapter.json is damaged \(JSONDecodeError"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_stored_tensors_are_checked_against_their_checksums(bert, tmp_path):
    _save(bert, tmp_path / "adapter", seed=1)
    _save(bert, tmp_path / "other", seed=2)  # the same shapes, other values
    shutil.rmtree(tmp_path / "adapter" / "trainable")
    shutil.copytree(tmp_path / "other" / "trainable", tmp_path / "adapter" / "trainable")
    with pytest.raises(vera_jax.AdapterFileError, match=r"adapter/trainable: tensor \['trainable'\].* does not "
                       "match its checksum in vera_adapter.json; the adapter is damaged"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_a_restore_puts_the_unraisable_hook_back_and_keeps_closed_loop_errors_from_it(bert, tmp_path, monkeypatch):
    """A restore, sound or damaged, leaves ``sys.unraisablehook`` as it found it; the "Event loop is closed" errors of a
    damaged tree's reads, which Orbax leaves running, never reach it."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(str(unraisable.exc_value)))
    hook = sys.unraisablehook
    _save(bert, tmp_path / "adapter")
    checkpoint.restore(tmp_path / "adapter", bert.params)
    assert sys.unraisablehook is hook
    for array_metadata in (tmp_path / "adapter" / "trainable" / "array_metadatas").iterdir():
        array_metadata.write_bytes(array_metadata.read_bytes()[:10])  # its tensors' reads start, then fail
    with pytest.raises(vera_jax.AdapterFileError, match=r"trainable cannot be read .*the adapter is damaged"):
        checkpoint.restore(tmp_path / "adapter", bert.params)
    assert sys.unraisablehook is hook
    time.sleep(0.5)  # tensorstore's threads, holding the reads Orbax left running, take the GIL meanwhile
    assert "Event loop is closed" not in reported


def test_the_recorded_base_tells_another_base(bert, tmp_path):
    adapter = families.random_adapter(bert, seed=1)
    checkpoint.save(tmp_path / "adapter", adapter, bert.params)
    base = json.loads((tmp_path / "adapter" / "vera_adapter.json").read_text())["base"]
    assert base["kernels"] == {layer.path: list(layer.kernel_shape)
                               for layer in vera_jax.find_layers(bert.params, adapter.config)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_adapter(checkpoint.restore(tmp_path / "adapter", bert.params), adapter)
    for other in (jax.tree.map(lambda x: x * 1.5, bert.params),  # another model of the same shapes
                  jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), bert.params)):  # a bf16 copy
        with pytest.warns(UserWarning, match="hold other values than those the adapter .* was trained on"):
            _assert_same_adapter(checkpoint.restore(tmp_path / "adapter", other), adapter)
    layer = next(iter(base["kernels"]))
    _edit_metadata(tmp_path / "adapter", lambda meta: meta["base"]["kernels"].update({layer: [7, 7]}))
    with pytest.raises(vera_jax.AdapterFileError, match=f"trained on a base whose adapted kernels differ from these "
                       f"params' at \\['{layer}'\\]"):
        checkpoint.restore(tmp_path / "adapter", bert.params)


def test_saving_again_replaces_the_adapter_whole(bert, tmp_path):
    first = _save(bert, tmp_path / "adapter")
    second = first.replace(trainable=jax.tree.map(lambda x: x + 1.0, first.trainable))
    checkpoint.save(tmp_path / "adapter", second)
    restored = checkpoint.restore(tmp_path / "adapter", bert.params)
    _assert_same_adapter(restored, second)
    bias = "classifier/bias"
    assert not np.array_equal(flatten(restored.trainable)[bias], flatten(first.trainable)[bias])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or old copy left behind


def test_the_same_adapter_is_saved_as_the_same_files(bert, tmp_path):
    """Identical saves give identical file names and sizes (a run's adapter_bytes) and tensor bytes; only Orbax's
    timestamps and the commit note naming the staging path differ."""
    adapter = _save(bert, tmp_path / "one")
    checkpoint.save(tmp_path / "two", adapter)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert {name: len(data) for name, data in one.items()} == {name: len(data) for name, data in two.items()}
    differing = sorted(name for name in one if one[name] != two[name])
    timestamped = ("_CHECKPOINT_METADATA", "commit_success.txt")
    assert all(name.rsplit("/", 1)[-1] in timestamped for name in differing), differing
    assert sum(name.endswith("/.zarray") for name in one) == len(jax.tree.leaves(adapter.trainable))  # one per tensor


def test_a_failed_write_leaves_the_previous_directory_whole(tmp_path):
    from vera_jax.atomic import staged_directory

    target = tmp_path / "adapter"
    with staged_directory(target, "weights") as staging:
        (staging / "weights").write_text("first")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(target, "weights") as staging:
            (staging / "weights").write_text("half of the second")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["vera_jax_manifest.json", "weights"]
    assert (target / "weights").read_text() == "first"
    with staged_directory(target, "weights") as staging:
        (staging / "weights").write_text("second")
    assert (target / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup left behind


def test_saving_with_another_models_params_is_refused(bert, tmp_path):
    adapter = families.random_adapter(bert, seed=1)
    with pytest.raises(ValueError, match=r"Cannot save this adapter with these params: it does not fit them \(The "
                                         r"adapter's trainable tree does not fit these params and config: missing "
                                         r"\['roberta/.*Pass the params of the model the adapter was trained on"):
        checkpoint.save(tmp_path / "adapter", adapter, families.roberta().params)
    wider = jax.tree.map(lambda x: x, bert.params)
    wider["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] = np.zeros((32, 40), np.float32)
    with pytest.raises(ValueError, match=r"them \(Projections A \(8, 32\) / B \(32, 8\) are too small for "
                                         r"'bert/encoder/layer/0/attention/self/query', which needs in=32, out=40; "
                                         r"build the adapter on these params\)\. Pass the params"):
        checkpoint.save(tmp_path / "adapter", adapter, wider)
    assert not (tmp_path / "adapter").exists()


def test_a_bf16_base_is_a_warning_also_with_a_trained_head(bert, tmp_path):
    adapter = families.random_adapter(bert, seed=1)  # the head ('classifier') trained in full
    checkpoint.save(tmp_path / "adapter", adapter, bert.params)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), bert.params)
    with pytest.warns(UserWarning, match="hold other values than those the adapter .* was trained on"):
        _assert_same_adapter(checkpoint.restore(tmp_path / "adapter", bf16), adapter)
