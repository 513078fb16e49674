"""The windows recovery tunes on, and where an interrupted recovery keeps its state."""

from __future__ import annotations

from pathlib import Path

import torch

from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.recover import chat_data
from mixsparse.pruner.recover.options import RecoverOptions


def recovery_state_dir(out: str) -> Path:
    """Where an interrupted recovery keeps its tuned blocks: beside the artifact, never inside it."""
    out_path = Path(out)
    return out_path.with_name(f".{out_path.name}.recovery")


def recovery_inputs(
    options: RecoverOptions, dense, tokenizer, calibration, device, state, progress: Progress = Silent()
) -> tuple[RecoverOptions, torch.Tensor]:
    """The options resolved for ``tokenizer`` and ``device``, and the windows recovery tunes on (the dense
    model writes the chats)."""
    options = options.resolved(tokenizer, device)
    if options.data == "text":
        return options, calibration
    prompts = chat_data.load_prompts(options.chat_prompts)
    dense.model.to(device)  # whole, to generate; back to the CPU after, as recovery expects it
    batches = -(-len(prompts) // chat_data.BATCH)
    # in float32 whatever the precision: greedy decoding under bf16 autocast was slower (58 s vs 38-46 s for 32
    # prompts, default model, 2 cores)
    with progress.task(f"chat data (the dense model answers {len(prompts)} prompts)", batches) as advance:
        windows = chat_data.recovery_windows(
            calibration,
            dense.model,
            tokenizer,
            options.chat_prompts,
            options.chat_tokens,
            options.seed,
            device,
            cache=state.directory / "chat-conversations.pt" if state else None,
            after_batch=advance,
        )
    dense.model.to("cpu")
    return options, windows
