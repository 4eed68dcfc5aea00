"""``bench --job``: PEFT's job schedules its learning rates as optax does, and both jobs run one recipe."""

import json

import numpy as np
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


def test_bench_job_runs_the_three_jobs_on_one_recipe_over_seeds(tmp_path):
    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch",))
    data = tiny_run.make_csv(tmp_path / "data.csv")
    flags = (f"--model {model} --dataset {data} --r 8 --batch-size 8 --max-length 16 --eval-batch-size 16 "
             "--max-steps 12")
    out = tmp_path / "job.json"
    assert main(["bench", "--job", "--job-flags", flags, "--seeds", "0", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["seeds"] == [0, 1] and [run["seed"] for run in results["runs"]] == [0, 1]
    for run in results["runs"]:
        assert run["vera_jax"]["steps"] == run["peft_vera"]["steps"] == run["peft_lora"]["steps"] == 12
        assert run["vera_jax"]["adapter_step"] == run["peft_vera"]["adapter_step"] == 12  # the last: no --keep-best
    methods = results["methods"]
    for name, method in methods.items():
        accuracies = [run[name]["test_accuracy"] for run in results["runs"]]
        assert method["test_accuracy"]["values"] == accuracies
        assert method["test_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
        assert method["test_accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    # The tiny BERT: hidden 32, 2 layers, query and value adapted; the head (32 x 2 + 2) trained by all three.
    head = 32 * 2 + 2
    vera = 2 * 2 * (8 + 32) + head
    assert methods["vera_jax"]["trainable_params"] == methods["peft_vera"]["trainable_params"] == vera
    assert methods["peft_lora"]["trainable_params"] == 2 * 2 * 8 * (32 + 32) + head
    assert results["job_speedup_vs_peft"] == pytest.approx(methods["peft_vera"]["wall_seconds"]["mean"] /
                                                           methods["vera_jax"]["wall_seconds"]["mean"])
    profile = results["runs"][0]["vera_jax"]["profile"]
    assert profile["first_logged_step"] == 10 and all(profile[k] > 0 for k in (
        "launch_to_first_logged_step", "first_to_last_logged_step", "after_the_last_step"))
    assert set(profile["seconds"]) == {"loading", "training", "validation", "checkpoints", "evaluation", "saving"}
    assert all(seconds > 0 for seconds in profile["seconds"].values())
    # Four length groups of 2 rows in each of the 12 steps, each padded to a multiple of 8 tokens.
    assert sum(profile["shapes"].values()) == 48 and {shape.split("x")[0] for shape in profile["shapes"]} == {"2"}
    assert 0 < profile["tokens"]["real"] < profile["tokens"]["padded"] <= 48 * 2 * 16
    assert profile["compiles"]["training"]["group_fn"]["programs"] == len(profile["shapes"])  # one per shape
    assert sum(profile["seconds"].values()) <= results["runs"][0]["vera_jax"]["wall_seconds"]


def test_bench_job_runs_only_the_peers_named(tmp_path):
    """``--peers peft_vera``: ours and PEFT's VeRA, no LoRA job and no LoRA figures; ``--peers`` alone: ours only."""
    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch",))
    data = tiny_run.make_csv(tmp_path / "data.csv")
    flags = f"--model {model} --dataset {data} --r 8 --batch-size 8 --max-length 16 --eval-batch-size 16 --max-steps 4"
    for peers, methods in ((["peft_vera"], {"vera_jax", "peft_vera"}), ([], {"vera_jax"})):
        out = tmp_path / f"job{len(peers)}.json"
        assert main(["bench", "--job", "--job-flags", flags, "--peers", *peers, "--json", str(out)]) == 0
        results = json.loads(out.read_text())
        assert set(results["methods"]) == set(results["runs"][0]) - {"seed"} == methods
        assert "lora_job_accuracy" not in results and ("job_speedup_vs_peft" in results) == bool(peers)
        assert results["job_accuracy"] == results["runs"][0]["vera_jax"]["test_accuracy"]


def test_the_peer_validates_when_ours_does_and_tests_its_best_with_keep_best(tmp_path):
    """PEFT's job validates at the steps ours does (``--eval-every``, each epoch's end, the last step) and, with
    ``--keep-best``, tests the adapter of its first best validation, as ours does."""
    model = tiny_run.make_model(tmp_path / "model", weights=("pytorch",))
    data = tiny_run.make_csv(tmp_path / "data.csv", rows=400)
    flags = (f"--model {model} --dataset {data} --r 8 --batch-size 8 --max-length 16 --eval-batch-size 16 "
             "--max-steps 12 --eval-every 2 --keep-best --lr-vectors 0.3 --lr-head 0.3")
    out = tmp_path / "job.json"
    assert main(["bench", "--job", "--job-flags", flags, "--peers", "peft_vera", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    ours, peer = run["vera_jax"], run["peft_vera"]
    assert [v["step"] for v in peer["validations"]] == [v["step"] for v in ours["validations"]]
    assert [v["step"] for v in peer["validations"]] == [2, 4, 6, 8, 10, 12]
    for job in (ours, peer):
        accuracies = [v["validation_accuracy"] for v in job["validations"]]
        assert job["adapter_step"] == job["validations"][int(np.argmax(accuracies))]["step"] < 12  # not the last
    assert 0 < peer["validation_seconds"] < peer["wall_seconds"]
