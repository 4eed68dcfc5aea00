"""VeraConfig validation and JSON round trip; the one path matcher's semantics."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

import vera_jax
from vera_jax import layers, paths


def test_json_round_trip_and_hashable():
    config = vera_jax.VeraConfig(r=32, target_modules=("query", "value"), modules_to_save=("classifier",),
                                 dropout=0.1, dtype="bfloat16", projection_seed=7, save_projection=True)
    again = vera_jax.VeraConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert json.loads(config.to_json())["target_modules"] == ["query", "value"]
    regex = vera_jax.VeraConfig(target_modules=r".*layer/\d+/.*/(query|value)")
    assert vera_jax.VeraConfig.from_json(regex.to_json()) == regex
    # Hashable, so a static argument to jax.jit.
    jax.jit(lambda x, c: x * c.r, static_argnums=1)(jnp.ones(2), config)


def test_defaults_follow_peft_except_saving_projections():
    config = vera_jax.VeraConfig(target_modules=("query",))
    assert (config.r, config.d_initial, config.dropout, config.dtype) == (256, 0.1, 0.0, "float32")
    # PEFT saves A and B by default because it cannot always rebuild them; a JAX key always can.
    assert config.save_projection is False and config.kernel_axes == ()


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-3), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(d_initial=float("nan")), "d_initial must be a finite number"),
    (dict(d_initial=float("inf")), "d_initial must be a finite number"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dtype="int32"), "must name a floating dtype"),
    (dict(dtype="float33"), "must name a floating dtype"),
    (dict(kernel_axes={".*": "rows"}), "'i' for an input axis, 'o' for an output axis"),
    (dict(kernel_axes={".*": "iol l"}), "at most one 'l'"),
    (dict(kernel_axes={"(": "io"}), "not a valid regular expression"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(target_modules="query(["), "not a valid regular expression"),
    (dict(target_modules=("query", "")), "must be non-empty strings"),
    (dict(save_projection="yes"), "save_projection must be True or False"),
])
def test_bad_config_is_refused_with_the_fix(kwargs, message):
    kwargs = {"target_modules": ("query",), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        vera_jax.VeraConfig(**kwargs)


def test_unknown_fields_are_an_error():
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        vera_jax.VeraConfig.from_dict({"target_modules": ["query"], "rank": 8})
    # The field of leaves trained in full is PEFT's modules_to_save; the old name is an unknown field.
    with pytest.raises(ValueError, match=r"unknown fields \['trainable'\]"):
        vera_jax.VeraConfig.from_dict({"target_modules": ["query"], "trainable": ["classifier"]})
    config = vera_jax.VeraConfig.from_dict({"target_modules": ["query"], "modules_to_save": ["classifier"]})
    assert config.modules_to_save == ("classifier",)


PATHS = ["bert/encoder/layer/0/attention/self/query", "bert/encoder/layer/0/attention/self/myquery",
         "bert/encoder/layer/10/attention/self/query", "query", "bert/query/dense"]


def test_names_match_whole_trailing_components():
    regex = paths.patterns_regex(("query",))
    assert [p for p in PATHS if regex.fullmatch(p)] == [PATHS[0], PATHS[2], PATHS[3]]
    regex = paths.patterns_regex(("self/query",))
    assert [p for p in PATHS if regex.fullmatch(p)] == [PATHS[0], PATHS[2]]
    regex = paths.patterns_regex(("layer/0/attention/self/query",))
    assert [p for p in PATHS if regex.fullmatch(p)] == [PATHS[0]]


def test_regex_must_match_the_whole_path():
    assert [p for p in PATHS if paths.patterns_regex("query").fullmatch(p)] == ["query"]
    assert [p for p in PATHS if paths.patterns_regex(r".*layer/1\d/.*query").fullmatch(p)] == [PATHS[2]]


def test_with_leaves_matches_a_module_and_everything_below():
    regex = paths.patterns_regex(("classifier",), with_leaves=True)
    assert regex.fullmatch("classifier/dense/kernel") and regex.fullmatch("classifier")
    assert not regex.fullmatch("myclassifier/kernel")


def test_rules_first_match_wins_and_unused_rules_fail():
    rules = paths.compile_rules([(r".*/kernel", "matrix"), (r".*", "other")])
    assert paths.label_paths(rules, ["a/kernel", "a/bias"]) == {"a/kernel": "matrix", "a/bias": "other"}
    assert paths.first_match(rules, "x/kernel") == "matrix"
    with pytest.raises(ValueError, match=re.escape("Rules ['.*/kernel'] matched none of the 1 paths")):
        paths.label_paths(rules, ["a/bias"])
    with pytest.raises(ValueError, match="No rule matches the path 'a/bias'"):
        paths.label_paths(paths.compile_rules([(r".*/kernel", 1)]), ["a/bias"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        paths.compile_rules([("(", 1)])


def test_vector_leaves_have_one_matcher():
    assert vera_jax.is_vector_path("bert/layer/0/query/vera_lambda_d")
    assert vera_jax.is_vector_path("bert/layer/0/query/vera_lambda_b")
    for path in ("bert/layer/0/query/kernel", "bert/layer/0/query/vera_lambda_dx", "bert/my_vera_lambda_b",
                 "bert/vera_lambda_b/kernel"):
        assert not vera_jax.is_vector_path(path), path
    assert layers.vector_module("a/query/vera_lambda_d") == "a/query"
    assert layers.vector_module("a/query/kernel") is None
    assert paths.split_leaf("a/b/kernel") == ("a/b", "kernel") and paths.split_leaf("kernel") == ("", "kernel")


def test_flatten_round_trips():
    tree = {"a": {"b": {"kernel": 1, "bias": 2}}, "c": 3}
    assert paths.flatten(tree) == {"a/b/kernel": 1, "a/b/bias": 2, "c": 3}
    assert paths.unflatten(paths.flatten(tree)) == tree
    assert paths.module_paths(["a/b/kernel", "a/c/kernel", "d"]) == ["a", "a/b", "a/c"]
