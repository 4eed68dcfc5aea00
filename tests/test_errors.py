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
        vera_jax.init_adapter(bert.params, _config(target_modules=("q_proj",)))


def test_variables_dict_instead_of_params_gets_a_hint(bert):
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        vera_jax.init_adapter({"params": bert.params}, _config(target_modules=r"bert/.*/query"))


@pytest.mark.parametrize("target", ["LayerNorm", "word_embeddings", "attention"])
def test_target_that_is_not_a_linear_kernel(bert, target):
    with pytest.raises(ValueError, match=r"is not a linear layer with a 'kernel' of rank 2 or more(.|\n)*Narrow"):
        vera_jax.init_adapter(bert.params, _config(target_modules=(target,)))


def test_modules_to_save_matching_nothing_or_overlapping(bert):
    with pytest.raises(ValueError, match=r"modules_to_save=\('head',\) matches no parameter"):
        vera_jax.init_adapter(bert.params, _config(modules_to_save=("head",)))
    with pytest.raises(ValueError, match="both adapted by VeRA and trained in full"):
        vera_jax.init_adapter(bert.params, _config(modules_to_save=("query",)))


def test_vectors_that_do_not_fit_the_params(bert):
    adapter = vera_jax.init_adapter(bert.params, _config(modules_to_save=("classifier",)))
    good = flatten(adapter.trainable)

    def with_trainable(flat):
        return adapter.replace(trainable=unflatten(flat))

    missing = with_trainable({p: v for p, v in good.items() if "layer/1/attention/self/value" not in p})
    with pytest.raises(ValueError, match=r"missing \['bert/encoder/layer/1/attention/self/value/vera_lambda_b'"):
        vera_jax.merge(bert.params, missing)
    extra = with_trainable(good | {"bert/pooler/dense/vera_lambda_d": jnp.zeros(8)})
    with pytest.raises(ValueError, match=r"unexpected \['bert/pooler/dense/vera_lambda_d'\]"):
        vera_jax.merge(bert.params, extra)
    wrong = with_trainable(good | {"bert/encoder/layer/0/attention/self/query/vera_lambda_b": jnp.zeros(7)})
    with pytest.raises(ValueError, match=r"needs lambda_d \(8,\) and lambda_b \(32,\)"):
        vera_jax.merge(bert.params, wrong)
    head = with_trainable(good | {"classifier/kernel": jnp.zeros((32, 5))})
    with pytest.raises(ValueError, match=r"'classifier/kernel' has shape \(32, 5\) but the params leaf has \(32, 3\)"):
        vera_jax.adapt(bert.apply, head, path="activation")(bert.params, bert.inputs)
    with pytest.raises(ValueError, match=r"missing \[.*\] \.\.\. \(8 in all\), unexpected \[\] \(0 in all\)"):
        vera_jax.adapt(bert.apply, with_trainable({}), path="activation")(bert.params, bert.inputs)


def test_projections_too_small_for_a_layer(bert):
    config = _config()
    small = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {
        "query": {"kernel": jnp.zeros((16, 16))}}}}}}}}
    adapter = vera_jax.init_adapter(bert.params, config)
    too_small = adapter.replace(projections=vera_jax.init_adapter(small, config).projections)
    with pytest.raises(ValueError, match=r"too small for 'bert/encoder/layer/0/attention/self/query'.*in=32"):
        vera_jax.merge(bert.params, too_small)
    other_rank = adapter.replace(projections=vera_jax.init_adapter(bert.params, _config(r=4)).projections)
    with pytest.raises(ValueError, match="do not have rank r=8"):
        vera_jax.merge(bert.params, other_rank)


def test_wrong_kernel_axes_are_caught_on_the_activation_path():
    gpt2 = families.gpt2()
    config = vera_jax.VeraConfig(r=8, target_modules=("c_attn",))  # GPT-2 needs kernel_axes={".*": "oi"}
    adapter = vera_jax.init_adapter(gpt2.params, config)
    with pytest.raises(ValueError, match="is a FlaxConv1D whose kernel axes are 'oi', but the adapter takes them as 'io'.*kernel_axes"):
        vera_jax.adapt(gpt2.apply, adapter, path="activation")(gpt2.params, gpt2.inputs)


def test_activation_path_that_sees_no_adapted_layer(bert):
    adapter = vera_jax.init_adapter(bert.params, _config())
    not_the_model = lambda params, inputs: jnp.sum(params["bert"]["pooler"]["dense"]["kernel"])  # noqa: E731
    with pytest.raises(ValueError, match="saw none of the 4 adapted layers"):
        vera_jax.adapt(not_the_model, adapter, path="activation")(bert.params, bert.inputs)
    # The merged path calls any function of the params: there is nothing to see.
    assert vera_jax.adapt(not_the_model, adapter, path="merged")(bert.params, bert.inputs).shape == ()


def test_a_layer_called_with_other_widths_than_its_kernel_is_named():
    cnn = families.cnn()
    adapter = vera_jax.init_adapter(cnn.params, cnn.config)  # 'hidden' reads 4 * 4 * 8 = 128 features
    bigger = jax.random.normal(jax.random.key(4), (2, 12, 12, 1))
    other_params = families.SmallCNN().init(jax.random.key(0), bigger)["params"]  # 'hidden' reads 288

    def apply_other_images(params, images):  # runs the model on other params than the adapter checks
        return families.SmallCNN().apply({"params": other_params}, bigger)

    with pytest.raises(ValueError, match=r"An input of shape \(2, 288\) does not fit the call \.\.\.a,ab->\.\.\.b of a "
                                         r"kernel \(128, 40\); apply the model to the params the adapter was built for"):
        vera_jax.adapt(apply_other_images, adapter, path="activation")(cnn.params, cnn.inputs)


def test_unknown_path_name(bert):
    adapter = vera_jax.init_adapter(bert.params, _config())
    expected = r"path must be one of \('merged', 'activation', 'activation-lean'\) or a vera_jax.PathPlan"
    with pytest.raises(ValueError, match=expected):
        vera_jax.adapt(bert.apply, adapter, path="fused")


def test_combined_optimizer_on_a_tree_without_vectors(bert):
    tx = vera_jax.combined_optimizer(optax.sgd(0.1), vera_jax.init_adapter(bert.params, _config()))
    with pytest.raises(ValueError, match="No leaf of this tree is trainable"):
        tx.init(bert.params)


def test_reports_match_the_layer_table(bert):
    adapter = vera_jax.init_adapter(bert.params, _config(modules_to_save=("classifier",)))
    trainable, total = vera_jax.count_parameters(bert.params, adapter)
    vectors = 4 * (8 + 32)
    head = 32 * 3 + 3
    assert trainable == vectors + head
    assert trainable == sum(x.size for x in jax.tree.leaves(adapter.trainable))
    assert total == sum(x.size for x in jax.tree.leaves(bert.params)) + trainable
    report = vera_jax.parameter_report(bert.params, adapter)
    assert report == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                      f"trainable%: {100 * trainable / total:.4f}")
    table = vera_jax.layer_table(bert.params, adapter).splitlines()
    assert table[0].split() == ["path", "kernel", "in", "out", "lambda_d", "lambda_b"]
    assert table[1].split() == ["bert/encoder/layer/0/attention/self/query", "32x32", "32", "32", "8", "32"]
    assert len(table) == 5
    assert np.all([row.split()[0].endswith(("query", "value")) for row in table[1:]])
