"""The one evaluation loop: accuracy and mean loss on the held-out split, of one adapter or of a stack."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

import vera_jax
from train.engine import data as data_lib
from train.engine import mesh as mesh_lib
from train.engine import steps
from train.engine.loop import Context, Trainees

__all__ = ["evaluate"]


def evaluate(ctx: Context, adapter: vera_jax.Adapter, logits_fn: Callable,
             trainees: Trainees | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean loss) on the held-out split: floats for one adapter, (K,) arrays for stacked ``trainees``.

    Rows run in batches of like length, ``--eval-batch-size`` rounded up to whole rows per device; the last batch
    is padded with zero-weight rows (one compiled shape per length). The batches' sums stay on the devices until
    the last is dispatched (one wait, not one a batch), then add up in float64.
    """
    options = ctx.options
    trainees = trainees or Trainees(("",))
    devices = ctx.mesh.size
    size = -(-options.run.eval_batch_size // devices) * devices
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    eval_step = trainees.per_adapter(steps.make_eval_step(logits_fn, options.data.task), (0, None, None),
                                     size * options.data.max_length)
    eval_fn = jax.jit(eval_step, in_shardings=(replicated, jax.tree.map(lambda x: x.sharding, ctx.params),
                                               batch_sharding))
    adapter = mesh_lib.place(adapter, replicated)
    sums = []
    n = len(ctx.test_data)
    by_length = data_lib.by_length(ctx.test_data, np.arange(n))
    for start in range(0, n, size):
        positions = np.arange(start, start + size)
        batch = data_lib.collate(ctx.test_data, by_length[np.minimum(positions, n - 1)], ctx.pad_id,
                                 options.data.max_length, options.data.pad_multiple)
        batch["weights"] = (positions < n).astype(np.float32)
        sums.append(eval_fn(adapter, ctx.params, mesh_lib.global_batch(batch, batch_sharding)))
    correct, loss, count = (np.sum(np.asarray(column, np.float64), axis=0) for column in zip(*jax.device_get(sums)))
    return correct / count, loss / count
