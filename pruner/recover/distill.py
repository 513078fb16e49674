"""End-to-end distillation after the block-wise tuning: the whole pruned model against the dense model's
next-token distribution (KL), masks frozen."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.pruner.recover.steps import cosine_schedule, masked_step


def distill_steps(options: RecoverOptions, windows: int) -> int:
    return options.distill_epochs * math.ceil(windows / options.batch)


def model_masks(
    adapter: ModelAdapter, plan: Plan, linears: dict[str, nn.Module] | None = None
) -> dict[str, torch.Tensor]:
    """Parameter name (within the model) -> keep mask, for the pruned linears of the plan (among ``linears``:
    all the model's by default)."""
    return {
        name + ".weight": module.weight != 0
        for name, module in (adapter.linears() if linears is None else linears).items()
        if name in plan.modules and not plan.modules[name].is_dense
    }


def distill_model(
    adapter: ModelAdapter,
    dense: ModelAdapter,
    plan: Plan,
    windows: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    after_step: Callable[..., None] = lambda status=None: None,
    tune_norms: bool = True,
    precision: str = "float32",
) -> tuple[float, float]:
    """End to end: the blocks and the final norm tuned (Adam, cosine) so the pruned model's next-token
    distribution matches the dense model's (KL divergence, every position of ``windows``); masks stay.

    The block-wise step matches hidden states, where the largest dimensions dominate the error; what a user
    sees is the distribution over tokens, which this step matches directly. Embeddings (often tied to the
    output head) stay as they are, and so do norms and biases unless ``tune_norms``. Returns the mean KL of
    the first and of the last quarter of the steps.
    """
    device = torch.device(device)
    model, reference = adapter.model, dense.model
    home, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    reference_home = next(reference.parameters()).device
    model.to(device, torch.float32)
    reference.to(device)
    masks = model_masks(adapter, plan)
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings()
    embeddings |= {id(p) for p in output.parameters()} if output is not None else set()
    tuned = [(n, p) for n, p in model.named_parameters() if id(p) not in embeddings and (tune_norms or p.dim() >= 2)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, parameter in tuned:
        parameter.requires_grad_(True)
    masked = [(p, masks[n].to(device)) for n, p in tuned if n in masks]
    optimizer = torch.optim.Adam([p for _, p in tuned], lr=lr, betas=(0.9, 0.95), eps=1e-10)
    samples = windows.shape[0]
    total = epochs * math.ceil(samples / batch)
    schedule = cosine_schedule(optimizer, total)
    generator = torch.Generator().manual_seed(seed)
    autocast = matmul.autocast(precision, device)
    losses = []
    try:
        for epoch in range(epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, batch):
                rows = order[start : start + batch]
                optimizer.zero_grad(set_to_none=True)
                kl = 0.0
                # one window at a time, gradients accumulated: the vocabulary-wide logits of a whole batch (and
                # their autograd copies) would multiply the peak memory by the batch size
                for row in rows.tolist():
                    ids = windows[row : row + 1].to(device)
                    with torch.no_grad(), autocast:
                        teacher = torch.log_softmax(reference(ids, use_cache=False).logits.float(), dim=-1)
                    with torch.enable_grad(), autocast:
                        student = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
                        loss = torch.nn.functional.kl_div(
                            student[0], teacher[0], log_target=True, reduction="batchmean"
                        )
                    (loss / len(rows)).backward()
                    kl += float(loss.detach()) / len(rows)
                    del teacher, student, loss
                masked_step(optimizer, schedule, masked)
                losses.append(kl)
                after_step(f"epoch {epoch + 1}: kl {kl:.3f}")
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.to(home, dtype)
        reference.to(reference_home)
    quarter = max(1, len(losses) // 4)
    return sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
