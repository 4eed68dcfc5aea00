"""Bad input gets a clear error that names the problem and the fix, never a deep JAX traceback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import families
import vera_jax
from vera_jax.paths import flatten, unflatten


@pytest.fixture(scope="module")
def bert():
    return families.bert()


def _config(**kwargs):
    return vera_jax.VeraConfig(**{"r": 8, "target_modules": ("query", "value"), **kwargs})


def test_target_matching_nothing_lists_candidate_paths(bert):
    with pytest.raises(ValueError, match=r"matches no module(.|\n)*bert/encoder/layer/0/attention/self/query"):
        vera_jax.init_vectors(bert.params, _config(target_modules=("q_proj",)))


def test_variables_dict_instead_of_params_gets_a_hint(bert):
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        vera_jax.init_vectors({"params": bert.params}, _config(target_modules=r"bert/.*/query"))


@pytest.mark.parametrize("target", ["LayerNorm", "word_embeddings", "attention"])
def test_target_that_is_not_a_2d_linear_kernel(bert, target):
    with pytest.raises(ValueError, match=r"is not a linear layer with a 2-D 'kernel'(.|\n)*Narrow"):
        vera_jax.init_projections(bert.params, jax.random.key(0), _config(target_modules=(target,)))


def test_trainable_matching_nothing_or_overlapping(bert):
    with pytest.raises(ValueError, match=r"trainable=\('head',\) matches no parameter"):
        vera_jax.init_trainable(bert.params, _config(trainable=("head",)))
    with pytest.raises(ValueError, match="both adapted by VeRA and trained in full"):
        vera_jax.init_trainable(bert.params, _config(trainable=("query",)))


def test_vectors_that_do_not_fit_the_params(bert):
    config = _config(trainable=("classifier",))
    projections = vera_jax.init_projections(bert.params, jax.random.key(0), config)
    good = flatten(vera_jax.init_trainable(bert.params, config))
    missing = unflatten({p: v for p, v in good.items() if "layer/1/attention/self/value" not in p})
    with pytest.raises(ValueError, match=r"missing \['bert/encoder/layer/1/attention/self/value/vera_lambda_b'"):
        vera_jax.merge(bert.params, missing, projections)
    extra = unflatten(good | {"bert/pooler/dense/vera_lambda_d": jnp.zeros(8)})
    with pytest.raises(ValueError, match=r"unexpected \['bert/pooler/dense/vera_lambda_d'\]"):
        vera_jax.merge(bert.params, extra, projections)
    wrong = unflatten(good | {"bert/encoder/layer/0/attention/self/query/vera_lambda_b": jnp.zeros(7)})
    with pytest.raises(ValueError, match=r"needs lambda_d \(8,\) and lambda_b \(32,\)"):
        vera_jax.merge(bert.params, wrong, projections)
    head = unflatten(good | {"classifier/kernel": jnp.zeros((32, 5))})
    with pytest.raises(ValueError, match=r"'classifier/kernel' has shape \(32, 5\) but the params leaf has \(32, 3\)"):
        vera_jax.adapt(bert.apply, head, projections, path="activation")(bert.params, bert.inputs)


def test_projections_too_small_for_a_layer(bert):
    config = _config()
    small = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {
        "query": {"kernel": jnp.zeros((16, 16))}}}}}}}}
    projections = vera_jax.init_projections(small, jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"too small for 'bert/encoder/layer/0/attention/self/query'.*in=32"):
        vera_jax.merge(bert.params, vera_jax.init_vectors(bert.params, config), projections)
    other_rank = vera_jax.init_projections(bert.params, jax.random.key(0), _config(r=4))
    with pytest.raises(ValueError, match="do not have rank r=8"):
        vera_jax.merge(bert.params, vera_jax.init_vectors(bert.params, config),
                       vera_jax.Projections(other_rank.A, other_rank.B, config))


def test_wrong_kernel_layout_is_caught_on_the_activation_path():
    gpt2 = families.gpt2()
    config = vera_jax.VeraConfig(r=8, target_modules=("c_attn",))  # GPT-2 needs kernel_layout="out_in"
    projections = vera_jax.init_projections(gpt2.params, jax.random.key(0), config)
    trainable = vera_jax.init_trainable(gpt2.params, config)
    with pytest.raises(ValueError, match="is a FlaxConv1D, whose kernel is stored out_in.*set kernel_layout='out_in'"):
        vera_jax.adapt(gpt2.apply, trainable, projections, path="activation")(gpt2.params, gpt2.inputs)


def test_activation_path_that_sees_no_adapted_layer(bert):
    config = _config()
    projections = vera_jax.init_projections(bert.params, jax.random.key(0), config)
    renamed = {"encoder": vera_jax.init_vectors(bert.params, config)["bert"]["encoder"]}
    with pytest.raises(ValueError, match="saw none of the 4 adapted layers"):
        with vera_jax.activation_path(renamed, projections):
            bert.apply(bert.params, bert.inputs)
    with pytest.raises(ValueError, match="holds no VeRA vectors"):
        with vera_jax.activation_path({}, projections):
            pass


def test_unknown_path_name(bert):
    config = _config()
    projections = vera_jax.init_projections(bert.params, jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"path must be one of \('merged', 'activation', 'activation-lean'\) or a vera_jax.PathPlan"):
        vera_jax.adapt(bert.apply, vera_jax.init_vectors(bert.params, config), projections, path="fused")


def test_combined_optimizer_on_a_tree_without_vectors(bert):
    tx = vera_jax.combined_optimizer(optax.sgd(0.1), _config())
    with pytest.raises(ValueError, match="No leaf of this tree is trainable"):
        tx.init(bert.params)


def test_reports_match_the_layer_table(bert):
    config = _config(trainable=("classifier",))
    trainable, total = vera_jax.count_parameters(bert.params, config)
    vectors = 4 * (8 + 32)
    head = 32 * 3 + 3
    assert trainable == vectors + head
    assert total == sum(x.size for x in jax.tree.leaves(bert.params)) + trainable
    report = vera_jax.parameter_report(bert.params, config)
    assert report == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    table = vera_jax.layer_table(bert.params, config).splitlines()
    assert table[0].split() == ["path", "kernel", "in", "out", "lambda_d", "lambda_b"]
    assert table[1].split() == ["bert/encoder/layer/0/attention/self/query", "32x32", "32", "32", "8", "32"]
    assert len(table) == 5
    assert np.all([row.split()[0].endswith(("query", "value")) for row in table[1:]])
