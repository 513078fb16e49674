"""Recovery as a prune runs it: the windows it tunes on (calibration text, or half of it and the dense model's own
chat answers), the block-wise tuning of every pruned block, then the end-to-end distillation, resumable from
a state directory beside the artifact."""

from __future__ import annotations

import math
import resource
import time
from typing import Callable

import torch

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.calibration import capture_block_inputs, place
from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover.blockwise import block_masks, tune_block
from mixsparse.pruner.recover.distill import distill_model, distill_steps
from mixsparse.pruner.recover.inputs import recovery_inputs
from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.pruner.recover.state import BlockRecord, DistillRecord, RecoverResult, RecoveryState
from mixsparse.pruner.recover.steps import float32_of, forward_block
from mixsparse.runtime.errors import MixsparseError


def recover_model(
    adapter: ModelAdapter,
    dense: ModelAdapter,
    plan: Plan,
    calibration: torch.Tensor,
    options: RecoverOptions = RecoverOptions(),
    device: str | torch.device = "cpu",
    state: RecoveryState | None = None,
    after_step: Callable[..., None] = lambda status=None: None,
) -> RecoverResult:
    """Tune ``adapter.model``'s pruned blocks in place to match ``dense`` (the same model before pruning).

    ``after_step(status)`` is called after every optimizer step (and once for each block taken from
    ``state``, with as many calls as that block's steps) so a progress bar can count them.
    """
    if len(adapter.blocks) != len(dense.blocks):
        raise MixsparseError("recovery: the dense reference has a different number of blocks")
    device = torch.device(device)
    options = options.resolved(device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    place(dense, device)
    hidden, kwargs = capture_block_inputs(dense, calibration, device)
    hidden, kwargs = hidden.float(), {k: float32_of(v) for k, v in kwargs.items()}
    pruned_hidden = hidden.clone()

    steps = options.epochs * math.ceil(hidden.shape[0] / options.batch)
    records = []
    for index in range(len(adapter.blocks)):
        block_start = time.perf_counter()
        block, reference = adapter.blocks[index], dense.blocks[index]
        home, dtype = next(block.parameters()).device, next(block.parameters()).dtype
        reference.to(device, torch.float32)
        dense_out = forward_block(reference, hidden, kwargs, options.batch, options.precision)
        targets = dense_out
        if options.target == "same":
            targets = forward_block(reference, pruned_hidden, kwargs, options.batch, options.precision)
        reference.to(home, dtype)
        block.to(device, torch.float32)
        saved = state.load(index) if state else None
        if saved is not None:
            block.load_state_dict(saved["state"])
            record = BlockRecord(**{**saved["record"], "resumed": True})
            for _ in range(steps):
                after_step()
            pruned_out = forward_block(block, pruned_hidden, kwargs, options.batch, options.precision)
        else:
            before = forward_block(block, pruned_hidden, kwargs, options.batch, options.precision)
            mse_before = float(torch.nn.functional.mse_loss(before, targets))
            del before
            generator = torch.Generator().manual_seed(options.seed * 100_003 + index)
            tune_block(
                block, block_masks(adapter, index, plan), pruned_hidden, targets, kwargs, options, generator, after_step
            )
            pruned_out = forward_block(block, pruned_hidden, kwargs, options.batch, options.precision)
            record = BlockRecord(
                index,
                mse_before,
                float(torch.nn.functional.mse_loss(pruned_out, targets)),
                time.perf_counter() - block_start,
            )
        block.to(home, dtype)
        if state is not None and saved is None:
            state.save(index, block, record)
        records.append(record)
        after_step(f"block {index}: mse {record.mse_before:.3g} -> {record.mse_after:.3g}")
        hidden, pruned_hidden = dense_out, pruned_out
    del hidden, pruned_hidden, kwargs
    distilled = None
    if options.distill_epochs > 0:
        saved = state.load_distilled() if state else None
        if saved is not None:
            adapter.model.load_state_dict(saved["state"])
            distilled = DistillRecord(**{**saved["record"], "resumed": True})
            for _ in range(distill_steps(options, calibration.shape[0])):
                after_step()
        else:
            distill_start = time.perf_counter()
            first, last = distill_model(
                adapter,
                dense,
                plan,
                calibration,
                options.distill_epochs,
                options.distill_lr,
                options.batch,
                options.seed,
                device,
                after_step,
                tune_norms=options.norm_lr > 0,
                precision=options.precision,
            )
            distilled = DistillRecord(first, last, time.perf_counter() - distill_start)
            if state is not None:
                state.save_distilled(adapter.model, distilled)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return RecoverResult(options, seconds, peak, str(device), records, distilled)


def recovery_steps(options: RecoverOptions, windows: int, blocks: int) -> int:
    """How many times recover_model calls ``after_step``: for a progress bar's total."""
    return blocks * (options.epochs * math.ceil(windows / options.batch) + 1) + distill_steps(options, windows)


def run_recovery(
    adapter, dense, tokenizer, plan, calibration, options, device, state, progress: Progress
) -> RecoverResult:
    """``options`` with ``data`` resolved ("auto" becomes what was used); chat windows are written by ``dense``."""
    start = time.perf_counter()
    options, windows = recovery_inputs(options, dense, tokenizer, calibration, device, state, progress)
    data_seconds = time.perf_counter() - start
    total = recovery_steps(options, windows.shape[0], len(adapter.blocks))
    then = f", then {options.distill_epochs} end to end" if options.distill_epochs else ""
    with progress.task(f"recovering ({len(adapter.blocks)} blocks x {options.epochs} epochs{then})", total) as advance:
        result = recover_model(adapter, dense, plan, windows, options, device, state, after_step=advance)
    result.data_seconds = data_seconds
    return result
