"""VeRA on Flax NNX models and stacked layers: Linear Llama (list and nnx.scan), Einsum attention of
rank-3/4 kernels, a linen nn.scan stack with the layer axis at 1; PEFT parity on the NNX Llama."""

from __future__ import annotations

import ast
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_rel_error, randomise_vectors
from flax import nnx

import nnx_models
import tiny_llama
import tiny_run
import vera_jax
import vera_jax.checkpoint
import vera_jax.nnx as vera_nnx
import vera_jax.paths
import vera_jax.peft
from train import options
from train.models import nnx_llama, scan

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")
EINSUM_TARGETS = ("q_einsum", "kv_einsum", "attn_vec_einsum")


@pytest.fixture(scope="module")
def torch_llama():
    model = tiny_llama.torch_llama()
    return model, {name: value.detach().numpy() for name, value in model.state_dict().items()}


def llama(torch_llama, *, scan: bool) -> nnx_llama.LlamaForCausalLM:
    model, state = torch_llama
    return nnx_llama.from_torch(state, nnx_llama.LlamaConfig.from_hf(model.config), scan_layers=scan)


def einsum_model() -> nnx_models.EinsumAttention:
    return nnx_models.EinsumAttention(nnx.Rngs(0))


IDS = jnp.array([[5, 9, 33, 2, 17, 8, 40], [4, 4, 10, 11, 12, 1, 3]])
X = jax.random.normal(jax.random.key(7), (2, 6, nnx_models.D))


def loss_and_grad_state(model: nnx.Module, inputs: jax.Array):
    """mean(model(inputs)^2) and its gradient with respect to the model's LoRAParams (an nnx.State)."""
    def loss(model):
        return jnp.mean(jnp.square(model(inputs)))

    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def loss_and_grads(model: nnx.Module, inputs: jax.Array):
    value, grads = loss_and_grad_state(model, inputs)
    return value, nnx.to_pure_dict(grads)


CASES = {
    "llama": (lambda tl: llama(tl, scan=False), LLAMA_TARGETS, IDS),
    "llama-scanned": (lambda tl: llama(tl, scan=True), LLAMA_TARGETS, IDS),
    "einsum": (lambda tl: einsum_model(), EINSUM_TARGETS, X),
}


@pytest.mark.parametrize("case", CASES)
def test_adapted_model_equals_base_at_init_and_merged_equals_activation(torch_llama, case):
    build, targets, inputs = CASES[case]
    base = build(torch_llama)(inputs)
    config = vera_jax.VeraConfig(r=8, target_modules=targets, projection_seed=3)
    merged = vera_nnx.attach(build(torch_llama), config, path="merged")
    np.testing.assert_array_equal(merged(inputs), base)
    randomise_vectors(merged)
    activation = vera_nnx.attach(build(torch_llama), config, path="activation")
    randomise_vectors(activation)
    loss_m, grads_m = loss_and_grads(merged, inputs)
    loss_a, grads_a = loss_and_grads(activation, inputs)
    assert max_rel_error(merged(inputs), base) > 1e-3  # VeRA changes the output
    assert max_rel_error(activation(inputs), merged(inputs)) < 1e-5
    assert abs(float(loss_a) - float(loss_m)) <= 1e-5 * abs(float(loss_m))
    for got, want in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_m), strict=True):
        assert max_rel_error(got, want) < 1e-4


def test_stacked_vectors_carry_the_layer_axis_and_einsum_kernels_their_roles(torch_llama):
    config = vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS)
    scanned = vera_nnx.attach(llama(torch_llama, scan=True), config)
    layers = tiny_llama.LAYERS
    attn = scanned.model.layers.self_attn
    assert attn.q_proj.vera_lambda_d.shape == (layers, 8)
    assert attn.q_proj.vera_lambda_b.shape == (layers, attn.q_proj.out_features)
    assert scanned.vera_projections.A.shape == (8, tiny_llama.FFN)  # one pair: in_max over q, v and down
    _, params, adapter = vera_nnx.split(scanned)
    table = {layer.path: layer.axes for layer in vera_jax.find_layers(params, adapter.config)}
    assert table["model/layers/self_attn/q_proj"] == "lio"
    einsum = vera_nnx.attach(einsum_model(), vera_jax.VeraConfig(r=8, target_modules=EINSUM_TARGETS))
    _, params, adapter = vera_nnx.split(einsum)
    axes = {layer.path: (layer.axes, layer.in_features, layer.out_features)
            for layer in vera_jax.find_layers(params, adapter.config)}
    D, N, H, K = nnx_models.D, nnx_models.N, nnx_models.H, nnx_models.K
    assert axes == {"q_einsum": ("ioo", D, N * H), "kv_einsum": ("ooio", D, 2 * K * H),
                    "attn_vec_einsum": ("iio", N * H, D)}


def test_scanned_stack_equals_the_same_layers_unstacked(torch_llama):
    config = vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS, projection_seed=5)
    listed = vera_nnx.attach(llama(torch_llama, scan=False), config, path="activation")
    scanned = vera_nnx.attach(llama(torch_llama, scan=True), config, path="activation")
    randomise_vectors(scanned)
    _, _, stacked = vera_nnx.split(scanned)
    np.testing.assert_array_equal(scanned.vera_projections.A[...], listed.vera_projections.A[...])
    for layer in range(tiny_llama.LAYERS):  # layer i of the stack's vectors -> the listed model's layer i
        for module in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"):
            owner = listed.model.layers[layer]
            for part in module.split("/"):
                owner = getattr(owner, part)
            stack_owner = scanned.model.layers
            for part in module.split("/"):
                stack_owner = getattr(stack_owner, part)
            for name in ("vera_lambda_d", "vera_lambda_b"):
                getattr(owner, name)[...] = getattr(stack_owner, name)[...][layer]
    assert max_rel_error(listed(IDS), scanned(IDS)) < 1e-5
    _, grads_listed = loss_and_grads(listed, IDS)
    _, grads_scanned = loss_and_grads(scanned, IDS)
    got = grads_scanned["model"]["layers"]["self_attn"]["q_proj"]["vera_lambda_b"][1]
    want = grads_listed["model"]["layers"][1]["self_attn"]["q_proj"]["vera_lambda_b"]
    assert max_rel_error(got, want) < 1e-4


@pytest.mark.parametrize("path", ["merged", "activation"])
def test_scan_remat_changes_what_the_backward_pass_keeps_not_what_it_computes(torch_llama, path):
    """Each policy of the scanned stack gives the gradient of the stack without rematerialisation; the
    compiled gradient keeps less the less the policy saves (full < dots < none)."""
    model, state = torch_llama
    config = vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS, projection_seed=5)
    grads, temp_bytes = {}, {}
    for policy in scan.SCAN_REMAT:
        scanned = nnx_llama.from_torch(state, nnx_llama.LlamaConfig.from_hf(model.config), scan_layers=True,
                                       scan_remat=policy)
        scanned = vera_nnx.attach(scanned, config, path=path)
        randomise_vectors(scanned)
        _, params, adapter = vera_nnx.split(scanned)
        call = vera_nnx.functional(scanned)

        def loss(trainable):
            return jnp.mean(jnp.square(call(params, adapter.replace(trainable=trainable), IDS)))

        compiled = jax.jit(jax.grad(loss)).lower(adapter.trainable).compile()
        temp_bytes[policy] = compiled.memory_analysis().temp_size_in_bytes
        grads[policy] = compiled(adapter.trainable)
    for policy in ("dots", "full"):
        for got, want in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"]), strict=True):
            assert max_rel_error(got, want) < 1e-5, policy
    assert temp_bytes["full"] < temp_bytes["dots"] < temp_bytes["none"], temp_bytes
    with pytest.raises(ValueError, match="scan_remat must be one of"):
        nnx_llama.LlamaForCausalLM(nnx_llama.LlamaConfig.from_hf(model.config), scan_layers=True, scan_remat="some",
                                   rngs=nnx.Rngs(0))
    assert set(options.SCAN_REMATS) == set(scan.SCAN_REMAT)  # the job's --scan-remat choices
    assert options.SCAN_REMATS[0] == scan.DEFAULT_SCAN_REMAT


@pytest.mark.standard_promotion  # optax's AdamW: a Python float with its int32 step count
@pytest.mark.parametrize("case", ["llama-scanned", "einsum"])
def test_optimizer_trains_only_the_vectors_and_every_param_stays_bit_identical(torch_llama, case):
    build, targets, inputs = CASES[case]
    model = vera_nnx.attach(build(torch_llama), vera_jax.VeraConfig(r=8, target_modules=targets, d_initial=0.5))
    randomise_vectors(model)
    frozen_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    vectors_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, inputs):
        loss, grads = loss_and_grad_state(model, inputs)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, inputs)) for _ in range(3)]
    assert losses[2] < losses[0]
    vectors = len(targets) * 2
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == vectors
    moments = [leaf for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if np.ndim(leaf) > 0]
    assert len(moments) == 2 * vectors  # Adam's two moments, for the vectors only
    assert "vera_projections" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))  # A, B: never Params
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))),
                 frozen_before)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                           nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), vectors_before)
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("case", CASES)
def test_pure_views_give_the_module_views_logits_and_gradients(torch_llama, case):
    """``vera_jax.merge`` over `split`'s params and base graphdef, and `vera_jax.nnx.functional` on either path."""
    build, targets, inputs = CASES[case]
    model = vera_nnx.attach(build(torch_llama), vera_jax.VeraConfig(r=8, target_modules=targets), path="merged")
    randomise_vectors(model)
    graphdef, params, adapter = vera_nnx.split(model)
    views = {"merge": lambda p, a: nnx.merge(graphdef, vera_jax.merge(p, a))(inputs)}
    views |= {path: (lambda call: lambda p, a: call(p, a, inputs))(vera_nnx.functional(model, path=path))
              for path in vera_nnx.PATHS}
    value, grads = loss_and_grads(model, inputs)
    want = vera_jax.paths.flatten(grads)
    for name, view in views.items():
        def loss(trainable):
            return jnp.mean(jnp.square(view(params, adapter.replace(trainable=trainable))))

        got_value, got_grads = jax.jit(jax.value_and_grad(loss))(adapter.trainable)
        assert abs(float(got_value) - float(value)) <= 1e-5 * abs(float(value)), name
        got = vera_jax.paths.flatten(got_grads)
        assert sorted(got) == sorted(want)
        for path, grad in got.items():
            assert max_rel_error(grad, want[path]) < 1e-4, (name, path)
    assert {module.vera_path for module in vera_nnx.adapted_modules(model).values()} == {"merged"}
    shifted = adapter.replace(trainable=jax.tree.map(lambda v: 2 * v, adapter.trainable))
    assert max_rel_error(vera_nnx.functional(model)(params, shifted, inputs), model(inputs)) > 1e-3  # the adapter's
    with pytest.raises(ValueError, match="adapts .* but the model's VeRA adapts"):
        vera_nnx.functional(model)(params, adapter.replace(config=vera_jax.VeraConfig(r=4, target_modules=targets)),
                                   inputs)
    unmerged = vera_jax.unmerge(vera_jax.merge(params, adapter), adapter)
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])  # noqa: E731
    assert max_rel_error(flat(unmerged), flat(params)) < 1e-5


def test_checkpoint_of_an_nnx_adapter_restores_into_a_fresh_model(tmp_path, torch_llama):
    config = vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS)
    trained = vera_nnx.attach(llama(torch_llama, scan=True), config)
    randomise_vectors(trained)
    vera_jax.checkpoint.save(tmp_path / "adapter", vera_nnx.split(trained)[2])
    fresh = vera_nnx.attach(llama(torch_llama, scan=True), config)
    assert max_rel_error(fresh(IDS), trained(IDS)) > 1e-3
    vera_nnx.update(fresh, vera_jax.checkpoint.restore(tmp_path / "adapter", vera_nnx.split(fresh)[1]))
    np.testing.assert_array_equal(fresh(IDS), trained(IDS))


@pytest.mark.parametrize("scan", [False, True], ids=["listed", "scanned"])
def test_nnx_llama_reads_and_writes_peft_vera_files(tmp_path, torch_llama, scan):
    """PEFT's own files load into the NNX Llama and give PEFT's PyTorch logits; the NNX Llama's adapter,
    written as PEFT files (a scanned stack per layer), loads into PEFT and gives the NNX logits."""
    import peft
    import torch

    stacks = ("model/layers",) if scan else ()
    torch_model, _ = torch_llama
    peft_model = peft.get_peft_model(torch_model, peft.VeraConfig(r=8, target_modules=list(LLAMA_TARGETS),
                                                                  projection_prng_key=11, save_projection=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape) * 0.5)
        reference = peft_model(torch.tensor(np.asarray(IDS))).logits.numpy()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.unload()
    model = vera_nnx.attach(llama(torch_llama, scan=scan), vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS))
    _, params, _ = vera_nnx.split(model)
    vera_nnx.update(model, vera_jax.peft.load_adapter(tmp_path / "peft", params, stacks=stacks))
    assert max_rel_error(model(IDS), reference) < 1e-5

    randomise_vectors(model, seed=4)
    vera_jax.peft.save_adapter(tmp_path / "ours", vera_nnx.split(model)[2], params, stacks=stacks)
    served = peft.PeftModel.from_pretrained(tiny_llama.torch_llama(), tmp_path / "ours")
    with torch.no_grad():
        logits = served(torch.tensor(np.asarray(IDS))).logits.numpy()
    assert max_rel_error(logits, model(IDS)) < 1e-5
    assert max_rel_error(logits, reference) > 1e-3  # the vectors written are the NNX model's, not PEFT's


def test_peft_files_of_a_stack_need_its_root_and_every_layer(tmp_path, torch_llama):
    model = vera_nnx.attach(llama(torch_llama, scan=True), vera_jax.VeraConfig(r=8, target_modules=LLAMA_TARGETS))
    _, params, adapter = vera_nnx.split(model)
    with pytest.raises(ValueError, match=r"'model/layers/[a-z_/]+' is a stack of 2 layers, and PyTorch names "
                                         r"each layer: pass .* stacks=\('model/layers',\)"):
        vera_jax.peft.save_adapter(tmp_path / "a", adapter, params)
    vera_jax.peft.save_adapter(tmp_path / "a", adapter, params, stacks=("model/layers",))
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "a" / vera_jax.peft.WEIGHTS_FILE
    tensors = load_file(weights)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d"]
    save_file(tensors, weights)
    with pytest.raises(vera_jax.peft.AdapterFileError,
                       match=r"model.layers.self_attn.v_proj \(per layer\): has \[1, 2\] layers, but the stack .* has 2"):
        vera_jax.peft.load_adapter(tmp_path / "a", params, stacks=("model/layers",))


def test_linen_scan_stack_with_the_layer_axis_at_1():
    stack, unrolled = nnx_models.LinenScanStack(), nnx_models.LinenUnrolled()
    params = stack.init(jax.random.key(0), X)["params"]
    assert params["blocks"]["up"]["kernel"].shape == (nnx_models.D, 3, 2 * nnx_models.D)
    config = vera_jax.VeraConfig(r=8, target_modules=("up", "down"), kernel_axes={".*": "ilo"})
    adapter = vera_jax.init_adapter(params, config)
    assert adapter.trainable["blocks"]["up"]["vera_lambda_b"].shape == (3, 2 * nnx_models.D)
    adapter = adapter.replace(trainable=jax.tree.map(
        lambda leaf: jax.random.normal(jax.random.key(2), leaf.shape), adapter.trainable))
    apply = lambda p, x: stack.apply({"params": p}, x)  # noqa: E731
    merged = vera_jax.adapt(apply, adapter)(params, X)
    activation = vera_jax.adapt(apply, adapter, path="activation")(params, X)
    assert max_rel_error(activation, merged) < 1e-5
    flat_config = vera_jax.VeraConfig(r=8, target_modules=("up", "down"))
    flat_params = nnx_models.unrolled_params(params, 3)
    flat_adapter = vera_jax.init_adapter(flat_params, flat_config).replace(trainable={
        f"blocks_{i}": jax.tree.map(lambda leaf: leaf[i], adapter.trainable["blocks"]) for i in range(3)})
    unrolled_out = vera_jax.adapt(lambda p, x: unrolled.apply({"params": p}, x), flat_adapter)(flat_params, X)
    assert max_rel_error(merged, unrolled_out) < 1e-5

    def loss(trainable, path):
        return jnp.mean(jnp.square(vera_jax.adapt(apply, adapter.replace(trainable=trainable), path=path)(params, X)))

    for got, want in zip(jax.tree.leaves(jax.grad(loss)(adapter.trainable, "activation")),
                         jax.tree.leaves(jax.grad(loss)(adapter.trainable, "merged")), strict=True):
        assert max_rel_error(got, want) < 1e-4


def test_dropout_on_a_linen_scan_stack_with_the_layer_axis_at_1():
    stack = nnx_models.LinenScanStack()
    params = stack.init(jax.random.key(0), X)["params"]
    config = vera_jax.VeraConfig(r=8, target_modules=("up", "down"), kernel_axes={".*": "ilo"}, dropout=0.5)
    adapter = vera_jax.init_adapter(params, config)
    adapter = adapter.replace(trainable=jax.tree.map(jnp.ones_like, adapter.trainable))
    run = vera_jax.adapt(lambda p, x: stack.apply({"params": p}, x), adapter, path="activation",
                         dropout_rng=jax.random.key(3))
    without = vera_jax.adapt(lambda p, x: stack.apply({"params": p}, x), adapter, path="activation")(params, X)
    with_dropout = run(params, X)
    assert bool(jnp.all(jnp.isfinite(with_dropout))) and max_rel_error(with_dropout, without) > 1e-3
    np.testing.assert_array_equal(run(params, X), with_dropout)


class OneLinear(nnx.Module):
    def __init__(self):
        self.proj = nnx.Linear(nnx_models.D, nnx_models.D, rngs=nnx.Rngs(1))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def test_vera_dropout_on_nnx_draws_from_the_key_on_the_activation_path_and_is_unbiased():
    """`functional`'s ``dropout_key`` drops VeRA's input (of a scanned stack, each layer from its own key); no key, no
    dropout; the mean over keys of a linear layer's output is the output without dropout; the merged path refuses."""
    config = vera_jax.VeraConfig(r=8, target_modules=("blocks",), dropout=0.5)
    stack = vera_nnx.attach(nnx_models.RematScanStack(nnx.Rngs(0)), config, path="activation")
    randomise_vectors(stack)
    _, params, adapter = vera_nnx.split(stack)
    call = jax.jit(vera_nnx.functional(stack))
    without = call(params, adapter, X)
    np.testing.assert_array_equal(stack(X), without)
    one, again, other = (call(params, adapter, X, dropout_key=jax.random.key(k)) for k in (7, 7, 8))
    np.testing.assert_array_equal(one, again)
    assert float(jnp.max(jnp.abs(one - other))) > 1e-3 and float(jnp.max(jnp.abs(one - without))) > 1e-3

    layer = vera_nnx.attach(OneLinear(), dataclasses.replace(config, target_modules=("proj",)), path="activation")
    randomise_vectors(layer)
    graphdef, params, adapter = vera_nnx.split(layer)
    call = vera_nnx.functional(layer)
    keys = jax.random.split(jax.random.key(0), 4096)
    dropped = jax.jit(jax.vmap(lambda key: call(params, adapter, X, dropout_key=key)))(keys)
    base = nnx.merge(graphdef, params)(X)  # W0 x + bias
    delta, mean_delta = call(params, adapter, X) - base, jnp.mean(dropped, axis=0) - base
    assert float(jnp.std(dropped[:, 0, 0])) > 1e-3  # the masks vary across keys
    assert max_rel_error(mean_delta, delta) < 0.05  # 4096 draws: E[dropout(x)] = x
    with pytest.raises(ValueError, match="merged path never computes"):
        vera_nnx.functional(layer, path="merged")(params, adapter, X, dropout_key=jax.random.key(1))


class Unknown(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.ones((4, 2, 3)))

    def __call__(self, x):
        return jnp.einsum("bi,ijk->bjk", x, self.kernel[...])


class WithUnknown(nnx.Module):
    def __init__(self):
        self.proj = Unknown()

    def __call__(self, x):
        return self.proj(x)


class Ambiguous(nnx.Module):
    def __init__(self):
        self.proj = nnx.Einsum("BND,NDH->BNH", (2, 4, 3), rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


@pytest.mark.parametrize("build, config, message", [
    (einsum_model, dict(target_modules=("query",)), r"matches no module of this EinsumAttention. Modules with a weight"),
    (WithUnknown, dict(target_modules=("proj",)),
     r"'proj' is a Unknown, a module vera_jax does not know; its weights are {'kernel': \(4, 2, 3\)}. Add a VeraConfig.kernel_axes rule naming its weight"),
    (Ambiguous, dict(target_modules=("proj",)), r"kernel axis 'N' in both the input and the output.*ambiguous"),
    (einsum_model, dict(target_modules=("q_einsum",), kernel_axes={"q_einsum": "lioo"}),
     r"Kernel axis roles 'lioo' for 'q_einsum' name 4 axes, but its kernel has shape \(16, 4, 4\)"),
    (WithUnknown, dict(target_modules=("proj",), kernel_axes={"proj": "ilo"}),
     r"'proj' has its stack's layer axis at position 1 \(roles 'ilo'\).*build and scan the stack over axis 0"),
])
def test_bad_input_names_the_path_and_the_fix(build, config, message):
    with pytest.raises(ValueError, match=message):
        vera_nnx.attach(build(), vera_jax.VeraConfig(r=4, **config))


def test_unknown_module_works_with_a_rule_and_a_layer_axis_that_does_not_fit_is_refused():
    model = vera_nnx.attach(WithUnknown(), vera_jax.VeraConfig(r=4, target_modules=("proj",),
                                                               kernel_axes={"proj": "ioo"}))
    randomise_vectors(model)
    _, params, adapter = vera_nnx.split(model)
    assert adapter.trainable["proj"]["vera_lambda_b"].shape == (6,)
    x = jnp.ones((2, 4))
    assert max_rel_error(model(x), nnx.merge(*vera_nnx.split(model)[:1], vera_jax.merge(params, adapter))(x)) < 1e-6
    with pytest.raises(ValueError, match=r"Kernel axis roles 'lioo' for 'proj' name 4 axes, but its kernel has shape \(4, 2, 3\)"):
        vera_nnx.attach(WithUnknown(), vera_jax.VeraConfig(r=4, target_modules=("proj",), kernel_axes={"proj": "lioo"}))


def test_attaching_twice_is_refused(torch_llama):
    config = vera_jax.VeraConfig(r=4, target_modules=LLAMA_TARGETS)
    model = vera_nnx.attach(llama(torch_llama, scan=True), config)
    with pytest.raises(ValueError, match="VeRA is already attached to this model"):
        vera_nnx.attach(model, config)


def test_remat_body_in_a_scan_runs_unchanged_on_both_paths():
    config = vera_jax.VeraConfig(r=8, target_modules=("blocks",))
    models = {}
    for path in ("merged", "activation"):
        models[path] = vera_nnx.attach(nnx_models.RematScanStack(nnx.Rngs(0)), config, path=path)
        assert models[path].blocks.vera_lambda_b.shape == (3, nnx_models.D)
        randomise_vectors(models[path])
    loss_m, grads_m = loss_and_grads(models["merged"], X)
    loss_a, grads_a = loss_and_grads(models["activation"], X)
    base = nnx_models.RematScanStack(nnx.Rngs(0))(X)
    assert max_rel_error(models["merged"](X), base) > 1e-3  # VeRA changes the output
    assert abs(float(loss_a) - float(loss_m)) <= 1e-5 * abs(float(loss_m))
    for got, want in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_m), strict=True):
        assert max_rel_error(got, want) < 1e-4


def test_update_with_vectors_that_do_not_fit_changes_nothing():
    model = vera_nnx.attach(einsum_model(), vera_jax.VeraConfig(r=8, target_modules=EINSUM_TARGETS))
    randomise_vectors(model)
    before = model(X)
    _, _, adapter = vera_nnx.split(model)
    trainable = jax.tree.map(lambda leaf: leaf + 1.0, adapter.trainable)
    trainable["kv_einsum"]["vera_lambda_b"] = jnp.zeros((3,))
    with pytest.raises(ValueError, match=r"Vectors of 'kv_einsum' have shapes lambda_d \(8,\) and lambda_b \(3,\)"):
        vera_nnx.update(model, adapter.replace(trainable=trainable))
    np.testing.assert_array_equal(model(X), before)


SHARDED_NNX = """
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import nnx_models, vera_jax, vera_jax.nnx as vera_nnx
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
config = vera_jax.VeraConfig(r=8, target_modules=("heads", "values", "mix", "up", "down"), d_initial=0.5)
with jax.set_mesh(mesh):
    sharded = {path: vera_nnx.attach(nnx_models.ShardedStack(nnx.Rngs(0)), config, path=path)
               for path in vera_nnx.PATHS}
with nnx.use_eager_sharding(False):
    plain = vera_nnx.attach(nnx_models.ShardedStack(nnx.Rngs(0)), config)
model = sharded["merged"]
specs = {"/".join(map(str, path)): tuple(variable.get_value().sharding.spec)
         for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(vera_nnx.VeraVector,
                                                                          vera_nnx.VeraProjection)))}
meshes = {variable.get_value().sharding.mesh for _, variable in nnx.to_flat_state(nnx.state(model))}
print("specs", sorted(specs.items()))
print("one_mesh", meshes == {mesh})
print("partition_spec", tuple(nnx.get_partition_spec(nnx.state(model)).blocks.up.vera_lambda_b.get_value()))
x = jax.random.normal(jax.random.key(1), (4, 6, nnx_models.D))
rows = jax.device_put(x, NamedSharding(mesh, P("data")))
with jax.set_mesh(mesh):
    logits = {path: nnx.jit(lambda m, x: m(x))(m, rows) for path, m in sharded.items()}
print("merged_vs_activation", float(np.max(np.abs(logits["merged"] - logits["activation"]))
                                    / np.max(np.abs(logits["activation"]))))

def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x))),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

base = nnx.All(nnx.Param, nnx.Not(vera_nnx.VeraVector))
before = jax.tree.map(np.asarray, nnx.state(model, base))
losses = {}
for name, m, inputs in (("sharded", model, rows), ("plain", plain, x)):
    optimizer = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.LoRAParam)
    with jax.set_mesh(mesh):
        losses[name] = np.array([float(nnx.jit(step)(m, optimizer, inputs)) for _ in range(3)])
print("losses", losses["sharded"].tolist())
print("loss_rel", float(np.max(np.abs(losses["sharded"] - losses["plain"]) / losses["plain"])))
after = jax.tree.map(np.asarray, nnx.state(model, base))
print("params_identical", len(jax.tree.leaves(before)) == 5 and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))))
print("kept_sharding", tuple(model.blocks.up.vera_lambda_b.get_value().sharding.spec))
"""


def test_sharded_kernels_shard_their_vectors_and_train_like_one_device():
    """nnx.with_partitioning kernels on a (data 2, model 4) mesh of 8 simulated CPU devices."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "XLA_FLAGS": tiny_run.xla_flags(8), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SHARDED_NNX], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert eval(printed["specs"]) == [  # lambda_b follows the kernel's leading output axis; the rest is replicated
        ("blocks/down/vera_lambda_b", (None, None)), ("blocks/down/vera_lambda_d", (None, None)),
        ("blocks/up/vera_lambda_b", (None, "model")), ("blocks/up/vera_lambda_d", (None, None)),
        ("heads/vera_lambda_b", ("model",)), ("heads/vera_lambda_d", (None,)),
        ("mix/vera_lambda_b", (None,)), ("mix/vera_lambda_d", (None,)),
        ("values/vera_lambda_b", (None,)), ("values/vera_lambda_d", (None,)),
        ("vera_projections/A", (None, None)), ("vera_projections/B", (None, None)),
    ]
    assert printed["one_mesh"] == "True"
    assert printed["partition_spec"] == "(None, 'model')"
    assert float(printed["merged_vs_activation"]) < 1e-5
    losses = eval(printed["losses"])
    assert losses[-1] < losses[0]
    assert float(printed["loss_rel"]) < 1e-5
    assert printed["params_identical"] == "True"
    assert printed["kept_sharding"] == "(None, 'model')"


class FusedKV(nnx.Module):
    """A module vera_jax does not know: Gemma's fused kv einsum, its output axes first (C, B, S, K, H)."""

    def __init__(self, rngs: nnx.Rngs):
        self.equation = "BSD,CKDH->CBSKH"
        self.w = nnx.Param(jax.random.normal(rngs.params(), (2, 3, 4, 5)))

    def __call__(self, x):
        return jnp.einsum(self.equation, x, self.w[...])


class OutProjection(nnx.Module):
    """Another unknown kind: an output projection (N, H, D) by 'BTNH,NHD->BTD'."""

    def __init__(self, rngs: nnx.Rngs):
        self.einsum_str = "BTNH,NHD->BTD"
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 2, 6)))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.o = OutProjection(rngs)


class Layers(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(rngs) for _ in range(2)])

    def __call__(self, x):
        return sum(layer.o(x) for layer in self.layers)


def test_an_unknown_module_runs_the_einsum_its_rule_gives_with_its_output_axes_where_the_equation_puts_them():
    x = jax.random.normal(jax.random.key(2), (2, 2, 4))  # batch = seq = 2: (C, B, S, K, H) would broadcast
    rule = vera_jax.VeraConfig(r=4, target_modules=("kv",), kernel_axes={"kv": "w:BSD,CKDH->CBSKH"})

    class Holder(nnx.Module):
        def __init__(self):
            self.kv = FusedKV(nnx.Rngs(0))

        def __call__(self, x):
            return self.kv(x)

    outputs = {}
    for path in vera_nnx.PATHS:
        model = vera_nnx.attach(Holder(), rule, path=path)
        assert model.kv.vera_lambda_b.shape == (2 * 3 * 5,)
        randomise_vectors(model)
        outputs[path] = model(x)
        graphdef, params, adapter = vera_nnx.split(model)
        assert max_rel_error(outputs[path], nnx.merge(graphdef, vera_jax.merge(params, adapter))(x)) < 1e-6
    np.testing.assert_allclose(outputs["activation"], outputs["merged"], rtol=1e-5, atol=1e-6)

    roles_only = vera_jax.VeraConfig(r=4, target_modules=("kv",), kernel_axes={"kv": "w:ooio"})
    vera_nnx.attach(Holder(), roles_only, path="merged")  # the merged path needs roles only
    with pytest.raises(ValueError, match=r"'kv' is a FusedKV, described by a roles rule only, which does not say where "
                                         r"its output puts the output axes.*'w:X,KERNEL->Y'"):
        vera_nnx.attach(Holder(), roles_only, path="activation")


def test_an_unknown_module_gets_the_rule_computed_from_its_einsum_keyed_for_every_layer():
    config = dict(r=4, target_modules=("o",))
    with pytest.raises(ValueError) as refused:
        vera_nnx.attach(Layers(nnx.Rngs(0)), vera_jax.VeraConfig(**config))
    message = str(refused.value)
    assert ("Target 'layers/0/o' is a OutProjection, a module vera_jax does not know; its weights are {'w': (4, 2, 6)} "
            "and it holds the einsum 'BTNH,NHD->BTD'") in message
    suggested = re.search(r"add kernel_axes=(\{.*\}) to the VeraConfig", message).group(1)
    assert suggested == r"{'layers/\\d+/o': 'w:BTNH,NHD->BTD'}" and "roles 'iio'" in message
    model = vera_nnx.attach(Layers(nnx.Rngs(0)), vera_jax.VeraConfig(**config, kernel_axes=ast.literal_eval(suggested)),
                            path="activation")
    assert [layer.o.vera_lambda_b.shape for layer in model.layers] == [(6,), (6,)]  # out = D, not N * H
    randomise_vectors(model)
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 2))
    graphdef, params, adapter = vera_nnx.split(model)
    assert max_rel_error(model(x), nnx.merge(graphdef, vera_jax.merge(params, adapter))(x)) < 1e-6
