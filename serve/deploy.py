"""``mixsparse deploy``: prune (or reuse an artifact made with the same settings), then serve it.

Prints what was pruned and what it saved before the server starts, with the URL and a curl line.
With ``--chat`` it sends one chat request once the server is up and prints the answer and a metrics
summary; ``--once`` then stops the server (what `make demo` and the tests use).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from mixsparse.pruner import pipeline
from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.io import models
from mixsparse.pruner.io.export import human_bytes
from mixsparse.pruner.io.gradient_file import check_gradients
from mixsparse.pruner.io.provenance import request_of
from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.serve.server import ServeOptions, check_port, preflight, serve_command, serve_environment


@dataclass
class DeployJob:
    prune: PruneJob
    serve: ServeOptions
    chat: str | None = None
    once: bool = False
    max_tokens: int = 64
    startup_timeout: float = 900.0
    verbose: bool = False
    environment: dict = field(default_factory=dict)
    budget: float | None = None  # make a deployment plan with this 2:4 fraction first
    allocator: str = "fisher"


def deployment_plan(job: DeployJob, progress: Progress, show) -> str:
    """The plan for ``job.budget``, next to the artifact (``<out>.plan.json``): made once, then reused."""
    from mixsparse.pruner.plans.make import make_plan
    from mixsparse.pruner.plans.request import Deployment, PlanRequest

    prune = job.prune
    path = Path(f"{prune.out}.plan.json")
    if path.exists():
        show("deployment plan", [("plan", f"{path} (reused)")])
        return str(path)
    make_plan(
        PlanRequest(
            model=prune.model,
            out=str(path),
            goal=Deployment(budget=job.budget),
            allocator=job.allocator,
            metric=prune.metric,
            calibration=prune.calibration,
            device=prune.device,
            gradients=prune.gradients,
        ),
        progress,
    )
    return str(path)


def default_out(model: str, metric: str, sparsity: str | None, plan: str | None, what: str | None = None) -> str:
    what = what or (Path(plan).stem if plan else (sparsity or "2:4").replace(":", "of"))
    return str(Path("runs") / f"{Path(model).name}-{metric}-{what}")


def reusable(job: PruneJob) -> bool:
    """True when ``job.out`` is an artifact made by exactly this request; False when it does not exist."""
    out = Path(job.out)
    if not out.exists():
        return False
    if not artifact.is_artifact(out):
        if job.overwrite:
            return False
        raise MixsparseError(f"{out} exists and is not a mixsparse artifact; pass --overwrite or another --out")
    try:
        recorded = json.loads((out / "plan.json").read_text()).get("request")
    except (OSError, ValueError, AttributeError):  # missing, not UTF-8, not JSON, not an object: not reusable
        recorded = None
    wanted = request_of(job, models.resolve(job.model))
    if recorded == json.loads(json.dumps(wanted)):
        return True
    if job.overwrite:
        return False
    raise MixsparseError(
        f"{out} holds an artifact made with other settings; pass --overwrite to replace it or choose another --out"
    )


def summary_rows(out: Path, options: ServeOptions, reused: bool) -> list[tuple[str, str]]:
    config = artifact.read_config(out)
    plan = json.loads((out / "plan.json").read_text())
    sizes = artifact.weight_bytes(config)
    formats: dict[str, int] = {}
    for entry in config.modules.values():
        storage = {artifact.PACKED24: "packed", artifact.BITMASK: "bitmask"}.get(entry.storage, "stored dense")
        key = f"{entry.format} ({storage})"
        formats[key] = formats.get(key, 0) + 1
    url = f"http://{options.host}:{options.port}"
    rows = [
        ("artifact", f"{out} ({'reused' if reused else 'new'})"),
        (
            "pruned",
            f"{plan.get('model', {}).get('name')} with {plan.get('metric')}: "
            + ", ".join(f"{n} modules {k}" for k, n in formats.items()),
        ),
        (
            "weight memory",
            f"{human_bytes(sizes['stored'])} stored vs {human_bytes(sizes['dense_equivalent'])} "
            f"dense ({1 - sizes['stored'] / sizes['dense_equivalent']:.1%} saved)",
        ),
    ]
    perplexity = plan.get("measurements", {}).get("perplexity") or {}
    if "pruned" in perplexity:
        rows.append(
            (
                "perplexity",
                f"{perplexity['dense']['perplexity']:.2f} dense -> "
                f"{perplexity['pruned']['perplexity']:.2f} pruned "
                f"({perplexity['pruned']['windows']} WikiText-2 test windows)",
            )
        )
    else:
        rows.append(("perplexity", f"not measured (mixsparse eval ppl {out} --windows 40)"))
    name = options.served_name or out.name
    auth = f" -H 'Authorization: Bearer {options.api_key}'" if options.api_key else ""
    rows += [
        ("URL", f"{url}/v1 (OpenAI-compatible), {url}/metrics"),
        (
            "try",
            f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d "
            f'\'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
        ),
    ]
    return rows


class ServerRefused(MixsparseError):
    """The server answered with an HTTP error; the message is its own one-line reason."""


def request(url: str, payload: dict | None = None, api_key: str | None = None, timeout: float = 600.0):
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as reply:
            body = reply.read().decode()
    except urllib.error.HTTPError as error:
        raise ServerRefused(f"the server refused {url} ({error.code}): {refusal_reason(error)}") from None
    return json.loads(body) if payload is not None else body


def refusal_reason(error: urllib.error.HTTPError) -> str:
    """The first line of the reason an OpenAI-compatible server gives ({"error": {"message": ...}}, or vLLM's
    older {"message": ...}), else the HTTP reason phrase."""
    try:
        body = json.loads(error.read().decode(errors="replace"))
        detail = body.get("error", body)
        message = detail.get("message") if isinstance(detail, dict) else detail
    except (ValueError, AttributeError, OSError):
        message = None
    return (str(message or error.reason).strip().splitlines() or [""])[0]


def stop(child: subprocess.Popen, timeout: float = 120.0) -> None:
    """Stop a server as Ctrl-C would, so vLLM takes its engine and helper processes (multiprocessing's
    resource tracker included) with it; kill it only if it does not stop within ``timeout``."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def wait_healthy(url: str, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise MixsparseError(f"the server exited with code {child.returncode} before it was ready")
        try:
            request(f"{url}/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ServerRefused):
            time.sleep(1)
    raise MixsparseError(f"the server did not become ready within {timeout:.0f} s")


def metrics_summary(text: str) -> list[tuple[str, str]]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(mixsparse_\w+|vllm:(?:prompt|generation)_tokens_total)(\{[^}]*\})?\s+(\S+)$", line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))

    def get(key: str):
        return next((v for k, v in values.items() if k.startswith(key)), None)

    rows = []
    for kind in ("dense_equivalent", "stored", "resident"):
        value = get(f'mixsparse_weight_bytes{{kind="{kind}"}}')
        if value is not None:
            rows.append((f"weight bytes ({kind})", human_bytes(value)))
    kernels = {k.split('"')[1]: int(v) for k, v in values.items() if k.startswith("mixsparse_kernel_layers")}
    if kernels:
        rows.append(("layers per GEMM backend", ", ".join(f"{b}: {n}" for b, n in kernels.items())))
    for phase in ("prompt", "generation"):
        value = get(f'mixsparse_tokens_per_second{{phase="{phase}"}}')
        if value is not None:
            rows.append((f"{phase} tokens/s (window)", f"{value:.1f}"))
    gain = get("mixsparse_throughput_gain_ratio")
    if gain is not None:
        rows.append(("throughput gain (bench)", f"{gain:.2f}x"))
    return rows


@contextmanager
def gradients_for_the_command(job: DeployJob):
    """A deployment plan prunes every group to 2:4 with gblm, and the prune that follows does again: both need
    the dense model's gradient norms. Without --gradients they are kept for this command only (beside the
    artifact, where there is room for one), so the backward pass over the calibration runs once, not twice."""
    prune = job.prune
    planned = job.budget is not None and not Path(f"{prune.out}.plan.json").exists()
    if prune.gradients is not None or not planned or not get_metric(prune.metric).needs_gradients:
        yield
        return
    parent = Path(prune.out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mixsparse-gradients-", dir=parent) as tmp:
        prune.gradients = str(Path(tmp) / "gradients.safetensors")
        try:
            yield
        finally:
            prune.gradients = None


def prepare(job: DeployJob, progress: Progress = Silent(), show=print) -> tuple[Path, bool]:
    """The artifact to serve (planned and pruned, or reused when made by the same request) and whether it was
    reused; the port is checked before any work, so a busy port fails in seconds, not after the pruning."""
    prune = job.prune
    check_gradients(prune.gradients, prune.metric)  # refused even when the artifact is reused
    if prune.out is None:
        what = f"deploy{job.budget:g}-{job.allocator}" if job.budget is not None else None
        prune.out = default_out(prune.model, prune.metric, prune.sparsity, prune.plan, what)
    check_port(job.serve.host, job.serve.port)
    with gradients_for_the_command(job):
        if job.budget is not None:
            prune.plan, prune.sparsity = deployment_plan(job, progress, show), None
            check_port(job.serve.host, job.serve.port)  # the planning took a while
        reused = reusable(prune)
        if not reused:
            prune.overwrite = prune.overwrite or Path(prune.out).exists()
            pipeline.prune(prune, progress)
    return preflight(prune.out), reused


def deploy(job: DeployJob, progress: Progress = Silent(), show=print) -> int:
    """Prune or reuse, print the summary, run the server; returns its exit code."""
    out, reused = prepare(job, progress, show)
    show("mixsparse deploy", summary_rows(out, job.serve, reused))
    command = serve_command(replace(job.serve, model=str(out), verbose=job.verbose))
    environment = {**os.environ, **job.environment, **serve_environment(job.serve)}
    if not job.verbose:
        environment.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    child = subprocess.Popen(command, env=environment)
    try:
        url = f"http://{job.serve.host}:{job.serve.port}"
        if job.chat is not None:
            wait_healthy(url, child, job.startup_timeout)
            reply = request(
                f"{url}/v1/chat/completions",
                {
                    "model": job.serve.served_name or out.name,
                    "temperature": 0,
                    "max_tokens": job.max_tokens,
                    "messages": [{"role": "user", "content": job.chat}],
                },
                job.serve.api_key,
            )
            answer = reply["choices"][0]["message"]["content"]
            time.sleep(min(2.0, job.serve.metrics_window))  # let the metrics sampler see the traffic
            rows = [
                ("prompt", job.chat),
                ("answer", answer.strip()),
                (
                    "tokens",
                    f"{reply['usage']['prompt_tokens']} prompt, {reply['usage']['completion_tokens']} generated",
                ),
            ]
            show("first answer", rows + metrics_summary(request(f"{url}/metrics", api_key=job.serve.api_key)))
            if job.once:
                stop(child)
                return 0  # the answer came back; how vLLM exits on SIGINT does not matter
            print(f"serving at {url} - Ctrl-C to stop", flush=True)
        return child.wait()
    except KeyboardInterrupt:
        stop(child)
        return 0
    finally:
        stop(child)  # on an error too: a killed server leaves vLLM's helper processes behind
