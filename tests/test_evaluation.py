"""Held-out evaluation waits for the devices once, not once a batch (issue: 40k held-out rows took 49 s)."""

import json

import jax
import pytest

import tiny_run
from train.__main__ import main
from train.engine import evaluation
from train.jobs import classify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv", rows=200)


def test_evaluation_reads_its_batches_back_in_one_transfer(tiny, tmp_path, monkeypatch):
    """100 held-out rows in batches of 16 give 7 batches: their sums stay device arrays until one read brings
    them all back."""
    model, data = tiny
    reads, batches, evaluations = [], [], []
    real_get, real_evaluate = jax.device_get, evaluation.evaluate

    def counted_get(tree):
        reads.append(len(tree))
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))  # not read batch by batch
        return real_get(tree)

    def counting_evaluate(ctx, adapter, logits_fn):
        batches.append(-(-len(ctx.test_data) // ctx.options.run.eval_batch_size))
        with monkeypatch.context() as patch:
            patch.setattr(evaluation.jax, "device_get", counted_get)
            evaluations.append(real_evaluate(ctx, adapter, logits_fn))
        return evaluations[-1]

    monkeypatch.setattr(classify, "evaluate", counting_evaluate)
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model, data, out, "--test-fraction", "0.5", "--max-steps", "2")) == 0
    assert batches and all(n == 7 for n in batches)
    assert reads == [7] * len(batches)  # one read of all 7 batches' sums per evaluation
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["test_accuracy"], summary["test_loss"]) == pytest.approx(evaluations[0])  # what the run reports
