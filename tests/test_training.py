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
from vera_jax.paths import flatten


@pytest.fixture(scope="module")
def bert():
    return families.bert()


@pytest.fixture(scope="module")
def projections(bert):
    return vera_jax.init_projections(bert.params, jax.random.key(0), bert.config)


LABELS = jnp.array([0, 2])


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


@pytest.mark.parametrize("path", vera_jax.activation.PATHS)
def test_three_tree_step_trains_vectors_lowers_loss_and_compiles_once(bert, projections, path):
    trainable = vera_jax.init_trainable(bert.params, bert.config)
    tx = optax.adam(3e-2)
    traces = itertools.count()

    @jax.jit
    def step(trainable, opt_state, params, inputs):
        next(traces)
        loss_fn = lambda t: _loss(vera_jax.adapt(bert.apply, t, projections, path=path)(params, inputs))  # noqa: E731
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
    assert all(np.any(np.asarray(v) != 0) for p, v in flat.items() if p.endswith(vera_jax.LAMBDA_B))
    assert set(flatten(opt_state[0].mu)) == set(flat)


def test_combined_view_freezes_every_other_leaf_exactly(bert, projections):
    combined = vera_jax.combine(bert.params, vera_jax.init_trainable(bert.params, bert.config))
    state = train_state.TrainState.create(
        apply_fn=bert.apply, params=combined, tx=vera_jax.combined_optimizer(optax.adam(1e-2), bert.config))

    @jax.jit
    def step(state, inputs):
        def loss_fn(combined):
            frozen, trainable = vera_jax.split(combined, bert.config)
            return _loss(vera_jax.adapt(state.apply_fn, trainable, projections, path="activation")(frozen, inputs))

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    for _ in range(3):
        state = step(state, bert.inputs)
    before, after = flatten(combined), flatten(state.params)
    labels = flatten(vera_jax.trainable_labels(combined, bert.config))
    trained = {p for p, label in labels.items() if label == "trainable"}
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


@pytest.mark.parametrize("build", families.ALL, ids=lambda f: f.__name__)
def test_split_and_combine_round_trip(build):
    family = build()
    trainable = vera_jax.init_trainable(family.params, family.config)
    combined = vera_jax.combine(family.params, trainable)
    frozen, trainable_again = vera_jax.split(combined, family.config)
    assert jax.tree.structure(trainable_again) == jax.tree.structure(trainable)
    jax.tree.map(np.testing.assert_array_equal, trainable_again, trainable)
    flat_combined = flatten(combined)
    assert flatten(vera_jax.combine(frozen, trainable_again)).keys() == flat_combined.keys()
    jax.tree.map(np.testing.assert_array_equal, vera_jax.combine(frozen, trainable_again), combined)
    assert not set(flatten(frozen)) & set(flatten(trainable))
    expected_frozen = {p for p in flatten(family.params)} - set(flatten(trainable))
    assert set(flatten(frozen)) == expected_frozen


def test_dropout_acts_only_with_a_key_and_only_on_the_activation_path(bert):
    config = vera_jax.VeraConfig(r=8, target_modules=("query", "value"), dropout=0.5)
    projections = vera_jax.init_projections(bert.params, jax.random.key(0), config)
    trainable = families.random_trainable(families.Family("bert", bert.params, bert.apply, bert.inputs, config))
    run = lambda rng: vera_jax.adapt(bert.apply, trainable, projections, path="activation",  # noqa: E731
                                     dropout_rng=rng)(bert.params, bert.inputs)
    evaluation = vera_jax.adapt(bert.apply, trainable, projections, path="merged")(bert.params, bert.inputs)
    np.testing.assert_allclose(run(None), evaluation, rtol=1e-5, atol=1e-5)
    first, second = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(first, evaluation, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
    np.testing.assert_array_equal(first, run(jax.random.key(1)))
    with pytest.raises(ValueError, match="use path='activation'"):
        vera_jax.adapt(bert.apply, trainable, projections, path="merged", dropout_rng=jax.random.key(1))


def test_the_step_donates_its_state_and_copies_nothing_between_host_and_device(bert, projections):
    trainable = jax.device_put(vera_jax.init_trainable(bert.params, bert.config))
    tx = optax.adam(1e-2)

    def step(trainable, opt_state, params, inputs):
        loss_fn = lambda t: _loss(vera_jax.adapt(bert.apply, t, projections)(params, inputs))  # noqa: E731
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
