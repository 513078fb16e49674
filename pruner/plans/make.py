"""The ``plan`` verb: check the request, gather the evidence its allocator needs, make the plan, write it.

Research plans (plans/ratios.py) give every gene its own unstructured ratio, keeping the global budget
exact in weights; deployment plans (plans/dense_or_24.py) choose dense or 2:4 per fused group under a budget,
and plans/pareto.py sweeps that budget. Either kind is a plan.json that ``mixsparse prune --plan`` applies with
any base metric. The evidence (Fisher traces, activation statistics) is in plans/evidence.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.plans.dense_or_24 import deploy_plan, weight_bytes_split
from mixsparse.pruner.plans.evidence import gather
from mixsparse.pruner.plans.pareto import pareto
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.plans.ratios import research_plan
from mixsparse.pruner.plans.request import PlanRequest, check
from mixsparse.pruner.search.group_genome import budget_for_memory
from mixsparse.runtime.atomic import refuse_existing
from mixsparse.runtime.errors import MixsparseError


@dataclass
class PlanOutcome:
    plan: Plan | None
    out: Path
    front: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def make_plan(request: PlanRequest, progress: Progress = Silent()) -> PlanOutcome:
    check(request)
    deploy = request.deploy
    pareto_sweep = deploy is not None and deploy.pareto
    if not request.search.resume:
        saved = [path for path in request.state_paths if path.exists()]
        if request.allocator == "msp" and not pareto_sweep and saved and not request.overwrite:
            raise MixsparseError(
                f"search state {saved[0]} exists: pass --resume to continue it, or --overwrite to start over"
            )
        refuse_existing(request.out, request.overwrite)
    if request.plot:
        refuse_existing(request.plot, request.overwrite)
    start = time.perf_counter()
    need_fisher = deploy is not None or request.allocator in ("fisher", "msp")
    # OWL's outliers are Wanda scores of the dense model; the msp search makes its own activation statistics
    # in its anchored calibration pass (core/levels.py); deployment candidates hold the base metric's own 2:4 weights
    metric = get_metric(request.metric)
    ranks_scores = request.allocator == "msp" and deploy is None
    need_stats = request.allocator == "owl"
    need_gradients = metric.needs_gradients and ranks_scores  # gblm's scores add the dense model's gradient norms
    evidence = gather(request, progress, need_fisher, need_stats, need_gradients)
    if pareto_sweep:
        front = pareto(request, evidence, progress)
        return PlanOutcome(None, Path(request.out), front, time.perf_counter() - start)
    if deploy is not None:
        fraction = deploy.budget
        if deploy.memory is not None:
            fraction = budget_for_memory(deploy.memory, *weight_bytes_split(evidence))
        plan = deploy_plan(
            request, evidence, fraction, progress, request.state_path if request.allocator == "msp" else None
        )
    else:
        plan = research_plan(request, evidence, progress)
    plan.info["seconds"] = round(time.perf_counter() - start, 1)
    plan.save(request.out, overwrite=request.overwrite or request.search.resume)
    if request.plot:
        from mixsparse.pruner.io.plots import plot_plan

        plot_plan(plan, request.plot, request.overwrite)
    return PlanOutcome(plan, Path(request.out), seconds=time.perf_counter() - start)
