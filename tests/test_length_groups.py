"""A batch run as groups of rows of like length: fewer padded tokens, the same optimizer step."""

import jax
import numpy as np
import optax
import pytest

import families
from train.engine import data as data_lib
from train.engine import steps
from train.models.hf_flax import HfFlaxModel
from vera_jax.paths import flatten

LENGTHS = [3, 30, 5, 7, 29, 4, 12, 6]  # one long row pads the whole batch to 32; grouped, the short half pads to 16


def _data(task: str) -> data_lib.TextData:
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 99, n).astype(np.int32) for n in LENGTHS]
    if task == "causal-lm":  # scored answer tokens: a different count in every row
        labels = [(np.arange(n) >= n // 3).astype(np.float32) for n in LENGTHS]
    else:
        labels = rng.integers(0, 3, len(LENGTHS)).astype(np.int32)
    return data_lib.TextData(ids, labels)


def test_groups_sort_a_batch_by_length_and_split_it_evenly():
    data = _data("classification")
    indices = np.array([6, 1, 4, 0, 7, 2, 5, 3])
    groups = data_lib.length_groups(data, indices, 2)
    assert [len(g) for g in groups] == [4, 4]
    assert sorted(np.concatenate(groups)) == sorted(indices)
    lengths = [LENGTHS[i] for i in np.concatenate(groups)]
    assert lengths == sorted(lengths)
    whole = data_lib.collate(data, indices, 0, 64)["input_ids"].size
    apart = sum(data_lib.collate(data, g, 0, 64)["input_ids"].size for g in groups)
    assert (whole, apart) == (8 * 32, 4 * 16 + 4 * 32)
    assert [data_lib.collate(data, g, 0, 64, multiple=m)["input_ids"].shape for g in groups for m in (1, 8)] == [
        (4, 6), (4, 8), (4, 30), (4, 32)]
    with pytest.raises(ValueError, match="3 groups do not divide a batch of 8 rows"):
        data_lib.length_groups(data, indices, 3)


@pytest.mark.parametrize("family, task, groups",
                         [(families.bert, "classification", 2), (families.gpt2, "causal-lm", 4)])
def test_a_step_over_groups_is_the_step_over_the_whole_batch(family, task, groups):
    """The groups' loss sums and counts add up to the batch's mean: per-group means would weigh a short group's
    tokens more (the causal LM's rows score different numbers of tokens). Merging once for all groups (the
    hoisted merge of runs on the merged path) gives that step too, and the same step as merging in each group
    when the model's dropout is on."""
    family = family()
    adapter = families.random_adapter(family)
    data, indices = _data(task), np.arange(len(LENGTHS))
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapter.trainable)
    model = HfFlaxModel(family.model, family.name)
    plain, apply = (jax.jit(steps.make_group_gradients(model.vera_logits("merged", adapter.config), task)),
                    jax.jit(steps.make_apply_gradients(tx)))  # jitted as the training loop jits them
    hoisted, apply_hoisted = (jax.jit(steps.make_merged_group_gradients(model, task)),
                              jax.jit(steps.make_apply_gradients(tx, hoisted=True)))

    def step(batches, hoist=False, rng=None):
        keys = [None if rng is None else jax.random.fold_in(rng, i) for i in range(len(batches))]
        if hoist:
            merged = steps.merged_leaves(family.params, adapter)
            parts = tuple(hoisted(merged, family.params, b, k) for b, k in zip(batches, keys))
            return apply_hoisted(adapter, opt_state, parts, family.params)
        return apply(adapter, opt_state, tuple(plain(adapter, family.params, b, k) for b, k in zip(batches, keys)))

    whole = [data_lib.collate(data, indices, 0, 64)]
    grouped = [data_lib.collate(data, g, 0, 64) for g in data_lib.length_groups(data, indices, groups)]
    reference, _, reference_loss = step(whole)
    for result in (step(grouped), step(grouped, hoist=True)):
        _assert_same_step(result, reference, reference_loss)
    key = jax.random.key(3)
    _assert_same_step(step(grouped, hoist=True, rng=key), *step(grouped, rng=key)[::2])
    moved = max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
                zip(flatten(reference.trainable).values(), flatten(adapter.trainable).values()))
    assert moved > 1e-3  # the step did move the vectors


def _assert_same_step(result, adapter, loss):
    np.testing.assert_allclose(result[2], loss, rtol=1e-5)
    trained = flatten(result[0].trainable)
    for path, leaf in flatten(adapter.trainable).items():
        np.testing.assert_allclose(trained[path], leaf, rtol=1e-5, atol=1e-7, err_msg=path)
