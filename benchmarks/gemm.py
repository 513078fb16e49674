"""Dense vs 2:4 linear layers, per weight shape and token count, for every backend this machine has.

The sparse path is what serving runs on CUDA: a packed 2:4 weight prepared by ``mixsparse.runtime.prepare``
and called through the registered op ``torch.ops.mixsparse.sparse_linear``; times are CUDA events around each
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

from mixsparse.pruner.masks import mask_nm
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
        dense_ms = median_ms(lambda: torch.nn.functional.linear(x, dense), measure, repeats)
        for backend, module in modules.items():
            with torch.no_grad():
                y = module(x)
                error = ((y.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
                sparse_ms = median_ms(lambda: module(x), measure, repeats)
            rows.append(
                {
                    "model": model,
                    "gemm": name,
                    "out": shape[0],
                    "in": shape[1],
                    "tokens": m,
                    "backend": backend,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "max_rel_error": error,
                    "weight_bytes_ratio": module.resident_bytes / (dense.numel() * dense.element_size()),
                }
            )
            print(
                f"{model} {name} {shape} M={m} {backend}: dense {dense_ms:.3f} ms, sparse {sparse_ms:.3f} ms, "
                f"x{dense_ms / sparse_ms:.2f}, rel err {error:.1e}",
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
                [p["tokens"] for p in points], [p["speedup"] for p in points], marker="o", label=f"{gemm} ({backend})"
            )
        axis.axhline(1.0, color="black", lw=0.8)
        axis.set(xscale="log", xlabel="tokens (M)", ylabel="dense time / 2:4 time", title=model)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
    table = markdown_table(
        [
            "model",
            "GEMM (out x in)",
            "M",
            "backend",
            "dense ms",
            "2:4 ms",
            "speedup",
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
                f"{r['max_rel_error']:.1e}",
                f"{r['weight_bytes_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    losers = [r for r in rows if r["backend"] != kernels.DENSE and r["speedup"] < 1.0]
    note = (
        "Only the dense fallback runs here (no CUDA): the 2:4 path unpacks once at load and must cost "
        "nothing, so the speedup column shows its parity with a plain dense linear."
        if not cuda
        else f"{len(losers)} of {len(rows)} (shape, M, backend) points are slower than dense"
        + (
            ": "
            + ", ".join(sorted({f"{r['model']} {r['gemm']} M={r['tokens']} ({r['backend']})" for r in losers})[:12])
            if losers
            else ""
        )
        + ". Serving picks per shape the backend that wins over the token counts (runtime/sparse_linear.py)."
    )
    markdown = (
        f"{args.dtype}, median of {args.repeats} repeats"
        f"{' (CUDA events)' if cuda else ' (wall clock)'}; random 2:4 weights; the sparse side is "
        f"`torch.ops.mixsparse.sparse_linear` on a prepared packed weight. Plot: "
        f"`benchmarks/results/gemm-{section}.png`, data: `benchmarks/results/gemm-{section}.csv`.\n\n"
        f"![dense vs 2:4 GEMM](benchmarks/results/gemm-{section}.png)\n\n{table}\n\n{note}"
    )
    save(f"gemm-{section}", "Dense vs 2:4 linear layers (GEMM)", markdown, {"rows": rows}, section=section, order=40)


if __name__ == "__main__":
    main()
