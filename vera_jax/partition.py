"""The combined view: one params tree with the VeRA vectors inside, for ``flax.training.train_state``.

In the combined tree every adapted module holds ``vera_lambda_d`` and ``vera_lambda_b`` next to its
``kernel``. `combine` and `split` move between it and the (params, adapter) pair, and
`combined_optimizer` freezes every other leaf with ``optax.partition`` + ``optax.set_to_zero``: frozen
leaves get an exactly-zero update and hold no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import optax

from vera_jax.adapter import Adapter
from vera_jax.config import VeraConfig
from vera_jax.layers import is_vector_path
from vera_jax.paths import SEP, flatten, patterns_regex, unflatten

__all__ = ["combine", "split", "combined_optimizer"]

_TRAINABLE, _FROZEN = "trainable", "frozen"


def _trainable_matcher(config: VeraConfig) -> Callable[[str], bool]:
    """Whether a leaf path is trained: a VeRA vector, or a leaf of a module ``config.modules_to_save`` selects."""
    full = patterns_regex(config.modules_to_save, with_leaves=True) if config.modules_to_save else None
    return lambda path: is_vector_path(path) or bool(full and full.fullmatch(path))


def _keypath_str(keypath) -> str:
    return SEP.join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def _labels(tree: Mapping, config: VeraConfig):
    """A tree of the same structure labelling each leaf trainable or frozen."""
    is_trainable = _trainable_matcher(config)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: _TRAINABLE if is_trainable(_keypath_str(kp)) else _FROZEN, tree)
    if _TRAINABLE not in jax.tree.leaves(labels):
        raise ValueError("No leaf of this tree is trainable: put the vectors in first with "
                         "vera_jax.combine(params, adapter).")
    return labels


def combine(params: Mapping, adapter: Adapter) -> dict:
    """``params`` with the adapter's trainable leaves inside: one nested dict; its trained leaves win."""
    return unflatten(flatten(params) | flatten(adapter.trainable))


def split(combined: Mapping, adapter: Adapter) -> tuple[dict, Adapter]:
    """Combined tree -> ``(params, adapter)``, the adapter holding the combined tree's trainable leaves;
    `combine` inverts it. ``adapter`` gives the config and A/B."""
    params, trainable = {}, {}
    is_trainable = _trainable_matcher(adapter.config)
    for path, leaf in flatten(combined).items():
        (trainable if is_trainable(path) else params)[path] = leaf
    return unflatten(params), adapter.replace(trainable=unflatten(trainable))


def combined_optimizer(tx: optax.GradientTransformation, adapter: Adapter) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves of a combined tree, exactly-zero updates and no state elsewhere."""
    return optax.partition({_TRAINABLE: tx, _FROZEN: optax.set_to_zero()},
                           lambda tree: _labels(tree, adapter.config))
