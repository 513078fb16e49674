"""Chat windows for recovery: the dense model's own answers to chat prompts, in its chat template.

Recovery tunes the pruned model to reproduce the dense one on whatever windows it is given. On plain
text alone (WikiText) it lowers perplexity yet can leave chat behaviour broken: the template's special
tokens and the assistant's turn never occur there, and the recovered all-2:4 default model ended every
answer at once. Self-distillation data fixes what is matched without any download: each prompt (a bundled
list, or a user's file, one prompt per line) is wrapped in the tokenizer's chat template, the dense model
answers it greedily, and the conversations, shuffled (seeded) and joined, are cut into windows like the
calibration text.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from mixsparse.runtime.errors import MixsparseError

BUNDLED = "bundled"
BATCH = 32  # prompts answered together; decoding on a CPU is bound by per-step overheads, so wider is cheaper


def load_prompts(source: str = BUNDLED) -> list[str]:
    if source == BUNDLED:
        text = resources.files("mixsparse.pruner").joinpath("data/chat/prompts.txt").read_text(encoding="utf-8")
    else:
        path = Path(source)
        if not path.is_file():
            raise MixsparseError(f"chat prompts {source!r}: no such file (one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise MixsparseError(f"cannot read chat prompts from {path} ({error})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MixsparseError(f"chat prompts {source!r}: the file has no prompts")
    return prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a list, or an encoding in newer versions


@torch.no_grad()
def conversations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 160,
    batch: int = BATCH,
    device: str | torch.device = "cpu",
    after_batch: Callable[[], None] = lambda: None,
) -> list[list[int]]:
    """Token ids of each prompt in the chat template followed by the model's greedy answer (end of turn included)."""
    if not has_chat_template(tokenizer):
        raise MixsparseError("chat recovery data needs a tokenizer with a chat template; use --recover-data text")
    # a chat model may end its turn with a token other than the tokenizer's EOS (Llama 3's <|eot_id|>)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ends = [e for e in dict.fromkeys([tokenizer.eos_token_id, *configured]) if e is not None]
    if not ends:
        raise MixsparseError("chat recovery data: the tokenizer and the model name no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    result = []
    for start in range(0, len(prompts), batch):
        encoded = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch]]
        width = max(map(len, encoded))
        # left padding, so every answer starts at the same position
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=ends,
            pad_token_id=pad,
        )
        for prompt_ids, answer in zip(encoded, out[:, width:].tolist()):
            stop = next((i for i, token in enumerate(answer) if token in ends), None)
            if stop is not None:
                answer = answer[: stop + 1]
            result.append(prompt_ids + answer)
        after_batch()
    return result


def chat_windows(
    conversations: list[list[int]], samples: int, seqlen: int, seed: int = 0, separator: list[int] = ()
) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets of the shuffled conversations joined by
    ``separator`` (what the template puts between turns, e.g. a newline)."""
    separator = list(separator)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(conversations), generator=generator).tolist()
    ids = torch.tensor([t for i in order for t in conversations[i] + separator], dtype=torch.long)
    if len(ids) <= seqlen:
        raise MixsparseError(
            f"the chat conversations have {len(ids)} tokens; windows of {seqlen} tokens need more prompts"
        )
    starts = torch.randint(0, len(ids) - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def recovery_windows(
    calibration: torch.Tensor,
    model: torch.nn.Module,
    tokenizer,
    prompts: str = BUNDLED,
    max_new_tokens: int = 160,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache: Path | None = None,
    after_batch: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """Half the calibration windows (the first ones) and as many chat windows of the same length.

    The total stays the calibration's, so recovery costs the same; the conversations are kept in ``cache``
    (a file) when given, so a resumed recovery tunes on exactly the windows it started with.
    """
    samples, seqlen = calibration.shape
    if cache is not None and cache.is_file():
        talks = torch.load(cache, weights_only=True)
    else:
        talks = conversations(
            model, tokenizer, load_prompts(prompts), max_new_tokens, device=device, after_batch=after_batch
        )
        if cache is not None:
            torch.save(talks, cache)
    separator = tokenizer("\n", add_special_tokens=False)["input_ids"]
    chat = chat_windows(talks, samples - samples // 2, seqlen, seed, separator)
    return torch.cat([calibration[: samples // 2], chat])
