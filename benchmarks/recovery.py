"""Recovery after pruning (issue 13), and the spread of the one-shot base over calibration seeds.

Each point is `mixsparse prune ... --eval-windows N --json` in its own process (so its peak memory is its
own); points are kept under --work, so an interrupted run continues where it stopped.

    python benchmarks/recovery.py seeds                # 50% unstructured, SparseGPT and Wanda, seeds 0-4
    python benchmarks/recovery.py recover              # all-2:4 Wanda/SparseGPT, with and without --recover

Run with one thread (OMP_NUM_THREADS=1 taskset -c 1) when the machine is shared; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import RESULTS, markdown_table, save


def run_point(args, work: Path, key: str, flags: list[str]) -> dict:
    cache = work / f"{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = work / "artifact"
    command = [sys.executable, "-m", "mixsparse.serve.cli", "prune", args.model, *flags, "--out", str(out),
               "--overwrite", "--eval-windows", args.windows, "--json"]
    print("$ mixsparse", " ".join(command[3:]), file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"{key} failed with exit code {result.returncode}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    summary = json.loads(result.stdout)
    value = {"key": key, "flags": flags, "threads": os.environ.get("OMP_NUM_THREADS", "all"), **summary}
    cache.write_text(json.dumps(value, indent=2) + "\n")
    return value


def seeds(args, work: Path) -> None:
    points = {}
    for metric in args.metrics.split(","):
        for seed in range(args.seeds):
            flags = ["--metric", metric, "--sparsity", "0.5", "--seed", str(seed)]
            points[(metric, seed)] = run_point(args, work, f"seed-{metric}-0.5-s{seed}-w{args.windows}", flags)
    rows, data = [], {}
    for metric in args.metrics.split(","):
        values = [points[(metric, s)]["perplexity"]["pruned"]["perplexity"] for s in range(args.seeds)]
        mean, stdev = statistics.mean(values), statistics.stdev(values)
        data[metric] = {"perplexity": values, "mean": mean, "stdev": stdev, "min": min(values), "max": max(values)}
        rows.append([metric, " / ".join(f"{v:.2f}" for v in values), f"{mean:.2f}", f"{stdev:.2f}",
                     f"{(max(values) - min(values)) / mean:.1%}", f"{stdev / mean:.1%}"])
    dense = points[(args.metrics.split(",")[0], 0)]["perplexity"]["dense"]["perplexity"]
    markdown = (f"50% unstructured, uniform, default calibration protocol (64 x 512 tokens of the validation split) "
                f"with calibration seeds 0-{args.seeds - 1}; WikiText-2 test perplexity on the first {args.windows} "
                f"windows of 2048 tokens (dense {dense:.2f}).\n\n"
                + markdown_table(["metric", "perplexity per seed", "mean", "stdev", "range / mean", "stdev / mean"],
                                 rows))
    save("seed-spread", "One-shot base: spread over calibration seeds", markdown, data, order=36)
    print(markdown)


def recover(args, work: Path) -> None:
    """One `prune --recover --eval-windows N` per row: it measures the one-shot model before tuning, so each row
    gives the perplexity without and with recovery from the very same masks."""
    extra = args.recover_flags.split()
    points = []
    for metric in args.metrics.split(","):
        for target in args.targets.split(","):
            flags = ["--metric", metric, *(["--plan", target] if target.endswith(".json") else ["--sparsity", target]),
                     "--recover", *extra]
            name = Path(target).stem if target.endswith(".json") else target.replace(":", "of")
            tag = "-".join(f.lstrip("-") for f in extra) or "defaults"
            points.append(run_point(args, work, f"recover-{metric}-{name}-{tag}-w{args.windows}", flags))
    rows = []
    for point in points:
        ppl, recovery = point["perplexity"], point["recovery"]
        options = recovery["options"]
        rows.append([point["metric"], point["plan"].split(": ", 1)[-1],
                     f"{ppl['one_shot']['perplexity']:.2f}", f"{ppl['pruned']['perplexity']:.2f}",
                     f"{recovery['seconds'] / 60:.1f} min", f"{point['prune_seconds'] / 60:.1f} min",
                     f"{recovery['peak_memory_bytes'] / 2**30:.2f} GiB",
                     f"{options['epochs']} x {options['batch']}, lr {options['lr']:g}/{options['norm_lr']:g}"])
    dense = points[0]["perplexity"]["dense"]["perplexity"]
    threads = points[0]["threads"]
    markdown = (f"`prune --recover`: masks frozen, kept weights and norms tuned block by block against the dense "
                f"block outputs on the default calibration windows (64 x 512 tokens, WikiText-2 validation, seed 0). "
                f"WikiText-2 test perplexity on the first {args.windows} windows of 2048 tokens (dense {dense:.2f}); "
                f"one-shot and recovered come from the same run and the same masks. Times on "
                f"{'one thread' if threads == '1' else 'all cores'} of a machine shared with other jobs; peak "
                f"memory is the prune process's resident peak (dense reference included).\n\n"
                + markdown_table(["metric", "plan", "one-shot ppl", "recovered ppl", "recovery", "prune",
                                  "peak memory", "epochs x batch, lr weights/norms"], rows))
    save("recovery", "Recovery after pruning (prune --recover)", markdown, {"points": points}, order=37)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["seeds", "recover"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", default="sparsegpt,wanda")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--windows", default="40", help="test windows of 2048 tokens, or 'all'")
    parser.add_argument("--targets", default="2:4", help="recover: sparsity specs or plan files, comma-separated")
    parser.add_argument("--recover-flags", default="", help="recover: extra prune flags, e.g. '--recover-epochs 3'")
    parser.add_argument("--work", default="runs/bench-recovery", help="kept between runs; delete to start over")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "seeds":
        seeds(args, work)
    else:
        recover(args, work)


if __name__ == "__main__":
    main()
