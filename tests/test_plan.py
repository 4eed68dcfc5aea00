"""The FLOP model's choices (vera_jax.plan), timed plans (vera_jax.timing), and the memory-lean custom VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_error

import families
import vera_jax
from vera_jax.ops import adapter_output, adapter_output_lean
from vera_jax.plan import PATHS, PathPlan
from vera_jax.timing import measured_seconds, time_in_rounds


def _xla_flops(fn, *args) -> float:
    """The FLOPs XLA counts in ``fn``'s compiled program: a count independent of the FLOP model."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


@pytest.mark.parametrize("r, tokens, n_in, n_out", [(64, 512, 96, 160), (16, 8, 128, 64)])
def test_the_inference_flop_model_matches_xlas_count(r, tokens, n_in, n_out):
    """Each path's extra work at inference, as XLA counts it: merging ΔW = (b ⊙ B)(d ⊙ A), or adding
    b ⊙ (B (d ⊙ (A x))) to every token's output (element-wise terms: within 1/r)."""
    x, a, b_matrix = np.ones((tokens, n_in), np.float32), np.ones((r, n_in), np.float32), np.ones((n_out, r),
                                                                                                 np.float32)
    d, b = np.ones(r, np.float32), np.ones(n_out, np.float32)
    merged = _xla_flops(lambda a, bm, d, b: (b[:, None] * bm) @ (d[:, None] * a), a, b_matrix, d, b)
    activation = _xla_flops(lambda x, a, bm, d, b: b * ((d * (x @ a.T)) @ bm.T), x, a, b_matrix, d, b)
    config = vera_jax.VeraConfig(r=r, target_modules=("dense",))
    params = {"dense": {"kernel": np.ones((n_in, n_out), np.float32)}}
    (cost,) = vera_jax.plan_paths(params, config, tokens=tokens, training=False).costs
    assert cost.merged == pytest.approx(merged, rel=1 / r)
    assert cost.activation == pytest.approx(activation, rel=1 / r)


@pytest.mark.hf_flax
@pytest.mark.parametrize("r", [4, 256])
def test_the_flop_model_scales_as_each_path_does(r):
    """The activation path's work grows with the tokens, three times over when training (a forward and two
    backward products); the merge's does not at inference, and does in training (its gradient is a product over
    the tokens); training never costs less than inference; each layer takes its cheaper path."""
    family = families.llama()
    config = vera_jax.VeraConfig(r=r, target_modules=families.LLAMA_TARGETS)

    def costs(tokens, training):
        return vera_jax.plan_paths(family.params, config, tokens=tokens, training=training).costs

    for few, many, few_training, many_training in zip(costs(64, False), costs(128, False), costs(64, True),
                                                      costs(128, True)):
        assert many.activation == 2 * few.activation and few_training.activation == 3 * few.activation
        assert many.merged == few.merged and many_training.merged > few_training.merged > few.merged
        for cost in (few, many, few_training, many_training):
            assert cost.choice == min(("merged", "activation"), key=lambda path: getattr(cost, path))
    plan = vera_jax.plan_paths(family.params, config, tokens=4096, training=True)
    layers = vera_jax.find_layers(family.params, config)
    assert [c.path for c in plan.costs] == [layer.path for layer in layers]
    assert plan.merged | plan.activation == {layer.path for layer in layers}
    assert f"{len(plan.merged)} layers merged, {len(plan.activation)} on the activation path" in plan.summary()
    assert len(plan.explain().splitlines()) == len(layers) + 1


@pytest.mark.hf_flax
def test_a_plan_is_a_pure_value_that_jit_can_take_as_static():
    family = families.bert()
    plan = vera_jax.plan_paths(family.params, family.config, tokens=64)
    again = vera_jax.plan_paths(family.params, family.config, tokens=64)
    assert isinstance(plan, PathPlan) and plan == again and hash(plan) == hash(again)
    assert not plan.measured and plan.tokens == 64 and plan.training
    assert set(plan.paths()) <= set(PATHS[:2]) and PATHS == ("merged", "activation", "activation-lean")
    adapter = families.random_adapter(family)
    run = jax.jit(lambda p, x, plan: vera_jax.adapt(family.apply, adapter, path=plan)(p, x), static_argnums=2)
    want = vera_jax.adapt(family.apply, adapter, path="merged")(family.params, family.inputs)
    assert max_rel_error(run(family.params, family.inputs, plan), want) < 1e-5
    for planner in (vera_jax.plan_paths, vera_jax.measured_plan):
        with pytest.raises(ValueError, match="tokens per step must be positive, got 0"):
            planner(family.params, family.config, tokens=0)


@pytest.mark.hf_flax
def test_few_tokens_favour_activation_and_many_favour_merged_at_inference():
    family = families.bert()
    few = vera_jax.plan_paths(family.params, family.config, tokens=8, training=False)
    many = vera_jax.plan_paths(family.params, family.config, tokens=10_000, training=False)
    assert not few.merged and not many.activation


def _layers_params(n_in, n_out):
    return {"layer": {"kernel": jax.ShapeDtypeStruct((n_in, n_out), jnp.float32)}}


@pytest.mark.parametrize("n_in, n_out, r, tokens, expected", [
    (8, 8, 64, 32768, "merged"),  # FLOP model: activation costs ~48x merged
    (512, 512, 64, 1, "activation"),  # merged costs ~250x activation
])
def test_a_measured_plan_times_both_paths_and_picks_the_faster(n_in, n_out, r, tokens, expected):
    config = vera_jax.VeraConfig(r=r, target_modules=("layer",))
    plan = vera_jax.measured_plan(_layers_params(n_in, n_out), config, tokens=tokens)
    (cost,) = plan.costs
    assert plan.measured and 0 < min(cost.merged, cost.activation) < 1.0  # seconds
    assert cost.choice == expected, cost
    assert "measured on this device" in plan.summary() and " ms" in plan.explain()
    estimated = vera_jax.plan_paths(_layers_params(n_in, n_out), config, tokens=tokens)
    assert estimated.costs[0].choice == expected and "estimated" in estimated.summary()


@pytest.mark.hf_flax
def test_measurements_are_made_once_per_layer_shape():
    measured_seconds.cache_clear()
    family = families.llama()  # 14 adapted layers of 4 distinct (in, out) shapes
    plan = vera_jax.measured_plan(family.params, family.config, tokens=64)
    layers = vera_jax.find_layers(family.params, family.config)
    shapes = {(layer.in_features, layer.out_features) for layer in layers}
    assert measured_seconds.cache_info().misses == len(shapes) < len(layers) == len(plan.costs)


def test_rounds_warm_up_each_runner_then_time_one_call_of_each_per_round_in_a_shuffled_order():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = time_in_rounds(runners, rounds=6, warmup=2)
    assert calls[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]
    rounds = [calls[start:start + 4] for start in range(8, len(calls), 4)]
    assert len(rounds) == 6 and all(sorted(one) == list("abcd") for one in rounds)
    assert len({tuple(one) for one in rounds}) > 1  # shuffled
    assert {name: len(t) for name, t in times.items()} == dict.fromkeys("abcd", 6)
    assert all(t >= 0 for seconds in times.values() for t in seconds)


@pytest.mark.hf_flax
def test_layers_that_read_one_input_are_found_by_tracing_and_timed_together():
    family = families.llama()
    groups = vera_jax.shared_input_groups(family.apply, family.params, family.config, family.inputs)
    names = sorted((group[0].split("/layers/")[1].split("/")[0], sorted(p.rsplit("/", 1)[-1] for p in group))
                   for group in groups)
    per_block = [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert names == [(block, members) for block in ("0", "1") for members in per_block]
    plan = vera_jax.measured_plan(family.params, family.config, tokens=64, input_groups=groups)
    by_path = {cost.path: cost for cost in plan.costs}
    for group in groups:
        assert len({by_path[path].choice for path in group}) == 1, group  # one path per group
        assert len({(by_path[path].merged, by_path[path].activation) for path in group}) == 1  # equal shares
    with pytest.raises(ValueError, match="input_groups cover"):
        vera_jax.measured_plan(family.params, family.config, tokens=64, input_groups=groups[:3])
    down = next(path for group in groups for path in group if path.endswith("down_proj"))  # reads 56 features
    query = next(path for group in groups for path in group if path.endswith("q_proj"))  # reads 32
    for bad in ((down, query), ("model/embed_tokens",)):
        with pytest.raises(ValueError, match="are not adapted layers that read one input of one width"):
            vera_jax.measured_plan(family.params, family.config, tokens=64, input_groups=(bad,) + groups)


@pytest.mark.hf_flax
def test_a_whole_step_plan_times_the_models_gradient_step_on_each_path():
    family = families.llama()
    adapter = families.random_adapter(family, seed=3)
    plan = vera_jax.whole_step_plan(family.apply, family.params, adapter, family.inputs, tokens=family.inputs.size)
    merged, activation = (sum(getattr(c, name) for c in plan.costs) for name in ("merged", "activation"))
    assert plan.measured and plan.whole_steps and not plan.per_layer and 0 < min(merged, activation) < 10.0
    chosen = "merged" if merged <= activation else "activation"
    assert set(plan.paths()) == {chosen} and len(plan.costs) == len(vera_jax.find_layers(family.params, family.config))
    assert plan.summary().startswith(f"auto: every layer {chosen}") and "whole steps" in plan.explain()
    got = vera_jax.adapt(family.apply, adapter, path=plan)(family.params, family.inputs)
    want = vera_jax.adapt(family.apply, adapter, path="merged")(family.params, family.inputs)
    assert max_rel_error(got, want) < 1e-5


@pytest.mark.hf_flax
def test_a_mixed_plan_gives_the_same_logits():
    family = families.llama()
    plan = vera_jax.plan_paths(family.params, family.config, tokens=100)
    assert plan.merged and plan.activation, "tokens=100 splits this model's layers between the two paths"
    adapter = families.random_adapter(family)
    merged = vera_jax.adapt(family.apply, adapter, path="merged")(family.params, family.inputs)
    mixed = jax.jit(vera_jax.adapt(family.apply, adapter, path=plan))(family.params, family.inputs)
    assert max_rel_error(mixed, merged) < 1e-5


def _single_layer(tokens=2048, n_in=64, n_out=512, r=16):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (4, tokens // 4, n_in))
    a = jax.random.normal(keys[1], (r, n_in + 8))
    b = jax.random.normal(keys[2], (n_out + 8, r))
    return x, a, b, jax.random.normal(keys[3], (r,)), jax.random.normal(keys[4], (n_out,))


def _loss(output):
    def loss(x, lambda_d, lambda_b, a, b):
        return jnp.sum(jnp.sin(output(x, a, b, lambda_d, lambda_b)))

    return loss


def test_lean_vjp_gives_the_autodiff_gradients():
    x, a, b, lambda_d, lambda_b = _single_layer(tokens=64)
    np.testing.assert_allclose(adapter_output_lean(x, a, b, lambda_d, lambda_b),
                               adapter_output(x, a, b, lambda_d, lambda_b), rtol=1e-6)
    lean = jax.grad(_loss(adapter_output_lean), argnums=(0, 1, 2))(x, lambda_d, lambda_b, a, b)
    full = jax.grad(_loss(adapter_output), argnums=(0, 1, 2))(x, lambda_d, lambda_b, a, b)
    for got, want in zip(lean, full):
        assert max_rel_error(got, want) < 1e-5
    frozen = jax.grad(_loss(adapter_output_lean), argnums=(3, 4))(x, lambda_d, lambda_b, a, b)
    assert all(not np.any(np.asarray(g)) for g in frozen)  # A and B are constants of VeRA


def test_lean_vjp_keeps_only_the_r_sized_intermediate():
    x, a, b, lambda_d, lambda_b = _single_layer()

    def kept_bytes(output):
        _, backward = jax.vjp(lambda x, d, lb: output(x, a, b, d, lb), x, lambda_d, lambda_b)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(backward))  # the residuals the backward pass holds

    tokens, r, n_out = x.shape[0] * x.shape[1], a.shape[0], lambda_b.shape[0]
    lean, full = kept_bytes(adapter_output_lean), kept_bytes(adapter_output)
    # Lean: the (tokens, r) intermediate plus the inputs it is given (A, B and the vectors), nothing more.
    assert lean == 4 * (tokens * r + a.size + b.size + lambda_d.size + lambda_b.size)
    assert full >= 4 * tokens * (n_out + r)  # autodiff holds the (tokens, out) product as well as (tokens, r)


@pytest.mark.hf_flax
def test_lean_path_trains_like_the_activation_path():
    family = families.bert()
    adapter = families.random_adapter(family)

    def grads(path):
        def loss(trainable):
            logits = vera_jax.adapt(family.apply, adapter.replace(trainable=trainable), path=path)(family.params,
                                                                                                family.inputs)
            return jnp.sum(logits**2)

        return jax.grad(loss)(adapter.trainable)

    for got, want in zip(jax.tree.leaves(grads("activation-lean")), jax.tree.leaves(grads("activation"))):
        assert max_rel_error(got, want) < 1e-5


@pytest.mark.hf_flax
def test_a_whole_model_plan_sends_every_layer_down_the_path_cheaper_in_total():
    family = families.llama()
    per_layer = vera_jax.plan_paths(family.params, family.config, tokens=100)
    assert per_layer.merged and per_layer.activation
    whole = vera_jax.plan_paths(family.params, family.config, tokens=100, per_layer=False)
    totals = {name: sum(getattr(c, name) for c in whole.costs) for name in ("merged", "activation")}
    cheaper = min(totals, key=totals.get)
    assert getattr(whole, cheaper) == {c.path for c in whole.costs} and not getattr(
        whole, "activation" if cheaper == "merged" else "merged")
    assert "one path for the whole model" in whole.summary()
    assert all(row.endswith(f"-> {cheaper}") for row in whole.explain().splitlines()[1:])
