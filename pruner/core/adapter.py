"""Where a causal LM keeps its decoder blocks and their linear layers, found generically.

The blocks are the largest ``nn.ModuleList`` whose every child holds ``nn.Linear`` layers (Llama,
Mistral, Qwen2: ``model.layers``). Names are always fully qualified (``model.layers.3.mlp.down_proj``)
so plans, include/exclude patterns and artifacts all speak the same language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mixsparse.runtime.errors import MixsparseError

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


@dataclass
class ModelAdapter:
    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        prefix = f"{self.blocks_name}.{index}"
        return {
            f"{prefix}.{name}": module
            for name, module in self.blocks[index].named_modules()
            if isinstance(module, nn.Linear)
        }

    def linears(self) -> dict[str, nn.Linear]:
        found: dict[str, nn.Linear] = {}
        for index in range(len(self.blocks)):
            found.update(self.block_linears(index))
        return found

    def shapes(self, names=None) -> dict[str, tuple[int, int]]:
        linears = self.linears()
        return {n: (m.out_features, m.in_features) for n, m in linears.items() if names is None or n in names}

    def block_of(self, name: str) -> int:
        return int(name[len(self.blocks_name) + 1 :].split(".", 1)[0])

    def lm_head(self) -> tuple[str, nn.Linear] | None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            return None
        return next(n for n, m in self.model.named_modules() if m is head), head

    def final_norm(self) -> nn.Module:
        """The module between the last block and lm_head (needed only to calibrate lm_head)."""
        owner = self.model.get_submodule(self.blocks_name.rsplit(".", 1)[0]) if "." in self.blocks_name else self.model
        for name in FINAL_NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module):
                return module
        raise MixsparseError(
            "cannot find the final norm before lm_head; lm_head can only be pruned for Llama-style models"
        )


def adapt(model: nn.Module) -> ModelAdapter:
    candidates = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module)
        ):
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, name, module))
    if not candidates:
        raise MixsparseError(
            f"{type(model).__name__}: no decoder blocks with linear layers found (unsupported architecture)"
        )
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return ModelAdapter(model, name, blocks)


def select(names, include: str | None = None, exclude: str | None = None) -> list[str]:
    """Names matching ``include`` (regex, search) and not ``exclude``; both optional."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as error:
        raise MixsparseError(f"bad module pattern: {error}") from None
    chosen = [n for n in names if (inc is None or inc.search(n)) and not (exc and exc.search(n))]
    if not chosen:
        raise MixsparseError(f"no module matches include={include!r} exclude={exclude!r}")
    return chosen


@torch.no_grad()
def fused_groups(adapter: ModelAdapter) -> list[list[str]]:
    """Linears of a block that read the very same input tensor (q/k/v, gate/up): vLLM fuses these.

    Found by one forward pass over 4 tokens, so it holds for any architecture the adapter finds.
    """
    seen: dict[str, int] = {}
    order: list[str] = []
    alive: list[torch.Tensor] = []  # keep inputs referenced so that no id is reused during the pass
    hooks = []
    for name, module in adapter.linears().items():

        def record(module, args, name=name):
            seen[name] = id(args[0])
            alive.append(args[0])
            order.append(name)

        hooks.append(module.register_forward_pre_hook(record))
    try:
        device = next(adapter.model.parameters()).device
        adapter.model(torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[tuple[int, int], list[str]] = {}
    for name in dict.fromkeys(order):
        groups.setdefault((adapter.block_of(name), seen[name]), []).append(name)
    return list(groups.values())
