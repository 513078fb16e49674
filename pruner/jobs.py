"""What a prune is asked for (PruneJob) and what it reports (PruneSummary): the plain data the CLI, deploy,
the model card and the benchmarks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mixsparse.pruner.core.perplexity import Perplexity
from mixsparse.pruner.core.prune import PruneOptions, PruneResult
from mixsparse.pruner.io import data
from mixsparse.pruner.io.export import human_bytes
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.pruner.recover.state import RecoverResult


@dataclass
class PruneJob:
    model: str
    metric: str
    out: str
    sparsity: str | None = None  # uniform spec, e.g. "2:4" or "0.5"
    plan: str | None = None  # or a plan file
    include: str | None = None
    exclude: str | None = None
    prune_lm_head: bool = False
    calibration: data.CalibrationProtocol = field(default_factory=data.CalibrationProtocol)
    evaluation: data.EvaluationProtocol | None = None  # measure dense and pruned perplexity when set
    device: str = "cpu"
    dtype: str | None = None  # artifact dtype; default: the model's own
    options: PruneOptions = field(default_factory=PruneOptions)
    overwrite: bool = False
    recover: RecoverOptions | None = None  # tune the kept weights to match the dense model after pruning
    gradients: str | None = None  # gblm: keep the dense model's gradient norms in this file (io/gradient_file.py)


@dataclass
class PruneSummary:
    out: Path
    plan: Plan
    result: PruneResult
    sparsity: float  # measured over the pruned decoder linears
    weight_bytes: dict[str, int]
    perplexity: dict[str, Perplexity]
    load_seconds: float
    save_seconds: float
    recovery: RecoverResult | None = None

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "metric": self.result.metric,
            "plan": self.plan.describe(),
            "planned_weight_sparsity": self.plan.weight_sparsity(),
            "linear_sparsity": self.sparsity,
            "weight_bytes": self.weight_bytes,
            "perplexity": {k: v.to_json() for k, v in self.perplexity.items()},
            "prune_seconds": self.result.seconds,
            "load_seconds": self.load_seconds,
            "save_seconds": self.save_seconds,
            "peak_memory_bytes": self.result.peak_memory_bytes,
            "device": self.result.device,
            **({"recovery": self.recovery.to_json()} if self.recovery else {}),
        }

    def rows(self) -> list[tuple[str, str]]:
        ppl = self.perplexity
        rows = [
            ("metric", self.result.metric),
            ("plan", self.plan.describe()),
            ("linear sparsity (planned modules)", f"{self.sparsity:.2%}"),
        ]
        if ppl:
            label = f"perplexity ({ppl['pruned'].windows} windows)"
            one_shot = f"{ppl['one_shot'].perplexity:.2f} one-shot -> " if "one_shot" in ppl else ""
            rows.append(
                (
                    label,
                    f"{ppl['dense'].perplexity:.2f} dense -> {one_shot}{ppl['pruned'].perplexity:.2f} "
                    f"{'recovered' if one_shot else 'pruned'}",
                )
            )
        wb = self.weight_bytes
        rows += [
            (
                "stored weight bytes",
                f"{human_bytes(wb['stored'])} of {human_bytes(wb['dense_equivalent'])} "
                f"dense ({wb['stored'] / wb['dense_equivalent']:.1%})",
            ),
            (
                "2:4 packed modules",
                f"{human_bytes(wb['packed_stored'])} of {human_bytes(wb['packed_dense_equivalent'])} dense",
            ),
            *(
                [
                    (
                        "bitmask modules",
                        f"{human_bytes(wb['bitmask_stored'])} of {human_bytes(wb['bitmask_dense_equivalent'])} dense",
                    )
                ]
                if wb.get("bitmask_dense_equivalent")
                else []
            ),
            (
                "prune time",
                f"{self.result.seconds:.1f} s on {self.result.device} "
                f"(load {self.load_seconds:.1f} s, save {self.save_seconds:.1f} s)",
            ),
            *(
                [
                    (
                        "recovery",
                        f"{self.recovery.seconds:.1f} s on {self.recovery.device}, {self.recovery.describe()}",
                    )
                ]
                if self.recovery
                else []
            ),
            (
                "peak memory",
                human_bytes(
                    max(self.result.peak_memory_bytes, self.recovery.peak_memory_bytes if self.recovery else 0)
                ),
            ),
            ("artifact", str(self.out)),
        ]
        return rows
