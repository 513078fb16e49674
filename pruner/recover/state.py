"""What recovery did (per block and end to end), and the state an interrupted recovery resumes from."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.runtime.atomic import atomic_file

log = logging.getLogger(__name__)


@dataclass
class BlockRecord:
    index: int
    mse_before: float  # mean squared error of the block output against the target, all calibration tokens
    mse_after: float
    seconds: float
    resumed: bool = False


@dataclass
class DistillRecord:
    kl_start: float  # mean KL(dense || pruned) per token of the batches of the first quarter of the steps
    kl_end: float  # ... of the last quarter
    seconds: float
    resumed: bool = False


@dataclass
class RecoverResult:
    options: RecoverOptions
    seconds: float
    peak_memory_bytes: int
    device: str
    blocks: list[BlockRecord] = field(default_factory=list)
    distill: DistillRecord | None = None
    data_seconds: float = 0.0  # writing the chat windows (text+chat), before any block is tuned

    @property
    def resumed_blocks(self) -> int:
        return sum(b.resumed for b in self.blocks)

    def describe(self) -> str:
        o = self.options
        resumed = f", {self.resumed_blocks} blocks resumed" if self.resumed_blocks else ""
        return (
            f"{o.epochs} epochs x {len(self.blocks)} blocks, batch {o.batch}, lr {o.lr:g} (norms {o.norm_lr:g}), "
            f"{o.target} targets, {o.precision} matmuls{resumed}"
        ) + (
            f"; then {o.distill_epochs} epoch(s) end to end against the dense model's token distribution, lr "
            f"{o.distill_lr:g}, KL {self.distill.kl_start:.3f} -> {self.distill.kl_end:.3f}"
            if self.distill
            else ""
        )

    def to_json(self) -> dict:
        return {
            "options": self.options.to_json(),
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
            "resumed_blocks": self.resumed_blocks,
            "data_seconds": round(self.data_seconds, 2),
            **(
                {
                    "distill": {
                        k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in asdict(self.distill).items()
                    }
                }
                if self.distill
                else {}
            ),
            "blocks": [
                {
                    **asdict(b),
                    "mse_before": float(f"{b.mse_before:.6g}"),
                    "mse_after": float(f"{b.mse_after:.6g}"),
                    "seconds": round(b.seconds, 2),
                }
                for b in self.blocks
            ],
        }


class RecoveryState:
    """Tuned blocks saved one file each, with the request they belong to; a different request starts over."""

    def __init__(self, directory: str | os.PathLike, request: dict):
        self.directory = Path(directory)
        self.key = json.dumps(request, sort_keys=True, default=str)
        manifest = self.directory / "state.json"
        if manifest.is_file():
            try:
                same = json.loads(manifest.read_text()).get("request") == self.key
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                log.warning("recovery state in %s belongs to another request; starting over", self.directory)
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(manifest, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"request": self.key}) + "\n")

    def _file(self, index: int) -> Path:
        return self.directory / f"block-{index}.pt"

    def load(self, index: int) -> dict | None:
        file = self._file(index)
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None

    def save(self, index: int, block: nn.Module, record: BlockRecord) -> None:
        payload = {
            "state": {k: v.detach().cpu().clone() for k, v in block.state_dict().items()},
            "record": asdict(record),
        }
        with atomic_file(self._file(index), overwrite=True) as tmp:
            torch.save(payload, tmp)

    def load_distilled(self) -> dict | None:
        file = self.directory / "distilled.pt"
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None

    def save_distilled(self, model: nn.Module, record: "DistillRecord") -> None:
        payload = {
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "record": asdict(record),
        }
        with atomic_file(self.directory / "distilled.pt", overwrite=True) as tmp:
            torch.save(payload, tmp)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
