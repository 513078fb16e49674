"""Research plans: every gene (decoder block or module) its own unstructured ratio, the average in weights
exactly the target; uniform, OWL, global magnitude, the Fisher allocation, or the msp search seeded from Fisher
and uniform."""

from __future__ import annotations

from mixsparse.pruner.allocate import fisher_ratios, global_ratios, outlier_ratio, owl_ratios, uniform_ratios
from mixsparse.pruner.evidence import Evidence
from mixsparse.pruner.genome import Budget, Genes, RatioOps, from_ratios, genes_for
from mixsparse.pruner.metrics import get_metric, wanda_score
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.plan_request import PlanRequest
from mixsparse.pruner.plan_search import fingerprint, run_search, search_summary
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
        delta = request.search.delta
        uniform = from_ratios(uniform_ratios(genes.sizes, target), budget)
        state_fingerprint = fingerprint(
            request,
            evidence,
            {
                "allocator": "msp",
                "target": target,
                "granularity": goal.granularity,
                "genes": genes.sizes,
                "bounds": [goal.min_ratio, goal.max_ratio],
                "delta": delta,
            },
        )
        state, evaluator = run_search(
            request,
            evidence,
            RatioOps(budget, delta),
            [tuple(counts), tuple(uniform)],
            to_specs,
            state_fingerprint,
            f"msp, target {target:g}",
            progress,
            request.state_path,
        )
        counts = list(state.best["genome"])
        budget.check(counts)
        info["search"] = search_summary(state, request)
        info["search"]["seed_fitness"] = {
            "fisher": state.seed_fitness(from_ratios(ratios, budget)),
            "uniform": state.seed_fitness(uniform),
        }
        evaluator.restore()
    ratios = budget.ratios(counts)
    modules = to_specs(counts)
    return Plan(
        modules,
        dict(evidence.shapes),
        {
            "allocator": request.allocator,
            "metric": request.metric,
            "search_scores": get_metric(request.metric).scores_as,
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
