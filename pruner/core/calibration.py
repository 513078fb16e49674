"""The calibration runner: push calibration tokens through the decoder, one block at a time.

It knows nothing of pruning. Block i receives the outputs of blocks 0..i-1 *as they are now*, so a
callback that prunes modules in place makes later blocks see the pruned model (sequential
calibration, as SparseGPT/Wanda do). The whole calibration batch goes through a block in one call,
so ``before_linear`` sees every calibration token of a module's input before the module computes
anything: a callback can prune the module right there and the rest of the block (o_proj after q/k/v,
down after gate/up) then runs on pruned inputs. One forward pass per block does it all; only one
block's activations live at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.runtime.errors import MixsparseError

BeforeLinear = Callable[[int, str, nn.Linear, torch.Tensor], None]


class _Captured(Exception):
    pass


def place(adapter: ModelAdapter, device: torch.device) -> None:
    """Put everything but the decoder blocks on ``device``; blocks move there one at a time."""
    prefix = adapter.blocks_name + "."
    for name, tensor in [*adapter.model.named_parameters(), *adapter.model.named_buffers()]:
        if not name.startswith(prefix):
            tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture_block_inputs(adapter: ModelAdapter, input_ids: torch.Tensor, device: torch.device):
    """The hidden states and keyword arguments (masks, rotary embeddings...) block 0 is called with."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.model(input_ids.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise MixsparseError("the model's forward never reached its first decoder block")
    return captured["hidden"], captured["kwargs"]


@torch.no_grad()
def run_blocks(
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    before_linear: BeforeLinear,
    device: torch.device | str = "cpu",
    names: set[str] | None = None,
    after_block: Callable[[int], None] = lambda index: None,
) -> torch.Tensor:
    """Run all blocks over ``input_ids`` (samples x tokens); return the last block's output.

    ``before_linear(block_index, name, module, x)`` is called with the full input of every linear
    (restricted to ``names`` if given) right before that linear runs.
    """
    device = torch.device(device)
    place(adapter, device)
    hidden, kwargs = capture_block_inputs(adapter, input_ids, device)
    for index, block in enumerate(adapter.blocks):
        home = next(block.parameters()).device
        block.to(device)
        hooks = [
            module.register_forward_pre_hook(
                lambda module, args, index=index, name=name: before_linear(index, name, module, args[0])
            )
            for name, module in adapter.block_linears(index).items()
            if names is None or name in names
        ]
        try:
            output = block(hidden, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = output[0] if isinstance(output, tuple) else output
        block.to(home)
        after_block(index)
    return hidden
