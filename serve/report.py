"""What ``mixsparse bench`` shows: a markdown table of dense vs sparse per concurrency, and a plot."""

from __future__ import annotations

from pathlib import Path

from mixsparse.pruner.io.export import human_bytes

# (key, label, format, higher is better)
LEVEL_COLUMNS = [
    ("output_tokens_per_second", "output tok/s", "{:.1f}", True),
    ("prompt_tokens_per_second", "prompt tok/s", "{:.1f}", True),
    ("requests_per_second", "req/s", "{:.2f}", True),
    ("ttft_p50", "TTFT p50 (ms)", "{:.0f}", False),
    ("ttft_p99", "TTFT p99 (ms)", "{:.0f}", False),
    ("itl_p50", "ITL p50 (ms)", "{:.1f}", False),
    ("itl_p99", "ITL p99 (ms)", "{:.1f}", False),
]
_MILLISECONDS = {"ttft_p50", "ttft_p99", "itl_p50", "itl_p99"}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value(level: dict, key: str):
    value = level.get(key)
    if value is None:
        return None
    return value * 1000 if key in _MILLISECONDS else value


def _levels(data: dict, kind: str) -> dict[int, dict]:
    return {lv["concurrency"]: lv for lv in data["engines"].get(kind, {}).get("levels", [])}


def level_rows(data: dict) -> list[list]:
    dense, sparse = _levels(data, "dense"), _levels(data, "sparse")
    rows = []
    for concurrency in data["concurrency"]:
        for key, label, fmt, _ in LEVEL_COLUMNS:
            d = _value(dense.get(concurrency, {}), key)
            s = _value(sparse.get(concurrency, {}), key)
            rows.append(
                [
                    concurrency,
                    label,
                    fmt.format(d) if d is not None else "-",
                    fmt.format(s) if s is not None else "-",
                    f"{s / d:.3f}" if d and s is not None else "-",
                ]
            )
    return rows


def memory_rows(data: dict) -> list[list]:
    rows = []
    dense, sparse = data["engines"].get("dense", {}), data["engines"].get("sparse", {})
    for kind in ("dense_equivalent", "stored", "resident"):
        d, s = dense.get("weight_bytes", {}).get(kind), sparse.get("weight_bytes", {}).get(kind)
        rows.append(
            [
                f"weight bytes ({kind.replace('_', '-')})",
                human_bytes(d) if d else "-",
                human_bytes(s) if s else "-",
                f"{s / d:.3f}" if d and s else "-",
            ]
        )
    for key, label in (
        ("peak_process_bytes", "peak process memory (server tree RSS)"),
        ("peak_gpu_bytes", "peak GPU memory in use"),
    ):
        d, s = dense.get(key), sparse.get(key)
        if d or s:
            rows.append(
                [label, human_bytes(d) if d else "-", human_bytes(s) if s else "-", f"{s / d:.3f}" if d and s else "-"]
            )
    return rows


def bench_markdown(data: dict) -> str:
    workload = data["workload"]
    status = "" if data.get("complete") else f"\n\n**Incomplete run**: {data.get('error', 'stopped early')}\n"
    head = (
        f"Workload {workload['name']}: {workload['prompt_tokens']} prompt tokens, {workload['output_tokens']} "
        f"generated per request ({workload['endpoint']} endpoint, streamed, EOS ignored); requests per level "
        f"{', '.join(f'{c}: {n}' for c, n in data['requests'].items())}; {data['warmup']} warm-up requests "
        f"excluded. Dense: `{data['dense']}`; sparse: `{data['sparse']}`.{status}"
    )
    table = markdown_table(["concurrency", "measure", "dense", "sparse", "sparse/dense"], level_rows(data))
    memory = markdown_table(["memory", "dense", "sparse", "sparse/dense"], memory_rows(data))
    gain = data.get("output_tokens_per_second_ratio")
    footer = (
        f"\n\nSparse/dense output tokens/s at concurrency {data['ratio_concurrency']}: **{gain:.3f}**"
        if gain is not None
        else ""
    )
    return f"{head}\n\n{table}\n\n{memory}{footer}\n"


def plot_bench(data: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dense": ("tab:gray", "o"), "sparse": ("tab:blue", "s")}
    for kind, (colour, marker) in styles.items():
        levels = sorted(_levels(data, kind).values(), key=lambda lv: lv["concurrency"])
        levels = [lv for lv in levels if lv["requests"]]
        if not levels:
            continue
        xs = [lv["concurrency"] for lv in levels]
        speed.plot(xs, [lv["output_tokens_per_second"] for lv in levels], marker=marker, color=colour, label=kind)
        for key, dash in (("ttft_p50", "-"), ("ttft_p99", ":"), ("itl_p50", "--"), ("itl_p99", "-.")):
            ys = [_value(lv, key) for lv in levels]
            if all(y is not None for y in ys):
                latency.plot(xs, ys, dash, marker=marker, color=colour, label=f"{kind} {key.replace('_', ' ')}")
    speed.set(
        xscale="log",
        xlabel="concurrent requests",
        ylabel="output tokens/s",
        title=f"Throughput ({data['workload']['name']})",
    )
    latency.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent requests",
        ylabel="ms",
        title="Latency: time to first token, inter-token",
    )
    for axis in (speed, latency):
        xs = sorted(data["concurrency"])
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
