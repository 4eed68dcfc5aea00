"""The combined view: one params tree with the VeRA vectors inside, for ``flax.training.train_state``.

In the combined tree every adapted module holds ``vera_lambda_d`` and ``vera_lambda_b`` next to its
``kernel``. `split` and `combine` move between it and the (frozen, trainable) pair, and
`combined_optimizer` freezes every other leaf with ``optax.partition`` + ``optax.set_to_zero``: frozen
leaves get an exactly-zero update and hold no optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

from vera_jax.config import VeraConfig
from vera_jax.layers import VECTOR_NAMES
from vera_jax.paths import SEP, compile_rules, first_match, flatten, patterns_regex, unflatten

__all__ = ["TRAINABLE", "FROZEN", "trainable_labels", "split", "combine", "combined_optimizer"]

TRAINABLE = "trainable"
FROZEN = "frozen"


def _label_rules(config: VeraConfig):
    vectors = "(?:.*/)?(?:" + "|".join(VECTOR_NAMES) + ")"
    rules = [(vectors, TRAINABLE)]
    if config.trainable:
        rules.append((patterns_regex(config.trainable, with_leaves=True).pattern, TRAINABLE))
    return compile_rules(rules + [(".*", FROZEN)])


def _keypath_str(keypath) -> str:
    return SEP.join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def trainable_labels(tree: Mapping, config: VeraConfig):
    """A tree of the same structure labelling each leaf ``"trainable"`` or ``"frozen"``.

    Raises:
      ValueError: no leaf is trainable (the vectors were never put into the tree).
    """
    rules = _label_rules(config)
    labels = jax.tree_util.tree_map_with_path(lambda kp, _: first_match(rules, _keypath_str(kp)), tree)
    if TRAINABLE not in jax.tree.leaves(labels):
        raise ValueError(
            "No leaf of this tree is trainable: put the vectors in first with "
            "vera_jax.combine(params, vera_jax.init_trainable(params, config))."
        )
    return labels


def split(combined: Mapping, config: VeraConfig) -> tuple[dict, dict]:
    """Combined tree -> ``(frozen, trainable)``, two disjoint nested dicts; `combine` inverts it."""
    rules = _label_rules(config)
    frozen, trainable = {}, {}
    for path, leaf in flatten(combined).items():
        (trainable if first_match(rules, path) == TRAINABLE else frozen)[path] = leaf
    return unflatten(frozen), unflatten(trainable)


def combine(frozen: Mapping, trainable: Mapping) -> dict:
    """``(frozen, trainable)`` -> one nested dict; where both hold a leaf, the trainable one wins."""
    return unflatten(flatten(frozen) | flatten(trainable))


def combined_optimizer(tx: optax.GradientTransformation, config: VeraConfig) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves of a combined tree, exactly-zero updates and no state elsewhere."""
    return optax.partition(
        {TRAINABLE: tx, FROZEN: optax.set_to_zero()},
        lambda tree: trainable_labels(tree, config),
    )
