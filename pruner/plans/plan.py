"""A plan is data: {qualified module name: Spec}, plus what produced it, validated against a model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mixsparse.pruner.core.spec import Spec
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.json_files import read_json, write_json

PLAN_FORMAT = "mixsparse-plan"
PLAN_VERSION = 1


@dataclass
class Plan:
    modules: dict[str, Spec]
    shapes: dict[str, tuple[int, int]]
    info: dict = field(default_factory=dict)  # allocator, metric, target, calibration, seed, traces, search...

    @classmethod
    def uniform(cls, shapes: dict[str, tuple[int, int]], spec: Spec, **info) -> "Plan":
        return cls({name: spec for name in shapes}, dict(shapes), {"allocator": "uniform", "target": str(spec), **info})

    def spec(self, name: str) -> Spec:
        return self.modules.get(name, Spec.dense())

    def weight_sparsity(self) -> float:
        """Fraction of the planned modules' weights that the plan removes (counted in weights)."""
        total = sum(o * i for o, i in self.shapes.values())
        removed = sum(self.spec(n).sparsity * o * i for n, (o, i) in self.shapes.items())
        return removed / total if total else 0.0

    def describe(self) -> str:
        """One line for tables: the allocator, the specs and how many modules take each, the weight sparsity."""
        counts: dict[str, int] = {}
        ratios = [s.sparsity for s in self.modules.values() if s.kind == "unstructured"]
        for spec in self.modules.values():
            if spec.kind != "unstructured":
                counts[str(spec)] = counts.get(str(spec), 0) + 1
        parts = [f"{n} x {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        if ratios:
            spread = (
                f"{min(ratios):.3f}" if max(ratios) - min(ratios) < 5e-4 else f"{min(ratios):.3f}-{max(ratios):.3f}"
            )
            parts.insert(0, f"{len(ratios)} x unstructured {spread}")
        return f"{self.info.get('allocator', 'custom')}: {', '.join(parts)} ({self.weight_sparsity():.1%} of weights)"

    def validate(self, model_shapes: dict[str, tuple[int, int]]) -> None:
        """Every planned module exists in the model with the planned shape, and its spec fits it."""
        unknown = sorted(set(self.modules) - set(model_shapes))
        mismatched = sorted(
            f"{name} (plan {list(self.shapes[name])}, model {list(model_shapes[name])})"
            for name in self.modules
            if name in model_shapes and name in self.shapes and tuple(self.shapes[name]) != tuple(model_shapes[name])
        )
        if unknown or mismatched:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} modules the model lacks: {_listing(unknown)}")
            if mismatched:
                parts.append(f"{len(mismatched)} with other shapes: {_listing(mismatched)}")
            raise MixsparseError("plan does not match this model: " + "; ".join(parts))
        for name, spec in self.modules.items():
            spec.check_shape(name, model_shapes[name])

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            **self.info,
            "weight_sparsity": round(self.weight_sparsity(), 6),
            "modules": {name: str(spec) for name, spec in self.modules.items()},
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise MixsparseError(f'{source} is not a mixsparse plan (no "format": "{PLAN_FORMAT}")')
        if data.get("version") != PLAN_VERSION:
            raise MixsparseError(
                f"{source}: plan version {data.get('version')!r} is not supported "
                f"(this mixsparse reads version {PLAN_VERSION})"
            )
        try:
            modules = {str(n): Spec.parse(s) for n, s in data["modules"].items()}
            shapes = {str(n): (int(s[0]), int(s[1])) for n, s in data["shapes"].items()}
        except MixsparseError as error:
            raise MixsparseError(f"{source}: {error}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise MixsparseError(f"{source}: malformed plan ({error!r})") from None
        missing = sorted(set(modules) - set(shapes))
        if missing:
            raise MixsparseError(f"{source}: no shape recorded for {_listing(missing)}")
        info = {k: v for k, v in data.items() if k not in {"format", "version", "modules", "shapes", "weight_sparsity"}}
        return cls(modules, shapes, info)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        write_json(path, self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_json(read_json(path, "plan file"), str(path))


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
