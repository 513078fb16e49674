"""The matmul precision of the pruner's own forward passes (recovery, the msp search's fitness).

Weights, optimizer state and losses stay float32; ``bfloat16`` runs the matmuls under torch autocast. ``auto``
means bfloat16 where the device computes it natively (a CPU reporting AVX512-BF16 or AMX, the test vLLM's CPU
serving dtype uses; a CUDA GPU with bf16) and float32 elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import torch

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.machine import cpu_serving_dtype

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_serving_dtype() == "bfloat16"


def check(precision: str, what: str) -> None:
    if precision not in PRECISIONS:
        raise MixsparseError(f"{what} precision {precision!r}: choose from {', '.join(PRECISIONS)}")


def resolve(precision: str, device: str | torch.device) -> str:
    """``precision`` with ``auto`` replaced by what it means on ``device``."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bf16(device) else "float32"


def autocast(precision: str, device: str | torch.device):
    """The context a forward pass runs in, for a resolved ``precision``."""
    # no cast cache: within one autocast region a weight is cast once, so recovery's tuning steps after the first
    # (or a search candidate's swapped-in weights) would be seen as they were at the first cast
    return torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16", cache_enabled=False
    )


def compute_dtype(device: str, stored: torch.dtype) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there and the OBS update wants float32); stored dtype on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else stored


def check_device(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise MixsparseError("--device cuda was asked for, but CUDA is not available here")
    if kind not in ("cpu", "cuda"):
        raise MixsparseError(f"unsupported device {device!r}; use cpu or cuda")
    return device
