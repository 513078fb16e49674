"""Per-layer sparsity as a genome whose budget is exact in weights.

A gene is a group of modules that share one ratio (a decoder block, or a single module). A genome
holds, per gene, the *number of weights pruned*; every operation keeps Σ counts equal to the budget
B = round(S · Σ n) exactly and each count within its bounds, so no candidate ever spends more or less
than the target (docs/design.md, The evolutionary search).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from mixsparse.pruner.core.spec import Spec
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


def level_units(sizes: list[int]) -> tuple[int, ...]:
    """Each gene's size in units of the genes' common divisor: a step of one level on gene i prunes u_i units
    of weights, so a level genome keeps its budget exactly while Σ u_i · index_i stays the same. Moves need a
    gene of one unit to pay any remainder: without one (e.g. Llama-2's 4096² attention and 4096x11008 MLP
    modules are 16 and 43 units), the genes must be of one size (decoder blocks)."""
    common = math.gcd(*sizes)
    units = tuple(n // common for n in sizes)
    if min(units) != 1:
        raise MixsparseError(
            f"a level search needs a gene whose size divides all the others' to keep the budget exact; these "
            f"genes are {sorted(set(units))} units of {common} weights (use --granularity block)"
        )
    return units


@dataclass(frozen=True)
class LevelOps:
    """A genome of level indices, one per gene, for searches over a grid of stored levels (core/levels.py).

    A level step of gene i prunes ``units[i]`` units of weights (level_units), so Σ units·index = Σ units·anchor
    keeps the budget exactly whatever the genes' sizes: a mutation moves one gene a level up (or down) and pays
    it with level steps of other genes the other way, units for units (a gene of the same size when one can);
    a crossover child is repaired by stepping genes on the side in excess back toward the anchor."""

    count: int  # levels in the grid
    anchor: int  # index of the target level
    units: tuple[int, ...]  # a level step of each gene, in weights / the genes' common divisor

    @property
    def total(self) -> int:
        return self.anchor * sum(self.units)

    def spent(self, genome) -> int:
        return sum(u * i for u, i in zip(self.units, genome))

    def mutate(self, genome, rng: random.Random, moves: int):
        child = list(genome)
        if len(child) < 2:
            return tuple(child)
        done = attempts = 0
        while done < moves and attempts < 50 * moves:
            attempts += 1
            step = rng.choice((1, -1))  # the first gene's direction; the others pay it back the other way
            first = rng.randrange(len(child))
            if not 0 <= child[first] + step < self.count:
                continue
            trial = list(child)
            trial[first] += step
            if self._pay(trial, self.units[first], -step, rng, exclude=first):
                child = trial
                done += 1
        return tuple(child)

    def _pay(self, genome: list[int], owed: int, step: int, rng: random.Random, exclude: int = -1) -> bool:
        """Step genes by ``step`` until ``owed`` units are paid; False (``genome`` half-changed) when they can't."""
        while owed:
            movable = [
                j
                for j, (u, i) in enumerate(zip(self.units, genome))
                if j != exclude and u <= owed and 0 <= i + step < self.count
            ]
            if not movable:
                return False
            same = [j for j in movable if self.units[j] == owed]
            j = rng.choice(same if same and rng.random() < 0.5 else movable)
            genome[j] += step
            owed -= self.units[j]
        return True

    def crossover(self, a, b, rng: random.Random):
        child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        return tuple(self.repair(child, rng, fallback=a))

    def repair(self, child: list[int], rng: random.Random, fallback=None) -> list[int]:
        """``child`` with its budget restored: genes on the side in excess step back toward the anchor while a
        step fits the excess, then genes of any size pay the rest (``fallback`` when nothing can)."""
        child = list(child)
        excess = self.spent(child) - self.total
        while excess:
            step = -1 if excess > 0 else 1
            side = [
                j
                for j, (u, i) in enumerate(zip(self.units, child))
                if u <= abs(excess) and (i > self.anchor if step < 0 else i < self.anchor)
            ]
            if not side:
                if not self._pay(child, abs(excess), step, rng):
                    if fallback is None:
                        raise MixsparseError("cannot meet the budget on this level grid")
                    return list(fallback)
                break
            j = rng.choice(side)
            child[j] += step
            excess += step * self.units[j]
        return child

    def snap(self, ratios: list[float], levels: tuple[float, ...], seed: int = 0) -> tuple[int, ...]:
        """The nearest level of each ratio, repaired to the exact budget (seeds from other allocators)."""
        nearest = [min(range(len(levels)), key=lambda i: abs(levels[i] - r)) for r in ratios]
        return tuple(self.repair(nearest, random.Random(seed)))


def specs_for(genes: Genes, ratios: list[float]) -> dict[str, Spec]:
    return {m: Spec.unstructured(r) for members, r in zip(genes.members, ratios) for m in members}
