"""K adapters sharing A and B: stacking, mixed-adapter batches, and training under jax.vmap."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_rel_error, random_like

import families
import nnx_models
import tiny_run
import vera_jax
from vera_jax.layers import LAMBDA_D
from vera_jax.paths import flatten, unflatten

K = 3


def _adapters(family, count=K):
    return [families.random_adapter(family, seed=10 + k) for k in range(count)]


@pytest.mark.hf_flax
def test_stack_and_unstack_round_trip():
    family = families.bert()
    adapters = _adapters(family)
    stacked = vera_jax.stack(adapters)
    assert isinstance(stacked, vera_jax.Adapter) and vera_jax.num_adapters(stacked) == K
    assert stacked.trainable["classifier"]["kernel"].shape == (K, 32, 3)
    assert stacked.config == family.config
    # A and B are held once, not K times.
    assert stacked.projections.A.shape == adapters[0].projections.A.shape == (8, 32)
    np.testing.assert_array_equal(stacked.projections.B, adapters[0].projections.B)
    unstacked = vera_jax.unstack(stacked)
    assert len(unstacked) == K
    for original, again in zip(adapters, unstacked):
        assert jax.tree.structure(again) == jax.tree.structure(original)
        jax.tree.map(np.testing.assert_array_equal, again, original)


@pytest.mark.hf_flax
def test_adapters_of_different_configs_do_not_stack():
    family = families.bert()
    adapter = vera_jax.init_adapter(family.params, family.config)
    other = vera_jax.init_adapter(family.params, dataclasses.replace(family.config, r=4))
    with pytest.raises(ValueError, match=r"Adapter 1 has another config than adapter 0 \(fields \['r'\]\)"):
        vera_jax.stack([adapter, other])
    reseeded = vera_jax.init_adapter(family.params, dataclasses.replace(family.config, projection_seed=1))
    with pytest.raises(ValueError, match=r"Adapter 2 has another config .*\['projection_seed'\].*one A/B"):
        vera_jax.stack([adapter, adapter, reseeded])
    flat = flatten(adapter.trainable)
    reshaped = adapter.replace(trainable=unflatten(flat | {"classifier/bias": jnp.zeros(4)}))
    with pytest.raises(ValueError, match="Adapter 1 does not match adapter 0"):
        vera_jax.stack([adapter, reshaped])
    with pytest.raises(ValueError, match="stack needs at least one"):
        vera_jax.stack([])
    with pytest.raises(ValueError, match="Not a stacked adapter"):
        vera_jax.num_adapters(adapter)  # one adapter: its leaves have no common leading axis


@pytest.mark.hf_flax
@pytest.mark.parametrize("build", [families.bert, families.gpt2, families.llama], ids=lambda f: f.__name__)
def test_a_mixed_batch_gives_each_example_its_own_adapters_logits(build):
    family = build()
    adapters = _adapters(family)
    inputs = jnp.concatenate([family.inputs] * 3)  # 6 examples
    ids = jnp.array([2, 0, 1, 1, 0, 2])
    mixed = jax.jit(lambda p, x, i: vera_jax.adapt_mixed(family.apply, vera_jax.stack(adapters), i)(
        p, x))(family.params, inputs, ids)
    for k, adapter in enumerate(adapters):
        alone = vera_jax.adapt(family.apply, adapter, path="activation")(family.params, inputs)
        rows = np.flatnonzero(np.asarray(ids) == k)
        assert max_rel_error(np.asarray(mixed)[rows], np.asarray(alone)[rows]) < 1e-5, k


@pytest.mark.hf_flax
def test_adapter_ids_out_of_range():
    family = families.bert()
    stacked = vera_jax.stack(_adapters(family))
    with pytest.raises(ValueError, match=r"adapter_ids span 0..3, but 3 adapters are stacked; ids must be in 0..2"):
        vera_jax.adapt_mixed(family.apply, stacked, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="must be a 1-D integer array"):
        vera_jax.adapt_mixed(family.apply, stacked, jnp.array([0.0, 1.0]))
    # Under jit the ids are not known in advance: an id out of range gives NaN, never another adapter's output.
    run = jax.jit(lambda i: vera_jax.adapt_mixed(family.apply, stacked, i)(family.params, family.inputs))
    logits = np.asarray(run(jnp.array([1, 7])))
    assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1]))


def _with_lambda_d(adapter, value):
    """The adapter with every lambda_d entry set to ``value`` (one config: such adapters stack)."""
    flat = flatten(adapter.trainable)
    return adapter.replace(trainable=unflatten(
        {path: jnp.full_like(leaf, value) if path.endswith(LAMBDA_D) else leaf for path, leaf in flat.items()}))


@pytest.mark.hf_flax
@pytest.mark.parametrize("adapters_per_pass", [None, 1, 2])  # all 3 at once; a scan of 3; a pass of 2, then 1
def test_vmapped_training_equals_separate_runs(adapters_per_pass):
    family = families.bert()
    initial = vera_jax.init_adapter(family.params, family.config)
    d_initials = (1e-7, 0.1, 1.0)  # the paper's sweep: only the initial lambda_d differs
    starts = [_with_lambda_d(initial, d) for d in d_initials]
    labels = jnp.array([0, 2])
    # SGD keeps the comparison well-conditioned: Adam divides by sqrt(v), which magnifies the ulp-level
    # differences of batched (vmapped) matmuls wherever a gradient is close to zero.
    tx = optax.sgd(0.5, momentum=0.9)

    def step(adapter, opt_state):
        """One step of one adapter: takes and returns an Adapter, differentiating only its trainable tree."""
        def loss_fn(trainable):
            logits = vera_jax.adapt(family.apply, adapter.replace(trainable=trainable), path="activation")(
                family.params, family.inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapter.trainable)
        updates, opt_state = tx.update(grads, opt_state, adapter.trainable)
        return adapter.replace(trainable=optax.apply_updates(adapter.trainable, updates)), opt_state, loss

    stacked = vera_jax.stack(starts)
    state = (stacked, jax.vmap(tx.init)(stacked.trainable))
    vmapped = jax.jit(vera_jax.map_adapters(step, (0, 0), adapters_per_pass))
    for _ in range(3):
        *state, losses = vmapped(*state)
    trained = state[0]
    # The Adapter fn returns comes back stacked: trainable leaves on the K axis, A and B once and unchanged.
    assert isinstance(trained, vera_jax.Adapter) and vera_jax.num_adapters(trained) == K
    assert trained.config == family.config and trained.generator == initial.generator
    assert trained.projections.A.shape == initial.projections.A.shape  # no K axis
    np.testing.assert_array_equal(trained.projections.A, initial.projections.A)
    np.testing.assert_array_equal(trained.projections.B, initial.projections.B)
    separate = []
    for start in starts:
        single = (start, tx.init(start.trainable))
        for _ in range(3):
            *single, _ = jax.jit(step)(*single)
        separate.append(single[0])
    for k, (got, want) in enumerate(zip(vera_jax.unstack(trained), separate)):
        assert jax.tree.structure(got.trainable) == jax.tree.structure(want.trainable)
        assert not np.array_equal(got.trainable["classifier"]["bias"], starts[k].trainable["classifier"]["bias"])
        for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"adapter {k}")
    assert losses.shape == (K,)


def test_map_adapters_over_one_adapter_is_the_function_itself():
    fn = lambda w, x: (jnp.tanh(x @ w), w.sum())  # noqa: E731
    w, x = jax.random.normal(jax.random.key(0), (4, 3)), jax.random.normal(jax.random.key(1), (5, 4))
    got = jax.jit(vera_jax.map_adapters(fn, (0, None)))(w[None], x)
    want = fn(w, x)
    assert [g.shape for g in got] == [(1, 5, 3), (1,)]
    for g, v in zip(got, want):
        np.testing.assert_array_equal(g[0], v)


def test_map_adapters_rejects_what_it_cannot_map():
    step = lambda trainable, batch: trainable  # noqa: E731
    with pytest.raises(ValueError, match="in_axes must hold 0"):
        vera_jax.map_adapters(step, (1, None))
    with pytest.raises(ValueError, match="adapters_per_pass must be a positive integer"):
        vera_jax.map_adapters(step, (0, None), adapters_per_pass=0)
    with pytest.raises(ValueError, match="sizes \\['3', '4'\\]"):
        vera_jax.map_adapters(step, (0, 0))(jnp.zeros((3, 2)), jnp.zeros((4, 2)))


def test_adapters_per_pass_fills_a_cpu_pass_and_leaves_accelerators_whole():
    assert vera_jax.adapters_per_pass(512, "cpu") == 2
    assert vera_jax.adapters_per_pass(4096, "cpu") == 1
    assert vera_jax.adapters_per_pass(64, "cpu") == 16
    assert vera_jax.adapters_per_pass(512, "gpu") is None


SHARDED_MIXED_BATCH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import families, vera_jax
assert jax.device_count() == 8, jax.devices()
family = families.bert()
stacked = vera_jax.stack([families.random_adapter(family, seed=10 + k) for k in range(3)])
inputs = jnp.concatenate([family.inputs] * 4)  # 8 examples, one per device
ids = jnp.array([2, 0, 1, 1, 0, 2, 2, 1])
mixed = lambda p, x, i: vera_jax.adapt_mixed(family.apply, stacked, i)(p, x)
mesh = Mesh(np.array(jax.devices()), ("data",))
rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
sharded = jax.jit(mixed, in_shardings=(replicated, rows, rows), out_shardings=rows)
out = sharded(family.params, jax.device_put(inputs, rows), jax.device_put(ids, rows))
assert out.sharding.spec == P("data"), out.sharding
want = jax.jit(mixed)(family.params, inputs, ids)
print("max_rel", float(np.max(np.abs(np.asarray(out) - np.asarray(want))) / np.max(np.abs(np.asarray(want)))))
"""


@pytest.mark.hf_flax
def test_a_mixed_batch_sharded_over_8_devices_equals_one_device(tmp_path):
    """The batch (examples and their adapter ids) split over 8 simulated CPU devices, under jax.jit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "XLA_FLAGS": tiny_run.xla_flags(8), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SHARDED_MIXED_BATCH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("max_rel")[1]) < 1e-5


class FusedOutputFirst(nn.Module):
    """A linen Einsum whose output puts its output axes first (Gemma's fused kv), and a DenseGeneral (D, N, H)."""

    @nn.compact
    def __call__(self, x):
        kv = nn.Einsum((2, 3, x.shape[-1], 4), "BSD,CKDH->CBSKH", name="kv")(x)  # (2, B, S, 3, 4)
        q = nn.DenseGeneral((3, 4), name="q")(x)  # (B, S, 3, 4)
        return jnp.einsum("bskh,cbskh->bsc", q, kv)


@pytest.mark.parametrize("case", ["n-d kernels", "stack, layer axis 1", "stack, layer axis 0"])
def test_a_mixed_batch_runs_n_d_kernels_and_stacked_layers(case):
    """Each example's own adapter on kernels of rank 3 and 4 and on a linen nn.scan stack (MaxText's layer
    axis 1, and axis 0), equal to that adapter alone on the activation path."""
    x = jax.random.normal(jax.random.key(0), (6, 5, nnx_models.D))
    if case == "n-d kernels":
        model, kernel_axes, targets = FusedOutputFirst(), {"kv": "ooio", "q": "ioo"}, ("kv", "q")
    else:
        axis = 1 if case.endswith("1") else 0
        model = nnx_models.LinenScanStack() if axis else LinenScanStackAxis0()
        kernel_axes, targets = {".*": "ilo" if axis else "lio"}, ("up", "down")
    params = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    config = vera_jax.VeraConfig(r=4, target_modules=targets, kernel_axes=kernel_axes)
    initial = vera_jax.init_adapter(params, config)
    adapters = [initial.replace(trainable=random_like(initial.trainable, jax.random.key(k), scale=0.5))
                for k in range(3)]
    ids = jnp.array([2, 0, 1, 1, 0, 2])
    mixed = jax.jit(lambda p, inputs: vera_jax.adapt_mixed(apply, vera_jax.stack(adapters), ids)(p, inputs))(params, x)
    base = apply(params, x)
    for k, adapter in enumerate(adapters):
        alone = vera_jax.adapt(apply, adapter, path="activation")(params, x)
        rows = np.flatnonzero(np.asarray(ids) == k)
        assert max_rel_error(alone[rows], base[rows]) > 1e-3
        assert max_rel_error(np.asarray(mixed)[rows], np.asarray(alone)[rows]) < 1e-5, k


class LinenScanStackAxis0(nn.Module):
    """`nnx_models.LinenScanStack` with the layer axis first: kernels (L, in, out)."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nnx_models.LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)
