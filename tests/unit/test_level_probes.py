import itertools
import random

import pytest

from mixsparse.pruner.search.probes import cheapest_levels, probe_costs, probe_levels
from mixsparse.runtime.errors import MixsparseError


def brute_force(costs, anchor, units):
    best = None
    for picked in itertools.product(*(range(len(row)) for row in costs)):
        if sum(u * (i - anchor) for u, i in zip(units, picked)) != 0:
            continue
        total = sum(row[i] for row, i in zip(costs, picked))
        if best is None or total < best[0] - 1e-12:
            best = (total, picked)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_the_cheapest_levels_keep_the_budget_and_cost_no_more_than_any_other_choice(seed):
    rng = random.Random(seed)
    genes, count = rng.randint(2, 5), rng.randint(3, 5)
    anchor = rng.randrange(count)
    units = tuple(rng.choice((1, 1, 2, 3)) for _ in range(genes))
    # costs grow with the level, as pruning more costs more, with noise that can break the order
    costs = [
        [(i - anchor) * rng.uniform(0.1, 2.0) + rng.gauss(0, 0.3) if i != anchor else 0.0 for i in range(count)]
        for _ in range(genes)
    ]
    picked = cheapest_levels(costs, anchor, units)
    assert sum(u * (i - anchor) for u, i in zip(units, picked)) == 0
    total = sum(row[i] for row, i in zip(costs, picked))
    assert total == pytest.approx(brute_force(costs, anchor, units)[0], abs=1e-9)


def test_the_cheap_block_takes_the_pruning_the_costly_one_sheds():
    # block 0 barely cares, block 1 suffers: move pruning from 1 to 0 as far as the levels go
    costs = [[-0.01, 0.0, 0.01], [-1.0, 0.0, 1.0]]
    assert cheapest_levels(costs, 1, (1, 1)) == [2, 0]
    # a block twice the size is paid for by a level step of each of two small ones
    costs = [[-0.3, 0.0, 0.3], [-0.05, 0.0, 0.05], [-0.05, 0.0, 0.05]]
    assert cheapest_levels(costs, 1, (2, 1, 1)) == [0, 2, 2]


def test_probe_levels_stay_in_bounds_and_on_a_stored_grid():
    levels, anchor = probe_levels(0.7, 0.0, 0.99)
    assert levels == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9] and levels[anchor] == 0.7
    levels, anchor = probe_levels(0.8, 0.7, 0.9)
    assert levels == [0.7, 0.75, 0.8, 0.85, 0.9] and anchor == 2
    grid = (0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    levels, anchor = probe_levels(0.7, 0.0, 0.99, grid)
    assert levels == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9] and anchor == 4
    with pytest.raises(MixsparseError, match="target 0.72"):
        probe_levels(0.72, 0.0, 0.99, grid)


def test_probe_costs_score_each_gene_alone_against_all_at_the_target():
    calls = []

    def score(ratios):
        calls.append(list(ratios))
        return sum((r - 0.5) * (g + 1) for g, r in enumerate(ratios))

    costs = probe_costs(3, [0.4, 0.5, 0.6], 1, 0.5, score)
    assert calls[0] == [0.5, 0.5, 0.5] and len(calls) == 1 + 3 * 2
    for gene, row in enumerate(costs):
        assert row == pytest.approx([-0.1 * (gene + 1), 0.0, 0.1 * (gene + 1)])
