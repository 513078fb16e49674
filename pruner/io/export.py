"""From a pruned transformers model to a mixsparse artifact, and from an artifact to plain transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.plans.plan import Plan
from mixsparse.runtime.atomic import atomic_dir, refuse_existing
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.hf import load_dense

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one is needed to tokenize


def module_entries(
    adapter: ModelAdapter, plan: Plan, groups: list[list[str]], dtype: torch.dtype | None = None
) -> dict[str, artifact.ModuleEntry]:
    """One entry per pruned module: its format, storage (chosen by its bytes stored in ``dtype``, default the
    weights' own), shape and measured sparsity."""
    modules = dict(adapter.linears())
    head = adapter.lm_head()
    if head:
        modules[head[0]] = head[1]
    pruned = {name: spec for name, spec in plan.modules.items() if not spec.is_dense}
    formats = {
        name: ("unstructured" if spec.kind == "unstructured" else str(spec), tuple(modules[name].weight.shape))
        for name, spec in pruned.items()
    }
    # counted in the stored dtype: a weight too small for fp16 becomes a zero the bitmask does not keep
    nnz = {
        name: int((modules[name].weight.detach().to(dtype or modules[name].weight.dtype) != 0).sum()) for name in pruned
    }
    element = torch.empty((), dtype=dtype or next(iter(modules.values())).weight.dtype).element_size()
    storage = artifact.storage_for(formats, groups, nnz, element)
    entries = {}
    for name, (fmt, shape) in formats.items():
        weight = modules[name].weight
        sparsity = float((weight == 0).sum()) / weight.numel()
        entries[name] = artifact.ModuleEntry(
            fmt, storage[name], shape, round(sparsity, 6), nnz[name] if storage[name] == artifact.BITMASK else None
        )
    return entries


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (lm_head tied to the embeddings)."""
    seen: set[tuple[int, tuple]] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        state[key] = tensor
    return state


def save_artifact(
    model: torch.nn.Module,
    tokenizer,
    entries: dict[str, artifact.ModuleEntry],
    groups: list[list[str]],
    out: str | os.PathLike,
    dtype: torch.dtype,
    texts: dict[str, str],
    overwrite: bool = False,
) -> artifact.ArtifactConfig:
    """Write the artifact in one atomic rename: compressed sparse weights (``entries``, see ``module_entries``),
    config, tokenizer, generation config and ``texts`` (``plan.json``, the model card)."""
    pretrained = [tokenizer] + (
        [model.generation_config] if getattr(model, "generation_config", None) is not None else []
    )
    return artifact.write(
        out, unique_state_dict(model), entries, groups, model.config.to_dict(), dtype, texts, pretrained, overwrite
    )


def export_dense(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A plain transformers copy of an artifact: dense weights with zeros, no quantization_config."""
    refuse_existing(out, overwrite)
    if not any((Path(source) / name).is_file() for name in VOCABULARY_FILES):
        # a copy without them loads its weights but not its tokenizer: not the plain model users expect
        raise MixsparseError(
            f"{source} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); copy the "
            f"base model's tokenizer files into it, then export"
        )
    model, config = load_dense(source)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES + ("plan.json",):
            if (config.path / name).is_file() and not (tmp / name).exists():
                shutil.copy2(config.path / name, tmp / name)
    return Path(out)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"
