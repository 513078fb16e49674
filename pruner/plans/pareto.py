"""The deployment front (``plan --deploy --pareto``): a deployment plan per 2:4 budget, with its weight
memory and held-out fitness, written as one directory (a plan per point, front.json, front.md, front.png)."""

from __future__ import annotations

import json

import torch

from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.plans.dense_or_24 import deploy_plan, score_plan, weight_bytes_split
from mixsparse.pruner.plans.evidence import Evidence
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.runtime.atomic import atomic_dir


def pareto(request: PlanRequest, evidence: Evidence, progress: Progress) -> list[dict]:
    """Sweep the 2:4 budget; write plan-b<B>.json per point, front.json, front.md and front.png into --out."""
    from mixsparse.pruner.io.plots import plot_front

    fitness = request.search.fitness
    linear, other = weight_bytes_split(evidence)
    front = []
    with atomic_dir(request.out, overwrite=request.overwrite) as tmp:
        for fraction in request.deploy.budgets:
            plan = deploy_plan(request, evidence, fraction, progress, None)
            best = plan.info.get("search", {}).get("plan_fitness")
            if best is None:  # fisher allocator: score the least-sensitive-first choice itself
                best = score_plan(request, evidence, plan, progress)
            name = f"plan-b{fraction:.2f}.json"
            plan.save(tmp / name)
            front.append(
                {
                    "budget": fraction,
                    "achieved_fraction": plan.info["achieved_fraction"],
                    "weight_memory": plan.info["weight_memory"],
                    "fitness": best,
                    "perplexity": float(torch.tensor(best).exp()) if fitness == "loss" else None,
                    "plan": name,
                }
            )
        (tmp / "front.json").write_text(
            json.dumps(
                {
                    "fitness": fitness,
                    "metric": request.metric,
                    "front": front,
                    "linear_bytes": linear,
                    "other_bytes": other,
                },
                indent=2,
            )
            + "\n"
        )
        (tmp / "front.md").write_text(front_markdown(front, fitness))
        plot_front(front, tmp / "front.png", fitness, request.allocator, request.metric)
    return front


def front_markdown(front: list[dict], fitness: str) -> str:
    label = "held-out perplexity" if fitness == "loss" else "KL to dense"
    rows = [
        "| 2:4 fraction (target) | 2:4 fraction (achieved) | weight memory (of dense) | " + label + " | plan |",
        "|---|---|---|---|---|",
    ]
    for point in front:
        value = point["perplexity"] if fitness == "loss" else point["fitness"]
        rows.append(
            f"| {point['budget']:.2f} | {point['achieved_fraction']:.3f} | {point['weight_memory']:.3f} | "
            f"{value:.3f} | {point['plan']} |"
        )
    return "\n".join(rows) + "\n"
