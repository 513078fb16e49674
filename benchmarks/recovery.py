"""Recovery after pruning, and the spread of the one-shot base over calibration seeds.

Each point is `mixsparse prune ... --eval-windows N --json` in its own process (so its peak memory is its
own); points are kept under --work, so an interrupted run continues where it stopped.

    python benchmarks/recovery.py seeds                # 50% unstructured, SparseGPT and Wanda, seeds 0-4
    python benchmarks/recovery.py recover              # all-2:4 Wanda/SparseGPT, before and after recovery
    python benchmarks/recovery.py recover --targets 2:4 --plans 'uniform 0.7=sparsegpt:0.7,msp 0.7=sparsegpt:runs/\
bench-allocators/plan-msp-0.7-sparsegpt.json' --deploy-budgets 0.25,0.5,0.75   # the table in BENCHMARKS.md

Run with one thread (OMP_NUM_THREADS=1 taskset -c 1) when the machine is shared; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from common import markdown_table, mixsparse, save

from mixsparse.runtime.machine import cpu_serving_dtype


def run_point(args, work: Path, key: str, flags: list[str]) -> dict:
    cache = work / f"{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = work / "artifact"
    output = ["--out", str(out), "--overwrite", "--eval-windows", args.windows, "--json"]
    summary = mixsparse("prune", args.model, *flags, *output, json_out=True)
    shutil.rmtree(out, ignore_errors=True)
    value = {"key": key, "flags": flags, "threads": os.environ.get("OMP_NUM_THREADS", "all"), **summary}
    cache.write_text(json.dumps(value, indent=2) + "\n")
    return value


def seeds(args, work: Path) -> None:
    points = {}
    wanted = [int(s) for s in args.only_seeds.split(",")] if args.only_seeds else range(args.seeds)
    for metric in args.metrics.split(","):
        for seed in wanted:
            flags = ["--metric", metric, "--sparsity", "0.5", "--seed", str(seed)]
            points[(metric, seed)] = run_point(args, work, f"seed-{metric}-0.5-s{seed}-w{args.windows}", flags)
    if args.only_seeds:  # a share of the points, e.g. on another core; the full command writes the table
        return
    rows, data = [], {}
    for metric in args.metrics.split(","):
        values = [points[(metric, s)]["perplexity"]["pruned"]["perplexity"] for s in range(args.seeds)]
        mean, stdev = statistics.mean(values), statistics.stdev(values)
        data[metric] = {"perplexity": values, "mean": mean, "stdev": stdev, "min": min(values), "max": max(values)}
        rows.append(
            [
                metric,
                " / ".join(f"{v:.2f}" for v in values),
                f"{mean:.2f}",
                f"{stdev:.2f}",
                f"{(max(values) - min(values)) / mean:.1%}",
                f"{stdev / mean:.1%}",
            ]
        )
    dense = points[(args.metrics.split(",")[0], 0)]["perplexity"]["dense"]["perplexity"]
    markdown = (
        f"50% unstructured, uniform, default calibration protocol (64 x 512 tokens of the validation split) "
        f"with calibration seeds 0-{args.seeds - 1}; WikiText-2 test perplexity on the first {args.windows} "
        f"windows of 2048 tokens (dense {dense:.2f}).\n\n"
        + markdown_table(["metric", "perplexity per seed", "mean", "stdev", "range / mean", "stdev / mean"], rows)
    )
    save("seed-spread", "One-shot base: spread over calibration seeds", markdown, data, order=12)
    print(markdown)


def cases(args, work: Path) -> list[tuple[str, str, str]]:
    """(label, metric, spec or plan file) of each point: uniform specs with every metric, then --plans, then
    the deployment plans of --deploy-budgets (made once by `mixsparse plan --deploy`, kept in --work)."""
    found = [(spec, metric, spec) for metric in args.metrics.split(",") for spec in args.targets.split(",") if spec]
    for item in filter(None, args.plans.split(",")):
        label, _, rest = item.partition("=")
        metric, _, path = rest.partition(":")
        if not path or (path.endswith(".json") and not Path(path).is_file()):
            raise SystemExit(
                f"--plans {item!r}: expected label=metric:plan.json (an existing file) or label=metric:spec"
            )
        found.append((label, metric, path))
    for budget in filter(None, args.deploy_budgets.split(",")):
        plan = work / f"deploy-{args.deploy_metric}-{float(budget):g}.json"
        if not plan.exists():
            flags = ["--budget", budget, "--allocator", "fisher", "--metric", args.deploy_metric, "--out", str(plan)]
            mixsparse(
                "plan",
                args.model,
                "--deploy",
                *flags,
                *(["--sensitivity", args.sensitivity] if args.sensitivity else []),
            )
        found.append((f"deploy {float(budget):g}", args.deploy_metric, str(plan)))
    return found


def recover(args, work: Path) -> None:
    """Each point is ``pipeline.prune`` with recovery and evaluation (what `mixsparse prune --recover
    --eval-windows N` runs), in this process; a finished point is kept under --work, and an interrupted one
    resumes at its next block from the recovery state the pipeline keeps beside its artifact."""
    import resource

    import torch

    from mixsparse.pruner import pipeline
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.pruner.io import data, models
    from mixsparse.pruner.jobs import PruneJob
    from mixsparse.pruner.recover.options import RecoverOptions

    overrides = json.loads(args.recover_options) if args.recover_options else {}
    options = RecoverOptions(**overrides)
    resolved = options.resolved(models.load_tokenizer(models.resolve(args.model)))  # the tag names what runs
    # named by the settings themselves, so a point measured under other defaults is never taken for this one
    r = resolved
    tag = f"e{r.epochs}-b{r.batch}-lr{r.lr:g}-{r.norm_lr:g}-{r.target}-s{r.seed}"
    # what every point had before chat data, the end-to-end step and bf16 tuning existed
    if not (resolved.data == "text" and resolved.distill_epochs == 0 and resolved.precision == "float32"):
        tag += f"-{resolved.data.replace('+', '')}-d{resolved.distill_epochs}-{resolved.distill_lr:g}"
    if resolved.precision != "float32":  # every point before bf16 tuning existed was float32
        tag += f"-{resolved.precision}"
    protocol = data.EvaluationProtocol(windows=None if args.windows == "all" else int(args.windows))
    progress = RichProgress()
    points = []
    for label, metric, source in cases(args, work):
        from_file = source.endswith(".json")
        key = f"{metric}-" + (
            "".join(c if c.isalnum() or c in "._" else "-" for c in label) if from_file else source.replace(":", "of")
        )
        done = work / f"recover-{key}-{tag}-w{args.windows}.json"
        if args.table_only:  # every setting measured for this case, each a row
            for found in sorted(work.glob(f"recover-{key}-e*-w{args.windows}.json")):
                points.append({**json.loads(found.read_text()), "label": label})
            continue
        if done.exists():
            points.append({**json.loads(done.read_text()), "label": label})
            continue
        out = work / f"artifact-{key}-{tag}"
        job = PruneJob(
            model=args.model,
            metric=metric,
            out=str(out),
            sparsity=None if from_file else source,
            plan=source if from_file else None,
            evaluation=protocol,
            recover=options,
            overwrite=True,
        )
        summary = pipeline.prune(job, progress)
        shutil.rmtree(out)
        result = summary.recovery
        value = {
            "metric": metric,
            "spec": label,
            "linear_sparsity": summary.plan.weight_sparsity(),
            "perplexity": {
                "recovered": summary.perplexity["pruned"].perplexity,
                "one_shot": summary.perplexity["one_shot"].perplexity,
            },
            "recovery": result.to_json(),
            "recovery_seconds": sum(b.seconds for b in result.blocks)
            + (result.distill.seconds if result.distill else 0)
            + result.data_seconds,
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(),
        }
        done.write_text(json.dumps(value, indent=2) + "\n")
        points.append({**value, "label": label})
    rows = []
    for point in points:
        o = point["recovery"]["options"]
        measured = point["perplexity"]
        rows.append(
            [
                point["label"],
                point["metric"],
                f"{point['linear_sparsity']:.3f}" if "linear_sparsity" in point else "-",
                f"{measured['one_shot']:.2f}" if "one_shot" in measured else "(not measured yet)",
                f"{measured['recovered']:.2f}",
                f"{point['recovery_seconds'] / 60:.1f} min" + ("*" if point["recovery"].get("resumed_blocks") else ""),
                (f"{point['peak_memory_bytes'] / 2**30:.2f} GiB" if point["peak_memory_bytes"] else "-")
                + ("*" if point["recovery"].get("resumed_blocks") else ""),
                f"{o['epochs']} x {o['batch']}, lr {o['lr']:g}/{o['norm_lr']:g}, {o['target']}"
                + (f", {o['distill_epochs']} e2e at {o['distill_lr']:g}" if o.get("distill_epochs") else "")
                + ", "
                + o.get("precision", "float32"),
                o.get("data", "text"),
            ]
        )
    threads = sorted({str(p["threads"]) for p in points if "threads" in p}) or ["?"]
    markdown = (
        "`prune --recover`: masks frozen, kept weights and norms tuned block by block against the dense "
        "block outputs, then (where the settings say e2e) the whole model against the dense model's "
        "next-token distribution. Data `text`: the default calibration windows (64 x 512 tokens, WikiText-2 "
        "validation, seed 0); `text+chat` (the default for a model with a chat template): 32 of them and 32 "
        "windows of the dense model's own answers to the bundled chat prompts. Matmuls: float32, or bfloat16 "
        "under autocast with float32 weights and optimizer (`--recover-precision`; auto, the default, is "
        f"{cpu_serving_dtype()} on this machine's CPU). "
        f"WikiText-2 test perplexity on the first {args.windows} windows of 2048 tokens (dense 17.9, see the "
        "pruning table); one-shot and recovered are the same masks before and after tuning. Rows: uniform "
        "specs; `msp 0.7` is the allocator table's MSP plan (searched over SparseGPT's own levels); `deploy B` "
        "is the deployment plan `mixsparse plan --deploy --budget B --allocator fisher` (B of the decoder "
        "linear weights in 2:4; 1 is all-2:4, the same as the uniform 2:4 row, and 0 is the dense model). "
        f"Recovery time on {'/'.join(threads)} thread(s) of a 2-core machine (chat answers, blocks and the "
        "end-to-end step; the points on 1 thread each ran pinned to one core beside another run); peak "
        "memory is the process's resident peak (dense reference and evaluation included)."
        + (
            " \\* resumed: some blocks were tuned by an earlier, interrupted process, often under more load "
            "(their recorded times are summed in), and the peak memory is the last process's only."
            if any(p["recovery"].get("resumed_blocks") for p in points)
            else ""
        )
        + "\n\n"
        + markdown_table(
            [
                "plan",
                "metric",
                "linear sparsity",
                "one-shot ppl",
                "recovered ppl",
                "recovery",
                "peak memory",
                "epochs x batch, lr weights/norms, target, end to end, matmuls",
                "data",
            ],
            rows,
        )
    )
    save("recovery", "Recovery after pruning (prune --recover)", markdown, {"points": points}, order=11)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["seeds", "recover"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", default="sparsegpt,wanda")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only-seeds", default="", help="seeds: compute these seeds only (e.g. 3,4), no table")
    parser.add_argument("--windows", default="40", help="test windows of 2048 tokens, or 'all'")
    parser.add_argument("--targets", default="2:4", help="recover: uniform sparsity specs, comma-separated")
    parser.add_argument(
        "--plans",
        default="",
        help="recover: more points, label=metric:plan.json or label=metric:spec, comma-separated "
        "(e.g. 'msp 0.7=sparsegpt:plan.json,uniform 0.7=sparsegpt:0.7')",
    )
    parser.add_argument(
        "--deploy-budgets", default="", help="recover: deployment plans at these 2:4 budgets, e.g. 0.25,0.5,0.75"
    )
    parser.add_argument("--deploy-metric", default="sparsegpt", help="recover: base metric of --deploy-budgets")
    parser.add_argument("--sensitivity", help="recover: Fisher traces for --deploy-budgets (`mixsparse sensitivity`)")
    parser.add_argument("--recover-options", default="", help="recover: RecoverOptions as JSON, e.g. '{\"epochs\": 3}'")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="recover: write the table from what is measured so far, computing nothing",
    )
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
