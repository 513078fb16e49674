"""Mixed-sparsity allocators on the default model: uniform, global magnitude, OWL, Fisher and MSP at several
targets, each applied with every base metric (Wanda, GBLM, SparseGPT); the 2:4 deployment choice at one budget
against its baselines; and the deployment quality/memory front.

The allocators that do not search (uniform, global, OWL, Fisher) make one plan per target, applied with each
base. MSP searches once per base, over that base's own levels (`mixsparse plan --metric <base>`), so what it
scores is what `prune --plan --metric <base>` writes. Three MSP rows: msp is `mixsparse plan`'s defaults (KL
fitness); msp-loss the next-token loss fitness the table was first measured with; msp-probe msp with the search
seeded by probing each block alone (`--probe-seed`, pruner/search/probes.py). msp's plans are the ones
fitness_variants.py's kl cells make, so a cell measured by either is not searched again.

Every step is a `mixsparse` command in its own process (what a user would run) and its output is kept
under --work, so an interrupted run continues where it stopped (delete --work to start over). The Fisher
traces are measured once (`mixsparse sensitivity`) and shared by every plan.

    python benchmarks/allocators.py                               # everything (hours on 2 CPU cores)
    python benchmarks/allocators.py --targets 0.7 --skip-front    # one column
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

from common import RESULTS, command_line, machine, machine_line, markdown_table, mixsparse, save

ALLOCATORS = ("uniform", "global", "owl", "fisher", "msp-loss", "msp", "msp-probe")
# the searched rows: (plan name suffix, `plan` flags, each named so a rerun searches what the row shows). msp is
# the CLI's defaults (KL fitness); msp-loss the loss fitness the table was first measured with; msp-probe
# adds the probed seed
SEARCHES = {
    "msp-loss": ("", ("--fitness", "loss", "--no-probe-seed")),
    "msp": ("kl", ("--fitness", "kl", "--no-probe-seed")),
    "msp-probe": ("kl-probe", ("--fitness", "kl", "--probe-seed")),
}
BASES = ("wanda", "gblm", "sparsegpt")
# the deployment table and front were measured with the loss fitness (the CLI's default until KL replaced it):
# pinned, so that a rerun measures what they show
DEPLOY_FITNESS = ("--fitness", "loss")
PROTOCOL = 2  # 2: MSP searched per base over its own levels; cells of other protocols are not shown beside these


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def kept_gradients(work: Path, metric: str) -> list[str]:
    """gblm's gradient norms are computed by the first gblm command and read by the others (--gradients)."""
    return ["--gradients", str(work / "gradients-gblm.safetensors")] if metric == "gblm" else []


def pruned_perplexity(args, work: Path, name: str, plan: Path, metric: str) -> dict:
    def run():
        with_plan = work / f"artifact-{name}-{metric}"
        summary = mixsparse(
            "prune",
            args.model,
            "--plan",
            str(plan),
            "--metric",
            metric,
            "--out",
            str(with_plan),
            "--eval-windows",
            args.windows,
            "--overwrite",
            "--json",
            *kept_gradients(work, metric),
            json_out=True,
        )
        # the artifact itself is not needed afterwards; the numbers are
        shutil.rmtree(with_plan, ignore_errors=True)
        return {
            "perplexity": summary["perplexity"]["pruned"]["perplexity"],
            "dense": summary["perplexity"]["dense"]["perplexity"],
            "linear_sparsity": summary["linear_sparsity"],
            "prune_seconds": summary["prune_seconds"],
        }

    return cached(work / f"ppl-{name}-{metric}-w{args.windows}.json", run)


def make_research_plan(
    args, work: Path, sensitivity: Path, allocator: str, target: float, metric: str, variant: tuple = ()
) -> Path:
    """The plan file of one (allocator, target[, base]) with its cost beside it; made once, kept in --work.
    ``variant``: (name, extra `plan` flags) of a search setting other than the defaults (fitness_variants.py)."""
    name = f"{allocator}-{target:g}" + (f"-{metric}" if allocator == "msp" else "")
    searched = allocator == "msp"
    if searched and args.msp_granularity == "module":
        name += "-module"
    if variant and variant[0]:
        name += f"-{variant[0]}"
    plan = work / f"plan-{name}.json"
    if not plan.exists():
        started = time.perf_counter()
        kept = kept_gradients(work, metric)
        gradients_read = bool(kept) and Path(kept[1]).exists()
        mixsparse(
            "plan",
            args.model,
            "--allocator",
            allocator,
            "--target",
            f"{target:g}",
            "--metric",
            metric,
            "--sensitivity",
            str(sensitivity),
            "--out",
            str(plan),
            "--overwrite",
            *(["--generations", str(args.generations)] if args.generations is not None and searched else []),
            *(["--granularity", "module"] if searched and args.msp_granularity == "module" else []),
            *kept_gradients(work, metric),
            *(variant[1] if variant else []),
        )
        info = json.loads(plan.read_text())
        (work / f"plan-{name}.cost.json").write_text(
            json.dumps(
                info.get("search", {})
                | {"command_seconds": round(time.perf_counter() - started, 1), "gradients_read": gradients_read},
                indent=2,
            )
        )
    return plan


def research(args, work: Path, sensitivity: Path) -> list[dict]:
    cells = []
    for target in args.targets:
        for allocator in args.allocators:
            cell = {"allocator": allocator, "target": target, "protocol": PROTOCOL}
            for base in args.bases:
                # only msp's plans depend on the base (it searches the base's own levels)
                if allocator in SEARCHES:
                    plan = make_research_plan(args, work, sensitivity, "msp", target, base, SEARCHES[allocator])
                else:
                    plan = make_research_plan(args, work, sensitivity, allocator, target, "wanda")
                cell[base] = pruned_perplexity(args, work, plan.stem.removeprefix("plan-"), plan, base)
                cost = plan.with_name(plan.stem + ".cost.json")
                if allocator in SEARCHES and cost.exists():
                    cell[base]["cost"] = json.loads(cost.read_text())
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
    return cells


def random_baseline(args, work: Path, sensitivity: Path, budget: float) -> dict:
    """Score ``args.random`` random deployment choices with the search's own fitness; keep the best."""

    def run():
        from mixsparse.pruner.core.progress import Silent
        from mixsparse.pruner.core.spec import Spec
        from mixsparse.pruner.plans.dense_or_24 import deploy_evaluator, deployment_groups
        from mixsparse.pruner.plans.evidence import gather
        from mixsparse.pruner.plans.plan import Plan
        from mixsparse.pruner.plans.request import Deployment, FisherOptions, PlanRequest, SearchOptions
        from mixsparse.pruner.search.group_genome import DeployBudget, random_choice

        job = PlanRequest(
            args.model,
            str(work / "unused.json"),
            Deployment(budget=budget),
            allocator="msp",
            metric=args.deploy_metric,
            fisher=FisherOptions(sensitivity=str(sensitivity)),
            search=SearchOptions(fitness=DEPLOY_FITNESS[1]),
        )
        evidence = gather(job, Silent(), need_fisher=True, need_stats=False)
        groups, sizes = deployment_groups(evidence)
        deploy_budget = DeployBudget.for_fraction(groups, sizes, budget)
        evaluator = deploy_evaluator(job, evidence, Silent())
        rng = random.Random(0)
        tried = []
        for index in range(args.random):
            bits = random_choice(deploy_budget, rng)
            specs = {m: (Spec.nm(2, 4) if bit else Spec.dense()) for g, bit in zip(groups, bits) for m in g}
            fitness = evaluator.evaluate(specs, max(job.search.settings.steps))
            tried.append({"bits": list(bits), "fitness": fitness, "fraction": deploy_budget.fraction(bits)})
            print(f"random choice {index + 1}/{args.random}: fitness {fitness:.4f}", file=sys.stderr, flush=True)
        evaluator.restore()
        best = min(tried, key=lambda t: t["fitness"])
        modules = {m: Spec.nm(2, 4) for g, bit in zip(groups, best["bits"]) if bit for m in g}
        Plan(
            modules,
            dict(evidence.shapes),
            {
                "allocator": "random",
                "deploy": True,
                "budget": budget,
                "achieved_fraction": best["fraction"],
                "metric": args.deploy_metric,
            },
        ).save(work / f"deploy-random-{args.deploy_metric}-{budget:g}.json", overwrite=True)
        return {"fitnesses": [t["fitness"] for t in tried], "best": best["fitness"], "best_fraction": best["fraction"]}

    return cached(work / f"deploy-random-{args.deploy_metric}-{budget:g}.result.json", run)


def deployment(args, work: Path, sensitivity: Path) -> dict:
    budget, metric = args.deploy_budget, args.deploy_metric
    plans = {
        "msp": work / f"deploy-msp-{metric}-{budget:g}.json",
        "least_sensitive_first": work / f"deploy-fisher-{metric}-{budget:g}.json",
    }
    for allocator, plan in (("msp", plans["msp"]), ("fisher", plans["least_sensitive_first"])):
        if not plan.exists():
            started = time.perf_counter()
            mixsparse(
                "plan",
                args.model,
                "--deploy",
                "--allocator",
                allocator,
                "--budget",
                f"{budget:g}",
                "--metric",
                metric,
                "--sensitivity",
                str(sensitivity),
                "--out",
                str(plan),
                "--overwrite",
                *DEPLOY_FITNESS,
            )
            plan.with_suffix(".cost.json").write_text(
                json.dumps({"command_seconds": round(time.perf_counter() - started, 1)}) + "\n"
            )
    randoms = random_baseline(args, work, sensitivity, budget)
    plans["best_random"] = work / f"deploy-random-{metric}-{budget:g}.json"
    msp_info = json.loads(plans["msp"].read_text())
    fitness = {
        "msp": msp_info["search"].get("plan_fitness", msp_info["search"]["best_fitness"]),
        "least_sensitive_first": msp_info["search"]["seed_fitness"]["least_sensitive_first"],
        "best_random": randoms["best"],
    }
    rows = {}
    for name, plan in plans.items():
        info = json.loads(plan.read_text())
        rows[name] = {
            "fitness": fitness[name],
            "achieved_fraction": info["achieved_fraction"],
            "test": pruned_perplexity(args, work, f"deploy-{name}-{budget:g}", plan, metric),
        }
    cost = json.loads(plans["msp"].with_suffix(".cost.json").read_text())
    return {"budget": budget, "metric": metric, "rows": rows, "random": randoms, "search": msp_info["search"] | cost}


def front(args, work: Path, sensitivity: Path) -> dict | None:
    out = work / f"front-{args.deploy_metric}"
    if not (out / "front.json").exists():
        extra = ["--generations", str(args.front_generations)] if args.front_generations else []
        mixsparse(
            "plan",
            args.model,
            "--deploy",
            "--pareto",
            "--allocator",
            "msp",
            "--metric",
            args.deploy_metric,
            "--sensitivity",
            str(sensitivity),
            "--out",
            str(out),
            "--overwrite",
            *DEPLOY_FITNESS,
            *extra,
        )
    result = json.loads((out / "front.json").read_text())
    for point in result["front"]:
        point["test"] = pruned_perplexity(
            args, work, f"front-{point['budget']:g}", out / point["plan"], args.deploy_metric
        )
    return result


def dense_perplexity(cell: dict) -> float:
    return next(cell[base]["dense"] for base in BASES if base in cell)


def with_published(cells: list[dict]) -> list[dict]:
    """This run's measurements over the published ones, per (target, allocator, base): whatever this run did not
    measure keeps its published number, so one column, one base or one allocator can be added or refreshed
    without rerunning the others. Each measurement names the command and machine that made it."""
    provenance = {"command": command_line(), "machine": machine_line(machine())}
    fresh = [{**c, **{b: {**c[b], **provenance} for b in BASES if b in c}} for c in cells]
    path = RESULTS / "allocators.json"
    if not path.exists():
        return fresh
    published = json.loads(path.read_text())
    default = {"command": published["command"], "machine": machine_line(published["machine"])}
    dense = dense_perplexity(fresh[0]) if fresh else None
    merged: dict[tuple[float, str], dict] = {}
    for cell in published["data"].get("research", []):
        # the same evaluation protocol shows as the same dense perplexity; other published cells are dropped
        if cell.get("protocol") != PROTOCOL or (
            dense is not None and abs(dense_perplexity(cell) - dense) > 1e-3 * dense
        ):
            continue
        bases = {b: {**default, **cell[b]} for b in BASES if b in cell}
        merged[cell["target"], cell["allocator"]] = {
            "allocator": cell["allocator"],
            "target": cell["target"],
            "protocol": PROTOCOL,
            **bases,
        }
    for cell in fresh:
        key = cell["target"], cell["allocator"]
        merged[key] = {**merged.get(key, {}), **cell}
    return sorted(merged.values(), key=lambda c: (c["target"], ALLOCATORS.index(c["allocator"])))


def provenance_markdown(cells: list[dict]) -> str:
    runs: dict[tuple[str, str], dict[float, list[str]]] = {}
    for cell in cells:
        for base in BASES:
            if base in cell:
                measured = runs.setdefault((cell[base]["command"], cell[base]["machine"]), {})
                bases = measured.setdefault(cell["target"], [])
                if base not in bases:
                    bases.append(base)
    if len(runs) < 2:
        return ""
    lines = [
        "- "
        + "; ".join(f"{t:g} {', '.join(bases)}" for t, bases in sorted(measured.items()))
        + f": `{command}` on {where}"
        for (command, where), measured in sorted(runs.items(), key=lambda kv: min(kv[1]))
    ]
    return "Measured in separate runs (same protocol):\n\n" + "\n".join(lines) + "\n\n"


def not_measured(cells: list[dict], targets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)) -> str:
    """The cells of the full table not measured yet, as the sentence under the table: whole (target, base)
    columns first, then the single cells of each allocator."""
    columns, rows = [], {}
    for target in targets:
        for base in BASES:
            absent = [
                a
                for a in ALLOCATORS
                if not any(c["target"] == target and c["allocator"] == a and base in c for c in cells)
            ]
            if len(absent) == len(ALLOCATORS):
                columns.append(f"{target:g} {base}")
                continue
            for allocator in absent:
                rows.setdefault(allocator, []).append(f"{target:g} {base}")
    missing = columns + [f"{allocator} at {', '.join(where)}" for allocator, where in rows.items()]
    if not missing:
        return ""
    return (
        f"\n\nNot measured yet: {'; '.join(missing)} "
        f"(`python benchmarks/allocators.py --windows 10 --targets <t> --bases <b> --allocators <a> "
        "--skip-deploy --skip-front` adds them; each MSP search takes 20-30 min on 2 cores)."
    )


def research_markdown(cells: list[dict], targets: list[float], bases: list[str]) -> str:
    headers = ["allocator"] + [f"{t:g} {base}" for t in targets for base in bases]
    rows = []
    for allocator in ALLOCATORS:
        row = [allocator]
        for target in targets:
            cell = next((c for c in cells if c["allocator"] == allocator and c["target"] == target), None)
            for base in bases:
                row.append(f"{cell[base]['perplexity']:.2f}" if cell and base in cell else "not run")
        rows.append(row)
    costs, verdict = [], []
    for target in targets:
        get = {c["allocator"]: c for c in cells if c["target"] == target}
        for base in bases:
            others = {
                a: get[a][base]["perplexity"] for a in ("uniform", "global", "owl", "fisher") if base in get.get(a, {})
            }
            for searched in SEARCHES:
                msp = get.get(searched, {}).get(base)
                if msp is None:
                    continue
                cost = msp.get("cost", {})
                if cost:
                    uniform_fit = cost.get("seed_fitness", {}).get("uniform")
                    # a difference of mean losses is a log perplexity ratio; of KL divergences it is not
                    by_loss = cost.get("fitness", "loss") == "loss" and uniform_fit is not None
                    own = math.exp(cost["best_fitness"] - uniform_fit) if by_loss else None
                    costs.append(
                        [
                            f"{target:g}",
                            base,
                            cost.get("fitness", "loss") + (" + probed seed" if "probed_seed" in cost else ""),
                            f"{cost['command_seconds']:.0f}" + (" (norms read)" if cost.get("gradients_read") else ""),
                            f"{cost['seconds']:.0f}",
                            str(cost["generations"]),
                            f"{cost['tokens']:,}",
                            cost.get("precision", "float32"),
                            f"{cost.get('levels', {}).get('database_bytes', 0) / 2**30:.2f}",
                            f"{own:.3f}" if own else "-",
                            f"{msp['perplexity'] / others['uniform']:.3f}" if "uniform" in others else "-",
                        ]
                    )
                if not others:
                    continue
                ratio = f"{msp['perplexity'] / others['uniform']:.2f}x uniform" if "uniform" in others else ""
                beaten = [a for a, v in others.items() if msp["perplexity"] < v]
                verdict.append(
                    f"- target {target:g}, {base}: {searched} {msp['perplexity']:.2f} ({ratio}); beats "
                    f"{', '.join(beaten) if beaten else 'none'}"
                    + (f"; not {', '.join(a for a in others if a not in beaten)}" if len(beaten) < len(others) else "")
                )
    return (
        f"{markdown_table(headers, rows)}\n\n"
        + "\n".join(verdict)
        + "\n\nMSP search cost per target, base and fitness (the Fisher traces are shared and measured once). 'fitness "
        "set ratio' is MSP's perplexity over uniform's on the search's own held-out sequences, 'test ratio' the "
        "same on the test windows: their gap is how much the search overfits its fitness set (shown for the loss "
        "fitness, whose held-out losses are log perplexities). '(norms read)': "
        "the GBLM plan read the gradient norms an earlier gblm command wrote (`--gradients`) instead of taking "
        "the backward pass over the calibration windows itself.\n\n"
        + markdown_table(
            [
                "target",
                "base",
                "fitness",
                "plan command (s)",
                "search (s)",
                "generations",
                "tokens evaluated",
                "fitness matmuls",
                "level database (GiB)",
                "fitness set ratio",
                "test ratio",
            ],
            costs,
        )
    )


def deployment_markdown(result: dict, windows: str) -> str:
    metric, rows = result["metric"], result["rows"]
    table = [
        [
            name.replace("_", " "),
            f"{r['achieved_fraction']:.3f}",
            f"{r['fitness']:.4f}",
            f"{r['test']['perplexity']:.2f}",
        ]
        for name, r in rows.items()
    ]
    randoms = result["random"]["fitnesses"]
    search = result["search"]
    best_other = min(("least_sensitive_first", "best_random"), key=lambda n: rows[n]["test"]["perplexity"])
    msp, other = rows["msp"]["test"]["perplexity"], rows[best_other]["test"]["perplexity"]
    verdict = f"MSP {msp:.2f} vs the better baseline ({best_other.replace('_', ' ')}) {other:.2f}: " + (
        "MSP's choice is better" if msp < other else "MSP's choice is NOT better"
    )
    return (
        f"Each choice puts 2:4 on fused groups (q/k/v, o, gate/up, down of a block) holding a "
        f"{result['budget']:g} fraction of the decoder linear weights, pruned with {metric}. The search fitness "
        f"is the held-out loss of the model whose 2:4 groups hold {metric}'s own 2:4 weights (every group "
        f"pruned once, sequentially); the test perplexity is `mixsparse prune --plan ... --metric {metric}` "
        f"on the first {windows} test windows.\n\n"
        + markdown_table(["choice", "2:4 fraction", "held-out loss (search fitness)", f"test ppl, {metric}"], table)
        + f"\n\n- {verdict}\n- Random choices: {len(randoms)} with the same budget, held-out loss from "
        f"{min(randoms):.4f} to {max(randoms):.4f}; the best is shown.\n- MSP search: {search['evaluations']} "
        f"evaluations, {search['tokens']:,} tokens, {search['seconds']:.0f} s of search, "
        f"{search['command_seconds']:.0f} s for the whole plan command."
    )


def front_markdown(result: dict, metric: str) -> str:
    rows = [
        [
            f"{p['budget']:.2f}",
            f"{p['achieved_fraction']:.3f}",
            f"{p['weight_memory']:.3f}",
            f"{p['perplexity']:.2f}",
            f"{p['test']['perplexity']:.2f}",
        ]
        for p in result["front"]
    ]
    return markdown_table(
        [
            "2:4 fraction (budget)",
            "achieved",
            "weight memory (of dense)",
            "held-out ppl (search fitness)",
            f"test ppl, {metric}",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="0.7,0.8,0.6,0.5", help="comma-separated average sparsities")
    parser.add_argument("--windows", default="40", help="test windows of 2048 tokens, or 'all' (quick protocol: 40)")
    parser.add_argument(
        "--allocators",
        default=",".join(ALLOCATORS),
        help="comma-separated research allocators (msp: the CLI's defaults, KL fitness; msp-loss: loss fitness; "
        "msp-probe: msp with --probe-seed)",
    )
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated base metrics")
    parser.add_argument("--generations", type=int, help="msp generations per research plan (default: the CLI's)")
    parser.add_argument(
        "--msp-granularity",
        default="module",
        choices=["block", "module"],
        help="msp plans per decoder block, or per module (searched per block, then refined per module); the "
        "other allocators set one ratio per block (default: %(default)s)",
    )
    parser.add_argument("--deploy-budget", type=float, default=0.5)
    parser.add_argument(
        "--deploy-metric",
        default="sparsegpt",
        choices=BASES,
        help="base metric of the deployment plans (searched with its own 2:4 weights, applied with it)",
    )
    parser.add_argument("--random", type=int, default=20, help="random deployment choices to beat")
    parser.add_argument("--front-generations", type=int, help="generations per front point (default: the CLI's)")
    parser.add_argument("--skip-research", action="store_true")
    parser.add_argument("--skip-deploy", action="store_true")
    parser.add_argument("--skip-front", action="store_true")
    parser.add_argument("--work", default="runs/bench-allocators", help="kept between runs; delete to start over")
    args = parser.parse_args()
    args.targets = [float(t) for t in args.targets.split(",")]
    args.allocators = [a for a in ALLOCATORS if a in args.allocators.split(",")]
    args.bases = [b for b in BASES if b in args.bases.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sensitivity = work / "sensitivity.json"
    if not sensitivity.exists():
        mixsparse("sensitivity", args.model, "--samples", "32", "--out", str(sensitivity))

    # each part is its own results file (and table in BENCHMARKS.md, under the command that made it), so a run
    # that skips a part leaves that part's published numbers alone
    if not args.skip_research:
        cells = with_published(research(args, work, sensitivity))
        markdown = (
            "uniform/global/OWL/Fisher plans are made once per target and applied with each base "
            "(`mixsparse prune --plan ... --metric <base>`); MSP searches once per base over that base's own levels "
            f"(`mixsparse plan --allocator msp --metric <base> --granularity {args.msp_granularity}`"
            + (", per block and then refined per module" if args.msp_granularity == "module" else "")
            + "), so its fitness is the model prune then writes; the other allocators set one ratio per block. "
            "msp is `mixsparse plan`'s defaults: KL divergence to the dense model on held-out validation "
            "sequences (EvoPress's fitness); msp-loss searches with the next-token loss on the same sequences; "
            "msp-probe is msp with its per-block search seeded by probing each block alone (`--probe-seed`). "
            f"WikiText-2 test perplexity on the first {args.windows} windows of "
            f"2048 tokens; dense {dense_perplexity(cells[0]):.2f}.\n\n"
            + provenance_markdown(cells)
            + research_markdown(
                cells, sorted({c["target"] for c in cells}), [b for b in BASES if any(b in c for c in cells)]
            )
            + not_measured(cells)
        )
        print(markdown)
        save(
            "allocators",
            "Mixed-sparsity plans: perplexity by allocator and target (unstructured, average "
            "sparsity exact in weights)",
            markdown,
            {"research": cells},
            order=20,
        )
    if not args.skip_deploy:
        result = deployment(args, work, sensitivity)
        markdown = deployment_markdown(result, args.windows)
        print(markdown)
        save(
            "allocators-deploy",
            f"Deployment plans: which fused groups go 2:4 at budget {args.deploy_budget:g}",
            markdown,
            {"deployment": result},
            order=21,
        )
    if not args.skip_front:
        result = front(args, work, sensitivity)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / f"front-{args.deploy_metric}" / "front.png", RESULTS / "allocators-front.png")
        generations = f"{args.front_generations} generations" if args.front_generations else "the default generations"
        markdown = (
            f"One MSP search per budget ({generations}), with {args.deploy_metric}'s own 2:4 weights as in the "
            f"deployment choice above; each plan then applied with `mixsparse prune --plan ... --metric "
            f"{args.deploy_metric}` and evaluated on the first {args.windows} test windows. Weight memory "
            f"counts the whole model (embeddings stay dense).\n\n"
            "![deployment front](benchmarks/results/allocators-front.png)\n\n"
            + front_markdown(result, args.deploy_metric)
        )
        print(markdown)
        save(
            "allocators-front",
            "Deployment plans: the quality/memory front (`mixsparse plan --deploy --pareto`)",
            markdown,
            {"front": result},
            order=22,
        )


if __name__ == "__main__":
    main()
