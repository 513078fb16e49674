"""Soak test (not CI): 64 concurrent streams against `mixsparse serve` for N minutes, the RSS of every server
process sampled; does memory plateau or keep growing?

Starts `mixsparse serve` on an artifact (loopback only, a free port), warms it up under the same load, then keeps
``--streams`` streaming chat completions in flight for ``--minutes``: each stream sends one request after another
(prompt and max_tokens varied, EOS ignored), and every ``--cancel-every``-th request is dropped mid-stream (the
connection closed after a few chunks), as a client that goes away does. Every ``--interval`` seconds the RSS of
the server's processes (the API server, EngineCore and whatever else vLLM starts) is recorded. Reported:
requests completed / cancelled / failed, RSS per process after warm-up, its maximum and at the end, and the
growth per minute over the second half of the run (least squares: a plateau reads ~0). The run is bounded by
``--minutes`` plus warm-up and start-up, and stops the server itself.

    python benchmarks/soak.py                                   # 5 minutes on runs/smollm2-magnitude-2of4
    python benchmarks/soak.py --minutes 2 --env MALLOC_ARENA_MAX=2 --name soak-arena2 --label "MALLOC_ARENA_MAX=2"
    python benchmarks/soak.py --env MIXSPARSE_CPU_RUNTIME=off --name soak-runtime-off --label "no tcmalloc"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, machine_line, markdown_table, save

from mixsparse.serve.deploy import wait_healthy
from mixsparse.serve.process_memory import ProcessMemory
from mixsparse.serve.server import ServeOptions, serve_command

HOST = "127.0.0.1"
DEFAULT_ARTIFACT = Path("runs/smollm2-magnitude-2of4")
WORDS = (
    "the model serves compressed layers while many clients stream tokens at once and some of them leave "
    "early so the engine must free what each request held memory should stay flat"
).split()


def ensure_artifact(path: Path) -> Path:
    if not (path / "config.json").exists():
        command = [
            sys.executable,
            "-m",
            "mixsparse.serve.cli",
            "prune",
            "smollm2-135m",
            "--metric",
            "magnitude",
            "--sparsity",
            "2:4",
            "--out",
            str(path),
        ]
        print("$", " ".join(command[2:]), file=sys.stderr, flush=True)
        if subprocess.run(command).returncode:
            raise SystemExit("making the artifact failed")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Load:
    """``streams`` clients, each sending one streaming chat request after another until ``deadline``."""

    def __init__(self, url: str, model: str, streams: int, cancel_every: int, max_tokens: int, seed: int):
        self.url, self.model, self.streams = url, model, streams
        self.cancel_every, self.max_tokens = cancel_every, max_tokens
        self.random = random.Random(seed)
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.errors: list[str] = []
        self.tokens = 0
        self.sent = 0

    def payload(self) -> tuple[dict, bool]:
        self.sent += 1
        words = self.random.randint(8, 200)
        prompt = " ".join(self.random.choice(WORDS) for _ in range(words))
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"#{self.sent}: {prompt}"}],
            "max_tokens": self.random.randint(max(1, self.max_tokens // 4), self.max_tokens),
            "stream": True,
            "ignore_eos": True,
            "temperature": 0.8,
        }
        return body, self.cancel_every > 0 and self.sent % self.cancel_every == 0

    async def one(self, session) -> None:
        body, cancel = self.payload()
        cut = self.random.randint(1, 8)
        chunks = 0
        try:
            async with session.post(f"{self.url}/v1/chat/completions", json=body) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
                done = False
                async for line in reply.content:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                        chunks += 1
                        self.tokens += 1
                    if cancel and chunks >= cut:
                        reply.close()  # the client goes away mid-stream: the server must abort the request
                        self.counts["cancelled"] += 1
                        return
                if not done:
                    raise RuntimeError("the stream ended without [DONE]")
            self.counts["completed"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as error:  # counted and kept (a few), the load goes on
            self.counts["failed"] += 1
            if len(self.errors) < 10:
                self.errors.append(f"{type(error).__name__}: {str(error)[:200]}")

    async def client(self, session, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one(session)

    async def run(self, seconds: float) -> None:
        import aiohttp

        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=self.streams, force_close=True)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [asyncio.create_task(self.client(session, deadline)) for _ in range(self.streams)]
            # requests in flight at the deadline finish (bounded by max_tokens and the request timeout)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 300)


def slope_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of bytes over seconds, in bytes per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


def summarise(samples: list, start: float, end: float) -> dict:
    """Per process (and the total): RSS at ``start`` (after warm-up), max and at the end of the measured window,
    and the growth per minute over all of it, its second half and its last quarter."""
    measured = [(t, s) for t, s in samples if start <= t <= end + 1]
    half, quarter = start + (end - start) / 2, start + 3 * (end - start) / 4
    labels = sorted({label for _, s in measured for label in s})
    series = {label: [(t, s[label]) for t, s in measured if label in s] for label in labels}
    series["total"] = [(t, sum(s.values())) for t, s in measured]
    return {
        label: {
            "start": points[0][1],
            "max": max(v for _, v in points),
            "end": points[-1][1],
            "growth_per_minute_all": slope_per_minute(points),
            "growth_per_minute_second_half": slope_per_minute([(t, v) for t, v in points if t >= half]),
            "growth_per_minute_last_quarter": slope_per_minute([(t, v) for t, v in points if t >= quarter]),
        }
        for label, points in series.items()
        if points
    }


def plot(samples: list, warm_end: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for _, s in samples for label in s}, key=lambda k: -max(s.get(k, 0) for _, s in samples))
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label in labels:
        series = [(t / 60, s[label] / 2**20) for t, s in samples if label in s]
        if max(v for _, v in series) < 50:  # helper processes (resource tracker): noise on this scale
            continue
        axis.plot([t for t, _ in series], [v for _, v in series], label=label)
    axis.axvline(warm_end / 60, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    axis.set_xlabel("minutes since the server answered")
    axis.set_ylabel("RSS (MiB)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_ARTIFACT), help="artifact or model directory to serve")
    parser.add_argument("--minutes", type=float, default=5.0, help="measured minutes of load (after warm-up)")
    parser.add_argument("--warmup", type=float, default=45.0, help="seconds of the same load before the baseline")
    parser.add_argument("--streams", type=int, default=64, help="streaming requests kept in flight")
    parser.add_argument("--cancel-every", type=int, default=4, help="drop every N-th request mid-stream (0: none)")
    parser.add_argument("--max-tokens", type=int, default=96, help="largest max_tokens of a request")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between RSS samples")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in the server's environment (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument("--name", default="soak", help="result name under benchmarks/results")
    parser.add_argument("--label", default="", help="what this run varies, for the title")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-arg", action="append", default=[], help="passed on to vLLM (repeatable)")
    args = parser.parse_args()
    if not (0 < args.minutes <= 120 and 1 <= args.streams <= 512 and args.interval > 0):
        raise SystemExit("--minutes must be in (0, 120], --streams in [1, 512], --interval > 0")
    model = args.model
    if model == str(DEFAULT_ARTIFACT):
        ensure_artifact(DEFAULT_ARTIFACT)
    elif not Path(model).is_dir():  # a model name (the dense baseline, e.g. smollm2-135m)
        from mixsparse.pruner.io.models import resolve

        model = resolve(model)
    port = free_port()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = Path("runs") / f"{args.name}-server.log"
    log.parent.mkdir(exist_ok=True)
    environment = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        environment[key] = value
    command = serve_command(
        ServeOptions(
            model,
            HOST,
            port,
            served_name="soak",
            log_file=str(log.resolve()),
            vllm_args=["--max-num-seqs", str(args.streams), *args.vllm_arg],
        )
    )
    print("$", " ".join(command[2:]), f"(env: {' '.join(args.env) or '-'})", file=sys.stderr, flush=True)
    url = f"http://{HOST}:{port}"
    with open(log.with_suffix(".out"), "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_healthy(url, child, timeout=600)
        sampler = ProcessMemory(child.pid, args.interval, keep_samples=True).start()
        print(f"server up at {url}; warm-up {args.warmup:.0f} s", file=sys.stderr, flush=True)
        warm = Load(url, "soak", args.streams, args.cancel_every, args.max_tokens, args.seed + 1)
        asyncio.run(warm.run(args.warmup))
        sampler.sample()
        start = sampler.samples[-1][0]
        print(
            f"baseline {', '.join(f'{k} {mib(v)} MiB' for k, v in sampler.samples[-1][1].items())}; "
            f"measuring {args.minutes:g} min",
            file=sys.stderr,
            flush=True,
        )
        load = Load(url, "soak", args.streams, args.cancel_every, args.max_tokens, args.seed)
        began = time.monotonic()
        asyncio.run(load.run(args.minutes * 60))
        seconds = time.monotonic() - began
        sampler.sample()
        end = sampler.samples[-1][0]
        time.sleep(min(10.0, args.interval * 3))  # idle: does RSS fall back once the load stops?
        sampler.stop()
        idle = sampler.samples[-1][1]
        alive = child.poll() is None
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    data = {
        "model": model,
        "label": args.label,
        "env": args.env,
        "streams": args.streams,
        "cancel_every": args.cancel_every,
        "max_tokens": args.max_tokens,
        "interval_s": args.interval,
        "warmup_s": args.warmup,
        "measured_s": seconds,
        "start_s": start,
        "end_s": end,
        "counts": load.counts,
        "warmup_counts": warm.counts,
        "errors": load.errors,
        "streamed_tokens": load.tokens,
        "alive": alive,
        "rss": summarise(sampler.samples, start, end),
        "idle": idle,
        "samples": [[round(t, 2), s] for t, s in sampler.samples],
    }
    title, markdown = report(args.name, data, machine())
    print(markdown)
    save(args.name, title, markdown, data, order=38)


def report(name: str, data: dict, info: dict) -> tuple[str, str]:
    """The title and markdown of a run (and its plot, results/<name>.png) from what it recorded."""
    label = f" ({data['label']})" if data.get("label") else ""
    model = Path(data["model"]).name
    png = RESULTS / f"{name}.png"
    plot(data["samples"], data["start_s"], png, f"RSS under {data['streams']} streams{label}, {model}")
    rows = []
    idle = data["idle"]
    for process, s in data["rss"].items():
        if s["max"] < 50 * 2**20 and process != "total":  # helper processes (resource tracker)
            continue
        rows.append(
            [
                process,
                mib(s["start"]),
                mib(s["max"]),
                mib(s["end"]),
                mib(sum(idle.values()) if process == "total" else idle.get(process, 0)),
                f"{(s['end'] - s['start']) / 2**20:+.0f}",
                f"{s['growth_per_minute_all'] / 2**20:+.1f}",
                f"**{s['growth_per_minute_second_half'] / 2**20:+.1f}**",
                f"**{s['growth_per_minute_last_quarter'] / 2**20:+.1f}**",
            ]
        )
    counts, seconds = data["counts"], data["measured_s"]
    rate = data["streamed_tokens"] / seconds
    markdown = (
        f"CPU: **{info['cpu']}**, {info['cores']} cores; {machine_line(info)}.\n\n"
        f"`mixsparse serve {model}` (loopback), {data['streams']} streaming chat requests kept in flight "
        f"for {seconds / 60:.1f} min after a {data['warmup_s']:.0f} s warm-up under the same load; prompts "
        f"of 8-200 words, max_tokens up to {data['max_tokens']} (EOS ignored), every "
        f"{data['cancel_every']}th request dropped mid-stream. Server environment: "
        f"{' '.join(data['env']) or 'as `serve` sets it'}. Requests: **{counts['completed']} completed, "
        f"{counts['cancelled']} cancelled, {counts['failed']} failed** ({rate:.0f} streamed "
        f"tokens/s); server alive at the end: {data['alive']}. RSS sampled every "
        f"{data['interval_s']:g} s; growth is the least-squares slope over the measured window.\n\n"
        + markdown_table(
            [
                "process",
                "RSS after warm-up MiB",
                "max MiB",
                "end MiB",
                "idle 10 s later MiB",
                "end - start MiB",
                "growth MiB/min (all)",
                "growth MiB/min (2nd half)",
                "growth MiB/min (last quarter)",
            ],
            rows,
        )
        + f"\n\n![RSS over time](benchmarks/results/{png.name})\n"
    )
    if data["errors"]:
        markdown += "\nFirst errors: " + "; ".join(f"`{e}`" for e in data["errors"][:3]) + "\n"
    title = f"Soak: {data['streams']} streams for {seconds / 60:.1f} min, RSS per server process{label}"
    return title, markdown


if __name__ == "__main__":
    main()
