"""Dense vs 2:4 linear layers, per weight shape and token count, for every backend this machine has.

The sparse path is what serving runs on CUDA: a packed 2:4 weight prepared by ``prepare`` and run by
``sparse_linear`` (runtime/sparse_linear.py), through the registered op ``torch.ops.mixsparse.sparse_linear``
(a ``SparseLinear`` module per backend); times are CUDA events around each
call (median of repeats, after warm-up). The CPU kernel has its own benchmark: benchmarks/cpu_gemm.py.

    python benchmarks/gemm.py                          # all shapes, M = 1..8192
    python benchmarks/gemm.py --models llama-2-7b --tokens 1,16,4096
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, markdown_table, save

from mixsparse.pruner.core.masks import mask_nm
from mixsparse.runtime import kernels
from mixsparse.runtime.formats.packed24 import Packed24
from mixsparse.runtime.sparse_linear import SparseLinear, prepare

# (out_features, in_features) of each fused GEMM as vLLM runs them: qkv, o, gate_up, down
SHAPES = {
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama-2-70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}
GPU_TOKENS = (1, 16, 64, 256, 1024, 4096, 8192)
CPU_TOKENS = (1, 16, 256, 2048)


def timer(device: torch.device):
    if device.type == "cuda":

        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def measure(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1000

    return measure


def median_ms(fn, measure, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(measure(fn) for _ in range(repeats))


GRAPH_CALLS = 20


def graphed_ms(fn, measure, repeats: int) -> float | str:
    """Per-call time with ``GRAPH_CALLS`` calls captured in one CUDA graph: the GPU's time without the host's
    launch overhead (what vLLM's decode runs, since it captures its forward in graphs); the reason on failure."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        return median_ms(graph.replay, measure, repeats) / GRAPH_CALLS
    except Exception as exception:  # report it in the table: whether the op captures is itself a result
        return f"{type(exception).__name__}: {str(exception).splitlines()[0][:80]}"


def host_us(fn, calls: int = 200) -> float:
    """CPU time to issue one call (no synchronisation inside the loop)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / calls * 1e6


def searched_cusparselt(dense: torch.Tensor, x: torch.Tensor):
    """cuSPARSELt with the algorithm its own search picks for this shape (``_cslt_sparse_mm_search``), vs the
    default alg_id 0 that serving uses: a probe of how much the choice is worth."""
    compressed = torch._cslt_compress(dense.contiguous())
    alg = torch._cslt_sparse_mm_search(compressed, x.t())
    return alg, lambda: torch._cslt_sparse_mm(compressed, x.t(), transpose_result=True, alg_id=alg)


def random_24(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    weight = torch.randn(shape, dtype=torch.float32, device=device)
    return (weight * mask_nm(weight.abs(), 2, 4)).to(dtype)


def bench_shape(
    model: str,
    name: str,
    shape: tuple[int, int],
    tokens: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
) -> list[dict]:
    measure = timer(device)
    dense = random_24(shape, dtype, device)
    packed = Packed24.pack(dense.cpu())
    backends = [b for b in kernels.available(str(device)) if b != kernels.DENSE or device.type != "cuda"]
    modules = {b: SparseLinear(prepare(packed, device, dtype, backend=b)) for b in backends}
    rows = []
    for m in tokens:
        x = torch.randn(m, shape[1], dtype=dtype, device=device)
        reference = torch.nn.functional.linear(x, dense)
        dense_call = lambda: torch.nn.functional.linear(x, dense)  # noqa: E731
        dense_ms = median_ms(dense_call, measure, repeats)
        cuda = device.type == "cuda"
        dense_graph = graphed_ms(dense_call, measure, repeats) if cuda else None
        calls = {backend: (lambda module=module: module(x)) for backend, module in modules.items()}
        if cuda and kernels.CUSPARSELT in modules and hasattr(torch, "_cslt_sparse_mm_search"):
            try:
                alg, calls["cusparselt, searched alg"] = searched_cusparselt(dense, x)
            except Exception as exception:
                print(f"cuSPARSELt search failed: {exception}", file=sys.stderr)
        for backend, call in calls.items():
            with torch.no_grad():
                y = call()
                error = ((y.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
                sparse_ms = median_ms(call, measure, repeats)
                sparse_graph = graphed_ms(call, measure, repeats) if cuda else None
            module = modules.get(backend, modules.get(kernels.CUSPARSELT))
            row = {
                "model": model,
                "gemm": name,
                "out": shape[0],
                "in": shape[1],
                "tokens": m,
                "backend": backend if "searched" not in backend else f"{backend} {alg}",
                "dense_ms": dense_ms,
                "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms,
                "max_rel_error": error,
                "weight_bytes_ratio": module.resident_bytes / (dense.numel() * dense.element_size()),
            }
            if cuda:
                graphed = isinstance(dense_graph, float) and isinstance(sparse_graph, float)
                row.update(
                    dense_graph_ms=dense_graph,
                    sparse_graph_ms=sparse_graph,
                    graph_speedup=dense_graph / sparse_graph if graphed else None,
                    dense_host_us=host_us(dense_call),
                    sparse_host_us=host_us(call),
                )
            rows.append(row)
            print(
                f"{model} {name} {shape} M={m} {row['backend']}: dense {dense_ms:.3f} ms, sparse {sparse_ms:.3f} ms, "
                f"x{dense_ms / sparse_ms:.2f}, rel err {error:.1e}"
                + (
                    f"; graphed dense {dense_graph} sparse {sparse_graph}; host us "
                    f"{row['dense_host_us']:.0f} / {row['sparse_host_us']:.0f}"
                    if cuda
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=list(SHAPES).index)
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for axis, model in zip(axes[0], models):
        for gemm, backend in sorted({(r["gemm"], r["backend"]) for r in rows if r["model"] == model}):
            points = [r for r in rows if r["model"] == model and r["gemm"] == gemm and r["backend"] == backend]
            axis.plot(
                [p["tokens"] for p in points],
                [p.get("graph_speedup") or p["speedup"] for p in points],
                marker="o",
                label=f"{gemm} ({backend})",
            )
        axis.axhline(1.0, color="black", lw=0.8)
        axis.set(xscale="log", xlabel="tokens (M)", ylabel="dense time / 2:4 time (graphed)", title=model)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary(rows: list[dict]) -> str:
    """The ranges a reader needs, computed from the rows: eager vs graphed, default vs searched algorithm."""

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}x" if values else "not measured"

    def speedups(key: str, searched: bool, low: int, high: int) -> list[float]:
        return [
            r[key]
            for r in rows
            if r.get(key) and ("searched" in r["backend"]) == searched and low <= r["tokens"] <= high
        ]

    def regimes(searched: bool) -> str:
        return (
            f"M <= 64 {span(speedups('graph_speedup', searched, 1, 64))}, "
            f"M 256 {span(speedups('graph_speedup', searched, 256, 256))}, "
            f"M >= 1024 {span(speedups('graph_speedup', searched, 1024, 1 << 30))}"
        )

    host = sorted(r["sparse_host_us"] for r in rows if "sparse_host_us" in r and "searched" not in r["backend"])
    dense_host = sorted(r["dense_host_us"] for r in rows if "dense_host_us" in r)
    lines = [
        "**What the table says** (computed from its rows):",
        f"- eager, as served today (alg 0): {span(speedups('speedup', False, 1, 1 << 30))} of dense at every M; "
        f"issuing one sparse call costs the host a median {host[len(host) // 2]:.0f} µs against "
        f"{dense_host[len(dense_host) // 2]:.0f} µs for dense (torch's `_cslt_sparse_mm` builds its cuSPARSELt plan "
        f"on every call), so eager 2:4 is launch-bound;"
        if host
        else "- no host timings",
        f"- CUDA-graphed, alg 0: {regimes(False)};",
        f"- CUDA-graphed, searched algorithm: {regimes(True)} (the search fails at M = 1: cuSPARSELt refuses that "
        "descriptor).",
    ]
    return "\n".join(lines)


def render(rows: list[dict], dtype: str, repeats: int) -> str:
    """The markdown for BENCHMARKS.md: a summary of what the rows show, then the whole table."""
    section = "gpu"

    def graph_cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else f"capture failed ({value})"

    table = markdown_table(
        [
            "model",
            "GEMM (out x in)",
            "M",
            "backend",
            "dense ms",
            "2:4 ms",
            "speedup",
            "graphed dense ms",
            "graphed 2:4 ms",
            "graphed speedup",
            "host µs/call dense / 2:4",
            "max rel. error",
            "weight bytes (of dense)",
        ],
        [
            [
                r["model"],
                f"{r['gemm']} ({r['out']}x{r['in']})",
                r["tokens"],
                r["backend"],
                f"{r['dense_ms']:.3f}",
                f"{r['sparse_ms']:.3f}",
                f"{r['speedup']:.2f}",
                graph_cell(r["dense_graph_ms"]),
                graph_cell(r["sparse_graph_ms"]),
                f"{r['graph_speedup']:.2f}" if r["graph_speedup"] else "-",
                f"{r['dense_host_us']:.0f} / {r['sparse_host_us']:.0f}",
                f"{r['max_rel_error']:.1e}",
                f"{r['weight_bytes_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    losers = [r for r in rows if r["backend"] != kernels.DENSE and r["speedup"] < 1.0]
    note = (
        f"{len(losers)} of {len(rows)} (shape, M, backend) points are slower than dense"
        + (
            ": "
            + ", ".join(sorted({f"{r['model']} {r['gemm']} M={r['tokens']} ({r['backend']})" for r in losers})[:12])
            if losers
            else ""
        )
        + ". Serving picks per shape the backend that wins over the token counts (runtime/sparse_linear.py)."
    )
    return (
        f"{dtype}, median of {repeats} repeats (CUDA events); random 2:4 weights; the sparse side is "
        f"`torch.ops.mixsparse.sparse_linear` on a prepared packed weight (alg_id 0); `searched alg` rows call "
        f"cuSPARSELt directly with the algorithm `_cslt_sparse_mm_search` picks. 'graphed' = {GRAPH_CALLS} calls "
        f"replayed from one CUDA graph (no host launch cost, as vLLM's decode runs); 'host µs' = CPU time to issue "
        f"one call. Plot: "
        f"`benchmarks/results/gemm-{section}.png`, data: `benchmarks/results/gemm-{section}.csv`.\n\n"
        f"![dense vs 2:4 GEMM](benchmarks/results/gemm-{section}.png)\n\n{summary(rows)}\n\n{table}\n\n{note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", help=f"comma-separated, from {', '.join(SHAPES)} (default: all on GPU, the default model on CPU)"
    )
    parser.add_argument("--tokens", help="comma-separated token counts M")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: the GPU GEMM table is skipped (the CPU table is benchmarks/cpu_gemm.py)")
        return
    device = torch.device("cuda")
    models = args.models.split(",") if args.models else (list(SHAPES) if cuda else ["smollm2-135m"])
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else (GPU_TOKENS if cuda else CPU_TOKENS)
    dtype = getattr(torch, args.dtype)
    rows = []
    for model in models:
        for name, shape in SHAPES[model].items():
            rows += bench_shape(model, name, shape, tokens, dtype, device, args.repeats)
    section = "gpu" if cuda else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"gemm-{section}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, RESULTS / f"gemm-{section}.png")

    markdown = render(rows, args.dtype, args.repeats)
    save(f"gemm-{section}", "Dense vs 2:4 linear layers (GEMM)", markdown, {"rows": rows}, section=section, order=40)


if __name__ == "__main__":
    main()
