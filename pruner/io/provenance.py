"""What an artifact's weights were made from: the request a prune ran under (``deploy`` reuses an artifact whose
request is the same) and the dtype the artifact is stored in."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.artifact import parse_dtype


def request_of(job: PruneJob, resolved: str) -> dict:
    """What determines an artifact's weights; `deploy` reuses an artifact whose request is the same."""
    plan_digest = None
    if job.plan:
        plan_digest = hashlib.sha256(Path(job.plan).read_bytes()).hexdigest()
    return {
        "model": str(Path(resolved).resolve()) if Path(resolved).exists() else resolved,
        "metric": job.metric,
        "sparsity": job.sparsity,
        "plan_sha256": plan_digest,
        "include": job.include,
        "exclude": job.exclude,
        "prune_lm_head": job.prune_lm_head,
        "calibration": job.calibration.to_json(),
        "dtype": job.dtype,
        "options": vars(job.options),
        **({"recover": job.recover.to_json()} if job.recover else {}),
    }


def stored_dtype(path: str, requested: str | None) -> torch.dtype:
    if requested:
        return parse_dtype(requested)
    if artifact.is_artifact(path):
        return artifact.read_config(path).dtype
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:
        return torch.bfloat16
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype) if dtype in ("bfloat16", "float16", "float32") else None
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
