import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.pruner.search.genome import Budget, crossover, from_ratios, genes_for, mutate
from mixsparse.pruner.search.group_genome import DeployBudget, DeployOps, greedy, random_choice
from mixsparse.runtime.errors import MixsparseError

sizes_strategy = st.lists(st.integers(100, 5000), min_size=2, max_size=12)


@settings(max_examples=80, deadline=None)
@given(
    sizes=sizes_strategy,
    target=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
    moves=st.integers(1, 8),
    delta=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_mutation_keeps_the_budget_exactly_and_the_bounds(sizes, target, seed, moves, delta):
    budget = Budget.for_target(sizes, target, 0.0, 0.95)
    rng = random.Random(seed)
    counts = from_ratios([rng.uniform(0, 0.95) for _ in sizes], budget)
    budget.check(counts)
    for _ in range(5):
        counts = mutate(counts, budget, rng, moves, delta)
        budget.check(counts)


@settings(max_examples=80, deadline=None)
@given(sizes=sizes_strategy, target=st.floats(0.05, 0.9), seed=st.integers(0, 10_000))
def test_crossover_repairs_the_budget_exactly(sizes, target, seed):
    budget = Budget.for_target(sizes, target, 0.02, 0.97)
    rng = random.Random(seed)
    a = from_ratios([rng.uniform(0.02, 0.97) for _ in sizes], budget)
    b = from_ratios([rng.uniform(0.02, 0.97) for _ in sizes], budget)
    child = crossover(a, b, budget, rng)
    budget.check(child)


def test_mutation_moves_weights_between_genes():
    budget = Budget.for_target([1000, 1000, 1000], 0.5)
    child = mutate([500, 500, 500], budget, random.Random(0), moves=1, delta=0.01)
    assert sorted(c - 500 for c in child) == [-10, 0, 10]


def test_infeasible_targets():
    with pytest.raises(MixsparseError, match="target 0.995 is infeasible"):
        Budget.for_target([100, 100], 0.995)
    with pytest.raises(MixsparseError, match="target 0.3 is infeasible"):
        Budget.for_target([100, 100], 0.3, min_ratio=0.4, max_ratio=0.9)


def test_genes_by_block_and_by_module():
    shapes = {"m.layers.0.q": (4, 8), "m.layers.0.k": (2, 8), "m.layers.1.q": (4, 8), "m.layers.1.k": (2, 8)}
    blocks = genes_for(shapes, "m.layers", "block")
    assert blocks.labels == ["m.layers.0", "m.layers.1"] and blocks.sizes == [48, 48]
    assert blocks.members[1] == ["m.layers.1.q", "m.layers.1.k"]
    modules = genes_for(shapes, "m.layers", "module")
    assert modules.labels == list(shapes) and modules.sizes == [32, 16, 32, 16]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(10, 400), min_size=3, max_size=16), fraction=st.floats(0, 1), seed=st.integers(0, 1000)
)
def test_deploy_mutation_and_crossover_stay_within_budget(sizes, fraction, seed):
    groups = [[f"g{i}"] for i in range(len(sizes))]
    budget = DeployBudget.for_fraction(groups, sizes, fraction)
    rng = random.Random(seed)
    ops = DeployOps(budget)
    a, b = random_choice(budget, rng), random_choice(budget, rng)
    assert budget.feasible(a) and budget.feasible(b)
    assert budget.feasible(ops.mutate(a, rng, 3))
    assert budget.feasible(ops.crossover(a, b, rng))


def test_least_sensitive_first_takes_groups_in_order():
    sizes = [100, 100, 100, 100]
    budget = DeployBudget.for_fraction([[str(i)] for i in range(4)], sizes, 0.5)
    assert greedy([3, 1, 0, 2], budget) == (0, 1, 0, 1)


def test_level_genomes_keep_the_budget_and_the_grid():
    import random

    from mixsparse.pruner.core.levels import LevelGrid
    from mixsparse.pruner.search.genome import LevelOps

    grid = LevelGrid.around(0.7, 0.05, 0.2, 0.0, 0.99)
    assert grid.levels == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    assert LevelGrid.around(0.7, 0.05, 0.2, 0.6, 0.8).levels == (0.6, 0.65, 0.7, 0.75, 0.8)
    assert LevelGrid.around(0.9, 0.05, 0.2, 0.0, 0.99).levels[-1] == 0.95  # clipped at 0.99
    ops = LevelOps(len(grid.levels), grid.index(0.7), (1,) * 12)
    rng = random.Random(0)
    population = [tuple([ops.anchor] * 12)]
    for _ in range(200):
        a, b = rng.choice(population), rng.choice(population)
        child = ops.mutate(ops.crossover(a, b, rng), rng, rng.randint(1, 4))
        assert sum(child) == ops.total and all(0 <= i < ops.count for i in child)
        population.append(child)
    assert len(set(population)) > 50
    seeded = ops.snap([0.52, 0.91, 0.7, 0.66, 0.74, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], grid.levels)
    assert sum(seeded) == ops.total and seeded[0] <= grid.index(0.55)
    with pytest.raises(MixsparseError, match="not a level"):
        grid.index(0.71)


def test_module_level_genomes_keep_the_budget_in_weights():
    """Modules of unlike sizes (SmolLM2's q, k, v, o, gate, up, down: 3, 1, 1, 3, 8, 8, 8 units of 110592
    weights): every mutation and crossover prunes exactly the anchor's number of weights, and budget moves
    between attention and MLP modules."""
    import random

    from mixsparse.pruner.core.levels import LevelGrid
    from mixsparse.pruner.search.genome import LevelOps, level_units

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 4
    sizes = [o * i for o, i in shapes]
    units = level_units(sizes)
    assert units[:7] == (3, 1, 1, 3, 8, 8, 8)
    grid = LevelGrid.around(0.7, 0.05, 0.2, 0.0, 0.99)
    ops = LevelOps(len(grid.levels), grid.index(0.7), units)

    def pruned(genome):
        return sum(round(grid.levels[i] * n) for i, n in zip(genome, sizes))

    rng = random.Random(0)
    population = [tuple([ops.anchor] * len(sizes))]
    for _ in range(300):
        a, b = rng.choice(population), rng.choice(population)
        child = ops.mutate(ops.crossover(a, b, rng), rng, rng.randint(1, 4))
        assert ops.spent(child) == ops.total and all(0 <= i < ops.count for i in child)
        assert pruned(child) == pytest.approx(0.7 * sum(sizes), abs=len(sizes))
        population.append(child)
    mlp = [i for i, u in enumerate(units) if u == 8]
    assert any(sum(g[i] for i in mlp) != ops.anchor * len(mlp) for g in population)  # MLP share moved
    seeded = ops.snap([0.9, 0.5, 0.5, 0.6] + [0.7] * (len(sizes) - 4), grid.levels)
    assert ops.spent(seeded) == ops.total and seeded[0] > ops.anchor
    with pytest.raises(MixsparseError, match="16, 43"):
        level_units([4096 * 4096, 11008 * 4096])
