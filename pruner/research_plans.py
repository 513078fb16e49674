"""Research plans: every gene (decoder block or module) its own unstructured ratio, the average in weights
exactly the target; uniform, OWL, global magnitude, the Fisher allocation, or the msp search seeded from Fisher
and uniform."""

from __future__ import annotations

import shutil
from dataclasses import replace

from mixsparse.pruner.allocate import fisher_ratios, global_ratios, outlier_ratio, owl_ratios, uniform_ratios
from mixsparse.pruner.evidence import Evidence
from mixsparse.pruner import data
from mixsparse.pruner.genome import Budget, Genes, LevelOps, RatioOps, from_ratios, genes_for, level_units
from mixsparse.pruner.level_probes import cheapest_levels, probe_costs, probe_levels
from mixsparse.pruner.levels import LevelGrid, build_levels, stores_levels
from mixsparse.pruner.metrics import get_metric, wanda_score
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.plan_request import PlanRequest
from mixsparse.pruner.plan_search import evaluator_for, fingerprint, held_out_choice, run_search, search_summary
from mixsparse.pruner.progress import Progress
from mixsparse.pruner.spec import Spec


def gene_table(genes: Genes, ratios: list[float], evidence: Evidence, outliers: list[float] | None) -> dict:
    table = {}
    for index, label in enumerate(genes.labels):
        row = {"ratio": ratios[index], "weights": genes.sizes[index], "modules": genes.members[index]}
        if evidence.sensitivity is not None:
            sens = evidence.sensitivity
            row["fisher_trace"] = sum(sens.traces[m] for m in genes.members[index])
            row["fisher_per_weight"] = row["fisher_trace"] / genes.sizes[index]
        if outliers is not None:
            row["outlier_ratio"] = outliers[index]
        table[label] = row
    return table


def specs_for(genes: Genes, ratios: list[float]) -> dict[str, Spec]:
    return {m: Spec.unstructured(r) for members, r in zip(genes.members, ratios) for m in members}


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
    """The budget-exact block levels of least summed cost, each block's cost probed alone (level_probes.py)."""
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
    """The msp search over the base metric's own levels (levels.py): candidates hold each gene's modules
    pruned by the metric at the candidate's ratio, from one anchored calibration pass, so the plan's fitness
    is that of the model ``prune --plan`` writes with the same metric and calibration.

    Per module (``--granularity module``) it first searches per decoder block, then refines per module from
    the block plan it found for ``refine_generations``: a search over hundreds of modules from the Fisher
    seed converges far slower than one over the blocks, and the refinement can never end worse than the block
    plan (its first seed, kept by elitism)."""
    goal, search = request.research, request.search
    metric = get_metric(request.metric)
    stored = stores_levels(metric)
    target = goal.target
    grid = LevelGrid.around(
        target, search.level_step if stored else search.delta, search.level_window, goal.min_ratio, goal.max_ratio
    )
    common = fingerprint(
        request,
        evidence,
        {
            "allocator": "msp",
            "target": target,
            "bounds": [goal.min_ratio, goal.max_ratio],
            "delta": search.delta,
            "levels": grid.to_json(),
        },
    )
    names = list(evidence.shapes)
    windows = (
        data.calibration_windows(evidence.loaded.tokenizer, request.calibration) if metric.needs_calibration else None
    )
    directory = request.levels_path if stored else None
    blocks = len(evidence.adapter.blocks)
    what = f"{len(grid.levels)} levels" if stored else "score ranks"
    with progress.task(f"{metric.name} levels: anchored pass ({what}, {blocks} blocks)", blocks) as advance:
        store = build_levels(
            evidence.adapter,
            names,
            metric,
            windows,
            grid,
            request.device,
            directory,
            {k: v for k, v in common.items() if k != "seed"},
            after_block=lambda index: advance(),
            gradients=evidence.gradients,
        )
    evidence.adapter.model.to("cpu")
    evaluator = evaluator_for(request, evidence, levels=store)
    uniform = uniform_ratios(genes.sizes, target)

    probed = None  # what probing the blocks cost and found, when the search was seeded by it

    def run(phase: _Phase, named: dict, state_path, label: str, settings, extra: dict, probe: bool = False):
        """One phase from its ``named`` seeds. With --probe-seed (``probe``) a new search is first seeded by
        probing (first, so generation 0 fills its population around it); a resumed one finds the probed seed
        and its cost in its state, so its plan is chosen and accounted as the search's first run was."""
        nonlocal probed
        notes = {}
        if probe and search.probe_seed and not (search.resume and state_path.is_file()):
            seed, probed = probed_seed(request, evaluator, phase, target, progress)
            named, notes = {"probed": seed, **named}, {"probed": probed}
        state_fingerprint = {**common, "granularity": label, "genes": phase.genes.sizes, **extra}
        state, _ = run_search(
            request,
            evidence,
            phase.ops,
            list(named.values()),
            phase.specs,
            state_fingerprint,
            f"msp per {label}, target {target:g}",
            progress,
            state_path,
            evaluator,
            settings,
            notes,
        )
        if "probed" in state.notes and "probed" not in named:
            probed = state.notes["probed"]
            named = {"probed": phase.seed(probed["ratios"]), **named}
        return state, named

    final = _Phase(genes, budget, grid, stored, search.delta)
    refine = goal.granularity == "module" and search.refine_generations > 0
    if refine:
        block_genes = genes_for(evidence.shapes, evidence.adapter.blocks_name, "block")
        first = _Phase(
            block_genes,
            Budget.for_target(block_genes.sizes, target, goal.min_ratio, goal.max_ratio),
            grid,
            stored,
            search.delta,
        )
        block_named = {
            "fisher": first.seed(fisher_allocation(request, evidence, block_genes)),
            "uniform": first.seed(uniform_ratios(block_genes.sizes, target)),
        }
        block_state, block_named = run(
            first, block_named, request.block_state_path, "block", search.settings, {}, probe=True
        )
        best_blocks = first.ratios(block_state.best["genome"])
        of_block = {m: r for members, r in zip(block_genes.members, best_blocks) for m in members}
        named = {
            "block plan": final.seed([of_block[m] for m in genes.labels]),
            "fisher per module": final.seed(fisher_allocation(request, evidence, genes)),
            "uniform": final.seed(uniform),
        }
        settings = replace(search.settings, generations=search.refine_generations)
        blocks = {"blocks": list(block_state.best["genome"])}
        state, named = run(final, named, request.state_path, "module", settings, blocks)
        seed_fitness = {name: block_state.seed_fitness(g) for name, g in block_named.items()}
        seed_fitness["block plan"] = state.seed_fitness(named["block plan"])
    else:
        named = {"fisher": final.seed(fisher_allocation(request, evidence, genes)), "uniform": final.seed(uniform)}
        state, named = run(
            final, named, request.state_path, goal.granularity, search.settings, {}, probe=goal.granularity == "block"
        )
        seed_fitness = {name: state.seed_fitness(g) for name, g in named.items()}
    candidates = {"search": tuple(state.best["genome"]), **{k: tuple(g) for k, g in named.items()}}
    chosen, selection = held_out_choice(request, evidence, evaluator, final.specs, candidates, progress)
    if not stored:
        budget.check(list(candidates[chosen]))
    summary = search_summary(state, request)
    if selection is not None:
        summary["held_out_check"] = selection
    if refine:
        blocks_summary = search_summary(block_state, request)
        summary["block_phase"] = blocks_summary
        for key in ("generations", "evaluations", "tokens", "seconds"):
            summary[key] = round(summary[key] + blocks_summary[key], 1)
    if probed is not None:
        summary["probed_seed"] = probed
        for key in ("evaluations", "tokens", "seconds"):
            summary[key] = round(summary[key] + probed[key], 1)
    summary["seed_fitness"] = seed_fitness
    summary["levels"] = {
        **grid.to_json(),
        "metric": metric.name,
        "stored": stored,
        "database_bytes": store.disk_bytes,
    }
    evaluator.restore()
    if stored:
        shutil.rmtree(directory, ignore_errors=True)  # a finished search needs it no more; resume would
    return final.ratios(candidates[chosen]), summary


def research_plan(request: PlanRequest, evidence: Evidence, progress: Progress) -> Plan:
    goal = request.research
    target = goal.target
    genes = genes_for(evidence.shapes, evidence.adapter.blocks_name, goal.granularity)
    budget = Budget.for_target(genes.sizes, target, goal.min_ratio, goal.max_ratio)
    outliers = None
    info: dict = {}
    if request.allocator == "uniform":
        ratios = uniform_ratios(genes.sizes, target)
    elif request.allocator == "owl":
        owl = request.owl
        # OWL's outliers are defined on Wanda's scores, whatever the base metric
        outliers = [
            outlier_ratio(
                [wanda_score(evidence.adapter.linears()[m].weight, evidence.stats[m]) for m in members], owl.multiple
            )
            for members in genes.members
        ]
        ratios = owl_ratios(outliers, genes.sizes, target, owl.lam, goal.min_ratio, goal.max_ratio)
        info["owl"] = {"lambda": owl.lam, "multiple": owl.multiple}
    elif request.allocator == "global":
        linears = evidence.adapter.linears()
        weights = [[linears[m].weight for m in members] for members in genes.members]
        ratios, threshold = global_ratios(weights, genes.sizes, target, goal.min_ratio, goal.max_ratio)
        info["global"] = {"threshold": threshold}
    elif request.allocator == "msp":
        # the search seeds itself from the Fisher allocation (per phase) and uniform
        ratios, info["search"] = msp_search(request, evidence, genes, budget, progress)
        # prune --plan with this metric reruns the anchored pass and keeps these levels (levels.prune_from_levels)
        info["levels"] = info["search"]["levels"]
        info["search_scores"] = f"{request.metric}'s own levels (anchored calibration pass at the target)"
    else:
        ratios = fisher_allocation(request, evidence, genes)
        info["fisher_allocation"] = {"spread": request.fisher.spread}
    if request.allocator != "msp":  # whole weights per gene, the average exactly the target
        ratios = budget.ratios(from_ratios(ratios, budget))
    modules = specs_for(genes, ratios)
    return Plan(
        modules,
        dict(evidence.shapes),
        {
            "allocator": request.allocator,
            "metric": request.metric,
            "search_scores": info.pop("search_scores", get_metric(request.metric).scores_as),
            "target": target,
            "granularity": goal.granularity,
            "bounds": [goal.min_ratio, goal.max_ratio],
            "calibration": request.calibration.to_json(),
            "seed": request.search.settings.seed,
            "genes": gene_table(genes, ratios, evidence, outliers),
            "fisher": evidence.sensitivity.info if evidence.sensitivity else None,
            **info,
        },
    )
