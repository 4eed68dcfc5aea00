"""Running a stack of NNX layers (layer axis first) with ``nnx.scan``, keeping for the backward pass what a
``jax.checkpoint`` policy says.

Without rematerialisation, ``nnx.scan``'s autodiff stacks every intermediate of every layer into (layers, ...)
buffers, copied in during the forward pass and out during the backward one; on a CPU that costs more than
recomputing the cheap ones. A dropout mask is not cheap to draw again (a random number per element): layers name
theirs `DROPOUT_MASK` (`jax.ad_checkpoint.checkpoint_name`) and the default policy keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

__all__ = ["SCAN_REMAT", "DEFAULT_SCAN_REMAT", "DROPOUT_MASK", "check_scan_remat", "run_stacked"]

DROPOUT_MASK = "dropout_mask"
_POLICIES = jax.checkpoint_policies
SCAN_REMAT = {
    # each layer's input, its projections' outputs and its dropout masks
    "dots": _POLICIES.save_from_both_policies(_POLICIES.dots_with_no_batch_dims_saveable,
                                              _POLICIES.save_only_these_names(DROPOUT_MASK)),
    "full": _POLICIES.nothing_saveable,  # each layer's input only; the layer reruns backward
    "none": None,  # every intermediate (no rematerialisation)
}
DEFAULT_SCAN_REMAT = "dots"  # on a 2-core CPU as fast as "full" or faster, and it recomputes no weight matmul


def check_scan_remat(scan_remat: str) -> None:
    """Raises ValueError for a policy name that is not a key of `SCAN_REMAT`."""
    if scan_remat not in SCAN_REMAT:
        raise ValueError(f"scan_remat must be one of {sorted(SCAN_REMAT)}, got {scan_remat!r}.")


def run_stacked(layers: nnx.Module, x: jax.Array, call: Callable[[nnx.Module, jax.Array], jax.Array],
                scan_remat: str) -> jax.Array:
    """``x`` through each layer of the stack ``layers`` in turn, ``call(layer, x) -> x`` (the same shape)."""
    if scan_remat != "none":  # prevent_cse=False: safe inside a scan, and lets XLA fuse freely
        call = nnx.remat(call, prevent_cse=False, policy=SCAN_REMAT[scan_remat])

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
        return call(layer, x)

    return run(x, layers)
