"""Held-out evaluation waits for the devices once, not once a batch (issue: 40k held-out rows took 49 s)."""

import json

import jax
import pytest

import tiny_run
from train.__main__ import main
from train.engine import evaluation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv", rows=200)


def test_evaluation_reads_its_batches_back_in_one_transfer(tiny, tmp_path, monkeypatch):
    """100 test rows in batches of 16 give 7 batches (the 10 validation rows, 1): their sums stay device arrays until
    one read brings them all back."""
    model, data = tiny
    reads, batches, evaluations = [], [], []
    real_get, real_call = jax.device_get, evaluation.Evaluator.__call__

    def counted_get(tree):
        reads.append(len(tree))
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))  # not read batch by batch
        return real_get(tree)

    def counting_call(self, adapter, rows):
        batches.append(-(-len(rows) // self.ctx.options.run.eval_batch_size))
        with monkeypatch.context() as patch:
            patch.setattr(evaluation.jax, "device_get", counted_get)
            evaluations.append(real_call(self, adapter, rows))
        return evaluations[-1]

    monkeypatch.setattr(evaluation.Evaluator, "__call__", counting_call)
    out = tmp_path / "run"
    assert main(tiny_run.train_args(model, data, out, "--test-fraction", "0.5", "--max-steps", "2")) == 0
    assert batches == [1, 7]  # the validation after the last step, then the test
    assert reads == batches  # one read of all the batches' sums per evaluation
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["test_accuracy"], summary["test_loss"]) == pytest.approx(evaluations[-1])  # what the run reports
