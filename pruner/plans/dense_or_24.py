"""Deployment plans (docs/design.md, The deployment form): dense or 2:4 per fused group as vLLM runs them, under a
budget; the least Fisher-sensitive groups first, or the msp search seeded from that choice. A candidate holds the
base metric's own 2:4 weights, so the search ranks what ``prune --plan`` will produce."""

from __future__ import annotations

from pathlib import Path

from mixsparse.pruner.core.adapter import fused_groups
from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.plans.evidence import Evidence, base_weights_24
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.pruner.search.fitness import PlanEvaluator
from mixsparse.pruner.search.group_genome import DeployBudget, DeployOps, greedy, memory_of
from mixsparse.pruner.search.session import evaluator_for, fingerprint, held_out_choice, run_search, search_summary

DEPLOY_SCORES = "the base metric's own 2:4 weights (every group pruned once, sequentially)"


def deploy_evaluator(request: PlanRequest, evidence: Evidence, progress: Progress) -> PlanEvaluator:
    """The fitness of deployment choices: held-out loss with each 2:4 group holding the base metric's own weights."""
    return evaluator_for(request, evidence, base_weights_24(request, evidence, progress))


def deployment_groups(evidence: Evidence) -> tuple[list[list[str]], list[int]]:
    groups = [g for g in fused_groups(evidence.adapter) if all(n in evidence.shapes for n in g)]
    for group in groups:
        for name in group:
            Spec.nm(2, 4).check_shape(name, evidence.shapes[name])
    sizes = [sum(evidence.shapes[n][0] * evidence.shapes[n][1] for n in g) for g in groups]
    return groups, sizes


def weight_bytes_split(evidence: Evidence) -> tuple[int, int]:
    """(decoder linear bytes, all other weight bytes) of the dense model in its stored dtype."""
    model = evidence.loaded.model
    element = 2  # bf16/fp16 storage, as served
    linear = sum(o * i for o, i in evidence.shapes.values()) * element
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * element
    return linear, total - linear


def deploy_plan(
    request: PlanRequest, evidence: Evidence, fraction: float, progress: Progress, state_path: Path | None
) -> Plan:
    groups, sizes = deployment_groups(evidence)
    budget = DeployBudget.for_fraction(groups, sizes, fraction)
    sensitivity = evidence.sensitivity
    per_weight = [sum(sensitivity.traces[m] for m in g) / n for g, n in zip(groups, sizes)]
    least_sensitive = greedy(sorted(range(len(groups)), key=lambda i: per_weight[i]), budget)

    def to_specs(bits) -> dict[str, Spec]:
        return {m: (Spec.nm(2, 4) if bit else Spec.dense()) for g, bit in zip(groups, bits) for m in g}

    bits = least_sensitive
    info: dict = {}
    if request.allocator == "msp":
        state_fingerprint = fingerprint(
            request,
            evidence,
            {"allocator": "msp-deploy", "budget": fraction, "groups": sizes, "candidates": DEPLOY_SCORES},
        )
        state, evaluator = run_search(
            request,
            evidence,
            DeployOps(budget),
            [least_sensitive],
            to_specs,
            state_fingerprint,
            f"deploy, 2:4 fraction {fraction:g}",
            progress,
            state_path,
            deploy_evaluator(request, evidence, progress),
        )
        candidates = {"search": tuple(state.best["genome"]), "least_sensitive_first": tuple(least_sensitive)}
        chosen, selection = held_out_choice(request, evidence, evaluator, to_specs, candidates, progress)
        bits = candidates[chosen]
        info["search"] = search_summary(state, request)
        seed_fitness = state.seed_fitness(least_sensitive)
        info["search"]["seed_fitness"] = {"least_sensitive_first": seed_fitness}
        # the written plan's fitness on the search's sequences (a front point plots it)
        info["search"]["plan_fitness"] = state.best["fitness"] if chosen == "search" else seed_fitness
        if selection is not None:
            info["search"]["held_out_check"] = selection
        evaluator.restore()
    linear, other = weight_bytes_split(evidence)
    achieved = budget.fraction(bits)
    modules = {m: s for m, s in to_specs(bits).items() if not s.is_dense}
    return Plan(
        modules,
        dict(evidence.shapes),
        {
            "allocator": request.allocator,
            "metric": request.metric,
            "deploy": True,
            "search_scores": DEPLOY_SCORES,
            "target": f"2:4 on {fraction:g} of decoder linear weights",
            "budget": fraction,
            "achieved_fraction": achieved,
            "weight_memory": memory_of(achieved, linear, other),
            "calibration": request.calibration.to_json(),
            "seed": request.search.settings.seed,
            "groups": [
                {"modules": g, "weights": n, "format": "2:4" if b else "dense", "fisher_per_weight": t}
                for g, n, b, t in zip(groups, sizes, bits, per_weight)
            ],
            "fisher": sensitivity.info,
            **info,
        },
    )


def score_plan(request: PlanRequest, evidence: Evidence, plan: Plan, progress: Progress) -> float:
    """The search's own fitness of a plan that was not searched (the fisher allocator's choice)."""
    evaluator = deploy_evaluator(request, evidence, progress)
    value = evaluator.evaluate(
        plan.modules | {n: Spec.dense() for n in evidence.shapes if n not in plan.modules},
        max(request.search.settings.steps),
    )
    evaluator.restore()
    return value
