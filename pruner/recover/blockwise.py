"""Recovery after pruning: masks frozen, the kept weights (and norms) tuned block by block to match the dense model.

For each decoder block, in order: the pruned block gets the outputs of the already recovered pruned blocks
as inputs (as the sequential runner gives them) and learns, with Adam and a cosine schedule, to reproduce
the dense block's outputs (``target="dense"``: the dense block on the dense model's own inputs, so errors
of earlier blocks are corrected too; ``"same"``: the dense block on the pruned inputs). Gradients of pruned
weights are zeroed and the mask is re-applied after every step, so a zero stays exactly zero and a 2:4
module stays 2:4. Weights, optimizer state and losses are float32 whatever the model's dtype; the matmuls run
in bfloat16 (autocast) where the device computes it natively (``precision="auto"``).

``run.py`` takes the blocks in order and saves each tuned block into a state directory, so an interrupted run
resumes at the next block; the caller deletes the state once the artifact is written.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover.distill import model_masks
from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.pruner.recover.steps import call_block, cosine_schedule, masked_step


def block_masks(adapter: ModelAdapter, index: int, plan: Plan) -> dict[str, torch.Tensor]:
    """Parameter name (within the block) -> keep mask, for the block's pruned linears."""
    prefix = f"{adapter.blocks_name}.{index}."
    masks = model_masks(adapter, plan, adapter.block_linears(index))
    return {name[len(prefix) :]: mask for name, mask in masks.items()}


def tune_block(
    block: nn.Module,
    masks: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict,
    options: RecoverOptions,
    generator: torch.Generator,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    """Adam on ``block``'s parameters (float32, in place) to map ``inputs`` to ``targets``; masked entries stay 0."""
    weights, others = [], []
    for name, parameter in block.named_parameters():
        (weights if parameter.dim() >= 2 else others).append(parameter)
    groups = [{"params": weights, "lr": options.lr}]
    if options.norm_lr > 0 and others:
        groups.append({"params": others, "lr": options.norm_lr})
    tuned = {id(p) for group in groups for p in group["params"]}
    for parameter in block.parameters():
        parameter.requires_grad_(id(parameter) in tuned)
    masked = [(parameter, masks[name]) for name, parameter in block.named_parameters() if name in masks]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-10)
    samples = inputs.shape[0]
    steps_per_epoch = math.ceil(samples / options.batch)
    total = options.epochs * steps_per_epoch
    schedule = cosine_schedule(optimizer, total)
    with torch.enable_grad():
        for _ in range(options.epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, options.batch):
                index = order[start : start + options.batch]
                optimizer.zero_grad(set_to_none=True)
                with matmul.autocast(options.precision, inputs.device):
                    output = call_block(block, inputs, kwargs, index, samples)
                    loss = torch.nn.functional.mse_loss(output.float(), targets[index])
                loss.backward()
                masked_step(optimizer, schedule, masked)
                after_step()
    for parameter in block.parameters():
        parameter.requires_grad_(False)
