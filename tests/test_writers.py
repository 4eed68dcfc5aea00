"""Writers recognise their own output by the vera_jax manifest alone, never by a file every such folder has;
concurrent writers and readers of one directory never lose or mix a copy; file system errors are one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open

import tiny_run
import vera_jax.atomic
from train.__main__ import main
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.atomic import MANIFEST_FILE, WriteError
from vera_jax.export import save_merged
from vera_jax.lora import save_lora
from writer_race import PARAMS, adapter

EXPORT = ("export", "--backend", "linen")  # the tiny models carry Flax weights: their adapters are linen's

WRITER_RACE = Path(__file__).with_name("writer_race.py")


@pytest.fixture(scope="module")
def old():
    return adapter(1)


@pytest.fixture(scope="module")
def new():
    return adapter(2)


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _same_vectors(loaded, expected) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.trainable),
                                                   jax.tree.leaves(expected.trainable)))


def _beside(directory: Path) -> list[str]:
    """What lies beside ``directory``, itself included."""
    return sorted(p.name for p in directory.parent.iterdir())


WRITERS = {
    "checkpoint": lambda d, a, **kw: checkpoint.save(d, a, **kw),
    "peft": lambda d, a, **kw: vera_peft.save_adapter(d, a, PARAMS, **kw),
    "lora": lambda d, a, **kw: save_lora(d, a, PARAMS, **kw),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier folder and a vera_jax adapter checkpoint for it."""
    from transformers import FlaxBertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny")
    model = tiny_run.make_model(root / "model")
    params = FlaxBertForSequenceClassification.from_pretrained(model).params
    config = vera_jax.VeraConfig(r=4, target_modules=("query", "value"))
    checkpoint.save(root / "adapter", vera_jax.init_adapter(params, config), params)
    return model, root / "adapter"


def _export(tiny, output: Path, fmt: str, *extra: str, model: Path | None = None) -> list[str]:
    return [*EXPORT, "--adapter", str(tiny[1]), "--model", str(model or tiny[0]), "--format", fmt,
            "--output", str(output), *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# Finding 1: the merged export's marker was config.json, which every Hugging Face model folder has.
@pytest.mark.hf_flax
def test_a_merged_export_never_replaces_a_model_folder(tiny, tmp_path, capsys):
    model, _ = tiny
    before = _files(model)
    assert main(_export(tiny, model, "flax")) == 2  # --output is --model: refused before anything loads
    assert "is the directory of --model" in _one_line(capsys)
    copy = shutil.copytree(model, tmp_path / "copy")  # a Hugging Face folder vera_jax did not write
    (copy / "README.md").write_text("my model card")
    copied = _files(copy)
    for fmt in ("flax", "safetensors"):
        assert main(_export(tiny, copy, fmt)) == 2
        assert f"has no {MANIFEST_FILE} naming a merged" in _one_line(capsys)
    assert _files(model) == before and _files(copy) == copied
    assert _beside(copy) == ["copy"]


# Finding 2: PEFT and LoRA exports shared adapter_config.json as their marker.
def test_lora_and_peft_writers_refuse_each_others_output(old, tmp_path):
    vera_peft.save_adapter(tmp_path / "peft", old, PARAMS)
    save_lora(tmp_path / "lora", old, PARAMS)
    for writer, other in (("lora", "peft"), ("peft", "lora")):
        before = _files(tmp_path / other)
        kind = {"lora": "peft-lora", "peft": "peft-vera"}[writer]
        with pytest.raises(FileExistsError, match=rf"{other} already holds files .* no {MANIFEST_FILE} naming "
                                                  rf"a {kind}"):
            WRITERS[writer](tmp_path / other, old)
        assert _files(tmp_path / other) == before


@pytest.mark.hf_flax
def test_lora_export_refuses_a_runs_peft_adapter(tiny, tmp_path, capsys):
    from transformers import FlaxBertForSequenceClassification

    params = FlaxBertForSequenceClassification.from_pretrained(tiny[0]).params
    run_peft = tmp_path / "run" / "peft_adapter"
    vera_peft.save_adapter(run_peft, checkpoint.restore(tiny[1], params), params)
    before = _files(run_peft)
    assert main(_export(tiny, run_peft, "lora")) == 2
    assert "naming a peft-lora" in _one_line(capsys)
    assert _files(run_peft) == before


# Finding 3, and a full disk during an export: every file, the tokenizer's included, is written before the swap.
@pytest.mark.hf_flax
def test_a_failed_tokenizer_write_leaves_the_old_export_whole(tiny, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "merged"
    assert main(_export(tiny, out, "safetensors")) == 0
    assert {"tokenizer.json", "vocab.txt", "model.safetensors", MANIFEST_FILE} <= set(_files(out))
    before = _files(out)

    def full_disk(self, directory, *args, **kwargs):
        assert not Path(directory).samefile(out)  # written into the staging directory, not the published one
        (Path(directory) / "vocab.txt").write_text("[PAD]\n")  # half written when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "vocab.txt"))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    assert main(_export(tiny, out, "safetensors")) == 2
    assert re.search(r"error: --output \S+merged: Cannot write \S+merged: No space left on device", _one_line(capsys))
    assert _files(out) == before
    assert _beside(out) == ["merged"]


# Finding 5: two overwrites within one second collided on NAME.replaced-SECOND-PID.
@pytest.mark.parametrize("writer", ["checkpoint", "peft"])
def test_overwrites_in_one_second_keep_every_foreign_folder(old, tmp_path, monkeypatch, writer):
    monkeypatch.setattr(vera_jax.atomic.time, "strftime", lambda *args: "20260101-000000")  # one second
    directory = tmp_path / "mine"
    for notes in ("first notes", "second notes"):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        (directory / "notes.txt").write_text(notes)
        WRITERS[writer](directory, old, overwrite=True)
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-20260101-000000-"))
    assert len(kept) == 2
    assert sorted((p / "notes.txt").read_text() for p in kept) == ["first notes", "second notes"]
    assert all(sorted(q.name for q in p.iterdir()) == ["notes.txt"] for p in kept)


# Finding 6: one fixed staging name for every writer.
@pytest.mark.parametrize("writer", ["checkpoint", "peft", "lora"])
def test_a_writer_that_runs_between_anothers_staging_and_swap(old, new, tmp_path, monkeypatch, writer):
    """A second writer runs whole between the first one's staging and its swap: both succeed, each publishes
    its own complete copy, and the last swap wins."""
    directory = tmp_path / "out"
    WRITERS[writer](directory, new)
    real_publish, interleaved = vera_jax.atomic.publish, []

    def publish_after_another_writer(staging, target, kind):
        if not interleaved:
            interleaved.append(_files(staging))
            WRITERS[writer](directory, new)  # the whole second write, through its own staging directory
            assert _files(staging) == interleaved[0]  # the first writer's staged copy is untouched
        return real_publish(staging, target, kind)

    monkeypatch.setattr(vera_jax.atomic, "publish", publish_after_another_writer)
    monkeypatch.setattr(checkpoint, "publish", publish_after_another_writer)
    WRITERS[writer](directory, old)
    assert interleaved
    assert _files(directory) == interleaved[0]
    if writer != "lora":
        loaded = (checkpoint.restore(directory, PARAMS) if writer == "checkpoint"
                  else vera_peft.load_adapter(directory, PARAMS))
        assert _same_vectors(loaded, old)
    assert _beside(directory) == ["out"]


def test_two_processes_rewriting_one_adapter_and_a_reader(old, tmp_path):
    """Two writer processes rewrite one adapter while this process reads it: every write succeeds, every read
    gives one of the written adapters whole (never a false 'damaged'), and nothing is left beside it."""
    directory = tmp_path / "adapter"
    vera_peft.save_adapter(directory, old, PARAMS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get(
        "PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
    writers = [subprocess.Popen([sys.executable, str(WRITER_RACE), str(directory), str(seed), "30"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 3)]
    expected = [adapter(seed) for seed in (1, 2, 3, 4)]
    reads = 0
    while any(w.poll() is None for w in writers) or reads == 0:
        loaded = vera_peft.load_adapter(directory, PARAMS)
        assert any(_same_vectors(loaded, e) for e in expected)
        reads += 1
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0 and out.strip() == "done", err[-2000:]
    assert reads > 10 and _beside(directory) == ["adapter"]


def test_read_stable_reads_again_when_the_directory_was_swapped(old, new, tmp_path, monkeypatch):
    """A swap between reading the config and reading the tensors: the read is done again, on the new copy."""
    directory = tmp_path / "adapter"
    vera_peft.save_adapter(directory, old, PARAMS)
    real_read, calls = vera_peft._read_tensors, []

    def read_then_swap(path):
        calls.append(path)
        if len(calls) == 1:
            vera_peft.save_adapter(tmp_path / "next", new, PARAMS)
            vera_jax.atomic._exchange(tmp_path / "next", directory)  # what a writer's swap does
            shutil.rmtree(tmp_path / "next")  # and its clean-up: the copy being read is gone
        return real_read(path)

    monkeypatch.setattr(vera_peft, "_read_tensors", read_then_swap)
    assert _same_vectors(vera_peft.load_adapter(directory, PARAMS), new)
    assert len(calls) == 2


def test_a_checkpoint_swapped_during_its_restore_is_read_again(old, new, tmp_path, monkeypatch):
    """A writer's swap and clean-up between reading vera_adapter.json and the Orbax tree: no false 'damaged'."""
    directory = tmp_path / "adapter"
    checkpoint.save(directory, old)
    real_read, calls = checkpoint._read_tree, []

    def swap_then_read(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            checkpoint.save(tmp_path / "next", new)
            vera_jax.atomic._exchange(tmp_path / "next", directory)
            shutil.rmtree(tmp_path / "next")  # the old copy, whose metadata was read, is gone
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_tree", swap_then_read)
    assert _same_vectors(checkpoint.restore(directory, PARAMS), new)
    assert len(calls) == 2


def test_stage_removes_only_the_staging_of_dead_writers(tmp_path):
    directory = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = vera_jax.atomic._host()
    live = tmp_path / f".out.partial.{host}.{os.getpid()}.live"
    stale = tmp_path / f".out.partial.{host}.{int(dead.stdout)}.stale"
    elsewhere = tmp_path / f".out.partial.otherhost.{int(dead.stdout)}.remote"
    for path in (live, stale, elsewhere):
        path.mkdir()
        (path / "half.bin").write_bytes(b"half")
    staging = vera_jax.atomic.stage(directory, "test")
    assert live.is_dir() and elsewhere.is_dir() and not stale.exists()
    assert staging.name.startswith(f".out.partial.{host}.{os.getpid()}.") and staging not in (live, stale)


# Finding 7: a symbolic link as the output.
@pytest.mark.parametrize("writer", ["checkpoint", "peft", "lora"])
def test_a_symlinked_output_is_written_where_it_points(old, new, tmp_path, writer):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    WRITERS[writer](link, old)
    WRITERS[writer](link, new)  # and again: the link's target is replaced, the link stays
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / MANIFEST_FILE).is_file()
    if writer == "peft":
        assert _same_vectors(vera_peft.load_adapter(link, PARAMS), new)
    if writer == "checkpoint":
        assert _same_vectors(checkpoint.restore(link, PARAMS), new)
    assert _beside(real) == ["link", "real"]


# LoRA exports carry per-tensor checksums as PEFT exports do; safetensors bytes are the same run to run.
def test_lora_files_carry_every_tensors_checksum(old, tmp_path):
    save_lora(tmp_path / "lora", old, PARAMS)
    with safe_open(str(tmp_path / "lora" / vera_peft.WEIGHTS_FILE), framework="numpy") as file:
        sums = json.loads(file.metadata()[vera_peft.CHECKSUMS])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert len(tensors) == 4 and set(sums) == set(tensors)
    for key, value in tensors.items():
        assert sums[key] == hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def _header(path: Path) -> list[str]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return list(json.loads(data[8: 8 + length]))


@pytest.mark.parametrize("writer", ["peft", "lora"])
def test_safetensors_files_are_written_byte_for_byte_the_same(old, tmp_path, writer):
    for name in ("first", "second"):
        WRITERS[writer](tmp_path / name, old)
    assert _files(tmp_path / "first") == _files(tmp_path / "second")
    keys = _header(tmp_path / "first" / vera_peft.WEIGHTS_FILE)
    assert keys == ["__metadata__", *sorted(k for k in keys if k != "__metadata__")]
    result = subprocess.run([sys.executable, str(WRITER_RACE), str(tmp_path / "third"), "1", "1"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
    if writer == "peft":  # another process writes the same adapter to the same bytes
        assert _files(tmp_path / "third") == _files(tmp_path / "first")


# A full disk or a read-only file system: one error naming the directory, the old copy whole.
@pytest.mark.parametrize("writer", ["checkpoint", "peft", "lora"])
def test_a_full_disk_leaves_the_old_copy_whole(old, new, tmp_path, monkeypatch, writer):
    directory = tmp_path / "out"
    WRITERS[writer](directory, old)
    before = _files(directory)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "a file")

    if writer == "checkpoint":
        monkeypatch.setattr(checkpoint.ocp.Checkpointer, "save", full)
    else:
        monkeypatch.setattr(f"vera_jax.{'peft' if writer == 'peft' else 'lora'}.write_safetensors", full)
    with pytest.raises(WriteError, match=r"Cannot write \S+out: No space left on device .*any old copy is whole"):
        WRITERS[writer](directory, new)
    assert _files(directory) == before and _beside(directory) == ["out"]


@pytest.mark.hf_flax
def test_a_read_only_parent_is_one_line(old, tmp_path, monkeypatch, capsys, tiny):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(vera_jax.atomic.tempfile, "mkdtemp", read_only)
    with pytest.raises(WriteError, match=r"Cannot write .*out: Read-only file system"):
        vera_peft.save_adapter(tmp_path / "out", old, PARAMS)
    assert main(_export(tiny, tmp_path / "export", "peft")) == 2
    assert "Read-only file system" in _one_line(capsys)
    assert _beside(tmp_path / "out") == []


@pytest.mark.hf_flax
def test_a_bit_flipped_adapter_is_one_damaged_file_error(tiny, tmp_path):
    """A flipped bit in the Orbax tree's metadata: named as damage in one line, not as a misfit with tracebacks."""
    flipped = shutil.copytree(tiny[1], tmp_path / "adapter")
    manifest = flipped / checkpoint.TREE_DIR / "_METADATA"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 3] ^= 0x10
    manifest.write_bytes(bytes(data))
    result = tiny_run.run_subprocess([*EXPORT, "--adapter", str(flipped), "--model", str(tiny[0]), "--format", "peft",
                                      "--output", str(tmp_path / "out")], timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the adapter is damaged" in errors[0], result.stderr[-3000:]
    assert "does not fit" not in errors[0] and "Traceback" not in result.stderr
    assert "Event loop is closed" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_read_only_target_is_refused_before_anything_is_written(old, new, tmp_path, monkeypatch):
    directory = tmp_path / "out"
    vera_peft.save_adapter(directory, old, PARAMS)
    before = _files(directory)
    real_access = os.access

    def access(path, mode, **kwargs):  # as a read-only directory answers to a user other than root
        return Path(path) != directory and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(WriteError, match=r"Cannot write \S+out: it is read-only; nothing was written"):
        vera_peft.save_adapter(directory, new, PARAMS)
    assert _files(directory) == before and _beside(directory) == ["out"]


@pytest.mark.hf_flax
def test_a_full_disk_during_a_runs_checkpoint_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    """The second of a run's checkpoints meets a full disk: one line, exit 2, the first step restorable."""
    import orbax.checkpoint as ocp

    from train.engine.checkpoints import RunCheckpoints

    data = tiny_run.make_csv(tmp_path / "data.csv")
    out = tmp_path / "run"
    real_save, saves = ocp.CheckpointManager.save, []

    def full_on_the_second(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoints" / str(step)))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_on_the_second)
    assert main(tiny_run.train_args(tiny[0], data, out, "--max-steps", "4", "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err  # with the progress bars
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(r"error: Cannot write \S+checkpoints/4: No space left on device", errors[0]), err
    monkeypatch.undo()
    checkpoints = RunCheckpoints(out / "checkpoints", 3)
    try:
        assert checkpoints.latest_step() == 2
    finally:
        checkpoints.close()
