"""The deployment form of a plan (docs/design.md, The deployment form): per fused group (q/k/v, o, gate/up, down),
dense or 2:4: the genome of a deployment plan.

Only 2:4 runs faster on GPUs, and vLLM runs each fused group as one GEMM, so the choice is one bit per
group. The budget B is the fraction of decoder linear weights in 2:4; a genome meets it when the weights
it puts in 2:4 are within half of the largest group of B·Σn (no subset can always hit it exactly).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mixsparse.runtime.errors import MixsparseError

PACKED_FRACTION = 0.5625  # bytes of a packed 2:4 bf16/fp16 weight, relative to dense


@dataclass(frozen=True)
class DeployBudget:
    groups: list[list[str]]
    sizes: list[int]
    target: int  # weights in 2:4
    tolerance: int

    @classmethod
    def for_fraction(cls, groups: list[list[str]], sizes: list[int], fraction: float) -> "DeployBudget":
        if not 0.0 <= fraction <= 1.0:
            raise MixsparseError(
                f"--budget {fraction:g} is infeasible: the fraction of weights in 2:4 must be in [0, 1]"
            )
        return cls(groups, sizes, round(fraction * sum(sizes)), max(sizes) // 2)

    def weight_of(self, bits) -> int:
        return sum(n for n, bit in zip(self.sizes, bits) if bit)

    def fraction(self, bits) -> float:
        return self.weight_of(bits) / sum(self.sizes)

    def feasible(self, bits) -> bool:
        return abs(self.weight_of(bits) - self.target) <= self.tolerance


def budget_for_memory(memory: float, linear_bytes: int, other_bytes: int) -> float:
    """The 2:4 fraction whose model weight memory is ``memory`` x the dense model's (embeddings included)."""
    dense = linear_bytes + other_bytes
    smallest = (other_bytes + PACKED_FRACTION * linear_bytes) / dense
    if not smallest - 1e-9 <= memory <= 1.0:
        raise MixsparseError(
            f"--memory {memory:g} is infeasible: with every decoder linear in 2:4 the weights "
            f"take {smallest:.3f} of dense, and nothing takes more than 1"
        )
    return min(1.0, (1.0 - memory) * dense / ((1 - PACKED_FRACTION) * linear_bytes))


def memory_of(fraction: float, linear_bytes: int, other_bytes: int) -> float:
    return (other_bytes + linear_bytes * (1 - (1 - PACKED_FRACTION) * fraction)) / (linear_bytes + other_bytes)


def greedy(order: list[int], budget: DeployBudget) -> tuple[int, ...]:
    """Take groups in ``order`` while they fit under target + tolerance: the least-sensitive-first choice
    when ``order`` sorts by Fisher trace per weight, a random choice when it is shuffled."""
    bits = [0] * len(budget.sizes)
    total = 0
    for index in order:
        if total >= budget.target - budget.tolerance and total + budget.sizes[index] > budget.target:
            continue
        if total + budget.sizes[index] <= budget.target + budget.tolerance:
            bits[index] = 1
            total += budget.sizes[index]
    return tuple(bits)


def random_choice(budget: DeployBudget, rng: random.Random) -> tuple[int, ...]:
    order = list(range(len(budget.sizes)))
    rng.shuffle(order)
    return greedy(order, budget)


@dataclass(frozen=True)
class DeployOps:
    budget: DeployBudget

    def mutate(self, genome, rng: random.Random, moves: int):
        """Swap a 2:4 group with a dense one, ``moves`` times, keeping the budget."""
        bits = list(genome)
        for _ in range(moves):
            on = [i for i, b in enumerate(bits) if b]
            off = [i for i, b in enumerate(bits) if not b]
            if not on or not off:
                break
            for _ in range(50):
                i, j = rng.choice(on), rng.choice(off)
                bits[i], bits[j] = 0, 1
                if self.budget.feasible(bits):
                    break
                bits[i], bits[j] = 1, 0
        return tuple(bits)

    def crossover(self, a, b, rng: random.Random):
        bits = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        return self.repair(bits, rng)

    def repair(self, bits, rng: random.Random):
        bits = list(bits)
        order = list(range(len(bits)))
        rng.shuffle(order)
        for i in order:  # too much in 2:4: turn groups back to dense
            if self.budget.weight_of(bits) <= self.budget.target + self.budget.tolerance:
                break
            if bits[i]:
                bits[i] = 0
        for i in order:  # too little: add groups that fit
            if self.budget.weight_of(bits) >= self.budget.target - self.budget.tolerance:
                break
            if (
                not bits[i]
                and self.budget.weight_of(bits) + self.budget.sizes[i] <= self.budget.target + self.budget.tolerance
            ):
                bits[i] = 1
        return tuple(bits)
