"""``mixsparse plan``: a sparsity spec per module for ``prune --plan``, or a front of deployment plans."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mixsparse.pruner.search.evolve import SearchSettings
from mixsparse.runtime.errors import MixsparseError
from mixsparse.serve.cli import common

if TYPE_CHECKING:
    from mixsparse.pruner.plans.request import PlanRequest, SearchOptions

NAME = "plan"


def add_parser(verbs) -> None:
    from mixsparse.pruner.core.importance import METRICS
    from mixsparse.pruner.plans.request import ALLOCATORS

    plan = verbs.add_parser(
        NAME,
        help="choose per-layer sparsity (uniform, OWL, global magnitude, Fisher, MSP search) or a 2:4 deployment plan",
        description="Write a plan.json: a sparsity spec per module, for `mixsparse prune --plan`. Research plans "
        "give each decoder block (or module) its own unstructured ratio with the average (counted in "
        "weights) exactly --target; --deploy plans choose dense or 2:4 per fused group (q/k/v, o, "
        "gate/up, down) under a 2:4 budget or a weight-memory target.",
        epilog="Examples:\n"
        "  mixsparse plan smollm2-135m --allocator msp --target 0.7 --metric wanda --out msp70.json\n"
        "  mixsparse prune smollm2-135m --plan msp70.json --metric sparsegpt --out msp70-sgpt\n"
        "  mixsparse plan smollm2-135m --allocator msp --deploy --budget 0.5 --out deploy50.json\n"
        "  mixsparse plan smollm2-135m --deploy --memory 0.8 --out deploy-mem80.json\n"
        "  mixsparse plan smollm2-135m --deploy --pareto --out front/\n\n" + common.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("model", help="model to plan for")
    plan.add_argument(
        "--allocator",
        default="msp",
        choices=list(ALLOCATORS),
        help="uniform ratio; OWL outlier-weighed; global: one |W| threshold over all weights sets the ratios; "
        "Fisher-trace allocation; MSP evolutionary search seeded from it (default: %(default)s)",
    )
    plan.add_argument("--target", type=common.RATIO, help="average unstructured sparsity, e.g. 0.7 (research plans)")
    plan.add_argument(
        "--metric",
        default="wanda",
        choices=list(METRICS),
        help="base metric the plan is for: MSP searches score the model as this metric prunes it (each "
        "module pruned by it at every level of a grid, or its own 2:4 weights for --deploy), so apply "
        "the plan with the same --metric (default: %(default)s)",
    )
    plan.add_argument(
        "--granularity",
        default="block",
        choices=["block", "module"],
        help="one ratio per decoder block or per module; an msp search per module runs per block first and "
        "then refines per module (--refine-generations) (default: %(default)s)",
    )
    plan.add_argument("--out", required=True, help="plan.json to write (a directory with --pareto)")
    plan.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    plan.add_argument("--plot", metavar="PNG", help="draw the plan (ratio per gene, Fisher traces on a 2nd axis)")
    _add_deployment(plan)
    _add_allocators(plan)
    _add_search(plan)
    common.add_calibration(plan)
    common.add_device(plan)


def _add_deployment(plan: argparse.ArgumentParser) -> None:
    deploy = plan.add_argument_group("deployment plans (dense or 2:4 per fused group)")
    deploy.add_argument("--deploy", action="store_true", help="make a deployment plan")
    deploy.add_argument("--budget", type=common.FRACTION, help="fraction of decoder linear weights in 2:4, e.g. 0.5")
    deploy.add_argument("--memory", type=common.SHARE, help="or: target weight memory as a fraction of dense, e.g. 0.8")
    deploy.add_argument(
        "--pareto",
        action="store_true",
        help="sweep the budget; write one plan per point and the quality/memory front (front.md, front.png) into --out",
    )
    deploy.add_argument(
        "--budgets",
        type=common.listed(common.FRACTION),
        default="0,0.25,0.5,0.75,1",
        help="budgets for --pareto (default: %(default)s)",
    )


def _add_allocators(plan: argparse.ArgumentParser) -> None:
    alloc = plan.add_argument_group("allocators")
    alloc.add_argument("--sensitivity", metavar="JSON", help="reuse Fisher traces from `mixsparse sensitivity`")
    alloc.add_argument(
        "--fisher-samples",
        type=common.POSITIVE,
        default=32,
        help="calibration sequences for the Fisher traces (default: %(default)s)",
    )
    alloc.add_argument(
        "--spread", type=common.FRACTION, default=0.1, help="λ of the Fisher allocation (default: %(default)s)"
    )
    alloc.add_argument("--owl-lambda", type=common.FRACTION, default=0.08, help="OWL's λ (default: %(default)s)")
    alloc.add_argument(
        "--owl-m", type=common.POSITIVE_REAL, default=5.0, help="OWL's outlier multiple M (default: %(default)s)"
    )
    alloc.add_argument("--min-ratio", type=common.RATIO, default=0.0, help="lowest ratio of any gene (default: 0)")
    alloc.add_argument("--max-ratio", type=common.RATIO, default=0.99, help="highest ratio of any gene (default: 0.99)")


def _add_search(plan: argparse.ArgumentParser) -> None:
    from mixsparse.pruner.core.precision import PRECISIONS
    from mixsparse.pruner.plans.request import SearchOptions

    defaults = SearchSettings()
    options = SearchOptions()
    search = plan.add_argument_group("MSP search")
    search.add_argument(
        "--generations", type=common.COUNT, default=defaults.generations, help="generations (default: %(default)s)"
    )
    search.add_argument(
        "--population",
        type=common.POSITIVE,
        default=defaults.population,
        help="population kept (default: %(default)s)",
    )
    search.add_argument(
        "--offspring",
        type=common.POSITIVE,
        default=defaults.offspring,
        help="children per generation (default: %(default)s)",
    )
    search.add_argument(
        "--survivors",
        type=common.POSITIVE,
        default=defaults.survivors,
        help="children scored on the final step (default: %(default)s)",
    )
    search.add_argument(
        "--steps",
        type=common.listed(common.POSITIVE),
        help="held-out sequences per selection step, growing (default: "
        f"{','.join(map(str, defaults.steps))} at {options.fitness_seqlen} tokens each; at another --fitness-seqlen "
        "as many sequences as keep the tokens per step, e.g. 1,4 at 512)",
    )
    search.add_argument(
        "--fitness-seqlen",
        type=common.TOKENS,
        default=options.fitness_seqlen,
        help="tokens per held-out sequence (default: %(default)s; the test windows are 2048). BENCHMARKS.md "
        "compares 512-token sequences at the same tokens per step",
    )
    search.add_argument(
        "--level-step",
        type=common.SHARE,
        default=options.level_step,
        help="grid step of the levels a metric with a weight update (sparsegpt) is pruned at, once each, for the "
        "search to swap in (default: %(default)s)",
    )
    search.add_argument(
        "--level-window",
        type=common.FRACTION,
        default=options.level_window,
        help="the levels span the target +- this (default: %(default)s); each level costs disk (bitmask, float32)",
    )
    search.add_argument(
        "--fitness",
        default=options.fitness,
        choices=["loss", "kl"],
        help="what a candidate is scored by on the held-out sequences: kl (KL divergence from the dense model's "
        "next-token distribution, EvoPress's fitness) or loss (the pruned model's next-token loss); same cost "
        "(default: %(default)s)",
    )
    search.add_argument(
        "--probe-seed",
        action=argparse.BooleanOptionalAction,
        default=options.probe_seed,
        help="seed the per-block search with each block scored alone at levels around the target and the "
        "budget-exact choice of least summed cost; costs 8 evaluations per block on the first step. At 0.7 on "
        "the default model it helped Wanda and hurt SparseGPT (BENCHMARKS.md) (default: %(default)s)",
    )
    search.add_argument(
        "--refine-generations",
        type=common.COUNT,
        default=options.refine_generations,
        help="with --granularity module: the search first runs per decoder block, then refines per module from "
        "the block plan for this many generations (0: search per module from the start) (default: %(default)s)",
    )
    search.add_argument(
        "--search-precision",
        default=options.precision,
        choices=PRECISIONS,
        help="matmul precision of the fitness forward passes: auto is bfloat16 on a CPU with AVX512-BF16 or AMX "
        "(about half the time per candidate) and float32 elsewhere (default: %(default)s)",
    )
    search.add_argument(
        "--delta", type=common.SHARE, default=options.delta, help="mutation step in ratio (default: %(default)s)"
    )
    search.add_argument(
        "--moves",
        type=common.POSITIVE,
        default=defaults.moves,
        help="mutation moves at the start, decaying to 1 (default: %(default)s)",
    )
    search.add_argument(
        "--patience",
        type=common.POSITIVE,
        default=defaults.patience,
        help="stop after this many generations without improvement (default: %(default)s)",
    )
    search.add_argument("--search-seed", type=common.SEED, default=0, help="seed of the search (default: %(default)s)")
    search.add_argument("--resume", action="store_true", help="continue the search saved in --state")
    search.add_argument("--state", help="search state file (default: next to --out, *.search.json)")


def search_options_from(args: argparse.Namespace) -> SearchOptions:
    """The msp search options the flags ask for. Without --steps the selection steps follow --fitness-seqlen,
    so longer held-out sequences keep the tokens each step reads rather than multiplying them."""
    from mixsparse.pruner.plans.request import SearchOptions, steps_for_seqlen

    return SearchOptions(
        SearchSettings(
            args.generations,
            args.population,
            args.offspring,
            args.survivors,
            args.steps if args.steps is not None else steps_for_seqlen(args.fitness_seqlen),
            args.moves,
            args.patience,
            args.search_seed,
        ),
        args.delta,
        args.fitness,
        args.fitness_seqlen,
        args.resume,
        args.state,
        level_step=args.level_step,
        level_window=args.level_window,
        precision=args.search_precision,
        refine_generations=args.refine_generations,
        probe_seed=args.probe_seed,
    )


def plan_request(args: argparse.Namespace) -> PlanRequest:
    from mixsparse.pruner.plans.request import Deployment, FisherOptions, OwlOptions, PlanRequest, Research

    if args.deploy or args.pareto:
        goal = Deployment(args.budget, args.memory, args.pareto, args.budgets)
    elif args.budget is not None or args.memory is not None:
        raise MixsparseError("--pareto, --budget and --memory go with --deploy")
    else:
        goal = Research(args.target, args.granularity, args.min_ratio, args.max_ratio)
    return PlanRequest(
        model=args.model,
        out=args.out,
        goal=goal,
        allocator=args.allocator,
        metric=args.metric,
        calibration=common.calibration(args),
        device=args.device,
        plot=args.plot,
        overwrite=args.overwrite,
        fisher=FisherOptions(args.fisher_samples, args.sensitivity, args.spread),
        owl=OwlOptions(args.owl_lambda, args.owl_m),
        search=search_options_from(args),
        gradients=args.gradients,
    )


def run(args) -> None:
    from mixsparse.pruner.plans.make import make_plan

    request = plan_request(args)
    outcome = make_plan(request, common.progress())
    if outcome.plan is None:
        print((outcome.out / "front.md").read_text())
        print(f"wrote {outcome.out}/ (front.md, front.png, front.json, one plan per budget)")
        return

    info = outcome.plan.info
    rows = [("plan", outcome.plan.describe()), ("weight sparsity", f"{outcome.plan.weight_sparsity():.4f}")]
    if "search" in info:
        rows += _search_rows(info["search"], request.search.fitness)
    if info.get("deploy"):
        rows.append(
            (
                "2:4 fraction",
                f"{info['achieved_fraction']:.3f} (budget {info['budget']:.3f}), weight memory "
                f"{info['weight_memory']:.3f} of dense",
            )
        )
    rows += [
        ("time", f"{outcome.seconds:.0f} s"),
        ("written", str(outcome.out) + (f", {args.plot}" if args.plot else "")),
    ]
    common.print_rows(f"mixsparse plan --allocator {args.allocator}", rows)


def _search_rows(search: dict, fitness: str) -> list[tuple[str, str]]:
    rows = [
        (
            "search",
            f"{search['generations']} generations, {search['evaluations']} candidate evaluations, "
            f"{search['tokens']} tokens, {search['seconds']:.0f} s; best {fitness} "
            f"{search['best_fitness']:.4f}",
        )
    ]
    seeds = {k: v for k, v in search["seed_fitness"].items() if v is not None}
    rows.append(("seeds", ", ".join(f"{k} {v:.4f}" for k, v in seeds.items())))
    if "held_out_check" in search:
        check = search["held_out_check"]
        scores = ", ".join(f"{k} {v:.4f}" for k, v in check["scores"].items())
        verdict = "the search's plan" if check["chosen"] == "search" else f"{check['chosen']} (the search overfit)"
        rows.append(("held-out check", f"{scores} on {check['sequences']} other sequences: wrote {verdict}"))
    return rows
