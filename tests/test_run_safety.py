"""Nothing lost, nothing silently wrong: bad data and lengths refused before the model loads, a resume on changed
data refused, damaged checkpoints skipped for the newest sound one, a diverging run stopped before it saves NaNs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_run
from train.__main__ import main
from train.engine import run_lock
from train.jobs import classify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv")


def _write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _csv(path, rows):
    return _write(path, "text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))


GOOD = [("good film", 1), ("dull plot", 0)] * 20
BAD_DATA = {
    "missing file": (lambda d: d / "nowhere.csv", r"--dataset \S+nowhere.csv: \S+ does not exist; give an existing "
                                                  r"\.csv/\.tsv/\.json/\.jsonl/\.parquet file"),
    "unsupported extension": (lambda d: _write(d / "rows.txt", "text,label\na,1\n"),
                              r"rows.txt has the unsupported extension '.txt'; use "
                              r"\.csv/\.tsv/\.json/\.jsonl/\.parquet"),
    "0-byte file": (lambda d: _write(d / "empty.csv", ""), r"empty.csv is empty \(0 bytes\)"),
    "binary file": (lambda d: _write(d / "sheet.csv", b"PK\x03\x04\x14\x00\x06\x00\xe8\xb1\x00\xff" * 50),
                    r"sheet.csv is not UTF-8 text \(byte 8 cannot be decoded\)"),
    "NUL bytes": (lambda d: _write(d / "nul.csv", b"text,label\na\x00b,1\n"), r"nul.csv holds binary data"),
    "blank text": (lambda d: _csv(d / "blank.csv", GOOD[:4] + [("  ", 1)] + GOOD[4:] + [("", 0)]),
                   r"the --text-column 'text' cell is blank in row 5 \(2 such rows"),
    "missing label": (lambda d: _csv(d / "nolabel.csv", GOOD[:2] + [("fine", "")] + GOOD[2:]),
                      r"the --label-column 'label' cell is empty in row 3 \(1 such rows"),
    "a mistyped label": (lambda d: _csv(d / "typo.csv", GOOD[:7] + [("good one", 1000000)] + GOOD[7:]),
                         r"go up to 1000000 \(a 1,000,001-class head\), but 999,998 of those classes never occur "
                         r"\(2, 3, 4, 5, \.\.\.\)"),
    "one class": (lambda d: _csv(d / "one.csv", [(text, 1) for text, _ in GOOD]),
                  r"Every label in --label-column 'label' is 1: one class, on which accuracy is 1.000 and means "
                  r"nothing"),
    "a JSON true among 0/1": (lambda d: _write(d / "rows.jsonl", "".join(
        f'{{"text": "{text}", "label": {"true" if i == 2 else label}}}\n' for i, (text, label) in enumerate(GOOD))),
        r"the --label-column 'label' cell is True in row 3, not an integer class; write every label as an "
        r"integer 0\.\.K-1 \(true/false as 1/0\), or use --task regression"),
    "a fractional label": (lambda d: _csv(d / "half.csv", GOOD[:2] + [("fine", 1.5)] + GOOD[2:]),
                           r"the --label-column 'label' cell is 1\.5 in row 3, not an integer class"),
    "one file twice": (lambda d: f"{_csv(d / 'a.csv', GOOD)},{d / 'a.csv'}",
                       r"--dataset \S+ names \S+/a.csv and \S+/a.csv, which hold the same rows \(the same file, "
                       r"or the same bytes\): each row would be read twice and held-out rows would leak into "
                       r"training\. Name each file once\."),
    "one file's copy": (lambda d: f"{_csv(d / 'a.csv', GOOD)},{_csv(d / 'b.csv', GOOD)}",
                        r"names \S+/a.csv and \S+/b.csv, which hold the same rows"),
    "an empty folder": (lambda d: d / "folder",
                        r"--dataset \S+/folder is a folder that datasets cannot read \(.*\); name its "
                        r"\.csv/\.tsv/\.json/\.jsonl/\.parquet files instead, comma-separated\."),
    "a hub name that cannot be reached": (lambda d: "nobody-vera-jax/no-such-dataset",
                                          r"--dataset nobody-vera-jax/no-such-dataset is neither a local file or "
                                          r"folder nor a datasets hub dataset that can be reached"),
    "too large a --test-fraction": (lambda d: f"{_csv(d / 'a.csv', GOOD)}\0--test-fraction\0{0.999}",
                                    r"--test-fraction 0\.999 holds out 40 and --validation-fraction 0\.1 holds out "
                                    r"0 of the 40 rows of '\S+', leaving 0 training rows, fewer than one batch of "
                                    r"8; lower --test-fraction or --validation-fraction \(or --batch-size\)\."),
    "a --test-fraction that leaves less than a batch": (
        lambda d: f"{_csv(d / 'a.csv', GOOD)}\0--test-fraction\0{0.85}",
        r"--test-fraction 0\.85 holds out 34 and --validation-fraction 0\.1 holds out 1 of the 40 rows of '\S+', "
        r"leaving 5 training rows, fewer than one batch of 8"),
    "a --validation-fraction that leaves less than a batch": (
        lambda d: f"{_csv(d / 'a.csv', GOOD)}\0--validation-fraction\0{0.8}",
        r"--test-fraction 0\.2 holds out 8 and --validation-fraction 0\.8 holds out 26 of the 40 rows of '\S+', "
        r"leaving 6 training rows"),
    "test files with a hub dataset": (
        lambda d: f"default\0--test-files\0{_csv(d / 'a.csv', GOOD)}",
        r"--test-files and --validation-files go with a --dataset of local files, not 'default'"),
    "a test file that is the training file": (
        lambda d: f"{_csv(d / 'a.csv', GOOD)}\0--test-files\0{d / 'a.csv'}",
        r"names \S+/a.csv and \S+/a.csv, which hold the same rows"),
    "--keep-best without validation rows": (
        lambda d: f"{_csv(d / 'a.csv', GOOD)}\0--validation-fraction\0{0}\0--keep-best",
        r"--keep-best picks the adapter by its validation accuracy, but the run has no validation rows"),
}


@pytest.mark.hf_flax
@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys, case):
    model, _ = tiny
    make, message = BAD_DATA[case]
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
    dataset, *flags = str(make(tmp_path)).split("\0")  # a case may add flags
    assert main([*tiny_run.train_args(model, dataset, tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("error: ") and err.count("error") == 1  # datasets' progress aside


def _config_only(d):
    (d / "config-only").mkdir()
    shutil.copy(d / "folder" / "config.json", d / "config-only")  # the tiny model's
    return d / "config-only"


BAD_MODELS = {
    "an empty folder": (lambda d: d / "folder", r"--model \S+/folder is a folder without a config.json, not a "
                                               r"Hugging Face model folder; give the folder that holds the model's "
                                               r"config.json and weights\."),
    "a config without weights": (_config_only, r"--model \S+/config-only has a config.json but no weights "
                                               r"\(flax_model.msgpack, model.safetensors or pytorch_model.bin\); put "
                                               r"the model's weights beside it\."),
    "an offline hub name": (lambda d: "nobody-vera-jax/no-such-model",
                            r"--model nobody-vera-jax/no-such-model is neither a local folder nor a hub model in the "
                            r"local cache, and the hub cannot be reached \(offline\); give a model folder, or fetch "
                            r"the model while online\."),
    "--targets naming nothing": (lambda d: "\0--targets\0q_proj",
                                 r"VeRA settings do not fit '\S+/model': VeraConfig.target_modules=\('q_proj',\) "
                                 r"matches no module of the params tree\. Its linear layers' names end in classifier, "
                                 r"dense, key, query, value: choose --targets and --head among them"),
    "--head naming nothing": (lambda d: "\0--head\0score",
                              r"VeRA settings do not fit '\S+/model': VeraConfig.modules_to_save=\('score',\) "
                              r"matches no parameter\. Its linear layers' names end in"),
}


@pytest.mark.hf_flax
@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_bad_model_is_one_line_in_seconds_before_the_weights_load(tiny, tmp_path, monkeypatch, capsys, case):
    model, data = tiny
    make, message = BAD_MODELS[case]
    (tmp_path / "folder").mkdir()
    if case == "a config without weights":
        (tmp_path / "folder").rmdir()
        shutil.copytree(model, tmp_path / "folder", ignore=lambda _, names: [n for n in names if n != "config.json"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
    name, *flags = str(make(tmp_path)).split("\0")
    started = time.perf_counter()
    assert main([*tiny_run.train_args(name or model, data, tmp_path / "run"), *flags]) == 2
    assert time.perf_counter() - started < 20  # a hub name used to take 40 s of retries
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("error: ") and err.count("error") == 1


@pytest.mark.hf_flax
def test_an_empty_dataset_name_is_refused(tiny, tmp_path, capsys):
    model, _ = tiny
    assert main(tiny_run.train_args(model, "", tmp_path / "run")) == 2
    assert capsys.readouterr().err == ("error: --dataset is empty; give 'default', 'chatterbot', a datasets hub name "
                                       "or local files.\n")


@pytest.mark.hf_flax
def test_max_length_beyond_the_positions_is_refused_before_the_weights_load(tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
    assert main([*tiny_run.train_args(model, data, tmp_path / "run"), "--max-length", "65"]) == 2
    assert ("error: --max-length 65 exceeds the 64 positions of" in capsys.readouterr().err)


@pytest.mark.hf_flax
def test_a_resume_on_changed_data_is_refused(tiny, tmp_path, capsys):
    model, _ = tiny
    data = tiny_run.make_csv(tmp_path / "data.csv")
    args = tiny_run.train_args(model, data, tmp_path / "run", "--max-steps", "2")
    assert main(args) == 0
    original = data.read_bytes()
    data.write_bytes(original.replace(b"good", b"fine", 1))  # one word of one row
    assert main(args) == 2
    assert "was written with different data (['sha256']). Use another --output-dir, or the dataset files it was " \
           "trained on to resume." in capsys.readouterr().err
    data.write_bytes(original)
    assert main(args) == 0
    assert "resumed from the checkpoint at step 2" in capsys.readouterr().out


# ---- damaged checkpoints ----

def _truncate_state(step_dir):
    for path in (step_dir / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"options": {"model"')


def _flip_a_stored_bit(step_dir):
    """Rewrite the step's state with one bit of one vector flipped, as storage that corrupts silently would."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = jax.tree.map(np.array, checkpointer.restore(step_dir / "state"))
        vector = state["trainable"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["vera_lambda_d"]
        vector.view(np.uint32)[0] ^= 1
        shutil.rmtree(step_dir / "state")
        checkpointer.save(step_dir / "state", state)


def _final_sums(out) -> dict:
    step = max(int(p.name) for p in (out / "checkpoints").iterdir())
    return json.loads((out / "checkpoints" / str(step) / "meta" / "metadata").read_text())["tensor_sha256"]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """A run of 8 steps keeping its checkpoints at 2, 4, 6 and 8."""
    model, data = tiny
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(tiny_run.train_args(model, data, out, "--max-steps", "8", "--checkpoint-every", "2",
                                    "--keep-checkpoints", "4")) == 0
    return out


def _rerun(tiny, out):
    model, data = tiny
    return main(tiny_run.train_args(model, data, out, "--max-steps", "8", "--checkpoint-every", "2",
                                    "--keep-checkpoints", "4"))


@pytest.mark.hf_flax
def test_a_resume_with_other_flags_is_refused_before_the_model_loads(tiny, straight, tmp_path, monkeypatch, capsys):
    model, data = tiny
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
    assert main([*tiny_run.train_args(model, data, out, "--max-steps", "8", "--checkpoint-every", "2",
                                      "--keep-checkpoints", "4"), "--r", "4"]) == 2
    assert re.search(r"error: The checkpoint at step 8 in \S+ was written with different options \(\['r'\]\)",
                     capsys.readouterr().err)


@pytest.mark.hf_flax
def test_damaged_newest_checkpoints_fall_back_to_the_newest_sound_one(tiny, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    checkpoints = out / "checkpoints"
    _truncate_state(checkpoints / "8")
    _garble_meta(checkpoints / "6")
    _flip_a_stored_bit(checkpoints / "4")
    capsys.readouterr()
    assert _rerun(tiny, out) == 0
    captured = capsys.readouterr()
    for step, reason in (("8", "ValueError"), ("6", "JSONDecodeError"),
                         ("4", "ValueError: 1 of its tensors differ from their sha256")):
        assert re.search(rf"warning: the checkpoint {checkpoints / step} is damaged \({reason}.*\); moved it to "
                         rf"{out / 'checkpoints-damaged'}/{step}-\S+ and resuming from step 2", captured.err), step
    assert "resumed from the checkpoint at step 2" in captured.out
    assert len(list((out / "checkpoints-damaged").iterdir())) == 3
    assert _final_sums(out) == _final_sums(straight)  # steps 3..8 trained again, to the same state
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # the records past step 2 were dropped, not repeated


@pytest.mark.hf_flax
def test_no_sound_checkpoint_is_a_clear_error_and_nothing_is_removed(tiny, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    checkpoints = out / "checkpoints"
    for step in ("2", "4", "6", "8"):
        _garble_meta(checkpoints / step)
    assert _rerun(tiny, out) == 2
    err = capsys.readouterr().err
    assert f"error: Every checkpoint in {checkpoints} is damaged ({checkpoints / '8'}: JSONDecodeError" in err
    assert f"Remove those step folders (or all of {checkpoints}) to train from the start" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6", "8"]


# ---- divergence ----

def _stored_state(step_dir):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(step_dir / "state")


@pytest.mark.parametrize("log_every, found", [("1", r"step 3: the training loss is (nan|inf)"),
                                              ("100", r"step 4: the trained state is not finite")])
@pytest.mark.hf_flax
def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tiny, tmp_path, capsys, log_every, found):
    model, data = tiny
    out = tmp_path / "run"
    args = tiny_run.train_args(model, data, out, "--max-steps", "8", "--lr-vectors", "1e30", "--lr-head", "1e30",
                               "--checkpoint-every", "2", "--keep-checkpoints", "5", "--log-every", log_every)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: Training stopped at {found}\. Lower the learning rate \(--lr-vectors 1e\+30, "
                     r"--lr-head 1e\+30\) and train in a new --output-dir; the last checkpoint here, step 2, is "
                     r"finite\.", err), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(_stored_state(
        out / "checkpoints" / "2")))
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


# ---- one run per directory ----

HOLD_LOCK = """
import pathlib, sys, time
from train.engine import run_lock
with run_lock.held(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def _hold_lock(out, seconds: float):
    """A second process holding ``out``'s run lock for ``seconds`` (once it has printed 'held'); killed on exit."""
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(seconds)], cwd=tiny_run.REPO,
                          stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "held\n"
        try:
            yield holder
        finally:
            holder.kill()


@pytest.mark.hf_flax
def test_a_second_run_on_a_busy_directory_is_refused_before_it_writes(tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    out = tmp_path / "run"
    out.mkdir()
    with _hold_lock(out, 60) as holder:
        monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
        assert main(tiny_run.train_args(model, data, out, "--max-steps", "2")) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"error: --output-dir {out} is in use by another run (pid {holder.pid} on "
                                            f"host {socket.gethostname()}); wait for it to finish, or choose another "
                                            "--output-dir."]
        assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_FILE]


def test_a_dead_owners_directory_is_taken_over_with_a_note(tmp_path, capsys):
    with _hold_lock(tmp_path, 60) as holder:
        holder.kill()  # SIGKILL: the kernel drops its lock, its record stays
        holder.wait()
    with run_lock.held(tmp_path):
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (f"note: the run that held --output-dir {tmp_path} (pid {holder.pid} on host {socket.gethostname()}) is "
            "no longer running; this run takes the directory over." in capsys.readouterr().err)
    with run_lock.held(tmp_path):  # released cleanly: no note
        pass
    assert "note" not in capsys.readouterr().err


@pytest.mark.hf_flax
def test_two_runs_started_together_on_one_directory_one_is_refused(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "run"
    args = tiny_run.train_args(model, data, out, "--max-steps", "2", "--seed", "1")
    runs = [subprocess.Popen([sys.executable, "-m", "train", *args], cwd=tiny_run.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]  # waits, and closes the pipes
    results = [(run.returncode, err) for run, err in zip(runs, errors)]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert re.fullmatch(rf"error: --output-dir {re.escape(str(out))} is in use by another run \(pid \d+ on host \S+\); "
                        r"wait for it to finish, or choose another --output-dir\.\n", refused), refused
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]  # one run's records only


@pytest.mark.hf_flax
def test_an_empty_output_dir_is_refused(tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    monkeypatch.chdir(tmp_path)
    assert main(tiny_run.train_args(model, data, "", "--max-steps", "2")) == 2
    assert capsys.readouterr().err == ("error: --output-dir is empty, which would write the run into the current "
                                       "directory; name a run directory, such as runs/latest.\n")
    assert list(tmp_path.iterdir()) == []
