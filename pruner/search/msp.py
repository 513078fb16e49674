"""MSP's search for research plans: each gene's unstructured ratio, searched over the base metric's own
levels, seeded from the Fisher allocation (and uniform), per decoder block and then per module."""

from __future__ import annotations

import shutil
from dataclasses import replace

from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.core.levels import LevelGrid, build_levels, stores_levels
from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.io import data
from mixsparse.pruner.plans.allocators import fisher_ratios, uniform_ratios
from mixsparse.pruner.plans.evidence import Evidence
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.pruner.search.genome import (
    Budget,
    Genes,
    LevelOps,
    RatioOps,
    from_ratios,
    genes_for,
    level_units,
    specs_for,
)
from mixsparse.pruner.search.probes import cheapest_levels, probe_costs, probe_levels
from mixsparse.pruner.search.session import evaluator_for, fingerprint, held_out_choice, run_search, search_summary


def fisher_allocation(request: PlanRequest, evidence: Evidence, genes: Genes) -> list[float]:
    goal = request.research
    per_weight = [
        sum(evidence.sensitivity.traces[m] for m in members) / size for members, size in zip(genes.members, genes.sizes)
    ]
    return fisher_ratios(per_weight, genes.sizes, goal.target, request.fisher.spread, goal.min_ratio, goal.max_ratio)


class _Phase:
    """One search over one set of genes: its genome operations, seeds and decoding to ratios."""

    def __init__(self, genes: Genes, budget: Budget, grid: LevelGrid, stored: bool, delta: float):
        self.genes, self.budget, self.grid, self.stored = genes, budget, grid, stored
        if stored:
            self.ops = LevelOps(len(grid.levels), grid.index(grid.anchor), level_units(genes.sizes))
        else:
            self.ops = RatioOps(budget, delta)

    def seed(self, ratios: list[float]):
        if self.stored:
            return self.ops.snap(ratios, self.grid.levels)
        return tuple(from_ratios(ratios, self.budget))

    def ratios(self, genome) -> list[float]:
        if self.stored:  # the grid's own floats: prune --plan finds each one's level by them
            return [self.grid.levels[i] for i in genome]
        return self.budget.ratios(list(genome))

    def specs(self, genome) -> dict[str, Spec]:
        return specs_for(self.genes, self.ratios(genome))


def probed_seed(
    request: PlanRequest, evaluator, phase: _Phase, target: float, progress: Progress
) -> tuple[tuple, dict]:
    """The budget-exact block levels of least summed cost, each block's cost probed alone (search/probes.py)."""
    goal, count = request.research, request.search.settings.steps[0]
    levels, anchor = probe_levels(target, goal.min_ratio, goal.max_ratio, phase.grid.levels if phase.stored else None)
    genes = len(phase.genes.sizes)
    before = evaluator.evaluations, evaluator.tokens, evaluator.seconds
    with progress.task(
        f"probing {genes} blocks at {len(levels) - 1} levels each", genes * (len(levels) - 1)
    ) as advance:
        costs = probe_costs(
            genes,
            levels,
            anchor,
            target,
            lambda ratios: evaluator.evaluate(specs_for(phase.genes, ratios), count),
            advance,
        )
    picked = cheapest_levels(costs, anchor, level_units(phase.genes.sizes))
    cost = {
        "levels": levels,
        "sequences": count,
        "evaluations": evaluator.evaluations - before[0],
        "tokens": evaluator.tokens - before[1],
        "seconds": round(evaluator.seconds - before[2], 1),
        "ratios": [levels[i] for i in picked],
    }
    return phase.seed(cost["ratios"]), cost


def msp_search(
    request: PlanRequest, evidence: Evidence, genes: Genes, budget: Budget, progress: Progress
) -> tuple[list[float], dict]:
    """The msp search over the base metric's own levels (core/levels.py): candidates hold each gene's modules
    pruned by the metric at the candidate's ratio, from one anchored calibration pass, so the plan's fitness
    is that of the model ``prune --plan`` writes with the same metric and calibration.

    Per module (``--granularity module``) it first searches per decoder block, then refines per module from
    the block plan it found for ``refine_generations``: a search over hundreds of modules from the Fisher
    seed converges far slower than one over the blocks, and the refinement can never end worse than the block
    plan (its first seed, kept by elitism)."""
    goal, search = request.research, request.search
    metric = get_metric(request.metric)
    stored = stores_levels(metric)
    grid = LevelGrid.around(
        goal.target, search.level_step if stored else search.delta, search.level_window, goal.min_ratio, goal.max_ratio
    )
    run = _MspRun(request, evidence, grid, progress)
    store = run.level_store(metric)
    final = _Phase(genes, budget, grid, stored, search.delta)
    if goal.granularity == "module" and search.refine_generations > 0:
        state, named, seed_fitness, block_state = run.blocks_then_modules(final)
    else:
        named = {
            "fisher": final.seed(fisher_allocation(request, evidence, genes)),
            "uniform": final.seed(uniform_ratios(genes.sizes, goal.target)),
        }
        state, named = run.phase(
            final, named, request.state_path, goal.granularity, search.settings, {}, probe=goal.granularity == "block"
        )
        seed_fitness, block_state = {name: state.seed_fitness(g) for name, g in named.items()}, None
    candidates = {"search": tuple(state.best["genome"]), **{k: tuple(g) for k, g in named.items()}}
    chosen, selection = held_out_choice(request, evidence, run.evaluator, final.specs, candidates, progress)
    if not stored:
        budget.check(list(candidates[chosen]))
    summary = search_summary(state, request)
    if selection is not None:
        summary["held_out_check"] = selection
    if block_state is not None:
        blocks_summary = search_summary(block_state, request)
        summary["block_phase"] = blocks_summary
        _add_cost(summary, blocks_summary, ("generations", "evaluations", "tokens", "seconds"))
    if run.probed is not None:
        summary["probed_seed"] = run.probed
        _add_cost(summary, run.probed, ("evaluations", "tokens", "seconds"))
    summary["seed_fitness"] = seed_fitness
    summary["levels"] = {**grid.to_json(), "metric": metric.name, "stored": stored, "database_bytes": store.disk_bytes}
    run.evaluator.restore()
    if stored:
        shutil.rmtree(request.levels_path, ignore_errors=True)  # a finished search needs it no more
    return final.ratios(candidates[chosen]), summary


def _add_cost(summary: dict, more: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        summary[key] = round(summary[key] + more[key], 1)


class _MspRun:
    """What the phases of one msp search share: the level database, the evaluator, the fingerprint every
    resumable state is tied to, and the probed seed when ``--probe-seed`` made one."""

    def __init__(self, request: PlanRequest, evidence: Evidence, grid: LevelGrid, progress: Progress):
        goal, search = request.research, request.search
        self.request, self.evidence, self.grid, self.progress = request, evidence, grid, progress
        self.target = goal.target
        self.common = fingerprint(
            request,
            evidence,
            {
                "allocator": "msp",
                "target": goal.target,
                "bounds": [goal.min_ratio, goal.max_ratio],
                "delta": search.delta,
                "levels": grid.to_json(),
            },
        )
        self.evaluator = None
        self.probed: dict | None = None  # what probing the blocks cost and found, when the search was seeded by it

    def level_store(self, metric):
        """Every module at every level of the grid, from one anchored calibration pass; the evaluator on it."""
        request, evidence = self.request, self.evidence
        stored = stores_levels(metric)
        windows = (
            data.calibration_windows(evidence.loaded.tokenizer, request.calibration)
            if metric.needs_calibration
            else None
        )
        blocks = len(evidence.adapter.blocks)
        what = f"{len(self.grid.levels)} levels" if stored else "score ranks"
        with self.progress.task(f"{metric.name} levels: anchored pass ({what}, {blocks} blocks)", blocks) as advance:
            store = build_levels(
                evidence.adapter,
                list(evidence.shapes),
                metric,
                windows,
                self.grid,
                request.device,
                request.levels_path if stored else None,
                {k: v for k, v in self.common.items() if k != "seed"},
                after_block=lambda index: advance(),
                gradients=evidence.gradients,
            )
        evidence.adapter.model.to("cpu")
        self.evaluator = evaluator_for(request, evidence, levels=store)
        return store

    def phase(self, phase: _Phase, named: dict, state_path, label: str, settings, extra: dict, probe: bool = False):
        """One phase from its ``named`` seeds. With --probe-seed (``probe``) a new search is first seeded by
        probing (first, so generation 0 fills its population around it); a resumed one finds the probed seed
        and its cost in its state, so its plan is chosen and accounted as the search's first run was."""
        search = self.request.search
        notes = {}
        if probe and search.probe_seed and not (search.resume and state_path.is_file()):
            seed, self.probed = probed_seed(self.request, self.evaluator, phase, self.target, self.progress)
            named, notes = {"probed": seed, **named}, {"probed": self.probed}
        state_fingerprint = {**self.common, "granularity": label, "genes": phase.genes.sizes, **extra}
        state, _ = run_search(
            self.request,
            self.evidence,
            phase.ops,
            list(named.values()),
            phase.specs,
            state_fingerprint,
            f"msp per {label}, target {self.target:g}",
            self.progress,
            state_path,
            self.evaluator,
            settings,
            notes,
        )
        if "probed" in state.notes and "probed" not in named:
            self.probed = state.notes["probed"]
            named = {"probed": phase.seed(self.probed["ratios"]), **named}
        return state, named

    def blocks_then_modules(self, final: _Phase):
        """A search per decoder block, then per module seeded from its best: (module state, module seeds, every
        seed's fitness, block state)."""
        request, evidence, goal, search = self.request, self.evidence, self.request.research, self.request.search
        genes = final.genes
        block_genes = genes_for(evidence.shapes, evidence.adapter.blocks_name, "block")
        first = _Phase(
            block_genes,
            Budget.for_target(block_genes.sizes, self.target, goal.min_ratio, goal.max_ratio),
            self.grid,
            final.stored,
            search.delta,
        )
        block_named = {
            "fisher": first.seed(fisher_allocation(request, evidence, block_genes)),
            "uniform": first.seed(uniform_ratios(block_genes.sizes, self.target)),
        }
        block_state, block_named = self.phase(
            first, block_named, request.block_state_path, "block", search.settings, {}, probe=True
        )
        best_blocks = first.ratios(block_state.best["genome"])
        of_block = {m: r for members, r in zip(block_genes.members, best_blocks) for m in members}
        named = {
            "block plan": final.seed([of_block[m] for m in genes.labels]),
            "fisher per module": final.seed(fisher_allocation(request, evidence, genes)),
            "uniform": final.seed(uniform_ratios(genes.sizes, self.target)),
        }
        settings = replace(search.settings, generations=search.refine_generations)
        blocks = {"blocks": list(block_state.best["genome"])}
        state, named = self.phase(final, named, request.state_path, "module", settings, blocks)
        seed_fitness = {name: block_state.seed_fitness(g) for name, g in block_named.items()}
        seed_fitness["block plan"] = state.seed_fitness(named["block plan"])
        return state, named, seed_fitness, block_state
