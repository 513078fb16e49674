"""Research-plan candidates pruned by the base metric itself: a database of levels (as EvoPress keeps).

One sequential pass over the calibration data, as ``prune`` makes it, with every module pruned at the
*anchor* level (the plan's target), so each block sees the inputs of a pruned model. At each module, on the
statistics of its input in that pass, the module is pruned at every level of a grid around the anchor. A
search candidate swaps those weights in, and ``prune --plan`` of the plan it finds reruns the same pass and
keeps, per module, the level the plan chose (``prune_from_levels``): what the search scored is what gets
written, bit for bit, whatever the metric (SparseGPT with its weight update included).

Two kinds of metric, told apart by the registry (``Metric.scores_as``), not by name:
- score metrics (magnitude, Wanda, ...): a level is a threshold of the module's score ranks, so any ratio is
  a level; the ranks are kept in memory (int16/int32: 2-4 bytes per weight) and nothing goes to disk.
- metrics with a weight update (SparseGPT): every grid level's weights are computed once and written to
  disk in the bitmask layout (float32 kept values + 1 bit per weight), read back per candidate; what the
  search holds in memory stays about one model, and the database is reused by a later run that asks for
  the same thing (same model, metric, calibration, anchor and grid).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.calibration import run_blocks
from mixsparse.pruner.core.importance import Metric
from mixsparse.pruner.core.masks import pruned_count, ranks
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.core.stats import InputStats, SharedInputs
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.bitmask import Bitmask

DATABASE_FORMAT = "mixsparse-levels"


@dataclass(frozen=True)
class LevelGrid:
    anchor: float  # the calibration pass prunes every module at this level (the plan's target)
    step: float
    levels: tuple[float, ...]

    @classmethod
    def around(cls, anchor: float, step: float, window: float, low: float, high: float) -> "LevelGrid":
        """anchor + k·step for every k keeping the level within ``window`` of the anchor and in [low, high]."""
        if step <= 0 or window < 0:
            raise MixsparseError(f"level grid: step {step:g} must be > 0 and window {window:g} >= 0")
        k_low = math.ceil((max(low, anchor - window, 0.0) - anchor) / step - 1e-9)
        k_high = math.floor((min(high, anchor + window, 0.99) - anchor) / step + 1e-9)
        return cls(anchor, step, tuple(round(anchor + k * step, 6) for k in range(k_low, k_high + 1)))

    def index(self, ratio: float) -> int:
        for i, level in enumerate(self.levels):
            if abs(level - ratio) < 1e-6:
                return i
        raise MixsparseError(f"ratio {ratio:g} is not a level of the grid {list(self.levels)}")

    def to_json(self) -> dict:
        return {"anchor": self.anchor, "step": self.step, "levels": list(self.levels)}

    @classmethod
    def from_json(cls, data: dict) -> "LevelGrid":
        return cls(float(data["anchor"]), float(data["step"]), tuple(float(x) for x in data["levels"]))


def stores_levels(metric: Metric) -> bool:
    """Whether a level of this metric is more than a threshold of its scores (a weight update)."""
    return metric.scores_as != metric.name


def level_weight(
    metric: Metric,
    dense: torch.Tensor,
    stats: InputStats | None,
    ratio: float,
    rank: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """The module's float32 weight pruned at ``ratio`` by ``metric``: the one definition the database and
    ``prune_from_levels`` share (``rank``: the score ranks, for score metrics)."""
    dense = dense.float()
    if ratio <= 0:
        return dense.clone()
    if stores_levels(metric):
        return metric.prune(dense, Spec.unstructured(ratio), stats, **options)
    if rank is None:
        rank = ranks(metric.score(dense, stats), metric.per_row)
    width = dense.shape[1] if metric.per_row else dense.numel()
    return torch.where(rank >= pruned_count(width, ratio), dense, torch.zeros((), dtype=dense.dtype))


class LevelStore:
    """Each module's weights at every level: ranks in memory, or bitmask files in ``directory``."""

    def __init__(self, metric: Metric, grid: LevelGrid, directory: Path | None):
        if stores_levels(metric) and directory is None:
            raise ValueError(f"{metric.name} levels need a directory")
        self.metric, self.grid, self.directory = metric, grid, directory
        self.ranks: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}

    def add(self, name: str, dense: torch.Tensor, stats: InputStats | None, **options) -> torch.Tensor:
        """Record ``name``'s levels from its dense weight and input statistics; its weight at the anchor."""
        if not stores_levels(self.metric):
            self.ranks[name] = ranks(self.metric.score(dense.float(), stats), self.metric.per_row)
            return level_weight(self.metric, dense, stats, self.grid.anchor, self.ranks[name])
        tensors, anchor, anchor_index = {}, None, self.grid.index(self.grid.anchor)
        for index, level in enumerate(self.grid.levels):
            weight = level_weight(self.metric, dense, stats, level, **options)
            if index == anchor_index:
                anchor = weight
            packed = Bitmask.pack(weight, name)
            tensors.update({f"{index}.values": packed.values, f"{index}.mask": packed.mask})
            tensors[f"{index}.offsets"] = packed.offsets
        path = self.directory / f"{name}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        self.files[name] = path
        return anchor

    def weight(self, name: str, dense: torch.Tensor, ratio: float) -> torch.Tensor:
        if ratio <= 0:
            return dense
        if name in self.ranks:
            return level_weight(self.metric, dense, None, ratio, self.ranks[name])
        index = self.grid.index(ratio)
        with safe_open(str(self.files[name]), framework="pt") as handle:
            packed = Bitmask(
                handle.get_tensor(f"{index}.values"),
                handle.get_tensor(f"{index}.mask"),
                handle.get_tensor(f"{index}.offsets"),
                tuple(dense.shape),
            )
        return packed.unpack()

    @property
    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


class _Pass:
    """The runner's callback: the module's input statistics (stats.SharedInputs, as ``prune`` gathers them),
    then the anchor weight ``on_module`` returns, kept for the rest of the pass."""

    def __init__(
        self,
        metric: Metric,
        on_module: Callable[[str, torch.nn.Linear, InputStats], torch.Tensor],
        gradients: dict | None = None,
    ):
        self.on_module = on_module
        self.inputs = SharedInputs(metric.needs_hessian, gradients)

    def __call__(self, index: int, name: str, module: torch.nn.Linear, x: torch.Tensor) -> None:
        anchor = self.on_module(name, module, self.inputs.of(name, x))
        module.weight.copy_(anchor.to(module.weight.dtype))


@torch.no_grad()
def anchored_pass(
    adapter: ModelAdapter,
    names: list[str],
    metric: Metric,
    windows: torch.Tensor | None,
    device: str | torch.device,
    on_module: Callable[[str, torch.nn.Linear, InputStats | None], torch.Tensor],
    after_block: Callable[[int], None] = lambda index: None,
    gradients: dict | None = None,
) -> None:
    """Visit every module in ``names`` once, block by block, with its input statistics from the calibration
    pass (none for metrics without calibration); ``on_module`` returns the anchor weight the module keeps
    for the rest of the pass."""
    if not metric.needs_calibration:
        for index in range(len(adapter.blocks)):
            for name, module in adapter.block_linears(index).items():
                if name in names:
                    module.weight.copy_(on_module(name, module, None).to(module.weight.dtype))
            after_block(index)
        return
    if windows is None:
        raise ValueError(f"{metric.name} needs calibration data")
    visitor = _Pass(metric, on_module, gradients)

    def on_block(index: int) -> None:
        visitor.inputs.clear()
        after_block(index)

    run_blocks(adapter, windows, visitor, device, names=set(names), after_block=on_block)


@torch.no_grad()
def build_levels(
    adapter: ModelAdapter,
    names: list[str],
    metric: Metric,
    windows: torch.Tensor | None,
    grid: LevelGrid,
    device: str | torch.device,
    directory: Path | None,
    fingerprint: dict,
    options: dict | None = None,
    after_block: Callable[[int], None] = lambda index: None,
    gradients: dict | None = None,
) -> LevelStore:
    """The level database of ``names``; the model's weights are dense again afterwards. A stored database
    in ``directory`` that was built for the same ``fingerprint`` is reused, not rebuilt."""
    options = options or {}
    linears = adapter.linears()
    if stores_levels(metric):
        manifest = directory / "levels.json"
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("fingerprint") == fingerprint and all(
                (directory / f"{n}.safetensors").is_file() for n in names
            ):
                store = LevelStore(metric, grid, directory)
                store.files = {n: directory / f"{n}.safetensors" for n in names}
                for index in range(len(adapter.blocks)):
                    after_block(index)
                return store
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    store = LevelStore(metric, grid, directory)
    dense = {n: linears[n].weight.detach().clone() for n in names}
    try:
        anchored_pass(
            adapter,
            names,
            metric,
            windows,
            device,
            lambda name, module, stats: store.add(name, dense[name], stats, **options),
            after_block,
            gradients,
        )
    finally:
        for name in names:
            linears[name].weight.copy_(dense[name])
    if stores_levels(metric):
        manifest_data = {"format": DATABASE_FORMAT, "fingerprint": fingerprint, "grid": asdict(grid)}
        (directory / "levels.json").write_text(json.dumps(manifest_data, indent=2) + "\n")
    return store


@torch.no_grad()
def prune_from_levels(
    adapter: ModelAdapter,
    ratios: dict[str, float],
    metric: Metric,
    windows: torch.Tensor | None,
    grid: LevelGrid,
    device: str | torch.device,
    options: dict | None = None,
    after_block: Callable[[int], None] = lambda index: None,
    gradients: dict | None = None,
) -> None:
    """Prune every module of ``ratios`` in place to its level, by the same pass the database was built with:
    the weights are bit-equal to the database's (what the search scored)."""
    options = options or {}
    names = list(ratios)
    linears = adapter.linears()
    planned: dict[str, torch.Tensor] = {}

    def on_module(name: str, module: torch.nn.Linear, stats: InputStats | None) -> torch.Tensor:
        dense = module.weight.detach().clone()
        rank = None if stores_levels(metric) else ranks(metric.score(dense.float(), stats), metric.per_row)
        anchor = level_weight(metric, dense, stats, grid.anchor, rank, **options)
        ratio = ratios[name]
        if stores_levels(metric) and ratio > 0:
            ratio = grid.levels[grid.index(ratio)]  # the grid's own float, as the database computed it
        same = abs(ratio - grid.anchor) < 1e-9
        planned[name] = anchor if same else level_weight(metric, dense, stats, ratio, rank, **options)
        return anchor

    anchored_pass(adapter, names, metric, windows, device, on_module, after_block, gradients)
    for name, weight in planned.items():
        linears[name].weight.copy_(weight.to(linears[name].weight.dtype))
