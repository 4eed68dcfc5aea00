"""The paper's ablations as config choices: projection init, which vectors train, shared or per-layer pairs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_rel_error

import families
import vera_jax
from vera_jax import checkpoint
from vera_jax import peft as vera_peft
from vera_jax.adapter import layer_vectors
from vera_jax.layers import LAMBDA_B, LAMBDA_D
from vera_jax.paths import flatten
from vera_jax.projections import kaiming_uniform_bound

from test_projections import CONFIG, PARAMS, _reference_stream


def _projections(**changes):
    return vera_jax.init_adapter(PARAMS, dataclasses.replace(CONFIG, projection_seed=1234, **changes)).projections


def test_kaiming_normal_has_the_kaiming_std_and_is_gaussian():
    projections = _projections(projection_init="kaiming_normal")
    for matrix, fan_in in ((projections.A, 300), (projections.B, 64)):
        values = np.asarray(matrix, np.float64).reshape(-1) / math.sqrt(2.0 / fan_in)  # standardised
        assert abs(values.mean()) < 4 / math.sqrt(values.size)
        assert abs(values.std() - 1.0) < 0.02
        # the share within one standard deviation, and the tails, of a standard normal
        assert abs(np.mean(np.abs(values) < 1.0) - 0.6827) < 0.01
        assert abs(np.mean(np.abs(values) > 3.0) - 0.0027) < 0.0015
        assert np.all(np.isfinite(values))


def test_kaiming_normal_is_the_erfinv_transform_of_the_pinned_stream():
    from jax.scipy.special import erfinv

    projections = _projections(projection_init="kaiming_normal")
    words = np.asarray(jax.random.key_data(jax.random.key(1234)))
    unit = (_reference_stream(words, 0, 64 * 300, 0.5) + np.float32(0.5)).astype(np.float32)  # back to [0, 1)
    expected = np.float32(math.sqrt(2.0)) * np.asarray(erfinv((unit + np.float32(2**-24)) * 2 - 1))
    expected = expected * np.float32(math.sqrt(2.0 / 300))
    np.testing.assert_allclose(np.asarray(projections.A).reshape(-1), expected, rtol=1e-6, atol=1e-7)


def test_uniform_init_is_the_same_stream_in_zero_to_a_tenth():
    projections = _projections(projection_init="uniform")
    kaiming = _projections()
    a = np.asarray(projections.A)
    assert a.min() >= 0.0 and a.max() < 0.1 and a.max() > 0.099 and abs(a.mean() - 0.05) < 0.002
    bound = kaiming_uniform_bound(300)  # the same bits: kaiming = (2u - 1) * bound, uniform = 0.1 u
    np.testing.assert_allclose(a, (np.asarray(kaiming.A) / bound + 1) / 2 * 0.1, rtol=1e-5, atol=1e-8)


def test_per_layer_pairs_have_their_own_bits_and_their_layers_fan_in():
    per_layer = _projections(projection_sharing="per_layer")
    assert per_layer.layers == ("up", "down")
    assert per_layer.A.shape == (2, 64, 300) and per_layer.B.shape == (2, 500, 64)
    shared = _projections()
    np.testing.assert_array_equal(per_layer.A[0], shared.A)  # layer 0 starts the stream, with in_0 = in_max
    up_a, up_b = per_layer.pair("up")
    down_a, down_b = per_layer.pair("down")
    assert not np.array_equal(up_a, down_a) and not np.array_equal(up_b, down_b)
    assert np.abs(np.asarray(down_a)).max() <= kaiming_uniform_bound(120)  # down's in = 120
    assert np.abs(np.asarray(down_a)).max() > 0.99 * kaiming_uniform_bound(120)
    with pytest.raises(ValueError, match="hold no pair for 'norm'"):
        per_layer.pair("norm")


@pytest.mark.parametrize("build", [families.bert, families.gpt2], ids=lambda f: f.__name__)
@pytest.mark.parametrize("changes", [dict(projection_sharing="per_layer"), dict(projection_init="kaiming_normal"),
                                     dict(train_vectors="lambda_b"),
                                     dict(train_vectors="lambda_d", b_initial=1.0, d_initial=0.0)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_path_agrees_and_starts_at_the_base_model(build, changes):
    family = build()
    config = dataclasses.replace(family.config, **changes)
    initial = vera_jax.init_adapter(family.params, config)
    base = family.apply(family.params, family.inputs)
    np.testing.assert_array_equal(vera_jax.adapt(family.apply, initial)(family.params, family.inputs), base)
    adapter = families.random_adapter(family, config=config)
    merged = vera_jax.adapt(family.apply, adapter, path="merged")(family.params, family.inputs)
    assert max_rel_error(merged, base) > 1e-3  # the adapter does act
    for path in ("activation", "activation-lean"):
        out = vera_jax.adapt(family.apply, adapter, path=path)(family.params, family.inputs)
        assert max_rel_error(out, merged) < 1e-5, path
    mixed = vera_jax.adapt_mixed(family.apply, vera_jax.stack([initial, adapter]), jnp.array([1, 0]))(
        family.params, family.inputs)
    assert max_rel_error(mixed[0], merged[0]) < 1e-5 and max_rel_error(mixed[1], base[1]) < 1e-5


@pytest.mark.parametrize("train_vectors, kept, frozen", [("lambda_d", LAMBDA_D, LAMBDA_B),
                                                          ("lambda_b", LAMBDA_B, LAMBDA_D)])
def test_a_frozen_vector_is_not_in_the_trainable_tree_and_never_changes(train_vectors, kept, frozen):
    family = families.bert()
    config = dataclasses.replace(family.config, train_vectors=train_vectors, b_initial=0.5)
    adapter = vera_jax.init_adapter(family.params, config)
    trainable = adapter.trainable
    names = {p.rsplit("/", 1)[-1] for p in flatten(trainable)}
    assert kept in names and frozen not in names
    layers = vera_jax.find_layers(family.params, config)
    counted, _ = vera_jax.count_parameters(family.params, adapter)
    per_layer = {LAMBDA_D: lambda layer: config.r, LAMBDA_B: lambda layer: layer.out_features}[kept]
    assert counted == sum(per_layer(layer) for layer in layers) + 32 * 3 + 3  # plus the classifier head
    assert "frozen" in vera_jax.layer_table(family.params, adapter)

    tx = optax.adamw(1e-1, weight_decay=0.1)
    state = tx.init(trainable)
    labels = jnp.array([0, 2])

    def loss(t):
        logits = vera_jax.adapt(family.apply, adapter.replace(trainable=t))(family.params, family.inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    for _ in range(3):
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    trained_adapter = adapter.replace(trainable=trainable)
    merged = flatten(vera_jax.merge(family.params, trained_adapter))
    for item in layer_vectors(family.params, trained_adapter):
        value = {LAMBDA_D: item.lambda_d, LAMBDA_B: item.lambda_b}[frozen]
        np.testing.assert_array_equal(value, np.float32(config.d_initial if frozen == LAMBDA_D else 0.5))
        trained = {LAMBDA_D: item.lambda_d, LAMBDA_B: item.lambda_b}[kept]
        assert not np.allclose(trained, trained[0])  # really trained, entry by entry
        assert not np.array_equal(merged[item.layer.path + "/kernel"],
                                  flatten(family.params)[item.layer.path + "/kernel"])  # and merged in


def test_ablation_adapters_round_trip_through_checkpoints(tmp_path):
    family = families.gpt2()
    for index, changes in enumerate([dict(projection_sharing="per_layer", save_projection=True),
                                     dict(projection_sharing="per_layer", projection_init="uniform"),
                                     dict(train_vectors="lambda_d", b_initial=1.0, projection_init="kaiming_normal")]):
        config = dataclasses.replace(family.config, projection_seed=5, **changes)
        adapter = families.random_adapter(family, seed=index, config=config)
        checkpoint.save(tmp_path / str(index), adapter)
        again = checkpoint.restore(tmp_path / str(index), family.params)
        assert again.config == config and again.projections.layers == adapter.projections.layers
        assert again.generator == adapter.generator
        assert jax.tree.structure(again.trainable) == jax.tree.structure(adapter.trainable)
        jax.tree.map(np.testing.assert_array_equal, again.trainable, adapter.trainable)
        np.testing.assert_array_equal(again.projections.A, adapter.projections.A)
        np.testing.assert_array_equal(again.projections.B, adapter.projections.B)


def test_a_frozen_vector_is_written_to_peft_as_its_constant(tmp_path):
    family = families.bert()
    config = dataclasses.replace(family.config, train_vectors="lambda_b")
    adapter = families.random_adapter(family, config=config)
    vera_peft.save_adapter(tmp_path / "peft", adapter, family.params)
    loaded = vera_peft.load_adapter(tmp_path / "peft", family.params)
    lambda_d = [leaf for path, leaf in flatten(loaded.trainable).items() if path.endswith(LAMBDA_D)]
    assert len(lambda_d) == len(vera_jax.find_layers(family.params, config))
    for leaf in lambda_d:
        np.testing.assert_array_equal(leaf, np.full(config.r, config.d_initial, np.float32))
    ours = vera_jax.adapt(family.apply, adapter)(family.params, family.inputs)
    theirs = vera_jax.adapt(family.apply, loaded)(family.params, family.inputs)
    assert max_rel_error(theirs, ours) < 1e-6


def test_ablation_settings_that_cannot_work_are_errors(tmp_path):
    family = families.bert()
    with pytest.raises(ValueError, match="b_initial=0.0, which switches the adapter off"):
        dataclasses.replace(family.config, train_vectors="lambda_d")
    with pytest.raises(ValueError, match="d_initial=0.0, which switches the adapter off"):
        dataclasses.replace(family.config, train_vectors="lambda_b", d_initial=0.0)
    with pytest.raises(ValueError, match="projection_init must be one of"):
        dataclasses.replace(family.config, projection_init="orthogonal")
    with pytest.raises(ValueError, match="projection_sharing must be one of"):
        dataclasses.replace(family.config, projection_sharing="per_block")
    with pytest.raises(ValueError, match="train_vectors must be one of"):
        dataclasses.replace(family.config, train_vectors="neither")
    config = dataclasses.replace(family.config, projection_sharing="per_layer")
    per_layer = vera_jax.init_adapter(family.params, config)
    with pytest.raises(ValueError, match="PEFT's VeRA holds one shared A/B pair"):
        vera_peft.save_adapter(tmp_path / "peft", per_layer, family.params)
    assert not (tmp_path / "peft").exists()
    shared = vera_jax.init_adapter(family.params, family.config)
    with pytest.raises(ValueError, match=r"not the \(layers, r, in_max\) .* that projection_sharing='per_layer' needs"):
        vera_jax.merge(family.params, per_layer.replace(projections=shared.projections))
    fewer = vera_jax.init_adapter(family.params, dataclasses.replace(config, target_modules=("query",)))
    with pytest.raises(ValueError, match="drawn for other layers"):
        vera_jax.merge(family.params, fewer.replace(projections=per_layer.projections))


def test_ablation_fields_survive_json():
    config = vera_jax.VeraConfig(target_modules=("q",), projection_init="uniform", projection_sharing="per_layer",
                                 train_vectors="lambda_d", b_initial=1.0, d_initial=0.0)
    assert vera_jax.VeraConfig.from_json(config.to_json()) == config
