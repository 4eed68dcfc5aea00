"""VeRA as LoRA factors: exact at rank r, the best rank-k approximation below it (checked against the SVD
of the full delta), stacks written per layer, and refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import random_like

import families
import vera_jax
from vera_jax.lora import lora_factors
from vera_jax.paths import flatten


@pytest.fixture(scope="module")
def llama():
    family = families.llama()
    adapter = vera_jax.init_adapter(family.params, family.config)
    adapter = adapter.replace(trainable=random_like(adapter.trainable, jax.random.key(4), scale=0.5))
    return family, adapter


def deltas(family, adapter) -> dict[str, np.ndarray]:
    """Each adapted layer's (out, in) delta, from vera_jax.merge: merged kernel minus base kernel."""
    merged, base = flatten(vera_jax.merge(family.params, adapter)), flatten(family.params)
    return {path.removesuffix("/kernel").replace("/", "."): np.asarray(merged[path] - base[path], np.float64).T
            for path in base if path.endswith("kernel") and not np.array_equal(merged[path], base[path])}


def test_full_rank_factors_are_exactly_the_delta(llama):
    family, adapter = llama
    want = deltas(family, adapter)
    factors = lora_factors(adapter, family.params)
    assert sorted(f.name for f in factors) == sorted(want)
    for factor in factors:
        assert factor.lora_a.shape == (8, want[factor.name].shape[1]) and factor.relative_error == 0.0
        np.testing.assert_allclose(factor.lora_b @ factor.lora_a, want[factor.name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_k_is_the_best_rank_k_approximation(llama, rank):
    family, adapter = llama
    want = deltas(family, adapter)
    for factor in lora_factors(adapter, family.params, rank=rank):
        delta = want[factor.name]
        u, s, vt = np.linalg.svd(delta)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young, from the full delta
        approx = factor.lora_b @ factor.lora_a
        assert factor.lora_a.shape[0] == rank
        np.testing.assert_allclose(approx, best, rtol=1e-4, atol=1e-6 * np.abs(delta).max())
        expected_error = np.sqrt(np.sum(s[rank:] ** 2)) / np.sqrt(np.sum(s ** 2))
        assert abs(factor.relative_error - expected_error) < 1e-6
        assert abs(np.linalg.norm(approx - delta) / np.linalg.norm(delta) - expected_error) < 1e-5


def test_refusals_name_the_problem():
    family = families.llama()
    adapter = vera_jax.init_adapter(family.params, family.config)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora_factors(adapter, family.params, rank=0)
    einsum = vera_jax.init_adapter({"proj": {"kernel": np.ones((4, 2, 3), np.float32)}},
                                   vera_jax.VeraConfig(r=2, target_modules=("proj",), kernel_axes={"proj": "ioo"}))
    with pytest.raises(ValueError, match=r"LoRA files describe layers as PyTorch nn.Linear .* axes \['ioo'\]"):
        lora_factors(einsum, {"proj": {"kernel": np.ones((4, 2, 3), np.float32)}})
