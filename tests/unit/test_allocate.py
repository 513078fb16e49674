import pytest
import torch

from mixsparse.pruner.allocate import fisher_ratios, fit_shift, outlier_ratio, owl_ratios
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
