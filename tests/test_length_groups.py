"""A batch run as groups of rows of like length: fewer padded tokens, the same optimizer step."""

import numpy as np
import optax
import pytest

import families
import vera_jax
from train import data as data_lib
from train import steps

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
    with pytest.raises(ValueError, match="3 groups do not divide a batch of 8 rows"):
        data_lib.length_groups(data, indices, 3)


@pytest.mark.parametrize("family, task", [(families.bert, "classification"), (families.gpt2, "causal-lm")])
@pytest.mark.parametrize("groups", [2, 4])
def test_a_step_over_groups_is_the_step_over_the_whole_batch(family, task, groups):
    """The groups' loss sums and counts add up to the batch's mean: per-group means would weigh a short group's
    tokens more (the causal LM's rows score different numbers of tokens)."""
    family = family()
    adapter = families.random_adapter(family)
    data, indices = _data(task), np.arange(len(LENGTHS))
    logits_fn = steps.vera_logits(family.model, "merged")
    gradients, apply = steps.make_group_gradients(logits_fn, task), steps.make_apply_gradients(optax.adam(1e-2))
    opt_state = optax.adam(1e-2).init(adapter.trainable)

    def step(batches):
        return apply(adapter, opt_state, tuple(gradients(adapter, family.params, b, None) for b in batches))

    whole, _, whole_loss = step([data_lib.collate(data, indices, 0, 64)])
    grouped, _, grouped_loss = step([data_lib.collate(data, g, 0, 64)
                                     for g in data_lib.length_groups(data, indices, groups)])
    np.testing.assert_allclose(grouped_loss, whole_loss, rtol=1e-5)
    for path, leaf in vera_jax.paths.flatten(whole.trainable).items():
        np.testing.assert_allclose(vera_jax.paths.flatten(grouped.trainable)[path], leaf, rtol=1e-5, atol=1e-7,
                                   err_msg=path)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(vera_jax.paths.flatten(whole.trainable).values(), vera_jax.paths.flatten(adapter.trainable).values())]
    assert max(moved) > 1e-3  # the step did move the vectors
