"""``mixsparse deploy``: prune (or reuse the artifact these settings already made), then serve it."""

from __future__ import annotations

import argparse

from mixsparse.serve.cli import common

NAME = "deploy"
PASSES_FLAGS_TO_VLLM = True


def add_parser(verbs) -> None:
    from mixsparse.pruner.core.importance import METRICS
    from mixsparse.pruner.plans.request import DEPLOY_ALLOCATORS

    deploy = verbs.add_parser(
        NAME,
        help="prune (or reuse a matching artifact) and serve, in one command",
        description="Prune MODEL (or reuse an artifact already made with the same settings), print what was "
        "pruned and saved, then serve it like `mixsparse serve`. Other flags go to vLLM.",
        epilog="Examples:\n  mixsparse deploy smollm2-135m --metric sparsegpt --sparsity 2:4\n"
        "  mixsparse deploy smollm2-135m --budget 0.5 --metric sparsegpt --chat 'Hi!' --once\n"
        "  mixsparse deploy smollm2-135m --plan deploy50.json --metric sparsegpt\n\n" + common.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_argument("model", help="model to prune and serve")
    deploy.add_argument(
        "--metric",
        default="wanda",
        choices=list(METRICS),
        help="base metric (default: %(default)s)",
    )
    target = deploy.add_mutually_exclusive_group()
    target.add_argument("--sparsity", help="uniform spec (default: 2:4 when neither --plan nor --budget is given)")
    target.add_argument("--plan", help="a plan.json from `mixsparse plan`")
    target.add_argument(
        "--budget",
        type=common.FRACTION,
        help="make a deployment plan first: this fraction of the decoder linear weights in "
        "2:4, the rest dense (see `mixsparse plan --deploy`); reused on later runs",
    )
    deploy.add_argument(
        "--allocator",
        default="fisher",
        choices=list(DEPLOY_ALLOCATORS),
        help="with --budget: least Fisher-sensitive groups first (seconds), or the MSP search "
        "(minutes, better quality) (default: %(default)s)",
    )
    deploy.add_argument("--out", help="artifact directory (default: runs/<model>-<metric>-<spec>)")
    deploy.add_argument("--overwrite", action="store_true", help="replace --out if it was made differently")
    deploy.add_argument(
        "--eval-windows",
        type=common.windows,
        metavar="N|all",
        help="measure dense and pruned perplexity when pruning (shown in the summary)",
    )
    deploy.add_argument(
        "--chat",
        metavar="TEXT",
        help="send this chat message once the server is up, print the answer and a metrics summary",
    )
    deploy.add_argument(
        "--max-tokens", type=common.POSITIVE, default=64, help="tokens for --chat's answer (default: 64)"
    )
    deploy.add_argument("--once", action="store_true", help="stop after --chat's answer instead of serving on")
    common.add_calibration(deploy)
    common.add_recovery(deploy)
    # not common.add_device: here the device only prunes; vLLM picks its own
    deploy.add_argument("--device", default="cpu", help="device for pruning: cpu or cuda (default: %(default)s)")
    common.add_server(deploy)


def run(args) -> int:
    from mixsparse.pruner.jobs import PruneJob
    from mixsparse.serve.deploy import DeployJob, deploy

    sparsity = args.sparsity if args.sparsity or args.plan or args.budget is not None else "2:4"
    job = DeployJob(
        prune=PruneJob(
            model=args.model,
            metric=args.metric,
            out=args.out,
            sparsity=sparsity,
            plan=args.plan,
            calibration=common.calibration(args),
            evaluation=common.evaluation(args),
            device=args.device,
            overwrite=args.overwrite,
            recover=common.recover_options(args),
            gradients=args.gradients,
        ),
        serve=common.serve_options(args, None),
        chat=args.chat,
        once=args.once,
        max_tokens=args.max_tokens,
        verbose=args.verbose,
        budget=args.budget,
        allocator=args.allocator,
    )
    return deploy(job, common.progress(), show=common.print_rows)
