"""A tiny classify job trains to the stored reference: bit-identical vectors and head, the same accuracy.

`python tests/test_reference_run.py` rewrites tests/reference/tiny_classify.json from the current code.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import tiny_run

REFERENCE = Path(__file__).resolve().parent / "reference" / "tiny_classify.json"
FLAGS = ["--max-steps", "12", "--lr-vectors", "0.3", "--lr-head", "0.3", "--test-fraction", "0.25"]


def run(root: Path) -> dict:
    """Trains the tiny job under root; its held-out accuracy and the sha256 of its adapter's trainable leaves."""
    from transformers import FlaxBertForSequenceClassification

    from train.__main__ import main
    from vera_jax import checkpoint
    from vera_jax.paths import flatten

    model, data = tiny_run.make_model(root / "model"), tiny_run.make_csv(root / "data.csv")
    out = root / "run"
    assert main(tiny_run.train_args(model, data, out, *FLAGS)) == 0
    params = FlaxBertForSequenceClassification.from_pretrained(model).params
    trainable = flatten(checkpoint.restore(out / "adapter", params).trainable)
    digest = hashlib.sha256()
    for path in sorted(trainable):
        leaf = np.asarray(trainable[path])
        digest.update(f"{path} {leaf.dtype} {leaf.shape}\n".encode())
        digest.update(leaf.tobytes())
    summary = json.loads((out / "summary.json").read_text())
    return {"flags": FLAGS, "test_accuracy": summary["test_accuracy"], "leaves": sorted(trainable),
            "sha256": digest.hexdigest()}


def test_tiny_classify_job_matches_its_stored_reference(tmp_path):
    assert run(tmp_path) == json.loads(REFERENCE.read_text())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        REFERENCE.write_text(json.dumps(run(Path(root)), indent=1) + "\n")
    sys.exit(0)
