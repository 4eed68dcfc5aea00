"""Many adapters on NNX models, scanned or not: mixed-adapter batches (`vera_jax.nnx.mixed`) and K
adapters trained at once by ``jax.vmap`` over their stacked vectors, never copying a kernel per adapter."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_error
from flax import nnx

import nnx_models
import vera_jax
import vera_jax.nnx as vera_nnx
from test_nnx import CASES, llama, randomise_vectors, torch_llama  # noqa: F401 (a fixture)

K = 3
CASE_INPUTS = {  # 4 examples: neither K nor L (2), so that a batched kernel copy would show in the shapes
    "llama": jnp.array([[5, 9, 33, 2, 17], [4, 4, 10, 11, 12], [7, 1, 3, 2, 9], [30, 2, 8, 8, 1]]),
    "einsum": jax.random.normal(jax.random.key(7), (4, 6, nnx_models.D)),
}
IDS = jnp.array([2, 0, 1, 2])


def adapted(torch_llama, case: str, path: str) -> tuple[nnx.Module, jax.Array]:
    build, targets, _ = CASES[case]
    config = vera_jax.VeraConfig(r=8, target_modules=targets, projection_seed=2)
    return vera_nnx.attach(build(torch_llama), config, path=path), CASE_INPUTS[case.split("-")[0]]


def adapters(model: nnx.Module) -> list[vera_jax.Adapter]:
    """K different adapters of ``model`` (its vectors are left as the last one)."""
    found = []
    for seed in range(K):
        randomise_vectors(model, seed=10 + seed)
        found.append(vera_nnx.split(model)[2])
    return found


def intermediate_shapes(jaxpr: jax.extend.core.Jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value an equation computes, inside scans, remats and other sub-programs too."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(var.aval.shape) for var in eqn.outvars if hasattr(var.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes |= intermediate_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes |= intermediate_shapes(sub)
    return shapes


def kernel_copies(jaxpr, model: nnx.Module, counts: set[int]) -> list:
    """Computed values shaped as ``count`` copies of an adapted layer's kernel, for count in ``counts``."""
    kernels = {module.vera_layer.layer.layer_kernel_shape for module in vera_nnx.adapted_modules(model).values()}
    return sorted((count, kernel) for count in counts for kernel in kernels
                  if (count, *kernel) in intermediate_shapes(jaxpr))


@pytest.mark.parametrize("path", vera_nnx.PATHS)
@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_gives_each_example_its_own_adapters_output(torch_llama, case, path):
    model, inputs = adapted(torch_llama, case, path)
    found = adapters(model)
    stacked = vera_jax.stack(found)
    kept = jax.tree.map(np.asarray, nnx.state(model, vera_nnx.VeraVector))
    want = []
    for example, adapter_id in enumerate(IDS.tolist()):
        vera_nnx.update(model, found[adapter_id])
        want.append(model(inputs)[example])
    vera_nnx.update(model, found[-1])
    with vera_nnx.mixed(model, stacked, IDS):
        eager = model(inputs)
    assert max_rel_error(eager, jnp.stack(want)) < 1e-5

    @nnx.jit
    def serve(model, stacked, ids, inputs):
        with vera_nnx.mixed(model, stacked, ids):
            return model(inputs)

    assert max_rel_error(serve(model, stacked, IDS, inputs), jnp.stack(want)) < 1e-5
    after = jax.tree.map(np.asarray, nnx.state(model, vera_nnx.VeraVector))  # the model's vectors are back
    for got, expected in zip(jax.tree.leaves(after), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(got, expected)
    graphdef, state = nnx.split(model)

    def pure(state, stacked, ids, inputs):
        with vera_nnx.mixed(module := nnx.merge(graphdef, state), stacked, ids):
            return module(inputs)

    jaxpr = jax.make_jaxpr(pure)(state, stacked, IDS, inputs).jaxpr
    assert kernel_copies(jaxpr, model, {K, len(IDS)}) == []


def test_mixed_batch_refuses_ids_out_of_range_and_adapters_of_another_config(torch_llama):
    model, inputs = adapted(torch_llama, "llama-scanned", "activation")
    stacked = vera_jax.stack(adapters(model))
    with pytest.raises(ValueError, match=r"adapter_ids span 0..3, but 3 adapters are stacked"):
        with vera_nnx.mixed(model, stacked, jnp.array([0, 1, 2, 3])):
            pass
    other = vera_nnx.attach(llama(torch_llama, scan=True), vera_jax.VeraConfig(r=4, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match=r"but the model's VeRA adapts .* attach VeRA with the adapter's config"):
        with vera_nnx.mixed(other, stacked, IDS):
            pass


@pytest.mark.parametrize("path", vera_nnx.PATHS)
@pytest.mark.parametrize("case", CASES)
def test_k_adapters_train_at_once_by_vmap_over_their_stacked_vectors(torch_llama, case, path):
    """jax.vmap over (K, [L,] ...) vectors with the frozen base shared: each adapter's loss and gradients
    equal its own run; the activation path copies no kernel per adapter, the merged path does (K deltas
    folded into K kernels: use the activation path for many adapters)."""
    model, inputs = adapted(torch_llama, case, path)
    graphdef, _, rest = nnx.split(model, vera_nnx.VeraVector, ...)
    states = []
    for seed in range(K):
        randomise_vectors(model, seed=20 + seed)
        states.append(nnx.state(model, vera_nnx.VeraVector))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def loss(vectors, rest, inputs):  # copy=True: variables of this trace, as nnx.scan needs under jax.grad
        return jnp.mean(jnp.square(nnx.merge(graphdef, vectors, rest, copy=True)(inputs)))

    train = jax.vmap(jax.value_and_grad(loss), in_axes=(0, None, None))
    losses, grads = jax.jit(train)(stacked, rest, inputs)
    for k, state in enumerate(states):
        want_loss, want_grads = jax.value_and_grad(loss)(state, rest, inputs)
        assert abs(float(losses[k]) - float(want_loss)) <= 1e-5 * float(want_loss)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            assert got.shape == (K, *want.shape)
            assert max_rel_error(got[k], want) < 1e-4
    assert bool(kernel_copies(jax.make_jaxpr(train)(stacked, rest, inputs).jaxpr, model, {K})) == (path == "merged")
    if case != "llama-scanned":  # the base's variables closed over from outside the vmap (NNX scans refuse that)
        closed_over = jax.vmap(lambda vectors: jnp.mean(jnp.square(nnx.merge(graphdef, vectors, rest)(inputs))))
        assert max_rel_error(closed_over(stacked), losses) < 1e-5
