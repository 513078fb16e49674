"""Load for ``mixsparse bench``: workloads of fixed token lengths, streamed through an OpenAI server.

Every request streams, ignores EOS and asks for a fixed number of tokens, so dense and sparse engines do
exactly the same work whatever text they produce. Time to first token is measured to the first streamed
token, inter-token latency between later chunks (vLLM streams one chunk per decode step).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

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
        from mixsparse.pruner import data

        self.tokenizer = tokenizer
        self.workload = workload
        self.ids = data.tokenize(tokenizer, data.load_text(data.DEFAULT_SOURCE, data.EVALUATION)).tolist()
        # chat prompts get the chat template around them, so the user text is shorter
        self.overhead = self._template_tokens() if workload.endpoint == "chat" else 0
        self.text_tokens = workload.prompt_tokens - self.overhead
        if self.text_tokens < 1:
            raise MixsparseError(f"--prompt-tokens {workload.prompt_tokens} is shorter than the chat template "
                                 f"({self.overhead} tokens)")
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
            ids = self.ids[start:start + self.text_tokens]
            prompts.append(self.tokenizer.decode(ids) if self.workload.endpoint == "chat" else ids)
        return prompts


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str | None = None


def _payload(workload: Workload, model: str, prompt) -> dict:
    common = {"model": model, "max_tokens": workload.output_tokens, "temperature": 0, "stream": True,
              "ignore_eos": True, "min_tokens": workload.output_tokens,
              "stream_options": {"include_usage": True}}
    if workload.endpoint == "chat":
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


async def one_request(session, url: str, workload: Workload, model: str, prompt,
                      headers: dict) -> RequestResult:
    import aiohttp

    path = "/v1/chat/completions" if workload.endpoint == "chat" else "/v1/completions"
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url + path, json=_payload(workload, model, prompt), headers=headers) as reply:
            if reply.status != 200:
                result.error = f"HTTP {reply.status}: {(await reply.text())[:200]}"
                return result
            buffer = b""
            async for chunk in reply.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    line = event.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    body = line[5:].strip()
                    if body == "[DONE]":
                        continue
                    message = json.loads(body)
                    if message.get("usage"):
                        result.prompt_tokens = message["usage"]["prompt_tokens"]
                        result.output_tokens = message["usage"]["completion_tokens"]
                    if _has_token(message):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.ttft is not None and result.output_tokens > 0
    if not result.ok:
        result.error = "the stream ended without tokens or usage"
    return result


def _has_token(message: dict) -> bool:
    for choice in message.get("choices", []):
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if 1 <= q <= 99 else None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    failed: int
    seconds: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_second: float
    prompt_tokens_per_second: float
    requests_per_second: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    latency_p50: float | None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def summarise(concurrency: int, results: list[RequestResult], seconds: float) -> LevelResult:
    done = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    ttfts = [r.ttft for r in done]
    gaps = [g for r in done for g in r.gaps]
    latencies = [r.latency for r in done]
    return LevelResult(
        concurrency=concurrency, requests=len(done), failed=len(results) - len(done), seconds=seconds,
        prompt_tokens=prompt, output_tokens=output, output_tokens_per_second=output / seconds if seconds else 0.0,
        prompt_tokens_per_second=prompt / seconds if seconds else 0.0,
        requests_per_second=len(done) / seconds if seconds else 0.0,
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99), itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99), latency_p50=percentile(latencies, 50),
        errors=sorted({r.error for r in results if r.error})[:5])


async def _run_level(url: str, workload: Workload, model: str, prompts: list, concurrency: int,
                     api_key: str | None, on_done: Callable[[RequestResult], None], timeout: float,
                     alive: Callable[[], bool]) -> tuple[list[RequestResult], float]:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    results: list[RequestResult] = []

    async def guarded(session, prompt):
        async with gate:
            if not alive():
                results.append(RequestResult(ok=False, error="the server is not running"))
                return
            result = await one_request(session, url, workload, model, prompt, headers)
            results.append(result)
            on_done(result)

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(guarded(session, p) for p in prompts))
        seconds = time.perf_counter() - start
    return results, seconds


def run_level(url: str, workload: Workload, model: str, prompts: list, concurrency: int,
              api_key: str | None = None, on_done: Callable[[RequestResult], None] = lambda r: None,
              timeout: float = 3600.0, alive: Callable[[], bool] = lambda: True) -> LevelResult:
    """Send ``prompts`` with at most ``concurrency`` in flight; wall time runs from the first send to the last
    answer."""
    results, seconds = asyncio.run(_run_level(url, workload, model, prompts, concurrency, api_key, on_done,
                                              timeout, alive))
    return summarise(concurrency, results, seconds)
