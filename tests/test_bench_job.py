"""``bench --job``: PEFT's job schedules its learning rates as optax does, and both jobs run one recipe."""

import json

import pytest

import tiny_run
from train.__main__ import main


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_the_peft_job_schedules_learning_rates_as_optax_does(kind):
    from train.bench.peft_job import lr_factor
    from train.engine.steps import _schedule

    schedule = _schedule(kind, 1.0, 50, 0.06)
    for step in range(50):
        assert lr_factor(kind, step, 50, 0.06) == pytest.approx(float(schedule(step)), abs=1e-6), step


def test_bench_job_runs_both_jobs_on_one_recipe(tmp_path):
    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch",))
    data = tiny_run.make_csv(tmp_path / "data.csv")
    flags = (f"--model {model} --dataset {data} --r 8 --batch-size 8 --max-length 16 --eval-batch-size 16 "
             "--max-steps 12")
    out = tmp_path / "job.json"
    assert main(["bench", "--job", "--job-flags", flags, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ours"]["steps"] == results["peft"]["steps"] == 12
    assert results["job_speedup_vs_peft"] == pytest.approx(results["peft"]["wall_seconds"] /
                                                           results["ours"]["wall_seconds"])
    profile = results["ours"]["profile"]
    assert profile["first_logged_step"] == 10 and all(profile[k] > 0 for k in (
        "launch_to_first_logged_step", "first_to_last_logged_step", "after_the_last_step"))
    assert set(profile["seconds"]) == {"loading", "training", "checkpoints", "evaluation", "saving"}
    assert all(seconds > 0 for seconds in profile["seconds"].values())
    # Four length groups of 2 rows in each of the 12 steps, each padded to a multiple of 8 tokens.
    assert sum(profile["shapes"].values()) == 48 and {shape.split("x")[0] for shape in profile["shapes"]} == {"2"}
    assert 0 < profile["tokens"]["real"] < profile["tokens"]["padded"] <= 48 * 2 * 16
    assert profile["compiles"]["training"]["group_fn"]["programs"] == len(profile["shapes"])  # one per shape
    assert sum(profile["seconds"].values()) <= results["ours"]["wall_seconds"]
