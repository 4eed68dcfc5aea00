"""A tiny classify job trains to the stored reference: the same accuracy, the same vectors and head.

The reference was written by the code before the application's re-cut (0540e2e). XLA's CPU kernels round
differently on other processors (AVX-512, AVX2, SSE4.2), so the leaves are compared to 1e-4 absolute (they are of
order 1; an SSE4.2-only run of this job moves them by at most 8e-6, and one more step or another init by far more
than 1e-2) and the accuracy exactly. `python tests/test_reference_run.py` rewrites
tests/reference/tiny_classify.json from the current code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import tiny_run

REFERENCE = Path(__file__).resolve().parent / "reference" / "tiny_classify.json"
FLAGS = ["--max-steps", "12", "--lr-vectors", "0.3", "--lr-head", "0.3", "--test-fraction", "0.25"]
NO_VALIDATION = ["--validation-fraction", "0"]  # the code of the reference carved no validation rows
ATOL = 1e-4


def run(root: Path) -> dict:
    """Trains the tiny job under root: its flags, held-out accuracy and the adapter's trainable leaves by path."""
    from transformers import FlaxBertForSequenceClassification

    from train.__main__ import main
    from vera_jax import checkpoint
    from vera_jax.paths import flatten

    model, data = tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv")
    out = root / "run"
    assert main(tiny_run.train_args(model, data, out, *FLAGS, *NO_VALIDATION)) == 0
    params = FlaxBertForSequenceClassification.from_pretrained(model).params
    trainable = flatten(checkpoint.restore(out / "adapter", params).trainable)
    summary = json.loads((out / "summary.json").read_text())
    return {"flags": FLAGS, "test_accuracy": summary["test_accuracy"],
            "leaves": {path: np.asarray(leaf).tolist() for path, leaf in sorted(trainable.items())}}


def test_tiny_classify_job_matches_its_stored_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    result = run(tmp_path)
    assert (result["flags"], result["test_accuracy"]) == (reference["flags"], reference["test_accuracy"])
    assert result["leaves"].keys() == reference["leaves"].keys()
    for path, expected in reference["leaves"].items():
        np.testing.assert_allclose(result["leaves"][path], expected, rtol=0, atol=ATOL, err_msg=path)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        REFERENCE.write_text(json.dumps(run(Path(root))) + "\n")
    sys.exit(0)
