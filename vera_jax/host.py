"""Host (numpy) copies of a pytree's arrays, also of global arrays whose parts other processes hold."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["to_host"]


def to_host(tree):
    """``tree`` with every `jax.Array` leaf as a numpy array; other leaves as they are.

    A replicated array gives this process's copy; a sharded one its whole value, gathered from the other processes
    when they hold parts of it (a collective: every process calls it then). Meant for adapter-sized trees.
    """
    return jax.tree.map(_host_array, tree)


def _host_array(value):
    if not isinstance(value, jax.Array):
        return value
    if value.is_fully_replicated:
        return np.asarray(value.addressable_data(0))
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
