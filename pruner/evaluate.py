"""The ``eval`` verb as a function: a model's or an artifact's perplexity (cached for unchanged files) and how
sparse its linears are."""

from __future__ import annotations

from dataclasses import dataclass

from mixsparse.pruner.core.adapter import adapt
from mixsparse.pruner.core.perplexity import Perplexity, cached, perplexity, result_cache_key, store
from mixsparse.pruner.core.precision import check_device, compute_dtype
from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.core.prune import linear_sparsity
from mixsparse.pruner.io import data, models
from mixsparse.pruner.io.provenance import stored_dtype


def run_perplexity(model, windows, protocol, device, progress: Progress, label: str) -> Perplexity:
    model.to(device)
    with progress.task(f"perplexity ({label}, {len(windows)} windows)", len(windows)) as advance:
        return perplexity(model, windows, protocol, device, after_window=lambda index: advance())


def cached_perplexity(loaded: models.LoadedModel, windows, protocol, device, progress, label) -> Perplexity:
    """Perplexity of an unchanged model is cached per (files, protocol, dtype): dense baselines are reused."""
    cache = models.cache_dir() / "perplexity"
    key = result_cache_key(loaded.path, protocol, next(loaded.model.parameters()).dtype)
    hit = cached(cache, key)
    if hit is not None:
        return hit
    result = run_perplexity(loaded.model, windows, protocol, device, progress, label)
    store(cache, key, result)
    return result


@dataclass
class EvalSummary:
    model: str
    perplexity: Perplexity
    sparsity: float  # over all decoder linears
    artifact: bool

    def to_json(self) -> dict:
        return {
            "model": self.model,
            **self.perplexity.to_json(),
            "linear_sparsity": self.sparsity,
            "artifact": self.artifact,
        }


def evaluate_model(
    model: str,
    protocol: data.EvaluationProtocol,
    device: str = "cpu",
    progress: Progress = Silent(),
    use_cache: bool = True,
) -> EvalSummary:
    check_device(device)
    path = models.resolve(model)
    loaded = models.load(model, dtype=compute_dtype(device, stored_dtype(path, None)))
    adapter = adapt(loaded.model)
    zeros, total = linear_sparsity(adapter.linears())
    windows = data.evaluation_windows(loaded.tokenizer, protocol)
    if use_cache:
        result = cached_perplexity(loaded, windows, protocol, device, progress, model)
    else:
        result = run_perplexity(loaded.model, windows, protocol, device, progress, model)
    return EvalSummary(model, result, zeros / max(total, 1), loaded.artifact is not None)
