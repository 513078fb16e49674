"""The evolutionary search over plans (docs/design.md, The evolutionary search), generic over the genome.

(μ+λ), elitist: each generation breeds ``offspring`` children (tournament-selected parents, uniform
crossover with repair, then budget-keeping mutation whose number of moves decays over the generations).
Multi-step selection keeps evaluation cheap: all children are scored on a few held-out sequences, the
best ``survivors`` on more, and only candidates scored on the final step's tokens compete with the
population. The best genome so far never leaves the population. The state (population, history, RNG)
is saved after every generation, so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from mixsparse.runtime.atomic import atomic_file
from mixsparse.runtime.errors import MixsparseError

Genome = tuple[int, ...]
STATE_FORMAT = "mixsparse-search-state"


class GenomeOps(Protocol):
    def mutate(self, genome: Genome, rng: random.Random, moves: int) -> Genome: ...

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome: ...


@dataclass(frozen=True)
class SearchSettings:
    generations: int = 50
    population: int = 8
    offspring: int = 12
    survivors: int = 3
    steps: tuple[int, ...] = (4, 16)  # held-out sequences per selection step, growing (of fitness_seqlen tokens)
    moves: int = 4  # mutation moves in the first generation, decaying to 1
    patience: int = 10  # stop when the best has not improved for this many generations
    seed: int = 0

    def __post_init__(self):
        if self.generations < 0 or self.population < 1 or self.offspring < 1 or self.survivors < 1:
            raise MixsparseError("search settings must be positive (generations >= 0)")
        if not self.steps or list(self.steps) != sorted(self.steps) or self.steps[0] < 1:
            raise MixsparseError(f"evaluation steps {list(self.steps)} must be positive and non-decreasing")


@dataclass
class SearchState:
    settings: dict
    fingerprint: dict  # what the search is about; a resumed state must match it
    generation: int = 0
    population: list[dict] = field(default_factory=list)  # {"genome": [...], "fitness": float}
    history: list[dict] = field(default_factory=list)
    rng: list = field(default_factory=list)
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_since: int = 0
    finished: bool = False
    seeds: list[dict] = field(default_factory=list)  # the initial genomes and their fitness
    notes: dict = field(default_factory=dict)  # the caller's, kept for a resume: e.g. what finding a seed cost

    def stalled(self, patience: int) -> bool:
        """The best has not improved for ``patience`` generations. From the state alone, so a resumed search that
        patience stopped stays stopped (more generations continue one that ran out of them)."""
        return self.generation - self.best_since >= patience

    def seed_fitness(self, genome) -> float | None:
        return next((s["fitness"] for s in self.seeds if tuple(s["genome"]) == tuple(genome)), None)

    @property
    def best(self) -> dict:
        return min(self.population, key=lambda member: member["fitness"])

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: dict) -> "SearchState":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.pop("format") != STATE_FORMAT:
                raise ValueError("not a search state")
            state = cls(**data)
            for member in state.population:
                member["genome"] = [int(g) for g in member["genome"]]
                member["fitness"] = float(member["fitness"])
            if state.population:
                random.Random().setstate(_rng_tuple(state.rng))
        except FileNotFoundError:
            raise MixsparseError(f"--resume: search state {path} does not exist") from None
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
            raise MixsparseError(f"--resume: search state {path} is corrupt ({error})") from None
        if not state.population:
            raise MixsparseError(f"--resume: search state {path} is corrupt (empty population)")
        if state.fingerprint != fingerprint:
            differing = sorted(
                k for k in set(fingerprint) | set(state.fingerprint) if fingerprint.get(k) != state.fingerprint.get(k)
            )
            raise MixsparseError(
                f"--resume: search state {path} belongs to another search (differs in {', '.join(differing)})"
            )
        return state


def _rng_tuple(state: list):
    version, internal, gauss = state
    return version, tuple(internal), gauss


def evolve(
    ops: GenomeOps,
    evaluate: Callable[[Genome, int], float],
    seeds: list[Genome],
    settings: SearchSettings,
    state: SearchState,
    on_generation: Callable[[SearchState], None] = lambda state: None,
) -> SearchState:
    """Run (or continue) the search. ``evaluate(genome, sequences)`` returns the fitness; lower is better."""
    rng = random.Random(settings.seed)
    if state.rng:
        rng.setstate(_rng_tuple(state.rng))
    final = settings.steps[-1]
    start = time.perf_counter() - state.seconds

    def score(genome: Genome, sequences: int) -> float:
        state.evaluations += 1
        return evaluate(genome, sequences)

    if not state.population:  # generation 0: the seeds, then mutated copies of the first seed
        candidates = list(dict.fromkeys(tuple(g) for g in seeds))
        attempts = 0
        while len(candidates) < settings.population and attempts < 100 * settings.population:
            attempts += 1
            child = ops.mutate(candidates[0], rng, 2 * settings.moves)
            if child not in candidates:
                candidates.append(child)
        scored = {genome: score(genome, final) for genome in candidates}
        state.seeds = [{"genome": list(g), "fitness": scored[tuple(g)]} for g in dict.fromkeys(tuple(g) for g in seeds)]
        state.population = [{"genome": list(g), "fitness": f} for g, f in scored.items()]
        _record(state, rng, start)
        on_generation(state)

    while state.generation < settings.generations and not state.stalled(settings.patience):
        state.generation += 1
        moves = max(1, round(settings.moves * (1 - (state.generation - 1) / max(settings.generations, 1))))
        parents = [tuple(m["genome"]) for m in state.population]
        fitness = {tuple(m["genome"]): m["fitness"] for m in state.population}
        children: list[Genome] = []
        attempts = 0
        while len(children) < settings.offspring and attempts < 20 * settings.offspring:
            attempts += 1
            first, second = _tournament(parents, fitness, rng), _tournament(parents, fitness, rng)
            child = ops.crossover(first, second, rng) if first != second and rng.random() < 0.5 else first
            child = ops.mutate(child, rng, moves)
            # only the (saved) population counts as known, so a resumed run breeds exactly the same children
            if child not in fitness and child not in children:
                children.append(child)
        pool = children
        for step in settings.steps[:-1]:  # cheap steps: rank on few tokens, keep the best
            ranked = sorted(pool, key=lambda g: score(g, step))
            pool = ranked[: max(settings.survivors, 1)]
        merged = dict(fitness)
        merged.update({genome: score(genome, final) for genome in pool})
        best_before = state.best["fitness"]
        ranked = sorted(merged.items(), key=lambda item: item[1])[: settings.population]
        state.population = [{"genome": list(g), "fitness": f} for g, f in ranked]
        if state.best["fitness"] < best_before - 1e-9:
            state.best_since = state.generation
        state.finished = state.stalled(settings.patience)
        _record(state, rng, start)
        on_generation(state)
    state.finished = True
    return state


def _tournament(parents: list[Genome], fitness: dict[Genome, float], rng: random.Random) -> Genome:
    a, b = rng.choice(parents), rng.choice(parents)
    return a if fitness[a] <= fitness[b] else b


def _record(state: SearchState, rng: random.Random, start: float) -> None:
    values = [m["fitness"] for m in state.population]
    state.seconds = time.perf_counter() - start
    state.rng = [list(x) if isinstance(x, tuple) else x for x in rng.getstate()]
    state.history.append(
        {
            "generation": state.generation,
            "best": min(values),
            "median": statistics.median(values),
            "evaluations": state.evaluations,
            "seconds": round(state.seconds, 1),
        }
    )
