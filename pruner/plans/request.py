"""What ``mixsparse plan`` is asked for: a small request (model, allocator, metric, goal) plus the options
of each allocator, checked once before any model is loaded.

The goal is either a research plan (an average unstructured sparsity, one ratio per block or module) or a
deployment plan (dense or 2:4 per fused group under a budget, or a Pareto sweep of budgets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.io import data
from mixsparse.pruner.io.gradient_file import check_gradients
from mixsparse.pruner.search.evolve import SearchSettings
from mixsparse.pruner.search.fitness import FITNESS
from mixsparse.runtime.errors import MixsparseError

ALLOCATORS = ("uniform", "owl", "global", "fisher", "msp")
DEPLOY_ALLOCATORS = ("fisher", "msp")


@dataclass
class Research:
    """One unstructured ratio per gene (decoder block or module), averaging ``target`` in weights."""

    target: float | None = None
    granularity: str = "block"
    min_ratio: float = 0.0
    max_ratio: float = 0.99


@dataclass
class Deployment:
    """Dense or 2:4 per fused group: a fraction of decoder linear weights in 2:4, or a weight-memory
    target as a fraction of the dense model's, or (``pareto``) a sweep over ``budgets``."""

    budget: float | None = None
    memory: float | None = None
    pareto: bool = False
    budgets: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class FisherOptions:
    """The Fisher traces (fisher and msp allocators, every deployment plan) and the ``fisher`` allocation."""

    samples: int = 32
    sensitivity: str | None = None  # reuse a file written by `mixsparse sensitivity`
    spread: float = 0.1  # λ of the Fisher allocation


@dataclass
class OwlOptions:
    lam: float = 0.08  # λ: ratios stay in [target - λ, target + λ]
    multiple: float = 5.0  # M: an outlier scores above M x its layer's mean


FITNESS_SEQLEN = 128  # tokens per held-out sequence the default selection steps are counted in


def steps_for_seqlen(seqlen: int, steps: tuple[int, ...] = SearchSettings.steps) -> tuple[int, ...]:
    """The default selection steps (sequences of FITNESS_SEQLEN tokens) as sequences of ``seqlen`` tokens with
    the same tokens per step, at least one sequence each: longer sequences cost no more unless asked to."""
    return tuple(max(1, round(count * FITNESS_SEQLEN / seqlen)) for count in steps)


@dataclass
class SearchOptions:
    """The msp search, and the held-out fitness that also scores a fisher deployment front."""

    settings: SearchSettings = field(default_factory=SearchSettings)
    delta: float = 0.01
    # KL to the dense model: measured better than the next-token loss in every cell compared (BENCHMARKS.md)
    fitness: str = "kl"
    fitness_seqlen: int = FITNESS_SEQLEN
    resume: bool = False
    state: str | None = None  # default: beside --out, <out>.search.json
    # the level database of metrics with a weight update (core/levels.py): the grid's step and half-width
    level_step: float = 0.05
    level_window: float = 0.25
    # seed the per-block search with the budget-exact levels of least summed cost, each block probed alone
    # (search/probes.py); (blocks) x 8 evaluations on the first step. Off by default: it helped Wanda at 0.7
    # (0.32x uniform vs 0.36x) and hurt SparseGPT there (0.84x vs 0.76x: the search stalled near the seed)
    probe_seed: bool = False
    # --granularity module: generations of the per-module refinement after the per-block search
    refine_generations: int = 20
    # the fitness forward's matmuls (core/precision.py); bfloat16 halves a candidate's cost on a CPU with native bf16
    precision: str = "auto"


@dataclass
class PlanRequest:
    model: str
    out: str
    goal: Research | Deployment
    allocator: str = "msp"
    metric: str = "wanda"
    calibration: data.CalibrationProtocol = field(default_factory=data.CalibrationProtocol)
    device: str = "cpu"
    plot: str | None = None
    overwrite: bool = False
    fisher: FisherOptions = field(default_factory=FisherOptions)
    owl: OwlOptions = field(default_factory=OwlOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    gradients: str | None = None  # gblm: keep the dense model's gradient norms in this file (io/gradient_file.py)

    @property
    def deploy(self) -> Deployment | None:
        return self.goal if isinstance(self.goal, Deployment) else None

    @property
    def research(self) -> Research | None:
        return self.goal if isinstance(self.goal, Research) else None

    @property
    def state_path(self) -> Path:
        if self.search.state:
            return Path(self.search.state)
        out = Path(self.out)
        return out.with_name(out.name.removesuffix(".json") + ".search.json")

    @property
    def block_state_path(self) -> Path:
        """A per-module msp search's first phase, per decoder block (search/msp.py)."""
        state = self.state_path
        return state.with_name(state.name.removesuffix(".json") + ".blocks.json")

    @property
    def state_paths(self) -> list[Path]:
        return [self.state_path, self.block_state_path]

    @property
    def levels_path(self) -> Path:
        """Where a search's level database lives while it runs (core/levels.py): beside the search state."""
        state = self.state_path
        return state.with_name(state.name.removesuffix(".json") + ".levels")


def check(request: PlanRequest) -> None:
    """Everything that can be refused without the model, so it fails before the Fisher traces."""
    check_gradients(request.gradients, request.metric)
    matmul.check(request.search.precision, "search")
    if request.search.fitness not in FITNESS:
        raise MixsparseError(f"unknown fitness {request.search.fitness!r}; choose from {', '.join(FITNESS)}")
    deploy = request.deploy
    if deploy is not None:
        if request.allocator not in DEPLOY_ALLOCATORS:
            raise MixsparseError(
                f"--deploy chooses dense or 2:4 per fused group; allocator {request.allocator!r} "
                f"does not apply (use {' or '.join(DEPLOY_ALLOCATORS)})"
            )
        if not deploy.pareto and (deploy.budget is None) == (deploy.memory is None):
            raise MixsparseError("--deploy needs exactly one of --budget or --memory (or --pareto)")
        # the same range DeployBudget enforces
        fractions = ([deploy.budget] if deploy.budget is not None else []) + (
            list(deploy.budgets) if deploy.pareto else []
        )
        for fraction in fractions:
            if not 0.0 <= fraction <= 1.0:
                raise MixsparseError(
                    f"--budget {fraction:g} is infeasible: the fraction of weights in 2:4 must be in [0, 1]"
                )
        if deploy.memory is not None and not 0.0 < deploy.memory <= 1.0:
            raise MixsparseError(f"--memory {deploy.memory:g} is not a fraction of the dense weight memory in (0, 1]")
    else:
        if request.allocator not in ALLOCATORS:
            raise MixsparseError(f"unknown allocator {request.allocator!r}; choose from {', '.join(ALLOCATORS)}")
        if request.research.target is None:
            raise MixsparseError("--target is required (the average sparsity, e.g. 0.7)")
        Spec.unstructured(request.research.target)
    if request.search.resume and request.allocator != "msp":
        raise MixsparseError("--resume continues an msp search; this allocator does not search")
    if request.search.resume and not any(path.is_file() for path in request.state_paths):
        raise MixsparseError(f"--resume: search state {request.state_path} does not exist")
