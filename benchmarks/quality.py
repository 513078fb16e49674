"""Perplexity vs sparsity on the default model: one curve per base metric (uniform unstructured sparsity,
plus 2:4), and one per allocator from ``allocators.py``'s results when they exist.

Each point is `mixsparse prune --sparsity S --eval-windows N --json` in its own process; points are kept
under --work, so an interrupted run continues where it stopped.

    python benchmarks/quality.py                                  # quick protocol: 40 test windows
    python benchmarks/quality.py --metrics wanda --sparsities 0.5,0.7 --windows 10
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import RESULTS, markdown_table, mixsparse, save


def point(args, work: Path, metric: str, sparsity: str) -> dict:
    cache = work / f"{metric}-{sparsity.replace(':', 'of')}-w{args.windows}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    # allocators.py's uniform plans give every module this ratio: the same masks as --sparsity, same protocol
    uniform = Path(args.allocator_work) / f"ppl-uniform-{sparsity}-{metric}-w{args.windows}.json"
    if ":" not in sparsity and uniform.exists():
        found = json.loads(uniform.read_text())
        return {
            "metric": metric,
            "sparsity": sparsity,
            "perplexity": found["perplexity"],
            "dense": found["dense"],
            "linear_sparsity": found["linear_sparsity"],
            "from": str(uniform),
        }
    out = work / "artifact"
    flags = ["--metric", metric, "--sparsity", sparsity, "--out", str(out), "--overwrite"]
    summary = mixsparse("prune", args.model, *flags, "--eval-windows", args.windows, "--json", json_out=True)
    shutil.rmtree(out, ignore_errors=True)
    value = {
        "metric": metric,
        "sparsity": sparsity,
        "perplexity": summary["perplexity"]["pruned"]["perplexity"],
        "dense": summary["perplexity"]["dense"]["perplexity"],
        "linear_sparsity": summary["linear_sparsity"],
    }
    cache.write_text(json.dumps(value, indent=2) + "\n")
    return value


def allocator_curves() -> dict[str, list[tuple[float, float]]]:
    """{'msp (sparsegpt)': [(target, ppl), ...], ...} from allocators.py's results, if any."""
    path = RESULTS / "allocators.json"
    if not path.exists():
        return {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for cell in json.loads(path.read_text())["data"].get("research", []):
        for base in ("wanda", "gblm", "sparsegpt"):
            if base in cell:  # a run measures the bases it was asked for
                curves.setdefault(f"{cell['allocator']} ({base})", []).append(
                    (cell["target"], cell[base]["perplexity"])
                )
    return {k: sorted(v) for k, v in curves.items()}


def plot(points: list[dict], curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (metrics, allocators) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = points[0]["dense"] if points else None
    for metric in sorted({p["metric"] for p in points}):
        mine = sorted(
            (float(p["sparsity"]), p["perplexity"])
            for p in points
            if p["metric"] == metric and ":" not in p["sparsity"]
        )
        line = metrics.plot([x for x, _ in mine], [y for _, y in mine], marker="o", label=metric)[0]
        for p in points:
            if p["metric"] == metric and ":" in p["sparsity"]:
                metrics.scatter(
                    [p["linear_sparsity"]],
                    [p["perplexity"]],
                    marker="*",
                    s=120,
                    color=line.get_color(),
                    label=f"{metric} {p['sparsity']}",
                )
    for name, curve in curves.items():
        allocators.plot(
            [x for x, _ in curve],
            [y for _, y in curve],
            marker="o",
            linestyle="-" if "sparsegpt" in name else "--",
            label=name,
        )
    for axis, title in ((metrics, "Base metrics, uniform sparsity"), (allocators, "Allocators (mixed sparsity)")):
        if dense:
            axis.axhline(dense, color="black", lw=0.8, label=f"dense {dense:.2f}")
        axis.set(yscale="log", xlabel="sparsity of decoder linear weights", ylabel="WikiText-2 perplexity", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7,0.8,2:4")
    parser.add_argument("--windows", default="40", help="test windows of 2048 tokens, or 'all'")
    parser.add_argument("--work", default="runs/bench-quality", help="kept between runs; delete to start over")
    parser.add_argument(
        "--allocator-work",
        default="runs/bench-allocators",
        help="allocators.py's --work: its uniform-plan points are reused",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sparsities = args.sparsities.split(",")
    points = [point(args, work, metric, s) for metric in args.metrics.split(",") for s in sparsities]
    curves = allocator_curves()
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(points, curves, RESULTS / "quality.png")
    metrics = args.metrics.split(",")
    rows = [
        [s]
        + [f"{next(p['perplexity'] for p in points if p['metric'] == m and p['sparsity'] == s):.2f}" for m in metrics]
        for s in sparsities
    ]
    markdown = (
        f"WikiText-2 test perplexity on the first {args.windows} windows of 2048 tokens (dense "
        f"{points[0]['dense']:.2f}); uniform sparsity per module, default calibration protocol. The "
        f"right panel takes the allocator table's numbers (its own window count) when it exists.\n\n"
        f"![perplexity vs sparsity](benchmarks/results/quality.png)\n\n" + markdown_table(["sparsity", *metrics], rows)
    )
    save(
        "quality", "Quality: perplexity vs sparsity", markdown, {"points": points, "allocator_curves": curves}, order=30
    )


if __name__ == "__main__":
    main()
