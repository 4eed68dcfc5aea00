import jax
import numpy as np



def max_rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: a relative error that is robust to entries near zero."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_like(tree, key, scale=1.0):
    """Independent N(0, scale^2) draws shaped like every leaf of tree."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def randomise_vectors(model, seed: int = 1) -> None:
    """N(0, 0.25) vectors on an NNX model with VeRA attached, so that every comparison sees VeRA's output."""
    from flax import nnx

    import vera_jax.nnx as vera_nnx

    leaves, treedef = jax.tree.flatten(nnx.state(model, vera_nnx.VeraVector))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, leaf.shape)
                                                   for k, leaf in zip(keys, leaves)]))
