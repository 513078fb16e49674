import pytest
import torch

from mixsparse.pruner.core.importance import GBLM_ALPHA, METRICS, gblm_score, prune_weight, wanda_score
from mixsparse.pruner.core.sparsegpt import sparsegpt_prune
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.core.stats import GradientStats, InputStats, accumulate, empty_stats
from mixsparse.runtime.errors import MixsparseError


def correlated_inputs(tokens=2048, features=64, rank=16, seed=0):
    """Inputs near a rank-16 subspace (strongly correlated features), with outlier-like feature scales."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, features, generator=generator)
    noise = 0.1 * torch.randn(tokens, features, generator=generator)
    return (low_rank + noise) * torch.logspace(-1, 1, features)


def reconstruction_error(x, weight, pruned):
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()


@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "0.7"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda_on_correlated_inputs(sparsity):
    x = correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = accumulate(x, empty_stats(64, hessian=True))
    spec = Spec.parse(sparsity)
    errors = {
        metric: reconstruction_error(x, weight, prune_weight(metric, weight, spec, stats))
        for metric in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_stats_accumulate_sums_squares_and_the_gram_matrix():
    x = torch.randn(3, 5, 8)
    stats = accumulate(x[:2], empty_stats(8, hessian=True))
    stats = accumulate(x[2:], stats)
    flat = x.reshape(-1, 8)
    assert stats.tokens == 15
    torch.testing.assert_close(stats.sq_norm, flat.square().sum(0))
    torch.testing.assert_close(stats.hessian, flat.T @ flat)


def test_wanda_by_hand():
    # scores |W| * ||X_j||: column norms 3 and 1 -> [[3, 2], [9, 4]]: each row drops its second weight
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stats = empty_stats(2, hessian=False)
    stats.sq_norm = torch.tensor([9.0, 1.0])
    torch.testing.assert_close(wanda_score(weight, stats), torch.tensor([[3.0, 2.0], [9.0, 4.0]]))
    assert torch.equal(prune_weight("wanda", weight, Spec.parse("0.5"), stats), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    # magnitude compares over the whole layer: the two smallest |W| are in the first row
    assert torch.equal(
        prune_weight("magnitude", weight, Spec.parse("0.5"), None), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    )


def test_sparsegpt_obs_update_by_hand():
    # One row, two inputs, H = [[2, 1], [1, 4]]. Saliencies w^2/[H^-1]_jj: 1.75 for w1, 16 for w2, so 1:2
    # drops w1, and OBS moves its contribution onto w2: w2 + w1 * H12 / H22 = 2 + 1 * 1/4 = 2.25.
    weight = torch.tensor([[1.0, 2.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    pruned = sparsegpt_prune(weight, hessian, Spec.nm(1, 2), blocksize=2, damp=1e-9)
    torch.testing.assert_close(pruned, torch.tensor([[0.0, 2.25]]))


def test_sparsegpt_with_diagonal_hessian_is_a_weighted_magnitude_mask():
    # No correlation: no update, and the mask keeps the largest w^2 * H_jj.
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, 100.0]))
    pruned = sparsegpt_prune(weight, hessian, Spec.parse("2:4"), blocksize=4, damp=1e-9)
    torch.testing.assert_close(pruned, torch.tensor([[0.0, 0.0, 3.0, 0.5]]))


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5", "0.73"])
def test_sparsegpt_masks_are_exact(sparsity):
    x = correlated_inputs(512, 128)
    weight = torch.randn(32, 128)
    hessian = x.T @ x
    spec = Spec.parse(sparsity)
    pruned = sparsegpt_prune(weight, hessian, spec, blocksize=32)
    if spec.kind == "nm":
        assert ((pruned != 0).reshape(32, -1, spec.m).sum(-1) == spec.n).all()
    else:
        assert int((pruned == 0).sum()) == round(spec.sparsity * pruned.numel())


def test_sparsegpt_survives_a_singular_hessian_and_dead_inputs():
    x = correlated_inputs(16, 32)  # fewer tokens than features: H is singular
    x[:, 3] = 0  # a dead input
    weight = torch.randn(8, 32)
    pruned = sparsegpt_prune(weight, x.T @ x, Spec.parse("2:4"), blocksize=32)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 3] == 0).all()


def gblm_stats(features=64, rows=48, samples=4, seqlen=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, seqlen, features, generator=generator) * torch.logspace(-1, 1, features)
    grads = torch.randn(samples, rows, features, generator=generator) * 1e-3
    stats = accumulate(x, empty_stats(features, hessian=False))
    stats.gradient = GradientStats(grads.square().sum(0).sqrt(), samples, samples * seqlen)
    return x, grads, stats


def test_gblm_score_is_the_formula_of_its_code():
    # |W_ij| * (sqrt(sum_tokens x_j^2 / N) + 100 * sqrt(sum_n g_nij^2)): Wanda's scaler_row is a mean over the
    # N sequences, the gradient norm a sum over them (GBLM-Pruner lib/prune.py, gradient_computation.py)
    x, grads, stats = gblm_stats()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    samples = x.shape[0]
    activation = x.square().sum((0, 1)).div(samples).sqrt()
    gradient = (GBLM_ALPHA * grads).square().sum(0).sqrt()
    expected = weight.abs() * activation + weight.abs() * gradient
    torch.testing.assert_close(gblm_score(weight, stats), expected)
    assert METRICS["gblm"].per_row and METRICS["gblm"].needs_gradients and GBLM_ALPHA == 100.0


def test_gblm_by_hand_and_without_gradients():
    # one sequence of 2 tokens; input norms 3 and 1, gradient norms 0.01 and 0.05: alpha*|G| = 1 and 5
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stats = InputStats(2, torch.tensor([9.0, 1.0]), gradient=GradientStats(torch.tensor([[0.01, 0.05]] * 2), 1, 2))
    torch.testing.assert_close(gblm_score(weight, stats), torch.tensor([[4.0, 12.0], [12.0, 24.0]]))
    assert torch.equal(prune_weight("gblm", weight, Spec.parse("0.5"), stats), torch.tensor([[0.0, 2.0], [0.0, 4.0]]))
    with pytest.raises(MixsparseError, match="gradient"):
        gblm_score(weight, InputStats(2, torch.tensor([9.0, 1.0])))


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5", "0.73"])
def test_gblm_masks_are_exact_per_row(sparsity):
    _, _, stats = gblm_stats()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    spec = Spec.parse(sparsity)
    pruned = prune_weight("gblm", weight, spec, stats)
    kept = pruned != 0
    if spec.kind == "nm":
        assert (kept.reshape(48, -1, spec.m).sum(-1) == spec.n).all()
    else:
        assert (kept.sum(1) == 64 - round(spec.sparsity * 64)).all()
    scores = gblm_score(weight, stats)
    if spec.kind == "unstructured":  # every kept weight of a row outscores every pruned one
        assert (scores.where(kept, torch.inf).min(1).values > scores.where(~kept, -torch.inf).max(1).values).all()
    assert torch.equal(pruned[kept], weight[kept])
