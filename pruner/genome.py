"""Per-layer sparsity as a genome whose budget is exact in weights.

A gene is a group of modules that share one ratio (a decoder block, or a single module). A genome
holds, per gene, the *number of weights pruned*; every operation keeps Σ counts equal to the budget
B = round(S · Σ n) exactly and each count within its bounds, so no candidate ever spends more or less
than the target (MSP.md §3).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from mixsparse.runtime.errors import MixsparseError


@dataclass(frozen=True)
class Genes:
    labels: list[str]  # a block name or a module name
    members: list[list[str]]  # the modules each gene sets
    sizes: list[int]  # weights per gene

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def total(self) -> int:
        return sum(self.sizes)


def genes_for(shapes: dict[str, tuple[int, int]], blocks_name: str, granularity: str) -> Genes:
    """One gene per decoder block (``block``) or per module (``module``), in model order."""
    if granularity == "module":
        return Genes(list(shapes), [[n] for n in shapes], [o * i for o, i in shapes.values()])
    if granularity != "block":
        raise MixsparseError(f"unknown granularity {granularity!r}; use block or module")
    groups: dict[str, list[str]] = {}
    for name in shapes:
        if not name.startswith(blocks_name + "."):
            raise MixsparseError(f"module {name} is not inside a decoder block; use --granularity module")
        block = f"{blocks_name}.{name[len(blocks_name) + 1 :].split('.', 1)[0]}"
        groups.setdefault(block, []).append(name)
    return Genes(
        list(groups),
        list(groups.values()),
        [sum(shapes[n][0] * shapes[n][1] for n in names) for names in groups.values()],
    )


@dataclass(frozen=True)
class Budget:
    sizes: tuple[int, ...]
    pruned: int  # exact total of pruned weights
    low: tuple[int, ...]
    high: tuple[int, ...]

    @classmethod
    def for_target(cls, sizes: list[int], target: float, min_ratio: float = 0.0, max_ratio: float = 0.99) -> "Budget":
        if not 0 <= min_ratio <= max_ratio < 1:
            raise MixsparseError(f"ratio bounds [{min_ratio}, {max_ratio}] must satisfy 0 <= min <= max < 1")
        if not min_ratio <= target <= max_ratio:
            raise MixsparseError(
                f"target {target:g} is infeasible: every ratio must lie in "
                f"[{min_ratio:g}, {max_ratio:g}], so the average can too"
            )
        low = tuple(math.ceil(min_ratio * n) for n in sizes)
        high = tuple(math.floor(max_ratio * n) for n in sizes)
        pruned = round(target * sum(sizes))
        if not sum(low) <= pruned <= sum(high):
            raise MixsparseError(f"target {target:g} is infeasible with ratio bounds [{min_ratio:g}, {max_ratio:g}]")
        return cls(tuple(sizes), pruned, low, high)

    @property
    def target(self) -> float:
        return self.pruned / sum(self.sizes)

    def check(self, counts: list[int]) -> None:
        assert sum(counts) == self.pruned, (sum(counts), self.pruned)
        assert all(lo <= c <= hi for c, lo, hi in zip(counts, self.low, self.high))

    def ratios(self, counts: list[int]) -> list[float]:
        return [c / n for c, n in zip(counts, self.sizes)]


def fix_sum(values: list[float], budget: Budget) -> list[int]:
    """Round ``values`` (pruned counts) to integers within bounds whose sum is exactly the budget."""
    counts = [min(max(int(math.floor(v)), lo), hi) for v, lo, hi in zip(values, budget.low, budget.high)]
    remainder = budget.pruned - sum(counts)
    # hand out the remainder by largest fractional part (or take it back by smallest), one weight at a time
    order = sorted(range(len(counts)), key=lambda i: values[i] - math.floor(values[i]), reverse=remainder > 0)
    step = 1 if remainder > 0 else -1
    first_pass = True
    while remainder:
        moved = False
        for i in order:
            room = (budget.high[i] - counts[i]) if step > 0 else (counts[i] - budget.low[i])
            # one weight per gene first (rounding remainders are small); then whatever room is left
            amount = min(abs(remainder), room, 1 if first_pass else room)
            if amount > 0:
                counts[i] += step * amount
                remainder -= step * amount
                moved = True
        if not moved:
            raise MixsparseError("cannot meet the budget within the ratio bounds")
        first_pass = False
    return counts


def from_ratios(ratios: list[float], budget: Budget) -> list[int]:
    return fix_sum([r * n for r, n in zip(ratios, budget.sizes)], budget)


def mutate(counts: list[int], budget: Budget, rng: random.Random, moves: int, delta: float = 0.01) -> list[int]:
    """Move ``delta`` of a gene's worth of pruned weights from one gene to another, ``moves`` times."""
    child = list(counts)
    if len(child) < 2:
        return child
    done = attempts = 0
    while done < moves and attempts < 50 * moves:
        attempts += 1
        i, j = rng.sample(range(len(child)), 2)  # i gets sparser, j denser
        amount = max(1, round(delta * min(budget.sizes[i], budget.sizes[j])))
        if child[i] + amount <= budget.high[i] and child[j] - amount >= budget.low[j]:
            child[i] += amount
            child[j] -= amount
            done += 1
    return child


def crossover(a: list[int], b: list[int], budget: Budget, rng: random.Random) -> list[int]:
    """Per-gene uniform crossover, then repair: shrink the deviations (from the uniform ratio) on the side in
    excess until the budget holds again — the child keeps its parents' shape, scaled toward uniform."""
    child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
    uniform = [budget.target * n for n in budget.sizes]
    deviation = [c - u for c, u in zip(child, uniform)]
    excess = sum(deviation)
    positive = sum(d for d in deviation if d > 0)
    negative = -sum(d for d in deviation if d < 0)
    if excess > 0 and positive > 0:
        deviation = [d * (negative / positive) if d > 0 else d for d in deviation]
    elif excess < 0 and negative > 0:
        deviation = [d * (positive / negative) if d < 0 else d for d in deviation]
    return fix_sum([u + d for u, d in zip(uniform, deviation)], budget)


@dataclass(frozen=True)
class RatioOps:
    """The search's view of a ratio genome: budget-exact mutation and crossover."""

    budget: Budget
    delta: float = 0.01

    def mutate(self, genome, rng: random.Random, moves: int):
        return tuple(mutate(list(genome), self.budget, rng, moves, self.delta))

    def crossover(self, a, b, rng: random.Random):
        return tuple(crossover(list(a), list(b), self.budget, rng))


@dataclass(frozen=True)
class LevelOps:
    """A genome of level indices, one per gene, for searches over a grid of stored levels (levels.py).

    The genes must be of one size (decoder blocks of a uniform model), so Σ indices = genes x the anchor's
    index keeps the budget in weights exactly: a mutation moves one gene a level up and another one down; a
    crossover child is repaired by stepping genes on the side in excess back toward the anchor."""

    count: int  # levels in the grid
    anchor: int  # index of the target level

    def total(self, genes: int) -> int:
        return genes * self.anchor

    def mutate(self, genome, rng: random.Random, moves: int):
        child = list(genome)
        if len(child) < 2:
            return tuple(child)
        done = attempts = 0
        while done < moves and attempts < 50 * moves:
            attempts += 1
            i, j = rng.sample(range(len(child)), 2)  # i gets sparser, j denser
            if child[i] + 1 < self.count and child[j] >= 1:
                child[i] += 1
                child[j] -= 1
                done += 1
        return tuple(child)

    def crossover(self, a, b, rng: random.Random):
        child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        return tuple(self.repair(child, rng))

    def repair(self, child: list[int], rng: random.Random) -> list[int]:
        total = self.total(len(child))
        while sum(child) != total:
            above = sum(child) > total
            side = [i for i, c in enumerate(child) if (c > self.anchor if above else c < self.anchor)]
            child[rng.choice(side)] += -1 if above else 1
        return child

    def snap(self, ratios: list[float], levels: tuple[float, ...], seed: int = 0) -> tuple[int, ...]:
        """The nearest level of each ratio, repaired to the exact budget (seeds from other allocators)."""
        nearest = [min(range(len(levels)), key=lambda i: abs(levels[i] - r)) for r in ratios]
        return tuple(self.repair(nearest, random.Random(seed)))
