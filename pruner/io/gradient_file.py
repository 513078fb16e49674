"""GBLM's gradient norms kept in a file (``--gradients FILE``), so that a plan and the prunes that apply it share
one backward pass over the calibration windows instead of each taking their own (on the default model and 2
cores that pass is 3 of the 4 minutes of a gblm prune, and it grows with the model).

The file is a safetensors file: one float32 tensor per module (the weight's shape, Σ_n g_n² under the square
root, as ``sensitivity.weight_gradients``) and, in its metadata, what they were computed from: the model's
files, the calibration protocol, the dtype and the device type. A file computed from anything else is refused
with what differs, never silently reused or overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.stats import GradientStats
from mixsparse.pruner.io.models import files_stamp
from mixsparse.pruner.plans.sensitivity import weight_gradients
from mixsparse.runtime.atomic import atomic_file, check_writable
from mixsparse.runtime.errors import MixsparseError

FORMAT = "mixsparse-gradient-norms"


def check_gradients(path: str | None, metric: str) -> None:
    """``--gradients`` keeps gblm's gradient norms; with another metric it would do nothing, so it is refused."""
    from mixsparse.pruner.core.importance import get_metric

    if path is not None and not get_metric(metric).needs_gradients:
        raise MixsparseError(f"--gradients keeps gblm's gradient norms; --metric {metric} uses none")
    if path is not None and Path(path).suffix != ".safetensors":
        raise MixsparseError(f"--gradients {path}: expected a .safetensors file")
    if path is not None:
        check_writable(path)  # before the model loads, not after the dense evaluation


@dataclass(frozen=True)
class GradientFile:
    path: str
    source: dict  # what the norms are computed from; a file of other norms is refused

    @classmethod
    def of(cls, path: str | None, model_path: str, calibration, dtype: torch.dtype, device: str):
        """``None`` without a path; ``calibration`` is the data.CalibrationProtocol the windows come from."""
        if path is None:
            return None
        source = {
            "model": files_stamp(model_path),
            "calibration": calibration.to_json(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.device(device).type,
        }
        return cls(str(path), source)


def gradient_norms(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str],
    device: str | torch.device,
    after_sample: Callable[[int], None] | None,
    kept: GradientFile | None,
    computed: dict[str, GradientStats] | None = None,
) -> dict[str, GradientStats]:
    """The dense model's per-weight gradient norms of ``names`` over ``windows``: read from ``kept`` when it
    exists, else computed (for every decoder linear besides ``names``, so any later plan or prune of this model
    finds its modules there) and written to it. ``computed``: norms of the same windows a pass already made
    (the Fisher pass of an msp plan), holding every module the file would."""
    if kept is None:
        if computed is None:
            return weight_gradients(adapter, windows, names, device, after_sample)
        return {n: computed[n] for n in names}
    path = Path(kept.path)
    if path.exists():
        stored, samples, tokens = _read(path, kept.source, names)
        missing = [n for n in names if n not in stored]
        if missing:
            raise MixsparseError(
                f"gradients file {path} holds no norms for {missing[0]} ({len(missing)} modules missing); "
                "pass another --gradients path to compute a new one"
            )
        for index in range(len(windows) if after_sample else 0):  # the pass a progress bar counts is done
            after_sample(index)
        return {n: GradientStats(stored[n], samples, tokens) for n in names}
    if computed is None:
        every = list(dict.fromkeys([*adapter.linears(), *names]))
        computed = weight_gradients(adapter, windows, every, device, after_sample)
    _write(path, computed, kept.source, len(windows), int(windows.numel()))
    return {n: computed[n] for n in names}


def _write(path: Path, gradients: dict[str, GradientStats], source: dict, samples: int, tokens: int) -> None:
    from safetensors.torch import save_file

    tensors = {name: stats.norm.contiguous() for name, stats in gradients.items()}
    metadata = {"format": FORMAT, "source": json.dumps(source, sort_keys=True)}
    metadata |= {"samples": str(samples), "tokens": str(tokens)}
    # the norms never change once computed: a file that exists is read, so this only creates
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read(path: Path, source: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], int, int]:
    """The norms of those of ``names`` the file holds (only those are loaded), its samples and tokens."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise MixsparseError(f"{path} is not a mixsparse gradients file (written by --gradients)")
            stored = json.loads(metadata["source"])
            differs = [key for key in sorted(source) if stored.get(key) != source[key]]
            if differs:
                details = "; ".join(f"{k}: file {stored.get(k)}, now {source[k]}" for k in differs)
                raise MixsparseError(
                    f"gradients file {path} was computed from other {', '.join(differs)} ({details}); "
                    "pass another --gradients path, or delete the file to recompute it"
                )
            held = set(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names if name in held}
            return tensors, int(metadata["samples"]), int(metadata["tokens"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise MixsparseError(f"cannot read gradients file {path} ({error})") from None
