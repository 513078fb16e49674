"""The ``sensitivity`` and ``plan`` verbs: evidence (Fisher traces, activation norms), allocators, search.

Research plans give every gene (decoder block or module) its own unstructured ratio, keeping the
global budget exact in weights; deployment plans choose dense or 2:4 per fused group under a budget.
Either kind is a plan.json that ``mixsparse prune --plan`` applies with any base metric.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from mixsparse.pruner import data, models
from mixsparse.pruner.adapter import ModelAdapter, adapt, fused_groups
from mixsparse.pruner.allocate import fisher_ratios, outlier_ratio, owl_ratios, uniform_ratios
from mixsparse.pruner.deployment import DeployBudget, DeployOps, budget_for_memory, greedy, memory_of
from mixsparse.pruner.fitness import FITNESS, PlanEvaluator, activation_stats
from mixsparse.pruner.genome import Budget, Genes, RatioOps, from_ratios, genes_for
from mixsparse.pruner.metrics import get_metric, wanda_score
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.prune import prune_model
from mixsparse.pruner.progress import Progress, Silent
from mixsparse.pruner.search import SearchSettings, SearchState, evolve
from mixsparse.pruner.sensitivity import Sensitivity, fisher_traces
from mixsparse.pruner.spec import Spec
from mixsparse.pruner.stats import InputStats
from mixsparse.runtime.atomic import atomic_dir, refuse_existing
from mixsparse.runtime.errors import MixsparseError

ALLOCATORS = ("uniform", "owl", "fisher", "msp")
DEPLOY_SCORES = "the base metric's own 2:4 weights (every group pruned once, sequentially)"
DEPLOY_ALLOCATORS = ("fisher", "msp")


@dataclass
class PlanJob:
    model: str
    out: str
    allocator: str = "msp"
    metric: str = "wanda"
    target: float | None = None  # research plans: average unstructured sparsity
    granularity: str = "block"
    deploy: bool = False
    budget: float | None = None  # deployment: fraction of decoder linear weights in 2:4
    memory: float | None = None  # deployment: weight memory as a fraction of the dense model's
    pareto: bool = False
    budgets: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    calibration: data.CalibrationProtocol = field(default_factory=data.CalibrationProtocol)
    fisher_samples: int = 32
    sensitivity: str | None = None  # reuse a file written by `mixsparse sensitivity`
    spread: float = 0.1  # λ of the Fisher allocation
    owl_lambda: float = 0.08
    owl_multiple: float = 5.0
    min_ratio: float = 0.0
    max_ratio: float = 0.99
    search: SearchSettings = field(default_factory=SearchSettings)
    delta: float = 0.01
    fitness: str = "loss"
    fitness_seqlen: int = 512
    resume: bool = False
    state: str | None = None
    device: str = "cpu"
    plot: str | None = None
    overwrite: bool = False

    @property
    def state_path(self) -> Path:
        if self.state:
            return Path(self.state)
        out = Path(self.out)
        return out.with_name(out.name.removesuffix(".json") + ".search.json")


@dataclass
class Evidence:
    """What the allocators need, computed once per model."""

    loaded: models.LoadedModel
    adapter: ModelAdapter
    shapes: dict[str, tuple[int, int]]
    sensitivity: Sensitivity | None = None
    stats: dict[str, InputStats] | None = None  # activation statistics of every module's input
    weights_24: dict[str, torch.Tensor] | None = None  # every module pruned to 2:4 by the base metric


def check_job(job: PlanJob) -> None:
    get_metric(job.metric)
    if job.fitness not in FITNESS:
        raise MixsparseError(f"unknown fitness {job.fitness!r}; choose from {', '.join(FITNESS)}")
    if job.deploy:
        if job.allocator not in DEPLOY_ALLOCATORS:
            raise MixsparseError(f"--deploy chooses dense or 2:4 per fused group; allocator {job.allocator!r} "
                                 f"does not apply (use {' or '.join(DEPLOY_ALLOCATORS)})")
        if not job.pareto and (job.budget is None) == (job.memory is None):
            raise MixsparseError("--deploy needs exactly one of --budget or --memory (or --pareto)")
        # the same range DeployBudget enforces, checked here so it fails before the Fisher traces
        for fraction in ([job.budget] if job.budget is not None else []) + (list(job.budgets) if job.pareto else []):
            if not 0.0 <= fraction <= 1.0:
                raise MixsparseError(f"--budget {fraction:g} is infeasible: the fraction of weights in 2:4 must be "
                                     f"in [0, 1]")
        if job.memory is not None and not 0.0 < job.memory <= 1.0:
            raise MixsparseError(f"--memory {job.memory:g} is not a fraction of the dense weight memory in (0, 1]")
    else:
        if job.allocator not in ALLOCATORS:
            raise MixsparseError(f"unknown allocator {job.allocator!r}; choose from {', '.join(ALLOCATORS)}")
        if job.target is None:
            raise MixsparseError("--target is required (the average sparsity, e.g. 0.7)")
        Spec.unstructured(job.target)
        if job.pareto or job.budget is not None or job.memory is not None:
            raise MixsparseError("--pareto, --budget and --memory go with --deploy")
    if job.resume and job.allocator != "msp":
        raise MixsparseError("--resume continues an msp search; this allocator does not search")
    if job.resume and not job.state_path.is_file():
        raise MixsparseError(f"--resume: search state {job.state_path} does not exist")


def gather(job: PlanJob, progress: Progress, need_fisher: bool, need_norms: bool) -> Evidence:
    loaded = models.load(job.model, dtype=torch.float32 if job.device == "cpu" else None)
    adapter = adapt(loaded.model)
    shapes = adapter.shapes()
    evidence = Evidence(loaded, adapter, shapes)
    if need_fisher:
        if job.sensitivity:
            evidence.sensitivity = Sensitivity.load(job.sensitivity)
            evidence.sensitivity.check_model(shapes)
        else:
            evidence.sensitivity = compute_sensitivity(evidence, job.calibration, job.fisher_samples, job.device,
                                                       progress)
    if need_norms:
        windows = data.calibration_windows(loaded.tokenizer, job.calibration)
        with progress.task(f"activation norms ({len(adapter.blocks)} blocks)", len(adapter.blocks)) as advance:
            evidence.stats = activation_stats(adapter, windows, list(shapes), job.device,
                                              after_block=lambda index: advance())
    return evidence


def compute_sensitivity(evidence: Evidence, calibration: data.CalibrationProtocol, samples: int, device: str,
                        progress: Progress) -> Sensitivity:
    if samples < 1:
        raise MixsparseError("--samples must be at least 1")
    windows = data.calibration_windows(evidence.loaded.tokenizer, replace(calibration, samples=samples))
    with progress.task(f"Fisher traces ({samples} samples)", samples) as advance:
        sensitivity = fisher_traces(evidence.adapter, windows, list(evidence.shapes), device,
                                    after_sample=lambda index: advance())
    sensitivity.info.update({"model": evidence.loaded.name, "calibration": replace(calibration, samples=samples)
                            .to_json(), "loss": "mean next-token NLL per sequence"})
    return sensitivity


def sensitivity_command(model: str, out: str, samples: int, calibration: data.CalibrationProtocol, device: str,
                        plot: str | None, overwrite: bool, progress: Progress = Silent()) -> Sensitivity:
    refuse_existing(out, overwrite)
    if plot:
        refuse_existing(plot, overwrite)
    loaded = models.load(model, dtype=torch.float32 if device == "cpu" else None)
    adapter = adapt(loaded.model)
    evidence = Evidence(loaded, adapter, adapter.shapes())
    sensitivity = compute_sensitivity(evidence, calibration, samples, device, progress)
    sensitivity.save(out, overwrite)
    if plot:
        from mixsparse.pruner.plots import plot_sensitivity

        plot_sensitivity(sensitivity, plot, overwrite)
    return sensitivity


def fitness_sequences(job: PlanJob, tokenizer) -> torch.Tensor:
    """Held-out sequences: other random windows of the calibration split (seed + 1)."""
    protocol = replace(job.calibration, samples=max(job.search.steps), seqlen=job.fitness_seqlen,
                       seed=job.calibration.seed + 1)
    return data.calibration_windows(tokenizer, protocol)


def base_weights_24(job: PlanJob, evidence: Evidence, progress: Progress) -> dict[str, torch.Tensor]:
    """Every decoder linear pruned to 2:4 by the job's metric, once (sequential calibration, as ``prune`` does),
    then the dense weights put back. Deployment candidates swap these in for their 2:4 groups."""
    if evidence.weights_24 is None:
        linears = evidence.adapter.linears()
        names = list(evidence.shapes)
        dense = {n: linears[n].weight.detach().clone() for n in names}
        metric = get_metric(job.metric)
        windows = data.calibration_windows(evidence.loaded.tokenizer, job.calibration) \
            if metric.needs_calibration else None
        plan = Plan({n: Spec.nm(2, 4) for n in names}, dict(evidence.shapes), {"allocator": "all 2:4"})
        blocks = len(evidence.adapter.blocks)
        with progress.task(f"{job.metric} 2:4 weights of every group ({blocks} blocks)", blocks) as advance:
            prune_model(evidence.adapter, plan, job.metric, windows, job.device, after_block=lambda index: advance())
        evidence.adapter.model.to("cpu")
        with torch.no_grad():
            evidence.weights_24 = {n: linears[n].weight.detach().clone() for n in names}
            for n in names:
                linears[n].weight.copy_(dense[n])
    return evidence.weights_24


def deploy_evaluator(job: PlanJob, evidence: Evidence, progress: Progress) -> PlanEvaluator:
    """The fitness of deployment choices: held-out loss with each 2:4 group holding the base metric's own weights."""
    weights = base_weights_24(job, evidence, progress)
    return PlanEvaluator(evidence.adapter, list(evidence.shapes), job.metric, evidence.stats,
                         fitness_sequences(job, evidence.loaded.tokenizer), job.device, job.fitness, weights)


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


def _fingerprint(job: PlanJob, evidence: Evidence, what: dict) -> dict:
    shapes = hashlib.sha256(json.dumps(sorted(evidence.shapes.items())).encode()).hexdigest()[:16]
    return {"model": evidence.loaded.path, "shapes": shapes, "metric": job.metric, "fitness": job.fitness,
            "steps": list(job.search.steps), "fitness_seqlen": job.fitness_seqlen,
            "calibration": job.calibration.to_json(), "seed": job.search.seed, **what}


def run_search(job: PlanJob, evidence: Evidence, ops, seeds, to_specs, fingerprint: dict, label: str,
               progress: Progress, state_path: Path | None,
               evaluator: PlanEvaluator | None = None) -> tuple[SearchState, PlanEvaluator]:
    if evaluator is None:
        evaluator = PlanEvaluator(evidence.adapter, list(evidence.shapes), job.metric, evidence.stats,
                                  fitness_sequences(job, evidence.loaded.tokenizer), job.device, job.fitness)
    if job.resume and state_path is not None:
        state = SearchState.load(state_path, fingerprint)
        state.finished = False
    else:
        state = SearchState(settings=asdict(job.search), fingerprint=fingerprint)
    tokens_before = state.tokens

    def evaluate(genome, count: int) -> float:
        return evaluator.evaluate(to_specs(genome), count)

    remaining = max(job.search.generations - state.generation, 0) + (0 if state.population else 1)
    with progress.task(f"search ({label})", remaining) as advance:
        def on_generation(current: SearchState) -> None:
            current.tokens = tokens_before + evaluator.tokens
            if state_path is not None:
                current.save(state_path)
            last = current.history[-1]
            advance(f"gen {current.generation}: best {last['best']:.4f} median {last['median']:.4f}")

        state = evolve(ops, evaluate, seeds, job.search, state, on_generation)
    state.tokens = tokens_before + evaluator.tokens
    if state_path is not None:
        state.save(state_path)
    return state, evaluator


def search_summary(state: SearchState, job: PlanJob) -> dict:
    return {"settings": state.settings, "delta": job.delta, "fitness": job.fitness, "fitness_seqlen": job.fitness_seqlen,
            "evaluation_steps_sequences": list(job.search.steps), "generations": state.generation,
            "evaluations": state.evaluations, "tokens": state.tokens, "seconds": round(state.seconds, 1),
            "best_fitness": state.best["fitness"],
            "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
                        for h in state.history]}


def research_plan(job: PlanJob, evidence: Evidence, progress: Progress) -> Plan:
    genes = genes_for(evidence.shapes, evidence.adapter.blocks_name, job.granularity)
    budget = Budget.for_target(genes.sizes, job.target, job.min_ratio, job.max_ratio)
    outliers = None
    info: dict = {}
    if job.allocator == "uniform":
        ratios = uniform_ratios(genes.sizes, job.target)
    elif job.allocator == "owl":
        outliers = [outlier_ratio([wanda_score(evidence.adapter.linears()[m].weight, evidence.stats[m])
                                   for m in members], job.owl_multiple) for members in genes.members]
        ratios = owl_ratios(outliers, genes.sizes, job.target, job.owl_lambda, job.min_ratio, job.max_ratio)
        info["owl"] = {"lambda": job.owl_lambda, "multiple": job.owl_multiple}
    else:
        per_weight = [sum(evidence.sensitivity.traces[m] for m in members) / size
                      for members, size in zip(genes.members, genes.sizes)]
        ratios = fisher_ratios(per_weight, genes.sizes, job.target, job.spread, job.min_ratio, job.max_ratio)
        info["fisher_allocation"] = {"spread": job.spread}
    counts = from_ratios(ratios, budget)

    def to_specs(genome) -> dict[str, Spec]:
        return {m: Spec.unstructured(c / n) for members, c, n in zip(genes.members, genome, genes.sizes)
                for m in members}

    if job.allocator == "msp":
        uniform = from_ratios(uniform_ratios(genes.sizes, job.target), budget)
        fingerprint = _fingerprint(job, evidence, {"allocator": "msp", "target": job.target,
                                                   "granularity": job.granularity, "genes": genes.sizes,
                                                   "bounds": [job.min_ratio, job.max_ratio], "delta": job.delta})
        state, evaluator = run_search(job, evidence, RatioOps(budget, job.delta), [tuple(counts), tuple(uniform)],
                                      to_specs, fingerprint, f"msp, target {job.target:g}", progress, job.state_path)
        counts = list(state.best["genome"])
        budget.check(counts)
        info["search"] = search_summary(state, job)
        info["search"]["seed_fitness"] = {"fisher": state.seed_fitness(from_ratios(ratios, budget)),
                                          "uniform": state.seed_fitness(uniform)}
        evaluator.restore()
    ratios = budget.ratios(counts)
    modules = to_specs(counts)
    return Plan(modules, dict(evidence.shapes), {
        "allocator": job.allocator, "metric": job.metric,
        "search_scores": get_metric(job.metric).scores_as,
        "target": job.target, "granularity": job.granularity, "bounds": [job.min_ratio, job.max_ratio],
        "calibration": job.calibration.to_json(), "seed": job.search.seed,
        "genes": gene_table(genes, ratios, evidence, outliers),
        "fisher": evidence.sensitivity.info if evidence.sensitivity else None, **info})


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


def deploy_plan(job: PlanJob, evidence: Evidence, fraction: float, progress: Progress,
                state_path: Path | None) -> Plan:
    groups, sizes = deployment_groups(evidence)
    budget = DeployBudget.for_fraction(groups, sizes, fraction)
    sensitivity = evidence.sensitivity
    per_weight = [sum(sensitivity.traces[m] for m in g) / n for g, n in zip(groups, sizes)]
    least_sensitive = greedy(sorted(range(len(groups)), key=lambda i: per_weight[i]), budget)

    def to_specs(bits) -> dict[str, Spec]:
        return {m: (Spec.nm(2, 4) if bit else Spec.dense()) for g, bit in zip(groups, bits) for m in g}

    bits = least_sensitive
    info: dict = {}
    if job.allocator == "msp":
        fingerprint = _fingerprint(job, evidence, {"allocator": "msp-deploy", "budget": fraction, "groups": sizes,
                                                   "candidates": DEPLOY_SCORES})
        state, evaluator = run_search(job, evidence, DeployOps(budget), [least_sensitive], to_specs, fingerprint,
                                      f"deploy, 2:4 fraction {fraction:g}", progress, state_path,
                                      deploy_evaluator(job, evidence, progress))
        bits = tuple(state.best["genome"])
        info["search"] = search_summary(state, job)
        info["search"]["seed_fitness"] = {"least_sensitive_first": state.seed_fitness(least_sensitive)}
        evaluator.restore()
    linear, other = weight_bytes_split(evidence)
    achieved = budget.fraction(bits)
    modules = {m: s for m, s in to_specs(bits).items() if not s.is_dense}
    return Plan(modules, dict(evidence.shapes), {
        "allocator": job.allocator, "metric": job.metric, "deploy": True, "search_scores": DEPLOY_SCORES,
        "target": f"2:4 on {fraction:g} of decoder linear weights",
        "budget": fraction, "achieved_fraction": achieved,
        "weight_memory": memory_of(achieved, linear, other),
        "calibration": job.calibration.to_json(), "seed": job.search.seed,
        "groups": [{"modules": g, "weights": n, "format": "2:4" if b else "dense", "fisher_per_weight": t}
                   for g, n, b, t in zip(groups, sizes, bits, per_weight)],
        "fisher": sensitivity.info, **info})


@dataclass
class PlanOutcome:
    plan: Plan | None
    out: Path
    front: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def make_plan(job: PlanJob, progress: Progress = Silent()) -> PlanOutcome:
    check_job(job)
    if not job.resume:
        if job.allocator == "msp" and not job.pareto and job.state_path.exists() and not job.overwrite:
            raise MixsparseError(f"search state {job.state_path} exists: pass --resume to continue it, or "
                                 f"--overwrite to start over")
        refuse_existing(job.out, job.overwrite)
    if job.plot:
        refuse_existing(job.plot, job.overwrite)
    start = time.perf_counter()
    need_fisher = job.deploy or job.allocator in ("fisher", "msp")
    # deployment candidates use the base metric's own 2:4 weights, not scores of the dense model
    need_norms = job.allocator == "owl" or (get_metric(job.metric).needs_calibration and job.allocator == "msp"
                                            and not job.deploy)
    evidence = gather(job, progress, need_fisher, need_norms)
    if job.pareto:
        front = pareto(job, evidence, progress)
        return PlanOutcome(None, Path(job.out), front, time.perf_counter() - start)
    if job.deploy:
        fraction = job.budget
        if job.memory is not None:
            fraction = budget_for_memory(job.memory, *weight_bytes_split(evidence))
        plan = deploy_plan(job, evidence, fraction, progress, job.state_path if job.allocator == "msp" else None)
    else:
        plan = research_plan(job, evidence, progress)
    plan.info["seconds"] = round(time.perf_counter() - start, 1)
    plan.save(job.out, overwrite=job.overwrite or job.resume)
    if job.plot:
        from mixsparse.pruner.plots import plot_plan

        plot_plan(plan, job.plot, job.overwrite)
    return PlanOutcome(plan, Path(job.out), seconds=time.perf_counter() - start)


def pareto(job: PlanJob, evidence: Evidence, progress: Progress) -> list[dict]:
    """Sweep the 2:4 budget; write plan-b<B>.json per point, front.json, front.md and front.png into --out."""
    from mixsparse.pruner.plots import plot_front

    linear, other = weight_bytes_split(evidence)
    front = []
    with atomic_dir(job.out, overwrite=job.overwrite) as tmp:
        for fraction in job.budgets:
            plan = deploy_plan(job, evidence, fraction, progress, None)
            best = plan.info.get("search", {}).get("best_fitness")
            if best is None:  # fisher allocator: score the least-sensitive-first choice itself
                evaluator = deploy_evaluator(job, evidence, progress)
                best = evaluator.evaluate(plan.modules | {n: Spec.dense() for n in evidence.shapes
                                                          if n not in plan.modules}, max(job.search.steps))
                evaluator.restore()
            name = f"plan-b{fraction:.2f}.json"
            plan.save(tmp / name)
            front.append({"budget": fraction, "achieved_fraction": plan.info["achieved_fraction"],
                          "weight_memory": plan.info["weight_memory"], "fitness": best,
                          "perplexity": float(torch.tensor(best).exp()) if job.fitness == "loss" else None,
                          "plan": name})
        (tmp / "front.json").write_text(json.dumps({"fitness": job.fitness, "metric": job.metric, "front": front,
                                                    "linear_bytes": linear, "other_bytes": other}, indent=2) + "\n")
        (tmp / "front.md").write_text(front_markdown(front, job))
        plot_front(front, tmp / "front.png", job)
    return front


def front_markdown(front: list[dict], job: PlanJob) -> str:
    label = "held-out perplexity" if job.fitness == "loss" else "KL to dense"
    rows = ["| 2:4 fraction (target) | 2:4 fraction (achieved) | weight memory (of dense) | " + label + " | plan |",
            "|---|---|---|---|---|"]
    for point in front:
        value = point["perplexity"] if job.fitness == "loss" else point["fitness"]
        rows.append(f"| {point['budget']:.2f} | {point['achieved_fraction']:.3f} | {point['weight_memory']:.3f} | "
                    f"{value:.3f} | {point['plan']} |")
    return "\n".join(rows) + "\n"
