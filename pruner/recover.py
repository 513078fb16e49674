"""Recovery after pruning: masks frozen, the kept weights (and norms) tuned block by block to match the dense model.

For each decoder block, in order: the pruned block gets the outputs of the already recovered pruned blocks
as inputs (as the sequential runner gives them) and learns, with Adam and a cosine schedule, to reproduce
the dense block's outputs (``target="dense"``: the dense block on the dense model's own inputs, so errors
of earlier blocks are corrected too; ``"same"``: the dense block on the pruned inputs). Gradients of pruned
weights are zeroed and the mask is re-applied after every step, so a zero stays exactly zero and a 2:4
module stays 2:4. Weights, optimizer state and losses are float32 whatever the model's dtype; the matmuls run
in bfloat16 (autocast) where the device computes it natively (``precision="auto"``).

After each block its tuned weights are saved into a state directory, so an interrupted run resumes at the
next block; the caller deletes the state once the artifact is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.adapter import ModelAdapter
from mixsparse.pruner.calibration import capture_block_inputs, place
from mixsparse.pruner.chat_data import has_chat_template
from mixsparse.pruner import precision as matmul
from mixsparse.pruner.plan import Plan
from mixsparse.runtime.atomic import atomic_file
from mixsparse.runtime.errors import MixsparseError

log = logging.getLogger(__name__)

TARGETS = ("dense", "same")
# what the blocks are tuned on: the calibration windows alone, or half of them and half the dense model's own
# chat answers (chat_data.py); auto: text+chat when the tokenizer has a chat template
DATA = ("auto", "text", "text+chat")
# recovery's matmuls; auto: bfloat16 where the device has native bf16 (AVX512-BF16/AMX, a CUDA GPU
# with bf16), float32 elsewhere (emulated bf16 is slower than float32)


@dataclass(frozen=True)
class RecoverOptions:
    # chosen on the calibration data (validation split), SparseGPT 2:4 on the default model, by the last block's
    # output error against the dense model: 126 with 2 epochs, 120 with 2 epochs of single windows (lr 5e-4),
    # 112 with 3 epochs; each block's error fell 5-19% with lr 1e-4 and 9-36% with 1e-3 (2 epochs, batch 4)
    epochs: int = 3  # passes over the calibration windows per block
    lr: float = 1e-3  # Adam, kept linear weights; cosine decay to 0 over the block's steps
    norm_lr: float = 1e-3  # Adam, the block's norm weights and biases (0: leave them as they are)
    batch: int = 4  # calibration windows per step
    target: str = "dense"
    seed: int = 0  # order of the windows
    data: str = "auto"
    chat_prompts: str = "bundled"  # or a file, one prompt per line
    chat_tokens: int = 160  # longest answer the dense model writes per prompt
    # then end to end against the dense model's next-token distribution (0 epochs: block-wise only); on the
    # all-2:4 default model one epoch at 1e-4 took the first answer from "The capital of France is France, ..."
    # to "... is Paris, France." and perplexity (10 test windows) from 32.3 to 29.3
    distill_epochs: int = 1
    distill_lr: float = 1e-4
    # bfloat16 on the default model (AMD EPYC, 2 cores, SparseGPT 2:4): a block's tuning 1.6x faster, its error
    # equal to float32's to 4 digits; the whole recovery 13.3 min instead of 19-22, perplexity 28.66 both ways
    precision: str = "auto"

    def __post_init__(self):
        if self.epochs < 1 or self.batch < 1:
            raise MixsparseError("recovery needs at least one epoch and a batch of at least one window")
        if self.lr < 0 or self.norm_lr < 0:
            raise MixsparseError("recovery learning rates must be >= 0")
        if self.target not in TARGETS:
            raise MixsparseError(f"recovery target {self.target!r}: choose from {', '.join(TARGETS)}")
        if self.data not in DATA:
            raise MixsparseError(f"recovery data {self.data!r}: choose from {', '.join(DATA)}")
        if self.distill_epochs < 0 or self.distill_lr < 0:
            raise MixsparseError("end-to-end distillation needs epochs >= 0 and a learning rate >= 0")
        if self.chat_tokens < 1:
            raise MixsparseError("recovery chat answers need at least one token")
        matmul.check(self.precision, "recovery")

    def resolved(self, tokenizer=None, device: str | torch.device = "cpu") -> "RecoverOptions":
        """These options with "auto" replaced by what it means: ``data`` for ``tokenizer`` (left as it is
        without one), ``precision`` for ``device``."""
        options = self
        if options.data == "auto" and tokenizer is not None:
            options = replace(options, data="text+chat" if has_chat_template(tokenizer) else "text")
        options = replace(options, precision=matmul.resolve(options.precision, device))
        return options

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class BlockRecord:
    index: int
    mse_before: float  # mean squared error of the block output against the target, all calibration tokens
    mse_after: float
    seconds: float
    resumed: bool = False


@dataclass
class DistillRecord:
    kl_start: float  # mean KL(dense || pruned) per token of the batches of the first quarter of the steps
    kl_end: float  # ... of the last quarter
    seconds: float
    resumed: bool = False


@dataclass
class RecoverResult:
    options: RecoverOptions
    seconds: float
    peak_memory_bytes: int
    device: str
    blocks: list[BlockRecord] = field(default_factory=list)
    distill: DistillRecord | None = None

    @property
    def resumed_blocks(self) -> int:
        return sum(b.resumed for b in self.blocks)

    def to_json(self) -> dict:
        return {
            "options": self.options.to_json(),
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
            "resumed_blocks": self.resumed_blocks,
            **(
                {
                    "distill": {
                        k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in asdict(self.distill).items()
                    }
                }
                if self.distill
                else {}
            ),
            "blocks": [
                {
                    **asdict(b),
                    "mse_before": float(f"{b.mse_before:.6g}"),
                    "mse_after": float(f"{b.mse_after:.6g}"),
                    "seconds": round(b.seconds, 2),
                }
                for b in self.blocks
            ],
        }


class RecoveryState:
    """Tuned blocks saved one file each, with the request they belong to; a different request starts over."""

    def __init__(self, directory: str | os.PathLike, request: dict):
        self.directory = Path(directory)
        self.key = json.dumps(request, sort_keys=True, default=str)
        manifest = self.directory / "state.json"
        if manifest.is_file():
            try:
                same = json.loads(manifest.read_text()).get("request") == self.key
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                log.warning("recovery state in %s belongs to another request; starting over", self.directory)
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(manifest, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"request": self.key}) + "\n")

    def _file(self, index: int) -> Path:
        return self.directory / f"block-{index}.pt"

    def load(self, index: int) -> dict | None:
        file = self._file(index)
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None

    def save(self, index: int, block: nn.Module, record: BlockRecord) -> None:
        payload = {
            "state": {k: v.detach().cpu().clone() for k, v in block.state_dict().items()},
            "record": asdict(record),
        }
        with atomic_file(self._file(index), overwrite=True) as tmp:
            torch.save(payload, tmp)

    def load_distilled(self) -> dict | None:
        file = self.directory / "distilled.pt"
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None

    def save_distilled(self, model: nn.Module, record: "DistillRecord") -> None:
        payload = {
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "record": asdict(record),
        }
        with atomic_file(self.directory / "distilled.pt", overwrite=True) as tmp:
            torch.save(payload, tmp)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _rows(value, index: torch.Tensor, samples: int):
    """``value`` with its batch dimension indexed, where it has one (kwargs: masks, rotary cos/sin...)."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == samples else value
    if isinstance(value, tuple):
        return tuple(_rows(v, index, samples) for v in value)
    return value


def _float(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_float(v) for v in value)
    return value


def _call(block: nn.Module, hidden: torch.Tensor, kwargs: dict, index: torch.Tensor, samples: int) -> torch.Tensor:
    output = block(hidden[index], **{k: _rows(v, index, samples) for k, v in kwargs.items()})
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int, precision: str) -> torch.Tensor:
    # the passes without gradients (targets, errors, the next block's inputs) were a third of a block's time
    # in float32; in bf16 a dense block's output differs from float32's by 4e-5 (mean square) where the pruned
    # block's error is 0.2 (block 5, SparseGPT 2:4, default model)
    samples = hidden.shape[0]
    with matmul.autocast(precision, hidden.device):
        return torch.cat(
            [
                _call(block, hidden, kwargs, torch.arange(i, min(i + batch, samples)), samples)
                for i in range(0, samples, batch)
            ]
        ).float()


def block_masks(adapter: ModelAdapter, index: int, plan: Plan) -> dict[str, torch.Tensor]:
    """Parameter name (within the block) -> keep mask, for the block's pruned linears."""
    prefix = f"{adapter.blocks_name}.{index}."
    masks = model_masks(adapter, plan, adapter.block_linears(index))
    return {name[len(prefix) :]: mask for name, mask in masks.items()}


def _cosine(optimizer: torch.optim.Optimizer, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))


def _masked_step(optimizer, schedule, masked: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One optimizer step that moves no pruned weight: gradients masked before, and the weights re-masked
    after, so the zeros stay exact whatever the optimizer does with a zero gradient."""
    for parameter, mask in masked:
        parameter.grad.mul_(mask)
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        for parameter, mask in masked:
            parameter.mul_(mask)


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
    schedule = _cosine(optimizer, total)
    with torch.enable_grad():
        for _ in range(options.epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, options.batch):
                index = order[start : start + options.batch]
                optimizer.zero_grad(set_to_none=True)
                with matmul.autocast(options.precision, inputs.device):
                    output = _call(block, inputs, kwargs, index, samples)
                    loss = torch.nn.functional.mse_loss(output.float(), targets[index])
                loss.backward()
                _masked_step(optimizer, schedule, masked)
                after_step()
    for parameter in block.parameters():
        parameter.requires_grad_(False)


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
    hidden, kwargs = hidden.float(), {k: _float(v) for k, v in kwargs.items()}
    pruned_hidden = hidden.clone()

    steps = options.epochs * math.ceil(hidden.shape[0] / options.batch)
    records = []
    for index in range(len(adapter.blocks)):
        block_start = time.perf_counter()
        block, reference = adapter.blocks[index], dense.blocks[index]
        home, dtype = next(block.parameters()).device, next(block.parameters()).dtype
        reference.to(device, torch.float32)
        dense_out = _forward(reference, hidden, kwargs, options.batch, options.precision)
        targets = dense_out
        if options.target == "same":
            targets = _forward(reference, pruned_hidden, kwargs, options.batch, options.precision)
        reference.to(home, dtype)
        block.to(device, torch.float32)
        saved = state.load(index) if state else None
        if saved is not None:
            block.load_state_dict(saved["state"])
            record = BlockRecord(**{**saved["record"], "resumed": True})
            for _ in range(steps):
                after_step()
            pruned_out = _forward(block, pruned_hidden, kwargs, options.batch, options.precision)
        else:
            before = _forward(block, pruned_hidden, kwargs, options.batch, options.precision)
            mse_before = float(torch.nn.functional.mse_loss(before, targets))
            del before
            generator = torch.Generator().manual_seed(options.seed * 100_003 + index)
            tune_block(
                block, block_masks(adapter, index, plan), pruned_hidden, targets, kwargs, options, generator, after_step
            )
            pruned_out = _forward(block, pruned_hidden, kwargs, options.batch, options.precision)
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
    schedule = _cosine(optimizer, total)
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
                _masked_step(optimizer, schedule, masked)
                losses.append(kl)
                after_step(f"epoch {epoch + 1}: kl {kl:.3f}")
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.to(home, dtype)
        reference.to(reference_home)
    quarter = max(1, len(losses) // 4)
    return sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
