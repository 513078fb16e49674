"""Mixed-sparsity allocators on the default model: uniform, OWL, Fisher and MSP at several targets, each
plan applied with Wanda and with SparseGPT; the 2:4 deployment choice at one budget against its
baselines; and the deployment quality/memory front.

Every step is a `mixsparse` command in its own process (what a user would run) and its output is kept
under --work, so an interrupted run continues where it stopped (delete --work to start over). The Fisher
traces are measured once (`mixsparse sensitivity`) and shared by every plan.

    python benchmarks/allocators.py                               # everything (hours on 2 CPU cores)
    python benchmarks/allocators.py --targets 0.7 --skip-front    # one column
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, command_line, machine, machine_line, markdown_table, save

ALLOCATORS = ("uniform", "owl", "fisher", "msp")
BASES = ("wanda", "sparsegpt")


def mixsparse(*args: str, json_out: bool = False):
    command = [sys.executable, "-m", "mixsparse.serve.cli", *args]
    print("$ mixsparse", " ".join(args), file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE if json_out else None, text=True)
    if result.returncode:
        raise SystemExit(f"`mixsparse {' '.join(args)}` failed with exit code {result.returncode}")
    return json.loads(result.stdout) if json_out else None


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


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
            json_out=True,
        )
        # the artifact itself is not needed afterwards; the numbers are
        subprocess.run(["rm", "-rf", str(with_plan)], check=True)
        return {
            "perplexity": summary["perplexity"]["pruned"]["perplexity"],
            "dense": summary["perplexity"]["dense"]["perplexity"],
            "linear_sparsity": summary["linear_sparsity"],
            "prune_seconds": summary["prune_seconds"],
        }

    return cached(work / f"ppl-{name}-{metric}-w{args.windows}.json", run)


def research(args, work: Path, sensitivity: Path) -> list[dict]:
    cells = []
    for target in args.targets:
        for allocator in ALLOCATORS:
            name = f"{allocator}-{target:g}"
            plan = work / f"plan-{name}.json"
            if not plan.exists():
                started = time.perf_counter()
                mixsparse(
                    "plan",
                    args.model,
                    "--allocator",
                    allocator,
                    "--target",
                    f"{target:g}",
                    "--metric",
                    "wanda",
                    "--sensitivity",
                    str(sensitivity),
                    "--out",
                    str(plan),
                    "--overwrite",
                )
                info = json.loads(plan.read_text())
                (work / f"plan-{name}.cost.json").write_text(
                    json.dumps(
                        info.get("search", {}) | {"command_seconds": round(time.perf_counter() - started, 1)}, indent=2
                    )
                )
            cell = {"allocator": allocator, "target": target}
            for base in BASES:
                cell[base] = pruned_perplexity(args, work, name, plan, base)
            cost = work / f"plan-{name}.cost.json"
            if cost.exists():
                cell["cost"] = json.loads(cost.read_text())
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
    return cells


def random_baseline(args, work: Path, sensitivity: Path, budget: float) -> dict:
    """Score ``args.random`` random deployment choices with the search's own fitness; keep the best."""

    def run():
        from mixsparse.pruner.deployment import DeployBudget, random_choice
        from mixsparse.pruner.deployment_plans import deploy_evaluator, deployment_groups
        from mixsparse.pruner.evidence import gather
        from mixsparse.pruner.plan import Plan
        from mixsparse.pruner.plan_request import Deployment, FisherOptions, PlanRequest
        from mixsparse.pruner.progress import Silent
        from mixsparse.pruner.spec import Spec

        job = PlanRequest(
            args.model,
            str(work / "unused.json"),
            Deployment(budget=budget),
            allocator="msp",
            metric=args.deploy_metric,
            fisher=FisherOptions(sensitivity=str(sensitivity)),
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
            )
            plan.with_suffix(".cost.json").write_text(
                json.dumps({"command_seconds": round(time.perf_counter() - started, 1)}) + "\n"
            )
    randoms = random_baseline(args, work, sensitivity, budget)
    plans["best_random"] = work / f"deploy-random-{metric}-{budget:g}.json"
    msp_info = json.loads(plans["msp"].read_text())
    fitness = {
        "msp": msp_info["search"]["best_fitness"],
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
            *extra,
        )
    result = json.loads((out / "front.json").read_text())
    for point in result["front"]:
        point["test"] = pruned_perplexity(
            args, work, f"front-{point['budget']:g}", out / point["plan"], args.deploy_metric
        )
    return result


def with_published_targets(cells: list[dict]) -> list[dict]:
    """This run's cells plus the published cells of targets it did not measure, each naming the command and
    machine that measured it, so one column can be added or refreshed without rerunning the others."""
    provenance = {"command": command_line(), "machine": machine_line(machine())}
    cells = [{**c, **provenance} for c in cells]
    path = RESULTS / "allocators.json"
    if not path.exists():
        return cells
    published = json.loads(path.read_text())
    measured = {c["target"] for c in cells}
    default = {"command": published["command"], "machine": machine_line(published["machine"])}
    dense = cells[0]["wanda"]["dense"] if cells else None
    # the same evaluation protocol shows as the same dense perplexity; other published columns are dropped
    kept = [
        {**default, **c}
        for c in published["data"].get("research", [])
        if c["target"] not in measured and (dense is None or abs(c["wanda"]["dense"] - dense) <= 1e-3 * dense)
    ]
    return sorted(kept + cells, key=lambda c: (c["target"], ALLOCATORS.index(c["allocator"])))


def provenance_markdown(cells: list[dict]) -> str:
    runs: dict[tuple[str, str], set[float]] = {}
    for cell in cells:
        runs.setdefault((cell["command"], cell["machine"]), set()).add(cell["target"])
    if len(runs) < 2:
        return ""
    lines = [
        f"- target {', '.join(f'{t:g}' for t in sorted(targets))}: `{command}` on {where}"
        for (command, where), targets in sorted(runs.items(), key=lambda kv: min(kv[1]))
    ]
    return "Columns were measured in separate runs (same protocol):\n\n" + "\n".join(lines) + "\n\n"


def research_markdown(cells: list[dict], targets: list[float]) -> str:
    headers = ["allocator"] + [f"{t:g} {base}" for t in targets for base in BASES]
    rows = []
    for allocator in ALLOCATORS:
        row = [allocator]
        for target in targets:
            cell = next((c for c in cells if c["allocator"] == allocator and c["target"] == target), None)
            for base in BASES:
                row.append(f"{cell[base]['perplexity']:.2f}" if cell else "not run")
        rows.append(row)
    costs = [
        [
            f"{c['target']:g}",
            f"{c['cost']['seconds']:.0f}",
            f"{c['cost']['command_seconds']:.0f}",
            str(c["cost"]["evaluations"]),
            f"{c['cost']['tokens']:,}",
            str(c["cost"]["generations"]),
            f"{c['cost']['best_fitness']:.3f}",
        ]
        for c in cells
        if c["allocator"] == "msp" and "cost" in c
    ]
    verdict = []
    for target in targets:
        get = {c["allocator"]: c for c in cells if c["target"] == target}
        if len(get) < len(ALLOCATORS):
            continue
        for base in BASES:
            msp, uniform, owl = (get[a][base]["perplexity"] for a in ("msp", "uniform", "owl"))
            verdict.append(
                f"- target {target:g}, {base}: MSP {msp:.2f} vs uniform {uniform:.2f} "
                f"({msp / uniform:.2f}x) and OWL {owl:.2f} ({msp / owl:.2f}x): "
                f"{'beats both' if msp < min(uniform, owl) else 'does NOT beat both'}"
            )
    return (
        f"{markdown_table(headers, rows)}\n\n"
        + "\n".join(verdict)
        + "\n\nMSP search cost per target (Wanda scores; the Fisher traces are shared and measured once):\n\n"
        + markdown_table(
            [
                "target",
                "search (s)",
                "whole plan command (s)",
                "candidate evaluations",
                "tokens evaluated",
                "generations",
                "best held-out loss",
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
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sensitivity = work / "sensitivity.json"
    if not sensitivity.exists():
        mixsparse("sensitivity", args.model, "--samples", "32", "--out", str(sensitivity))

    # each part is its own results file (and table in BENCHMARKS.md, under the command that made it), so a run
    # that skips a part leaves that part's published numbers alone
    if not args.skip_research:
        cells = with_published_targets(research(args, work, sensitivity))
        markdown = (
            "Plans are found with Wanda scores (`mixsparse plan --metric wanda`) and applied with each base "
            f"(`mixsparse prune --plan`); WikiText-2 test perplexity on the first {args.windows} windows of "
            f"2048 tokens; dense {cells[0]['wanda']['dense']:.2f}.\n\n"
            + provenance_markdown(cells)
            + research_markdown(cells, sorted({c["target"] for c in cells}))
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
