"""Dense bf16 ``F.linear`` (oneDNN) vs mixsparse's native CPU kernel on compressed weights, per shape,
token count M and thread count, with the achieved bandwidth beside each speedup.

The sparse side is the runtime's ``sparse_linear`` (what serving calls: on CPU the op
``torch.ops.mixsparse_cpu.sparse_linear``) on a weight in the kernel's layout: 2:4 converted from the
artifact's packing (56.25% of dense bf16 bytes), or a bitmask at an unstructured ratio (the bitmask
format). Both sides run in the same dtype on the same activations.
Weights do not sit in cache: each side cycles through enough copies to exceed twice the L3 (the copies
are distinct tensors; the count is printed), and dense/sparse calls alternate so machine noise hits both.
GB/s is weight bytes read per second (dense: out*in*2; sparse: values + mask + offsets); the machine's
copy bandwidth (read + write of a 512 MiB tensor) is measured in the same run for comparison.

    python benchmarks/cpu_gemm.py                                   # 2:4, default model + 7B/8B shapes
    python benchmarks/cpu_gemm.py --sparsity 0.5,0.7,0.8,0.9 --shapes 7b --tokens 1,16,256,2048
    python benchmarks/cpu_gemm.py --sweep --shapes 4096x4096         # where streaming/panel hand over to tiles
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine, machine_line, markdown_table, save

from mixsparse.pruner.core.masks import mask_nm
from mixsparse.runtime import cpu_sparse
from mixsparse.runtime.formats.packed24 import Packed24
from mixsparse.runtime.sparse_linear import sparse_linear
from mixsparse.runtime.weight import SparseWeight

SHAPE_SETS = {
    # (out, in) of the default model's fused GEMMs as vLLM runs them: qkv, o, gate_up, down
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
    # Llama-2-7B / Llama-3-8B linear shapes
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)],
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        if part in SHAPE_SETS:
            shapes += SHAPE_SETS[part]
        else:
            out_features, in_features = (int(v) for v in part.split("x"))
            shapes.append((out_features, in_features))
    return shapes


def l3_bytes() -> int:
    """The largest cache level this CPU reports (sysfs), 32 MiB when unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def copy_bandwidth(threads: int) -> float:
    """GB/s of dst.copy_(src) for 512 MiB, counting the bytes read and written."""
    torch.set_num_threads(threads)
    source = torch.ones(2**28, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    best = min(_seconds(lambda: target.copy_(source)) for _ in range(5))
    return 2 * source.numel() * 2 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sparse_weight(shape, sparsity: str, generator) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator)
    if sparsity == "2:4":
        return (weight * mask_nm(weight.abs(), 2, 4)).to(torch.bfloat16)
    keep = torch.rand(shape, generator=generator) >= float(sparsity)
    return (weight * keep).to(torch.bfloat16)


def compress(weight: torch.Tensor, sparsity: str) -> SparseWeight:
    if sparsity == "2:4":  # what serving does: from the artifact's packing, never unpacked
        packed = Packed24.pack(weight)
        return cpu_sparse.from_packed24(packed.values, packed.meta, packed.shape)
    return cpu_sparse.from_dense(weight)


def bench_shape(
    shape, sparsity: str, tokens: list[int], threads: list[int], repeats: int, cache: int, sweep: bool
) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    dense_bytes = shape[0] * shape[1] * 2
    copies = max(2, math.ceil(2 * cache / dense_bytes))
    weights = [sparse_weight(shape, sparsity, generator) for _ in range(copies)]
    compressed = [compress(w, sparsity) for w in weights]
    sparse_bytes = compressed[0].nbytes
    module, _ = cpu_sparse.load()
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for m in tokens:
            x = torch.randn(m, shape[1], generator=generator).to(torch.bfloat16)
            variants = {"sparse": lambda c: sparse_linear(x, c)}
            if sweep:  # the kernel's test hook: the same op with its path forced
                variants = {
                    "rows": lambda c: module.sparse_linear_with(
                        "best", x, c.values, c.mask, c.offsets, None, shape[0], tile_min_tokens=1 << 40
                    ),
                    "tiles": lambda c: module.sparse_linear_with(
                        "best", x, c.values, c.mask, c.offsets, None, shape[0], tile_min_tokens=0
                    ),
                }
            times = {"dense": [], **{name: [] for name in variants}}
            calls = max(repeats, copies)
            for i in range(calls + 2):  # two warm-up rounds, then dense and sparse alternate on copy i
                w, c = weights[i % copies], compressed[i % copies]
                elapsed = {"dense": _seconds(lambda: torch.nn.functional.linear(x, w))}
                for name, fn in variants.items():
                    elapsed[name] = _seconds(lambda: fn(c))
                if i >= 2:
                    for name, value in elapsed.items():
                        times[name].append(value)
            dense_s = statistics.median(times["dense"])
            for name in variants:
                sparse_s = statistics.median(times[name])
                rows.append(
                    {
                        "out": shape[0],
                        "in": shape[1],
                        "sparsity": sparsity,
                        "threads": count,
                        "tokens": m,
                        "variant": name,
                        "dense_ms": dense_s * 1e3,
                        "sparse_ms": sparse_s * 1e3,
                        "speedup": dense_s / sparse_s,
                        "dense_gbps": dense_bytes / dense_s / 1e9,
                        "sparse_gbps": sparse_bytes / sparse_s / 1e9,
                        "bytes_ratio": sparse_bytes / dense_bytes,
                        "copies": copies,
                    }
                )
                r = rows[-1]
                print(
                    f"{shape[0]}x{shape[1]} {sparsity} t={count} M={m} {name}: dense {r['dense_ms']:.3f} ms "
                    f"({r['dense_gbps']:.1f} GB/s), sparse {r['sparse_ms']:.3f} ms ({r['sparse_gbps']:.1f} GB/s), "
                    f"x{r['speedup']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default="smollm2,7b",
        help=f"comma-separated sets ({', '.join(SHAPE_SETS)}) or OUTxIN shapes (default: %(default)s)",
    )
    parser.add_argument("--sparsity", default="2:4", help="comma-separated: 2:4 and/or unstructured ratios")
    parser.add_argument("--tokens", default="1,4,16,64,256,2048", help="comma-separated token counts M")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per side and point (median)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time the kernel's streaming path and its tiles path separately (tuning evidence)",
    )
    parser.add_argument("--name", help="result name under benchmarks/results (default from the options)")
    args = parser.parse_args()
    if cpu_sparse.unavailable_reason():
        sys.exit(f"the native CPU kernels are unavailable: {cpu_sparse.unavailable_reason()}")
    shapes, tokens = parse_shapes(args.shapes), [int(t) for t in args.tokens.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    cache = l3_bytes()
    bandwidth = {t: copy_bandwidth(t) for t in threads}
    rows = []
    for sparsity in args.sparsity.split(","):
        for shape in shapes:
            rows += bench_shape(shape, sparsity, tokens, threads, args.repeats, cache, args.sweep)
    info = machine()
    name = args.name or (
        "cpu-gemm-sweep" if args.sweep else "cpu-gemm-24" if args.sparsity == "2:4" else "cpu-gemm-bitmask"
    )
    table = markdown_table(
        [
            "shape (out x in)",
            "sparsity",
            "threads",
            "M",
            *(["path"] if args.sweep else []),
            "dense ms",
            "sparse ms",
            "speedup",
            "dense GB/s",
            "sparse GB/s",
        ],
        [
            [
                f"{r['out']}x{r['in']}",
                r["sparsity"],
                r["threads"],
                r["tokens"],
                *([r["variant"]] if args.sweep else []),
                f"{r['dense_ms']:.3f}",
                f"{r['sparse_ms']:.3f}",
                f"**{r['speedup']:.2f}**",
                f"{r['dense_gbps']:.1f}",
                f"{r['sparse_gbps']:.1f}",
            ]
            for r in rows
        ],
    )
    ratios = sorted({(r["sparsity"], round(r["bytes_ratio"], 3)) for r in rows})
    markdown = (
        f"CPU: **{info['cpu']}**, {info['cores']} cores, kernel variant `{cpu_sparse.isa()}`; "
        f"{machine_line(info)}.\n\n"
        f"bf16 both sides; median of {args.repeats} wall-clock calls per point, dense and sparse alternating; "
        f"random weights cycling through copies totalling more than 2x the {cache / 2**20:.0f} MiB L3 "
        f"(not in cache). Sparse bytes of dense: "
        + ", ".join(f"{s}: {b}" for s, b in ratios)
        + ". Copy bandwidth (read + write, 512 MiB): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {b:.1f} GB/s" for t, b in bandwidth.items())
        + ".\n\n"
        + table
    )
    title = f"CPU GEMM: dense bf16 vs the native sparse kernel ({args.sparsity}, threads {args.threads})"
    save(
        name,
        title + (", path sweep" if args.sweep else ""),
        markdown,
        {"rows": rows, "copy_bandwidth_gbps": bandwidth, "l3_bytes": cache},
        section="cpu",
        order=39,
    )


if __name__ == "__main__":
    main()
