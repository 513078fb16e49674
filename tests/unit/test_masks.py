import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.pruner.core.masks import mask_for, mask_nm, mask_ratio, pruned_count
from mixsparse.pruner.core.spec import Spec

nm_pairs = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (6, 8), (1, 16)])


@settings(max_examples=60, deadline=None)
@given(pair=nm_pairs, rows=st.integers(1, 9), groups=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_nm_keeps_exactly_n_of_every_m_and_the_largest(pair, rows, groups, seed):
    n, m = pair
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = mask_nm(scores, n, m).reshape(rows, groups, m)
    assert (keep.sum(-1) == n).all()
    grouped = scores.reshape(rows, groups, m)
    kept_min = grouped.masked_fill(~keep, float("inf")).min(-1).values
    dropped_max = grouped.masked_fill(keep, float("-inf")).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_nm_with_ties_still_keeps_exactly_n():
    keep = mask_nm(torch.zeros(3, 16), 2, 4)
    assert (keep.reshape(3, 4, 4).sum(-1) == 2).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_ratio_per_row_prunes_exactly_round_sparsity_times_cols_in_every_row(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = mask_ratio(scores, sparsity, per_row=True)
    assert ((~keep).sum(1) == pruned_count(cols, sparsity)).all()
    for row in range(rows):
        if keep[row].any() and (~keep[row]).any():
            assert scores[row][keep[row]].min() >= scores[row][~keep[row]].max()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_ratio_layerwise_prunes_exactly_and_the_smallest(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = mask_ratio(scores, sparsity, per_row=False)
    assert int((~keep).sum()) == pruned_count(rows * cols, sparsity)
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


def test_mask_for_dispatches_on_the_spec():
    scores = torch.arange(16.0).reshape(2, 8)
    assert mask_for(scores, Spec.dense()).all()
    assert torch.equal(mask_for(scores, Spec.parse("2:4")), mask_nm(scores, 2, 4))
    layerwise = mask_for(scores, Spec.parse("0.5"), per_row=False)
    assert layerwise[0].sum() == 0 and layerwise[1].all()  # the whole first row holds the smallest scores
    assert (mask_for(scores, Spec.parse("0.5"), per_row=True).sum(1) == 4).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 30),
    sparsity=st.floats(0, 0.99),
    per_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rank_thresholds_give_the_same_masks_as_mask_ratio(rows, cols, sparsity, per_row, seed):
    from mixsparse.pruner.core.masks import ranks

    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))  # distinct: no ties
    count = cols if per_row else rows * cols
    assert torch.equal(ranks(scores, per_row) >= pruned_count(count, sparsity), mask_ratio(scores, sparsity, per_row))
