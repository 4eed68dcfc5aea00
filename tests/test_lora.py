"""VeRA as LoRA factors: exact at rank r, the best rank-k approximation below it (checked against the SVD
of the full delta), stacks written per layer, and refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import random_like

import families
import vera_jax
from vera_jax import peft as vera_peft
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
    mixed = {"conv": {"kernel": np.ones((6, 4), np.float32)}, "dense": {"kernel": np.ones((4, 6), np.float32)}}
    adapter = vera_jax.init_adapter(mixed, vera_jax.VeraConfig(r=2, target_modules=("conv", "dense"),
                                                               kernel_axes={"conv": "oi"}))
    with pytest.raises(ValueError, match=r"mix GPT-2's Conv1D \(out, in\) with others: \['io', 'oi'\]"):
        lora_factors(adapter, mixed)


FUSED = {"attn": {"w": np.zeros((2, 3, 4, 5), np.float32)}}  # Gemma's kv (C, K, D, H): BSD,CKDH->CBSKH


def fused_adapter():
    config = vera_jax.VeraConfig(r=3, target_modules=("attn",), kernel_axes={"attn": "w:BSD,CKDH->CBSKH"})
    adapter = vera_jax.init_adapter(FUSED, config)
    return adapter.replace(trainable=random_like(adapter.trainable, jax.random.key(1), scale=0.5))


def test_an_einsum_kernel_is_its_out_in_matrix_and_a_name_map_splits_a_fused_one():
    adapter = fused_adapter()
    kernel = np.asarray(vera_jax.merge(FUSED, adapter)["attn"]["w"], np.float64)  # the delta, as (C, K, D, H)
    torch_weights = np.transpose(kernel, (0, 1, 3, 2)).reshape(2, 3 * 5, 4)  # k_proj, v_proj: (K*H, D) each
    names = ((r"attn", ("k_proj", "v_proj")),)
    factors = lora_factors(adapter, FUSED, names=names)
    assert [factor.name for factor in factors] == ["k_proj", "v_proj"]
    for factor, weight in zip(factors, torch_weights):
        np.testing.assert_allclose(factor.lora_b @ factor.lora_a, weight, rtol=1e-5, atol=1e-7)
    (whole,) = lora_factors(adapter, FUSED)  # unsplit: one nn.Linear (C*K*H, D)
    np.testing.assert_allclose(whole.lora_b @ whole.lora_a, torch_weights.reshape(30, 4), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"splits 'attn' into 3 PyTorch layers .* first output axis has 2 entries"):
        lora_factors(adapter, FUSED, names=((r"attn", ("q", "k", "v")),))
    with pytest.raises(ValueError, match=r"uses 'name', which its regex does not capture"):
        lora_factors(adapter, FUSED, names=((r"attn", "{name}"),))


def test_peft_vera_files_refuse_a_split_fused_kernel(tmp_path):
    with pytest.raises(ValueError, match=r"'attn' is a fused kernel written as \['k_proj', 'v_proj'\].*Export this "
                                         r"adapter as LoRA"):
        vera_peft.save_adapter(tmp_path / "adapter", fused_adapter(), FUSED, names=((r"attn", ("k_proj", "v_proj")),))
    assert not (tmp_path / "adapter").exists()
