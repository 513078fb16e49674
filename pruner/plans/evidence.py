"""What the allocators decide from, computed once per model: Fisher traces (``mixsparse sensitivity``),
the input statistics of every module, and every module pruned to 2:4 by the base metric."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mixsparse.pruner.core.adapter import ModelAdapter, adapt
from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.core.prune import prune_model
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.core.stats import GradientStats, InputStats, activation_stats
from mixsparse.pruner.io import data, models
from mixsparse.pruner.io.gradient_file import GradientFile, gradient_norms
from mixsparse.pruner.io.sizes import check_windows, hidden_size
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.pruner.plans.sensitivity import Sensitivity, fisher_and_gradients, fisher_traces
from mixsparse.runtime.atomic import refuse_existing
from mixsparse.runtime.errors import MixsparseError


@dataclass
class Evidence:
    loaded: models.LoadedModel
    adapter: ModelAdapter
    shapes: dict[str, tuple[int, int]]
    sensitivity: Sensitivity | None = None
    stats: dict[str, InputStats] | None = None  # activation statistics of every module's input
    weights_24: dict[str, torch.Tensor] | None = None  # every module pruned to 2:4 by the base metric
    gradients: dict[str, GradientStats] | None = None  # gblm: per-weight gradient norms of the dense model


def load_model(model: str, device: str) -> Evidence:
    loaded = models.load(model, dtype=torch.float32 if device == "cpu" else None)
    adapter = adapt(loaded.model)
    return Evidence(loaded, adapter, adapter.shapes())


def gather(
    request: PlanRequest, progress: Progress, need_fisher: bool, need_stats: bool, need_gradients: bool = False
) -> Evidence:
    calibrated = need_gradients or need_stats
    path = models.resolve(request.model)
    if calibrated:
        check_windows("--samples", request.calibration.samples, request.calibration.seqlen, hidden_size(path))
    if need_fisher and not request.fisher.sensitivity:  # one sequence at a time: only its ids are held at once
        check_windows("--fisher-samples", request.fisher.samples, request.calibration.seqlen)
    evidence = load_model(request.model, request.device)
    computed = None  # gblm's norms, when the Fisher pass computed them too
    windows = data.calibration_windows(evidence.loaded.tokenizer, request.calibration) if calibrated else None
    if need_fisher:
        if request.fisher.sensitivity:
            evidence.sensitivity = Sensitivity.load(request.fisher.sensitivity)
            evidence.sensitivity.check_model(evidence.shapes)
        elif need_gradients and shares_a_pass(request, evidence, windows):
            evidence.sensitivity, computed = sensitivity_and_gradients(evidence, request, windows, progress)
        else:
            evidence.sensitivity = compute_sensitivity(
                evidence, request.calibration, request.fisher.samples, request.device, progress
            )
    if need_stats:
        blocks = len(evidence.adapter.blocks)
        with progress.task(f"activation norms ({blocks} blocks)", blocks) as advance:
            evidence.stats = activation_stats(
                evidence.adapter, windows, list(evidence.shapes), request.device, after_block=lambda index: advance()
            )
    if need_gradients:  # GBLM's per-weight gradient norms of the dense model, on the calibration windows
        kept, names = kept_gradients(request, evidence), list(evidence.shapes)
        if computed is not None:
            evidence.gradients = gradient_norms(evidence.adapter, windows, names, request.device, None, kept, computed)
        else:
            with progress.task(f"gradient norms ({len(windows)} samples)", len(windows)) as advance:
                evidence.gradients = gradient_norms(
                    evidence.adapter, windows, names, request.device, lambda index: advance(), kept
                )
        if evidence.stats is not None:
            evidence.stats = {n: replace(s, gradient=evidence.gradients[n]) for n, s in evidence.stats.items()}
    return evidence


def kept_gradients(request: PlanRequest, evidence: Evidence) -> GradientFile | None:
    dtype = next(evidence.adapter.model.parameters()).dtype
    return GradientFile.of(request.gradients, evidence.loaded.path, request.calibration, dtype, request.device)


def shares_a_pass(request: PlanRequest, evidence: Evidence, windows: torch.Tensor) -> bool:
    """The Fisher traces and gblm's gradient norms come from one backward pass when the Fisher windows are the
    first of the calibration windows (the same protocol, fewer or as many samples; the seeded draw makes them a
    prefix) and the norms are not read from a --gradients file that has them already."""
    kept = kept_gradients(request, evidence)
    if kept is not None and Path(kept.path).exists():
        return False
    samples = request.fisher.samples
    if samples < 1 or samples > request.calibration.samples:
        return False
    fisher = data.calibration_windows(evidence.loaded.tokenizer, replace(request.calibration, samples=samples))
    return torch.equal(fisher, windows[:samples])


def sensitivity_and_gradients(
    evidence: Evidence, request: PlanRequest, windows: torch.Tensor, progress: Progress
) -> tuple[Sensitivity, dict[str, GradientStats]]:
    samples, names = request.fisher.samples, list(evidence.shapes)
    title = f"Fisher traces ({samples} samples) and gradient norms ({len(windows)})"
    with progress.task(title, len(windows)) as advance:
        sensitivity, gradients = fisher_and_gradients(
            evidence.adapter, windows, samples, names, names, request.device, lambda index: advance()
        )
    describe(sensitivity, evidence, replace(request.calibration, samples=samples))
    return sensitivity, gradients


def describe(sensitivity: Sensitivity, evidence: Evidence, calibration: data.CalibrationProtocol) -> None:
    sensitivity.info.update(
        {
            "model": evidence.loaded.name,
            "calibration": calibration.to_json(),
            "loss": "mean next-token NLL per sequence",
        }
    )


def compute_sensitivity(
    evidence: Evidence, calibration: data.CalibrationProtocol, samples: int, device: str, progress: Progress
) -> Sensitivity:
    if samples < 1:
        raise MixsparseError("--samples must be at least 1")
    windows = data.calibration_windows(evidence.loaded.tokenizer, replace(calibration, samples=samples))
    with progress.task(f"Fisher traces ({samples} samples)", samples) as advance:
        sensitivity = fisher_traces(
            evidence.adapter, windows, list(evidence.shapes), device, after_sample=lambda index: advance()
        )
    describe(sensitivity, evidence, replace(calibration, samples=samples))
    return sensitivity


def sensitivity_command(
    model: str,
    out: str,
    samples: int,
    calibration: data.CalibrationProtocol,
    device: str,
    plot: str | None,
    overwrite: bool,
    progress: Progress = Silent(),
) -> Sensitivity:
    refuse_existing(out, overwrite)
    if plot:
        refuse_existing(plot, overwrite)
    check_windows("--samples", samples, calibration.seqlen)
    sensitivity = compute_sensitivity(load_model(model, device), calibration, samples, device, progress)
    sensitivity.save(out, overwrite)
    if plot:
        from mixsparse.pruner.io.plots import plot_sensitivity

        plot_sensitivity(sensitivity, plot, overwrite)
    return sensitivity


def base_weights_24(request: PlanRequest, evidence: Evidence, progress: Progress) -> dict[str, torch.Tensor]:
    """Every decoder linear pruned to 2:4 by the request's metric, once (sequential calibration, as ``prune``
    does), then the dense weights put back. Deployment candidates swap these in for their 2:4 groups."""
    if evidence.weights_24 is None:
        linears = evidence.adapter.linears()
        names = list(evidence.shapes)
        dense = {n: linears[n].weight.detach().clone() for n in names}
        metric = get_metric(request.metric)
        windows = (
            data.calibration_windows(evidence.loaded.tokenizer, request.calibration)
            if metric.needs_calibration
            else None
        )
        plan = Plan({n: Spec.nm(2, 4) for n in names}, dict(evidence.shapes), {"allocator": "all 2:4"})
        blocks = len(evidence.adapter.blocks)
        with progress.task(f"{request.metric} 2:4 weights of every group ({blocks} blocks)", blocks) as advance:
            prune_model(
                evidence.adapter,
                plan,
                request.metric,
                windows,
                request.device,
                after_block=lambda index: advance(),
                kept_gradients=kept_gradients(request, evidence),
            )
        evidence.adapter.model.to("cpu")
        with torch.no_grad():
            evidence.weights_24 = {n: linears[n].weight.detach().clone() for n in names}
            for n in names:
                linears[n].weight.copy_(dense[n])
    return evidence.weights_24
