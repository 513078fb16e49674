import pytest
import torch

from mixsparse.pruner.plans.allocators import (
    fisher_ratios,
    fit_shift,
    global_ratios,
    magnitude_threshold,
    outlier_ratio,
    owl_ratios,
)
from mixsparse.runtime.errors import MixsparseError


def weighted_mean(ratios, sizes):
    return sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes)


@pytest.mark.parametrize("sizes", [[10] * 6, [10, 30, 5, 70, 20, 40]])
def test_owl_ratios_respect_bounds_and_mean(sizes):
    outliers = [0.01, 0.05, 0.02, 0.2, 0.03, 0.04]
    ratios = owl_ratios(outliers, sizes, target=0.7, lam=0.08)
    assert weighted_mean(ratios, sizes) == pytest.approx(0.7, abs=1e-9)
    assert all(0.62 - 1e-12 <= r <= 0.78 + 1e-12 for r in ratios)
    assert ratios.index(min(ratios)) == outliers.index(max(outliers))  # most outliers: pruned least


def test_fisher_ratios_prune_sensitive_genes_less_and_keep_the_budget():
    traces = [1e-6, 1e-3, 1e-5, 1e-2]
    sizes = [100, 200, 300, 400]
    ratios = fisher_ratios(traces, sizes, target=0.6, spread=0.1)
    assert weighted_mean(ratios, sizes) == pytest.approx(0.6, abs=1e-9)
    order = sorted(range(4), key=lambda i: traces[i])
    assert [ratios[i] for i in order] == sorted(ratios, reverse=True)


def test_fit_shift_respects_clipping():
    ratios = fit_shift([0.1, 0.95, 0.98], [1, 1, 1], target=0.9, low=0.0, high=0.99)
    assert max(ratios) <= 0.99 and weighted_mean(ratios, [1, 1, 1]) == pytest.approx(0.9, abs=1e-9)
    with pytest.raises(MixsparseError, match="infeasible"):
        fit_shift([0.5], [1], target=0.995, low=0.0, high=0.99)


def test_outlier_ratio():
    scores = [torch.ones(10, 10), torch.ones(10, 10)]
    scores[0][0, 0] = 1000.0  # one outlier among 200
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 200)


def random_genes(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [[(8, 16), (16, 8)], [(24, 16)], [(4, 4), (12, 20), (8, 8)]]
    scales = [1.0, 0.3, 2.0]
    return [[torch.randn(*shape, generator=generator) * s for shape in gene] for gene, s in zip(shapes, scales)]


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7])
def test_global_ratios_are_fractions_under_one_threshold_and_hit_the_budget(target):
    genes = random_genes()
    sizes = [sum(w.numel() for w in gene) for gene in genes]
    ratios, threshold = global_ratios(genes, sizes, target)
    pruned = round(target * sum(sizes))
    counts = [round(r * n) for r, n in zip(ratios, sizes)]
    assert sum(counts) == pruned
    assert all(r * n == pytest.approx(c, abs=1e-9) for r, n, c in zip(ratios, sizes, counts))
    if pruned:
        everything = torch.cat([w.abs().reshape(-1) for gene in genes for w in gene])
        assert threshold == everything.sort().values[pruned - 1].item()
        under = [sum(int((w.abs() <= threshold).sum()) for w in gene) for gene in genes]
        assert counts == under  # random floats: no ties at the threshold
    assert len(set(ratios)) > 1 or target == 0.0  # the scales differ: so do the ratios


def test_global_threshold_ties_and_low_precision():
    weights = [torch.tensor([[1.0, -1.0, 2.0, 0.0]], dtype=torch.bfloat16), torch.tensor([[1.0, 3.0]])]
    assert magnitude_threshold(weights, 1) == 0.0
    assert magnitude_threshold(weights, 2) == 1.0 and magnitude_threshold(weights, 4) == 1.0
    assert magnitude_threshold(weights, 5) == 2.0
    # three weights tie at 1.0: the budget takes the ties from the earliest genes
    ratios, threshold = global_ratios([[weights[0]], [weights[1]]], [4, 2], target=0.5)
    assert threshold == 1.0 and [r * n for r, n in zip(ratios, [4, 2])] == [3, 0]
    with pytest.raises(ValueError):
        magnitude_threshold(weights, 7)


def test_global_ratios_respect_bounds():
    genes = random_genes()
    genes[1] = [w * 1e-3 for w in genes[1]]  # all tiny: the one threshold would prune the gene entirely
    sizes = [sum(w.numel() for w in gene) for gene in genes]
    ratios, _ = global_ratios(genes, sizes, 0.4, high=0.9)
    assert max(ratios) <= 0.9 + 1e-12 and ratios[1] == pytest.approx(0.9)
    assert weighted_mean(ratios, sizes) == pytest.approx(0.4, abs=1e-9)
