"""Prune the default model with every base metric, unstructured 50% and 2:4; measure quality and cost.

Each configuration runs `mixsparse prune ... --json` in its own process, so prune time and peak
memory (max RSS of that process, model included) belong to that configuration alone.

    python benchmarks/prune_table.py                 # quick protocol: 40 test windows
    python benchmarks/prune_table.py --windows all   # full protocol
"""

from __future__ import annotations

import argparse
import tempfile

from common import markdown_table, mixsparse, save

REFERENCE = (
    "A widely used open-source pruning library: SparseGPT 2:4 perplexity 39.7 in 234 s on this model and protocol."
)


def run(model: str, metric: str, sparsity: str, windows: str, device: str, out: str) -> dict:
    flags = ["--metric", metric, "--sparsity", sparsity, "--out", out, "--eval-windows", windows, "--device", device]
    return mixsparse("prune", model, *flags, "--json", json_out=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="2:4,0.5")
    parser.add_argument("--windows", default="40", help="test windows of 2048 tokens, or 'all'")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for sparsity in args.sparsities.split(","):
            for metric in args.metrics.split(","):
                summary = run(
                    args.model,
                    metric,
                    sparsity,
                    args.windows,
                    args.device,
                    f"{scratch}/{metric}-{sparsity.replace(':', 'of')}",
                )
                results.append({"metric": metric, "sparsity": sparsity, **summary})
    dense = results[0]["perplexity"]["dense"]
    rows = [["dense", "-", f"{dense['perplexity']:.2f}", "0%", "100%", "-", "-"]]
    for r in results:
        wb = r["weight_bytes"]
        rows.append(
            [
                r["metric"],
                r["sparsity"],
                f"{r['perplexity']['pruned']['perplexity']:.2f}",
                f"{r['linear_sparsity']:.1%}",
                f"{wb['stored'] / wb['dense_equivalent']:.1%}",
                f"{r['prune_seconds']:.1f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
            ]
        )
    table = markdown_table(
        [
            "metric",
            "sparsity",
            "perplexity",
            "linear sparsity",
            "stored weight bytes (of dense)",
            "prune time (s)",
            "peak memory (GiB)",
        ],
        rows,
    )
    windows = dense["windows"]
    markdown = (
        f"WikiText-2 test perplexity on the first {windows} windows of 2048 tokens ({dense['tokens']} tokens); "
        f"calibration: 64 random windows of 512 tokens of WikiText-2 valid, seed 0, sequential. Prune time "
        f"is calibration + pruning (model load and save excluded); peak memory is the max RSS of the "
        f"prune process. Stored weight bytes count the whole model (embeddings included).\n\n{table}\n\n"
        f"{REFERENCE}"
    )
    print(markdown)
    save("prune", f"Pruning the default model ({args.model})", markdown, {"results": results}, order=10)


if __name__ == "__main__":
    main()
