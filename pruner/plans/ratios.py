"""Research plans: every gene (decoder block or module) its own unstructured ratio, the average in weights
exactly the target; uniform, OWL, global magnitude, the Fisher allocation, or the msp search (search/msp.py)
seeded from Fisher and uniform."""

from __future__ import annotations

from mixsparse.pruner.core.importance import get_metric, wanda_score
from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.plans.allocators import global_ratios, outlier_ratio, owl_ratios, uniform_ratios
from mixsparse.pruner.plans.evidence import Evidence
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.pruner.search.genome import Budget, Genes, from_ratios, genes_for, specs_for
from mixsparse.pruner.search.msp import fisher_allocation, msp_search


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
