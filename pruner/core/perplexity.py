"""Perplexity on non-overlapping windows, and how sparse a model's linears really are."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from mixsparse.pruner.io.data import EvaluationProtocol
from mixsparse.pruner.io.models import files_stamp
from mixsparse.runtime.atomic import atomic_file


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted (seqlen - 1 per window)
    windows: int
    seconds: float
    protocol: dict

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    protocol: EvaluationProtocol,
    device: str | torch.device = "cpu",
    after_window: Callable[[int], None] = lambda index: None,
) -> Perplexity:
    """exp(mean next-token NLL) over ``windows`` (n x seqlen), one window at a time."""
    start = time.perf_counter()
    total_nll = 0.0
    tokens = 0
    for index, window in enumerate(windows):
        ids = window.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
        after_window(index)
    nll = total_nll / tokens
    return Perplexity(
        math.exp(nll),
        nll,
        tokens,
        len(windows),
        time.perf_counter() - start,
        {**protocol.to_json(), "windows": len(windows)},
    )


def result_cache_key(model_path: str, protocol: EvaluationProtocol, dtype: torch.dtype) -> str:
    """Identifies (weights, protocol, dtype): cached dense perplexities are reused only for the same files."""
    stamp = [files_stamp(model_path), str(dtype), json.dumps(protocol.to_json(), sort_keys=True)]
    return hashlib.sha256("|".join(stamp).encode()).hexdigest()[:24]


def cached(cache: Path, key: str) -> Perplexity | None:
    file = cache / f"{key}.json"
    if not file.is_file():
        return None
    try:
        return Perplexity(**json.loads(file.read_text()))
    except (OSError, TypeError, ValueError):  # a damaged cache entry is recomputed
        return None


def store(cache: Path, key: str, result: Perplexity) -> None:
    with atomic_file(cache / f"{key}.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(result.to_json()))
