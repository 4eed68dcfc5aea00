"""Splits and choices: --data-seed fixes the test and validation rows apart from --seed; a local dataset's own test
and validation files are used as given; validation runs after every epoch (and every --eval-every steps) and
--keep-best keeps the adapter it scored best; a sweep reports validation and test accuracy per point and
--select writes the best point by validation as a run directory."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

import tiny_run
from train.__main__ import main
from train.engine import data as data_lib
from train.engine.loop import Trainees, Validation, fit
from train.engine.run import start
from train.jobs import classify
from train.models.load import load_classifier
from train.options import DataOptions, Options
from vera_jax import checkpoint
from vera_jax.host import to_host
from vera_jax.paths import flatten

NNX_FLAGS = ("--backend", "nnx", "--lr-vectors", "0.05", "--lr-head", "0.05")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT in PyTorch weights (the NNX encoder's input), without dropout, and 160 labeled rows."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_run.make_model(root / "model", weights=("pytorch",), dropout=0.0), tiny_run.make_csv(root / "data.csv")


def _texts(split) -> list[str]:
    return list(split["text"])


def test_the_data_seed_fixes_the_test_and_validation_rows_apart_from_the_seed(tiny):
    _, data = tiny
    splits = data_lib.load_splits(DataOptions(dataset=str(data)), batch_size=8)
    rows = _texts(datasets.load_dataset("csv", data_files=str(data), split="train"))
    assert (len(splits.test), len(splits.validation), len(splits.train)) == (32, 13, 115)  # ceil(.2 x 160), ...
    assert sorted(_texts(splits.train) + _texts(splits.validation) + _texts(splits.test)) == sorted(rows)
    # --data-seed 0 holds out the rows --seed 0 held out before the flag existed: datasets' split of seed 0.
    reference = datasets.load_dataset("csv", data_files=str(data), split="train").train_test_split(0.2, seed=0)
    assert _texts(splits.test) == _texts(reference["test"])
    again = data_lib.load_splits(DataOptions(dataset=str(data)), batch_size=8)
    assert _texts(again.validation) == _texts(splits.validation) and _texts(again.test) == _texts(splits.test)
    other = data_lib.load_splits(DataOptions(dataset=str(data), data_seed=1), batch_size=8)
    assert _texts(other.test) != _texts(splits.test) and _texts(other.validation) != _texts(splits.validation)
    unvalidated = data_lib.load_splits(DataOptions(dataset=str(data), validation_fraction=0.0), batch_size=8)
    assert unvalidated.validation is None and _texts(unvalidated.test) == _texts(splits.test)


def test_a_local_datasets_own_test_and_validation_files_are_used_as_given(tiny, tmp_path):
    _, data = tiny
    test = tiny_run.make_csv(tmp_path / "test.csv", rows=20, seed=1)
    validation = tiny_run.make_csv(tmp_path / "validation.csv", rows=10, seed=2)
    given = DataOptions(dataset=str(data), test_files=str(test), validation_files=str(validation))
    splits = data_lib.load_splits(given, batch_size=8)
    read = lambda path: _texts(datasets.load_dataset("csv", data_files=str(path), split="train"))  # noqa: E731
    assert _texts(splits.train) == read(data)  # nothing carved from the training rows
    assert _texts(splits.test) == read(test) and _texts(splits.validation) == read(validation)
    # A folder that datasets reads as named splits keeps its validation split too.
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, path in (("train", data), ("validation", validation), ("test", test)):
        (folder / f"{name}.csv").write_bytes(path.read_bytes())
    from_folder = data_lib.load_splits(DataOptions(dataset=str(folder)), batch_size=8)
    assert _texts(from_folder.validation) == read(validation) and _texts(from_folder.test) == read(test)
    assert len(from_folder.train) == 160


def test_keep_best_keeps_the_adapter_its_validation_scored_best(tiny, tmp_path):
    """`fit` with a scripted validation score: the adapter kept is the very one scored best, not the last."""
    model, data = tiny
    options = Options().replace(model=str(model), dataset=str(data), output_dir=str(tmp_path / "run"), r=8,
                                batch_size=8, max_length=16, eval_batch_size=16, lr_vectors=0.05, lr_head=0.05,
                                max_steps=8)
    setup = start(options, classify.prepare)
    seen, scores = [], iter([0.5, 0.9, 0.7, 0.8])

    def score(adapter):
        seen.append(flatten(to_host(adapter.trainable)))
        return next(scores), 0.0

    trained = fit(setup.ctx, Trainees(("vera",)), setup.adapter, setup.logits(), setup.log,
                  validation=Validation(score, every=2, keep_best=True))
    setup.checkpoints.close()
    assert (trained.best_step, trained.best_accuracy, trained.validation_accuracy) == (4, 0.9, 0.8)
    best, last = flatten(to_host(trained.best.trainable)), flatten(to_host(trained.adapter.trainable))
    for path, leaf in seen[1].items():
        np.testing.assert_array_equal(best[path], leaf, err_msg=path)
    assert any(not np.array_equal(best[path], last[path]) for path in best)
    logged = [r for r in setup.log.records() if "validation_accuracy" in r]
    assert [(r["step"], r["validation_accuracy"]) for r in logged] == [(2, 0.5), (4, 0.9), (6, 0.7), (8, 0.8)]


def test_the_job_validates_every_epoch_and_reports_it(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model, data, out, *NNX_FLAGS, "--epochs", "2", "--eval-every", "5",
                                    "--keep-best")) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps_per_epoch = summary["train_examples"] // 8  # 115 rows, batches of 8: 14 steps an epoch
    assert steps_per_epoch == 14 and summary["steps"] == 28
    validations = summary["validations"]
    assert [v["step"] for v in validations] == [5, 10, 14, 15, 20, 25, 28]
    assert [v["epoch"] for v in validations] == [0, 0, 0, 1, 1, 1, 1]
    assert all(v["train_loss"] > 0 for v in validations)
    best = max(validations, key=lambda v: v["validation_accuracy"])  # the first of equals
    assert (summary["adapter_step"], summary["validation_accuracy"]) == (best["step"], best["validation_accuracy"])
    assert summary["validation_examples"] == 13 and (out / "curves.png").stat().st_size > 10_000
    tested = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "test_accuracy" in r]
    assert [(r["step"], r["test_accuracy"]) for r in tested] == [(best["step"], summary["test_accuracy"])]


def test_a_sweep_selects_its_best_point_by_validation_as_a_run_directory(tiny, tmp_path, capsys):
    model, data = tiny
    out, chosen = tmp_path / "sweep", tmp_path / "chosen"
    assert main(["sweep", *tiny_run.train_args(model, data, out, *NNX_FLAGS, "--max-steps", "6", "--lr-vectors",
                                               "0.01", "0.2", "--d-initials", "0.1", "--seeds", "0", "1",
                                               "--select", str(chosen))]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["grid"]
    assert [(r["lr_vectors"], r["seed"]) for r in rows] == [(0.01, 0), (0.01, 1), (0.2, 0), (0.2, 1)]
    assert all(0 <= r["validation_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    best = max(rows, key=lambda r: r["validation_accuracy"])
    assert sweep["selected"] == best
    assert set(sweep["mean_validation_accuracy"]) == {"vera lr_vectors=0.01 d=0.1", "vera lr_vectors=0.2 d=0.1"}
    summary = json.loads((chosen / "summary.json").read_text())
    assert summary["options"]["lr_vectors"] == best["lr_vectors"] and summary["options"]["seed"] == best["seed"]
    assert summary["test_accuracy"] == best["test_accuracy"]
    params = load_classifier(str(model), 2, backend="nnx")[0].params
    selected = flatten(checkpoint.restore(chosen / "adapter", params).trainable)
    swept = flatten(checkpoint.restore(out / "adapters" / best["adapter"], params).trainable)
    assert selected.keys() == swept.keys()
    for path in selected:
        np.testing.assert_array_equal(selected[path], swept[path], err_msg=path)
    assert (chosen / "peft_adapter" / "adapter_config.json").is_file()
    assert f"selected {best['adapter']}" in capsys.readouterr().out


def test_select_without_validation_rows_or_into_a_foreign_folder_is_refused_before_training(tiny, tmp_path, capsys,
                                                                                             monkeypatch):
    model, data = tiny
    monkeypatch.setattr(classify, "load_classifier", lambda *a, **k: pytest.fail("the model loaded"))
    args = ["sweep", *tiny_run.train_args(model, data, tmp_path / "sweep", "--validation-fraction", "0",
                                          "--seeds", "0", "--select", str(tmp_path / "chosen"))]
    assert main(args) == 2
    assert "--select picks the adapter by its validation accuracy" in capsys.readouterr().err
    assert not (tmp_path / "chosen").exists() and not (tmp_path / "sweep" / "sweep.json").exists()
    (tmp_path / "mine" / "adapter").mkdir(parents=True)  # a folder vera_jax did not write
    (tmp_path / "mine" / "adapter" / "notes.txt").write_text("mine")
    assert main([*args[:args.index("--validation-fraction")], *args[args.index("--seeds"):-1],
                 str(tmp_path / "mine")]) == 2
    assert "choose another --select" in capsys.readouterr().err
    assert (tmp_path / "mine" / "adapter" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_a_resume_on_another_split_is_refused(tiny, tmp_path, capsys):
    model, data = tiny
    args = tiny_run.train_args(model, data, tmp_path / "run", *NNX_FLAGS, "--max-steps", "2", "--checkpoint-every", "1")
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--data-seed", "1"]) == 2
    assert "data_seed" in capsys.readouterr().err
