"""A small VeRA adapter, and a process that rewrites it in a loop: the other side of the concurrency tests.

``python tests/writer_race.py DIRECTORY SEED ROUNDS`` writes the PEFT form of adapter SEED to DIRECTORY
ROUNDS times (alternating with adapter SEED + 1 when ROUNDS > 1), then prints "done".
"""

from __future__ import annotations

import sys

import jax
import numpy as np

import vera_jax
from vera_jax import peft as vera_peft

PARAMS = {"block": {"dense": {"kernel": np.linspace(-1, 1, 24 * 16, dtype=np.float32).reshape(24, 16)},
                    "out": {"kernel": np.linspace(1, -1, 16 * 24, dtype=np.float32).reshape(16, 24)}}}
CONFIG = vera_jax.VeraConfig(r=4, target_modules=("dense", "out"))


def adapter(seed: int) -> vera_jax.Adapter:
    """Adapter ``seed``: every vector drawn from N(0, 1) with that seed."""
    base = vera_jax.init_adapter(PARAMS, CONFIG)
    leaves, treedef = jax.tree.flatten(base.trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return base.replace(trainable=jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


if __name__ == "__main__":
    directory, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    versions = [adapter(seed), adapter(seed + 1)]
    for round_ in range(rounds):
        vera_peft.save_adapter(directory, versions[round_ % 2], PARAMS)
    print("done")
