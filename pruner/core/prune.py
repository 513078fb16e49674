"""Prune a model under a plan with a base metric, block by block."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.calibration import run_blocks
from mixsparse.pruner.core.importance import Metric, get_metric, prune_weight
from mixsparse.pruner.core.stats import GradientStats, InputStats, SharedInputs
from mixsparse.pruner.io.gradient_file import GradientFile, gradient_norms
from mixsparse.pruner.plans.plan import Plan


@dataclass
class PruneOptions:
    blocksize: int = 128  # SparseGPT lazy-update block
    damp: float = 0.01  # SparseGPT dampening, relative to mean(diag H)


@dataclass
class PruneResult:
    metric: str
    seconds: float
    peak_memory_bytes: int
    device: str
    module_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


class _SequentialPruner:
    """The runner's callback: statistics of a module's input (stats.SharedInputs), then prune it in place."""

    def __init__(
        self,
        plan: Plan,
        metric: Metric,
        options: PruneOptions,
        timings: dict[str, float],
        gradients: dict[str, GradientStats] | None = None,
    ):
        self.plan, self.metric, self.options, self.timings = plan, metric, options, timings
        self.inputs = SharedInputs(metric.needs_hessian, gradients)

    def new_block(self, index: int) -> None:
        self.inputs.clear()

    def __call__(self, index: int, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        start = time.perf_counter()
        prune_module(self.metric.name, module, self.plan.spec(name), self.inputs.of(name, x), self.options)
        self.timings[name] = time.perf_counter() - start


@torch.no_grad()
def prune_module(metric: str, module: nn.Linear, spec, stats: InputStats | None, options: PruneOptions) -> None:
    pruned = prune_weight(metric, module.weight, spec, stats, blocksize=options.blocksize, damp=options.damp)
    module.weight.copy_(pruned.to(module.weight.dtype))


@torch.no_grad()
def prune_model(
    adapter: ModelAdapter,
    plan: Plan,
    metric_name: str,
    calibration: torch.Tensor | None,
    device: str | torch.device = "cpu",
    options: PruneOptions = PruneOptions(),
    after_block: Callable[[int], None] = lambda index: None,
    after_sample: Callable[[int], None] = lambda index: None,
    kept_gradients: GradientFile | None = None,
) -> PruneResult:
    """Prune ``adapter.model`` in place. ``calibration`` (samples x tokens) is needed by wanda/sparsegpt/gblm;
    gblm first takes one backward per calibration sample on the dense model (``after_sample`` after each),
    or reads the norms from ``kept_gradients`` when an earlier command wrote them there."""
    metric = get_metric(metric_name)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    targets = {n for n, s in plan.modules.items() if not s.is_dense}
    head = adapter.lm_head()
    head_name = head[0] if head and head[0] in targets else None
    levels = plan.info.get("levels")
    if levels and levels.get("metric") == metric.name and head_name is None:
        # a plan searched over this metric's own levels: rebuild exactly the weights the search scored
        from mixsparse.pruner.core.levels import LevelGrid, prune_from_levels

        # every module the anchored pass visited, dense ones too: each takes the anchor level for the pass
        ratios = {n: (0.0 if s.is_dense else s.sparsity) for n, s in plan.modules.items()}
        gradients = None
        if metric.needs_gradients:
            gradients = gradient_norms(adapter, calibration, sorted(ratios), device, after_sample, kept_gradients)
        prune_from_levels(
            adapter,
            ratios,
            metric,
            calibration,
            LevelGrid.from_json(levels),
            device,
            {"blocksize": options.blocksize, "damp": options.damp},
            after_block,
            gradients,
        )
    elif not metric.needs_calibration:
        for index in range(len(adapter.blocks)):
            for name, module in adapter.block_linears(index).items():
                if name in targets:
                    t = time.perf_counter()
                    prune_module(metric.name, module, plan.spec(name), None, options)
                    timings[name] = time.perf_counter() - t
            after_block(index)
        if head_name:
            prune_module(metric.name, head[1], plan.spec(head_name), None, options)
    else:
        if calibration is None:
            raise ValueError(f"{metric.name} needs calibration data")
        gradients = None
        if metric.needs_gradients:
            gradients = gradient_norms(adapter, calibration, sorted(targets), device, after_sample, kept_gradients)
        pruner = _SequentialPruner(plan, metric, options, timings, gradients)

        def on_block(index: int) -> None:
            pruner.new_block(index + 1)
            after_block(index)

        hidden = run_blocks(adapter, calibration, pruner, device, names=targets, after_block=on_block)
        if head_name:
            module = head[1]
            pruner(len(adapter.blocks), head_name, module, adapter.final_norm()(hidden).to(module.weight.dtype))
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return PruneResult(metric.name, seconds, peak, str(device), timings)


def linear_sparsity(modules: dict[str, nn.Linear]) -> tuple[int, int]:
    """(zeros, total) over the weights of ``modules``."""
    zeros = total = 0
    for module in modules.values():
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros, total
