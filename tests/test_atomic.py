"""The atomic writer under failure: a swap that fails leaves the old adapter whole, and no writer replaces a
directory that is not its own."""

import errno
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import families
import vera_jax
import vera_jax.atomic
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.export import save_merged
from vera_jax.lora import save_lora
from vera_jax.paths import flatten


@pytest.fixture(scope="module")
def bert():
    return families.bert()


@pytest.fixture(scope="module")
def old(bert):
    return families.random_adapter(bert, seed=1)


@pytest.fixture(scope="module")
def new(bert):
    return families.random_adapter(bert, seed=2)


def _assert_restores_to(directory, params, adapter):
    restored = checkpoint.restore(directory, params)
    assert restored.config == adapter.config
    assert jax.tree.structure(restored.trainable) == jax.tree.structure(adapter.trainable)
    for got, want in zip(jax.tree.leaves(restored.trainable), jax.tree.leaves(adapter.trainable)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # bit-identical
    np.testing.assert_array_equal(restored.projections.A, adapter.projections.A)
    np.testing.assert_array_equal(restored.projections.B, adapter.projections.B)


def _hidden(directory: Path) -> list[str]:
    """What the writer left beside ``directory``: staging or old copies."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


def test_the_two_adapters_differ(old, new):
    """The tests below would prove nothing if the old and the new adapter were the same."""
    for a, b in zip(jax.tree.leaves(old.trainable), jax.tree.leaves(new.trainable)):
        assert not np.array_equal(a, b)


def test_a_failed_exchange_leaves_the_old_adapter(bert, old, new, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    checkpoint.save(directory, old)

    def failing_exchange(first, second):
        raise OSError(errno.EIO, "injected: the exchange failed", str(second))

    with monkeypatch.context() as patch:
        patch.setattr(vera_jax.atomic, "_exchange", failing_exchange)
        with pytest.raises(OSError, match="injected: the exchange failed"):
            checkpoint.save(directory, new)
    _assert_restores_to(directory, bert.params, old)

    exchanged = []
    real_exchange = vera_jax.atomic._exchange
    monkeypatch.setattr(vera_jax.atomic, "_exchange", lambda *paths: exchanged.append(paths) or real_exchange(*paths))
    checkpoint.save(directory, new)  # a later save works, and clears what the failed one left
    assert len(exchanged) == 1  # through the exchange the failure above was injected into
    _assert_restores_to(directory, bert.params, new)
    assert _hidden(directory) == []


def _staging_name(path) -> str:
    """A path's name, a writer's unique staging suffix (``.NAME.partial.HOST.PID.RANDOM``) cut to ``.partial``."""
    name = Path(path).name
    return name[: name.index(".partial.") + len(".partial")] if ".partial." in name else name


class _FlakyOs:
    """``os`` as `vera_jax.atomic` sees it, with a ``replace`` that fails moving ``failing`` (a path, or a staging
    directory of that name) into place."""

    def __init__(self, failing: Path):
        self.failing = failing
        self.calls = []

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, source, target):
        self.calls.append((_staging_name(source), _staging_name(target)))
        if Path(source).parent == self.failing.parent and _staging_name(source) == self.failing.name:
            raise OSError(errno.EIO, "injected: the second rename failed", str(target))
        os.replace(source, target)


@pytest.mark.parametrize("after_crash", ["recover", "restore", "save"])
def test_a_crash_between_the_fallback_renames_is_recovered(bert, old, new, tmp_path, monkeypatch, after_crash):
    directory = tmp_path / "adapter"
    checkpoint.save(directory, old)
    flaky = _FlakyOs(tmp_path / ".adapter.partial")
    with monkeypatch.context() as patch:
        patch.setattr(vera_jax.atomic, "_exchange", lambda first, second: False)  # no atomic exchange here
        patch.setattr(vera_jax.atomic, "os", flaky)
        with pytest.raises(OSError, match="injected: the second rename failed"):
            checkpoint.save(directory, new)
    # The old copy went aside, the new one never came in: the state a crash between the two renames leaves.
    assert flaky.calls == [("adapter", ".adapter.old"), (".adapter.partial", "adapter")]
    assert not directory.exists() and (tmp_path / ".adapter.old" / checkpoint.METADATA_FILE).is_file()

    if after_crash == "recover":
        vera_jax.atomic.recover(directory)
        assert directory.is_dir() and not (tmp_path / ".adapter.old").exists()
    if after_crash in ("recover", "restore"):
        _assert_restores_to(directory, bert.params, old)  # restore also puts a copy still aside back first
    checkpoint.save(directory, new)  # stage() recovers a copy still aside before it checks the directory
    _assert_restores_to(directory, bert.params, new)
    assert _hidden(directory) == []


def test_the_fallback_without_an_exchange_replaces_the_adapter(bert, old, new, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    monkeypatch.setattr(vera_jax.atomic, "_exchange", lambda first, second: False)
    checkpoint.save(directory, old)
    checkpoint.save(directory, new)
    _assert_restores_to(directory, bert.params, new)
    assert _hidden(directory) == []


def test_recover_leaves_a_published_directory_alone(tmp_path):
    directory, aside = tmp_path / "adapter", tmp_path / ".adapter.old"
    directory.mkdir()
    (directory / "marker").write_text("new")
    aside.mkdir()
    (aside / "marker").write_text("old")
    vera_jax.atomic.recover(directory)  # the new copy is in place: the old one must not come back over it
    assert (directory / "marker").read_text() == "new"
    assert not aside.exists()  # and the leftover of the finished swap is gone


def _writers(bert, adapter):
    """Each writer as a function of its directory."""
    return {
        "checkpoint": lambda d: checkpoint.save(d, adapter),
        "peft": lambda d: vera_peft.save_adapter(d, adapter, bert.params),
        "merged": lambda d: save_merged(d, adapter, bert.params, bert.model),
    }


@pytest.mark.parametrize("writer", ["checkpoint", "peft", "merged"])
def test_writers_refuse_a_directory_that_is_not_theirs(bert, old, tmp_path, writer):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"already holds files and is not a directory this writer made"):
        _writers(bert, old)[writer](directory)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
    assert (directory / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing staged beside it either
    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        _writers(bert, old)[writer](tmp_path / "file")
    assert (tmp_path / "file").read_text() == "a file"


def test_writers_refuse_each_others_directories(bert, old, tmp_path):
    writers = _writers(bert, old)
    for name, write in writers.items():
        write(tmp_path / name)
    for name, write in writers.items():
        for other in writers:
            if other != name:
                before = {p.name: p.read_bytes() for p in (tmp_path / other).rglob("*") if p.is_file()}
                with pytest.raises(FileExistsError):
                    write(tmp_path / other)
                assert {p.name: p.read_bytes() for p in (tmp_path / other).rglob("*") if p.is_file()} == before


def test_writers_replace_their_own_directory_and_accept_an_empty_one(bert, old, new, tmp_path):
    for name in ("checkpoint", "peft", "merged"):
        (tmp_path / name).mkdir()  # empty: nothing to lose
        _writers(bert, old)[name](tmp_path / name)
        _writers(bert, new)[name](tmp_path / name)
    _assert_restores_to(tmp_path / "checkpoint", bert.params, new)
    loaded = vera_peft.load_adapter(tmp_path / "peft", bert.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.trainable, new.trainable)
    exported = type(bert.model).from_pretrained(tmp_path / "merged")
    want = flatten(vera_jax.merge(bert.params, new))
    for path, leaf in flatten(exported.params).items():
        np.testing.assert_array_equal(leaf, want[path], err_msg=path)
    assert json.loads((tmp_path / "peft" / vera_peft.CONFIG_FILE).read_text())["peft_type"] == "VERA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "merged", "peft"]


def test_write_text_replaces_a_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "notes.json"
    vera_jax.atomic.write_text(path, "first")
    vera_jax.atomic.write_text(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["notes.json"]
    monkeypatch.setattr(vera_jax.atomic, "os", _FlakyOs(path.with_name(".notes.json.tmp")))
    with pytest.raises(OSError, match="injected"):
        vera_jax.atomic.write_text(path, "third")
    assert path.read_text() == "second"


class CrashRecorder:
    """Copies the disk under ``root`` before every step a writer takes on it (a directory made or removed, a
    rename or exchange, a file written): each copy is what a crash at that step leaves."""

    STEPS = [(os, "replace"), (os, "rename"), (shutil, "rmtree"), (vera_jax.atomic, "_exchange"),
             (Path, "mkdir"), (Path, "write_text"), (Path, "write_bytes")]

    def __init__(self, root: Path, crashes: Path, monkeypatch):
        self.root, self.crashes, self.count = root, crashes, 0
        for owner, name in self.STEPS:
            monkeypatch.setattr(owner, name, self._before(getattr(owner, name)))

    def _before(self, step):
        def recorded(*args, **kwargs):
            self.count += 1
            shutil.copytree(self.root, self.crashes / str(self.count), symlinks=True)
            return step(*args, **kwargs)

        return recorded


def _contents(directory: Path) -> dict:
    """Each file's bytes; a safetensors file's tensors (its header's key order varies from write to write)."""
    return {p.relative_to(directory): {k: (v.dtype, v.shape, v.tobytes()) for k, v in load_file(p).items()}
            if p.suffix == ".safetensors" else p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("writer", ["checkpoint", "peft", "lora", "merged"])
def test_a_crash_at_any_step_of_a_writer_leaves_the_old_or_the_new_copy(bert, old, new, tmp_path, monkeypatch,
                                                                        writer, exchange):
    writers = _writers(bert, old) | {"lora": lambda d: save_lora(d, old, bert.params)}
    new_writers = _writers(bert, new) | {"lora": lambda d: save_lora(d, new, bert.params)}
    reference = {}
    for name, write in (("old", writers[writer]), ("new", new_writers[writer])):
        write(tmp_path / name)
        reference[name] = _contents(tmp_path / name)
    target = tmp_path / "work" / "out"
    writers[writer](target)
    if not exchange:
        monkeypatch.setattr(vera_jax.atomic, "_exchange", lambda first, second: False)
    recorder = CrashRecorder(tmp_path / "work", tmp_path / "crashes", monkeypatch)
    new_writers[writer](target)
    monkeypatch.undo()
    assert recorder.count >= 4
    seen = set()
    for crash in range(1, recorder.count + 1):
        left = tmp_path / "crashes" / str(crash) / "out"
        vera_jax.atomic.recover(left)  # what the next save or restore does first
        if writer == "checkpoint":
            restored = checkpoint.restore(left, bert.params)
            match = [name for name, adapter in (("old", old), ("new", new))
                     if all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored.trainable),
                                                                 jax.tree.leaves(adapter.trainable)))]
        else:
            match = [name for name, contents in reference.items() if _contents(left) == contents]
        assert match, f"a crash at step {crash} of {recorder.count} left neither copy whole"
        seen.update(match)
    assert seen == {"old", "new"}  # crashes before the swap keep the old copy; after it (cleaning up), the new
    if writer == "checkpoint":
        _assert_restores_to(target, bert.params, new)
    else:
        assert _contents(target) == reference["new"]


@pytest.mark.parametrize("writer", ["checkpoint", "peft", "lora", "merged"])
def test_overwrite_keeps_a_foreign_directory_aside(bert, old, tmp_path, writer):
    """overwrite=True writes over a folder that is not the writer's own; its files move aside, never deleted."""
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("my notes")
    writers = {"checkpoint": lambda: checkpoint.save(directory, old, overwrite=True),
               "peft": lambda: vera_peft.save_adapter(directory, old, bert.params, overwrite=True),
               "lora": lambda: save_lora(directory, old, bert.params, overwrite=True),
               "merged": lambda: save_merged(directory, old, bert.params, bert.model, overwrite=True)}
    writers[writer]()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in kept[0].iterdir()) == ["notes.txt"]
    assert not (directory / "notes.txt").exists() and any(directory.iterdir())
    if writer == "checkpoint":
        _assert_restores_to(directory, bert.params, old)
    writers[writer]()  # now its own: replaced as usual, nothing more kept aside
    assert [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")] == kept
