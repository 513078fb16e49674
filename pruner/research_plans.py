"""Research plans: every gene (decoder block or module) its own unstructured ratio, the average in weights
exactly the target; uniform, OWL, global magnitude, the Fisher allocation, or the msp search seeded from Fisher
and uniform."""

from __future__ import annotations

import shutil

from mixsparse.pruner.allocate import fisher_ratios, global_ratios, outlier_ratio, owl_ratios, uniform_ratios
from mixsparse.pruner.evidence import Evidence
from mixsparse.pruner import data
from mixsparse.pruner.genome import Budget, Genes, LevelOps, RatioOps, from_ratios, genes_for
from mixsparse.pruner.levels import LevelGrid, build_levels, stores_levels
from mixsparse.pruner.metrics import get_metric, wanda_score
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.plan_request import PlanRequest
from mixsparse.pruner.plan_search import evaluator_for, fingerprint, run_search, search_summary
from mixsparse.pruner.progress import Progress
from mixsparse.pruner.spec import Spec
from mixsparse.runtime.errors import MixsparseError


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


def msp_search(
    request: PlanRequest,
    evidence: Evidence,
    genes: Genes,
    budget: Budget,
    seed_counts: list[int],
    to_specs,
    progress: Progress,
) -> tuple[list[int], dict]:
    """The msp search over the base metric's own levels (levels.py): candidates hold each gene's modules
    pruned by the metric at the candidate's ratio, from one anchored calibration pass, so the plan's fitness
    is that of the model ``prune --plan`` writes with the same metric and calibration."""
    goal, search = request.research, request.search
    metric = get_metric(request.metric)
    stored = stores_levels(metric)
    target = goal.target
    grid = LevelGrid.around(
        target, search.level_step if stored else search.delta, search.level_window, goal.min_ratio, goal.max_ratio
    )
    uniform_counts = from_ratios(uniform_ratios(genes.sizes, target), budget)
    if stored:
        if len(set(genes.sizes)) != 1:
            raise MixsparseError(
                f"an msp search with {metric.name} holds its levels per gene, which needs genes of one size; "
                "these differ (use --granularity block on a model whose blocks are alike)"
            )
        ops = LevelOps(len(grid.levels), grid.index(target))
        seeds = [ops.snap(budget.ratios(seed_counts), grid.levels), tuple([ops.anchor] * len(genes))]

        def decode(genome) -> list[int]:
            return [round(grid.levels[i] * n) for i, n in zip(genome, genes.sizes)]

        def specs_of(genome) -> dict[str, Spec]:
            return {m: Spec.unstructured(grid.levels[i]) for members, i in zip(genes.members, genome) for m in members}
    else:
        ops = RatioOps(budget, search.delta)
        seeds = [tuple(seed_counts), tuple(uniform_counts)]

        def decode(genome) -> list[int]:
            return list(genome)

        specs_of = to_specs
    state_fingerprint = fingerprint(
        request,
        evidence,
        {
            "allocator": "msp",
            "target": target,
            "granularity": goal.granularity,
            "genes": genes.sizes,
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
            {k: v for k, v in state_fingerprint.items() if k != "seed"},
            after_block=lambda index: advance(),
            gradients=evidence.gradients,
        )
    evidence.adapter.model.to("cpu")
    evaluator = evaluator_for(request, evidence, levels=store)
    state, evaluator = run_search(
        request,
        evidence,
        ops,
        seeds,
        specs_of,
        state_fingerprint,
        f"msp, target {target:g}",
        progress,
        request.state_path,
        evaluator,
    )
    counts = decode(state.best["genome"])
    summary = search_summary(state, request)
    summary["seed_fitness"] = {"fisher": state.seed_fitness(seeds[0]), "uniform": state.seed_fitness(seeds[1])}
    summary["levels"] = {
        **grid.to_json(),
        "metric": metric.name,
        "stored": stored,
        "database_bytes": store.disk_bytes,
    }
    evaluator.restore()
    if stored:
        shutil.rmtree(directory, ignore_errors=True)  # a finished search needs it no more; resume would
    if not stored:
        budget.check(counts)
    return counts, summary


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
    else:
        per_weight = [
            sum(evidence.sensitivity.traces[m] for m in members) / size
            for members, size in zip(genes.members, genes.sizes)
        ]
        ratios = fisher_ratios(per_weight, genes.sizes, target, request.fisher.spread, goal.min_ratio, goal.max_ratio)
        info["fisher_allocation"] = {"spread": request.fisher.spread}
    counts = from_ratios(ratios, budget)

    def to_specs(genome) -> dict[str, Spec]:
        return {
            m: Spec.unstructured(c / n) for members, c, n in zip(genes.members, genome, genes.sizes) for m in members
        }

    if request.allocator == "msp":
        counts, info["search"] = msp_search(request, evidence, genes, budget, counts, to_specs, progress)
        # prune --plan with this metric reruns the anchored pass and keeps these levels (levels.prune_from_levels)
        info["levels"] = info["search"]["levels"]
        info["search_scores"] = f"{request.metric}'s own levels (anchored calibration pass at the target)"
    ratios = budget.ratios(counts)
    modules = to_specs(counts)
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
