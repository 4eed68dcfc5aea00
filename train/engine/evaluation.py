"""The one evaluation loop: accuracy and mean loss on a split (the validation or the test rows), of one adapter
or of a stack."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

import vera_jax
from train.engine import data as data_lib
from train.engine import mesh as mesh_lib
from train.engine import steps
from train.engine.loop import Context, Trainees

__all__ = ["Evaluator", "evaluate"]


class Evaluator:
    """Scores adapters on any split with one jitted program: a run validates every epoch and tests at its end
    without compiling again."""

    def __init__(self, ctx: Context, logits_fn: Callable, trainees: Trainees | None = None):
        """``logits_fn``: the adapted model's ``logits(params, adapter, batch, rng)``; ``trainees``: a stack of
        adapters scored at once (default: one adapter)."""
        options = ctx.options
        self.ctx, self.trainees = ctx, trainees or Trainees(("",))
        self.size = -(-options.run.eval_batch_size // ctx.mesh.size) * ctx.mesh.size  # whole rows per device
        self.replicated, self.batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
        eval_step = self.trainees.per_adapter(steps.make_eval_step(logits_fn, options.data.task), (0, None, None),
                                              self.size * options.data.max_length)
        self.eval_fn = jax.jit(eval_step, in_shardings=(self.replicated, jax.tree.map(lambda x: x.sharding, ctx.params),
                                                        self.batch_sharding))

    def __call__(self, adapter: vera_jax.Adapter, data: data_lib.TextData) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy, mean loss) on ``data``: floats for one adapter, (K,) arrays for a stack.

        Rows run in batches of like length; the last batch is padded with zero-weight rows (one compiled shape per
        length). The batches' sums stay on the devices until the last is dispatched (one wait, not one a batch),
        then add up in float64.
        """
        options = self.ctx.options
        adapter = mesh_lib.place(adapter, self.replicated)
        sums = []
        n = len(data)
        by_length = data_lib.by_length(data, np.arange(n))
        for start in range(0, n, self.size):
            positions = np.arange(start, start + self.size)
            batch = data_lib.collate(data, by_length[np.minimum(positions, n - 1)], self.ctx.pad_id,
                                     options.data.max_length, options.data.pad_multiple)
            batch["weights"] = (positions < n).astype(np.float32)
            sums.append(self.eval_fn(adapter, self.ctx.params, mesh_lib.global_batch(batch, self.batch_sharding)))
        correct, loss, count = (np.sum(np.asarray(column, np.float64), axis=0)
                                for column in zip(*jax.device_get(sums)))
        return correct / count, loss / count


def evaluate(ctx: Context, adapter: vera_jax.Adapter, logits_fn: Callable,
             trainees: Trainees | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean loss) on the test rows (`Evaluator`)."""
    return Evaluator(ctx, logits_fn, trainees)(adapter, ctx.test_data)
