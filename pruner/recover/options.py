"""What recovery is asked to do: epochs, learning rates, targets, the data it tunes on, its matmul precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.recover.chat_data import has_chat_template
from mixsparse.runtime.errors import MixsparseError

TARGETS = ("dense", "same")
# what the blocks are tuned on: the calibration windows alone, or half of them and half the dense model's own
# chat answers (recover/chat_data.py); auto: text+chat when the tokenizer has a chat template
DATA = ("auto", "text", "text+chat")


@dataclass(frozen=True)
class RecoverOptions:
    # the defaults were measured, not guessed: docs/design.md, Recovery
    epochs: int = 3  # passes over the calibration windows per block
    lr: float = 1e-3  # Adam, kept linear weights; cosine decay to 0 over the block's steps
    norm_lr: float = 1e-3  # Adam, the block's norm weights and biases (0: leave them as they are)
    batch: int = 4  # calibration windows per step
    target: str = "dense"
    seed: int = 0  # order of the windows
    data: str = "auto"
    chat_prompts: str = "bundled"  # or a file, one prompt per line
    chat_tokens: int = 160  # longest answer the dense model writes per prompt
    # then end to end against the dense model's next-token distribution (0 epochs: block-wise only)
    distill_epochs: int = 1
    distill_lr: float = 1e-4
    precision: str = "auto"  # the matmuls: auto is bfloat16 where the device computes it natively, else float32

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
