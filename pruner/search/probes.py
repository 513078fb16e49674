"""A search seed from each decoder block's own cost at each level (as SPDY's and OBC's level databases are
solved): every block is scored alone at a few levels around the target, the others held at it, and a dynamic
program picks one level per block so the budget holds exactly and the summed costs are least.

The costs do not add up exactly (a block pruned harder changes what the blocks after it see), so this is a
seed for the search, not a plan: the search starts from it beside Fisher's and uniform, and keeps whichever
scores best. Its price is (probes per block) x (blocks) evaluations on the search's first, cheapest step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mixsparse.runtime.errors import MixsparseError

PROBE_STEP = 0.05  # levels probed: the target +- k·step, k = 1..PROBE_REACH, inside the bounds
PROBE_REACH = 4


def probe_levels(
    target: float, low: float, high: float, grid: tuple[float, ...] | None = None
) -> tuple[list[float], int]:
    """The levels a block is probed at (ascending, the target among them) and the target's index there. With
    ``grid`` (a metric whose levels are stored) only the grid's own levels within reach can be probed."""
    reach = PROBE_STEP * PROBE_REACH + 1e-9
    if grid is not None:
        levels = [level for level in grid if abs(level - target) <= reach]
    else:
        levels = [
            round(target + k * PROBE_STEP, 6)
            for k in range(-PROBE_REACH, PROBE_REACH + 1)
            if low - 1e-9 <= target + k * PROBE_STEP <= min(high, 0.99) + 1e-9
        ]
    anchor = next((i for i, level in enumerate(levels) if abs(level - target) < 1e-6), None)
    if anchor is None:
        raise MixsparseError(f"the target {target:g} is not among the probed levels {levels}")
    return levels, anchor


def probe_costs(
    genes: int,
    levels: list[float],
    anchor: int,
    target: float,
    score: Callable[[list[float]], float],
    after_probe: Callable[[], None] = lambda: None,
) -> list[list[float]]:
    """costs[g][i]: the fitness with gene g at levels[i] and every other gene at ``target``, less the fitness
    with all at ``target`` (zero at the anchor). ``score(ratios)`` evaluates one candidate."""
    base = score([target] * genes)
    costs = []
    for gene in range(genes):
        row = []
        for index, level in enumerate(levels):
            if index == anchor:
                row.append(0.0)
                continue
            ratios = [target] * genes
            ratios[gene] = level
            row.append(score(ratios) - base)
            after_probe()
        costs.append(row)
    return costs


def cheapest_levels(costs: list[list[float]], anchor: int, units: tuple[int, ...]) -> list[int]:
    """One level index per gene, least total cost, with Σ units_g · (index_g - anchor) = 0: the same weights
    pruned as every gene at the anchor. A dynamic program over the running offset from the budget."""
    span = sum(u * max(anchor, len(row) - 1 - anchor) for u, row in zip(units, costs))
    width = 2 * span + 1
    best = np.full(width, np.inf)
    best[span] = 0.0
    choices = []
    for unit, row in zip(units, costs):
        following = np.full(width, np.inf)
        choice = np.full(width, -1, dtype=np.int16)
        for index, cost in enumerate(row):
            shift = unit * (index - anchor)
            moved = np.full(width, np.inf)
            if shift >= 0:
                moved[shift:] = best[: width - shift]
            else:
                moved[:shift] = best[-shift:]
            moved += cost
            better = moved < following
            following[better] = moved[better]
            choice[better] = index
        best = following
        choices.append(choice)
    if not np.isfinite(best[span]):
        raise MixsparseError("no choice of probed levels keeps the budget")
    picked, offset = [], span
    for unit, choice in zip(reversed(units), reversed(choices)):
        index = int(choice[offset])
        picked.append(index)
        offset -= unit * (index - anchor)
    return picked[::-1]
