"""What ``mixsparse bench`` sends: workloads of fixed token lengths and the prompts that fill them.

Every request streams, ignores EOS and asks for a fixed number of tokens, so dense and sparse engines do
exactly the same work whatever text they produce. The requests themselves are sent and timed by vLLM's
own benchmark library (see bench.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mixsparse.runtime.errors import MixsparseError


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int
    output_tokens: int
    endpoint: str  # "chat" or "completions"

    def describe(self) -> str:
        return f"{self.name}: {self.prompt_tokens} prompt tokens -> {self.output_tokens} generated ({self.endpoint})"


WORKLOADS = {
    "chat": Workload("chat", 256, 128, "chat"),
    "prefill": Workload("prefill", 1024, 1, "completions"),
    "decode": Workload("decode", 32, 256, "completions"),
}


def make_workload(name: str, prompt_tokens: int | None = None, output_tokens: int | None = None) -> Workload:
    if name not in WORKLOADS:
        raise MixsparseError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    base = WORKLOADS[name]
    workload = Workload(name, prompt_tokens or base.prompt_tokens, output_tokens or base.output_tokens, base.endpoint)
    if workload.prompt_tokens < 1 or workload.output_tokens < 1:
        raise MixsparseError("--prompt-tokens and --output-tokens must be at least 1")
    return workload


class PromptSource:
    """Distinct prompts of an exact token length, cut from the bundled WikiText-2 text.

    Each call to :meth:`take` returns prompts no earlier call returned, so no request of one run can hit
    a prefix cache filled by another; the same seed gives the same sequence for the dense and sparse runs.
    """

    def __init__(self, tokenizer, workload: Workload, seed: int = 0):
        from mixsparse.pruner.io import data

        self.tokenizer = tokenizer
        self.workload = workload
        self.ids = data.tokenize(tokenizer, data.load_text(data.DEFAULT_SOURCE, data.EVALUATION)).tolist()
        # chat prompts get the chat template around them, so the user text is shorter
        self.overhead = self._template_tokens() if workload.endpoint == "chat" else 0
        self.text_tokens = workload.prompt_tokens - self.overhead
        if self.text_tokens < 1:
            raise MixsparseError(
                f"--prompt-tokens {workload.prompt_tokens} is shorter than the chat template ({self.overhead} tokens)"
            )
        if self.text_tokens >= len(self.ids):
            raise MixsparseError(f"--prompt-tokens {workload.prompt_tokens} is longer than the bundled text")
        self.rng = random.Random(seed)

    def _template_tokens(self) -> int:
        if getattr(self.tokenizer, "chat_template", None) is None:
            return 0
        return len(self.tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True))

    def take(self, count: int) -> list:
        """Completions get token ids (exact length); chat gets the decoded text (within a token or two)."""
        prompts = []
        for _ in range(count):
            start = self.rng.randrange(len(self.ids) - self.text_tokens)
            ids = self.ids[start : start + self.text_tokens]
            prompts.append(self.tokenizer.decode(ids) if self.workload.endpoint == "chat" else ids)
        return prompts
