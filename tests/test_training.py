"""Optimizer steps train only the vectors and declared leaves; state and compilation stay adapter-sized."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import families
import vera_jax
from vera_jax.layers import LAMBDA_B
from vera_jax.paths import flatten
from vera_jax.plan import PATHS


@pytest.fixture(scope="module")
def bert():
    return families.bert()


@pytest.fixture(scope="module")
def adapter(bert):
    return vera_jax.init_adapter(bert.params, bert.config)


LABELS = jnp.array([0, 2])


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


@pytest.mark.parametrize("path", PATHS)
def test_three_tree_step_trains_vectors_lowers_loss_and_compiles_once(bert, adapter, path):
    trainable = adapter.trainable
    tx = optax.adam(3e-2)
    traces = itertools.count()

    @jax.jit
    def step(trainable, opt_state, params, inputs):
        next(traces)

        def loss_fn(trainable):
            return _loss(vera_jax.adapt(bert.apply, adapter.replace(trainable=trainable), path=path)(params, inputs))

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    for _ in range(25):
        trainable, opt_state, loss = step(trainable, opt_state, bert.params, bert.inputs)
        losses.append(float(loss))
    assert next(traces) == 1, "the step must compile once and be reused"
    assert losses[-1] < 0.5 * losses[0]
    flat = flatten(trainable)
    assert all(np.any(np.asarray(v) != 0) for p, v in flat.items() if p.endswith(LAMBDA_B))
    assert set(flatten(opt_state[0].mu)) == set(flat)


def test_combined_view_freezes_every_other_leaf_exactly(bert, adapter):
    combined = vera_jax.combine(bert.params, adapter)
    state = train_state.TrainState.create(
        apply_fn=bert.apply, params=combined, tx=vera_jax.combined_optimizer(optax.adam(1e-2), adapter))

    @jax.jit
    def step(state, inputs):
        def loss_fn(combined):
            frozen, trained = vera_jax.split(combined, adapter)
            return _loss(vera_jax.adapt(state.apply_fn, trained, path="activation")(frozen, inputs))

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    for _ in range(3):
        state = step(state, bert.inputs)
    before, after = flatten(combined), flatten(state.params)
    assert after.keys() == before.keys()
    trained = set(flatten(adapter.trainable))
    assert trained == {p for p in before if "vera_lambda" in p or p.startswith("classifier/")}
    for path, leaf in before.items():
        if path in trained:
            assert not np.array_equal(after[path], leaf), path
        else:
            assert after[path].dtype == leaf.dtype
            np.testing.assert_array_equal(after[path], leaf, err_msg=path)  # bit-identical

    # Adam's state is exactly two moments per trainable leaf, plus step counters; nothing for frozen leaves.
    trainable_size = sum(before[p].size for p in trained)
    state_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in state_arrays) == 2 * trainable_size

    # The trained leaves come back out as an adapter that runs like the combined tree.
    frozen, trained_adapter = vera_jax.split(state.params, adapter)
    assert set(flatten(trained_adapter.trainable)) == trained
    for path, leaf in flatten(trained_adapter.trainable).items():
        np.testing.assert_array_equal(leaf, after[path])
    np.testing.assert_array_equal(vera_jax.adapt(bert.apply, trained_adapter)(bert.params, bert.inputs),
                                  vera_jax.adapt(bert.apply, trained_adapter)(frozen, bert.inputs))


@pytest.mark.parametrize("build", families.ALL, ids=lambda f: f.__name__)
def test_split_and_combine_round_trip(build):
    family = build()
    adapter = families.random_adapter(family)  # random: a head that differs from the base's, vectors that act
    combined = vera_jax.combine(family.params, adapter)
    frozen, again = vera_jax.split(combined, adapter)
    assert isinstance(again, vera_jax.Adapter) and again.config == adapter.config
    assert again.generator == adapter.generator
    np.testing.assert_array_equal(again.projections.A, adapter.projections.A)
    # The adapter's trainable tree comes back exactly, structure, dtypes and bits.
    assert jax.tree.structure(again.trainable) == jax.tree.structure(adapter.trainable)
    for got, want in zip(jax.tree.leaves(again.trainable), jax.tree.leaves(adapter.trainable)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # The params come back exactly, less the leaves trained in full, which the adapter holds now.
    full = set(vera_jax.layers.find_full_leaves(family.params, family.config))
    assert bool(full) == bool(family.config.modules_to_save)
    params = flatten(family.params)
    assert set(flatten(frozen)) == set(params) - full
    for path, leaf in flatten(frozen).items():
        assert leaf.dtype == params[path].dtype
        np.testing.assert_array_equal(leaf, params[path], err_msg=path)
    assert not set(flatten(frozen)) & set(flatten(adapter.trainable))
    # combine inverts split, and the split pair runs the same adapted model as the original pair.
    jax.tree.map(np.testing.assert_array_equal, vera_jax.combine(frozen, again), combined)
    np.testing.assert_array_equal(vera_jax.adapt(family.apply, again)(frozen, family.inputs),
                                  vera_jax.adapt(family.apply, adapter)(family.params, family.inputs))


def test_dropout_acts_only_with_a_key_and_only_on_the_activation_path(bert):
    config = vera_jax.VeraConfig(r=8, target_modules=("query", "value"), dropout=0.5)
    adapter = families.random_adapter(bert, config=config)
    run = lambda rng: vera_jax.adapt(bert.apply, adapter, path="activation",  # noqa: E731
                                     dropout_rng=rng)(bert.params, bert.inputs)
    evaluation = vera_jax.adapt(bert.apply, adapter, path="merged")(bert.params, bert.inputs)
    np.testing.assert_allclose(run(None), evaluation, rtol=1e-5, atol=1e-5)
    first, second = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(first, evaluation, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
    np.testing.assert_array_equal(first, run(jax.random.key(1)))
    with pytest.raises(ValueError, match="use path='activation'"):
        vera_jax.adapt(bert.apply, adapter, path="merged", dropout_rng=jax.random.key(1))


def test_the_step_donates_its_state_and_copies_nothing_between_host_and_device(bert, adapter):
    adapter = jax.device_put(adapter)
    trainable = adapter.trainable
    tx = optax.adam(1e-2)

    def step(trainable, opt_state, params, inputs):
        def loss_fn(trainable):
            return _loss(vera_jax.adapt(bert.apply, adapter.replace(trainable=trainable))(params, inputs))

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    step = jax.jit(step, donate_argnums=(0, 1))
    params, inputs = jax.device_put(bert.params), jax.device_put(bert.inputs)
    state = step(trainable, tx.init(trainable), params, inputs)  # compiles
    old = jax.tree.leaves(state)
    with jax.transfer_guard("disallow"):  # an implicit host<->device copy in the step would raise here
        state = step(*state, params, inputs)
    assert all(leaf.is_deleted() for leaf in old), "donated buffers are reused, not copied"
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
