"""``mixsparse prune``: one model in, one artifact out."""

from __future__ import annotations

import argparse
import json

from mixsparse.serve.cli import common

NAME = "prune"


def add_parser(verbs) -> None:
    from mixsparse.pruner.core.importance import METRICS

    prune = verbs.add_parser(
        NAME,
        help="prune a model into a mixsparse artifact",
        description="Prune the decoder blocks' linear layers block by block (sequential calibration) and write "
        "an artifact: 2:4 modules packed, other sparse modules bitmask-compressed where smaller, "
        "plan.json, tokenizer and a model card.",
        epilog="Examples:\n  mixsparse prune smollm2-135m --metric sparsegpt --sparsity 2:4 --out sgpt-24\n"
        "  mixsparse prune smollm2-135m --metric wanda --sparsity 0.5 --out wanda-50 --eval-windows 40\n"
        "  mixsparse prune smollm2-135m --metric sparsegpt --plan plan.json --out msp-70\n\n" + common.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument("model", help="model to prune")
    prune.add_argument(
        "--metric",
        required=True,
        choices=list(METRICS),
        help="base importance metric (gblm: Wanda plus gradient norms, one extra backward per calibration window)",
    )
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sparsity",
        help="the same spec for every module: a ratio in [0, 1) such as 0.5 (unstructured) or N:M such as 2:4",
    )
    target.add_argument("--plan", help="a plan.json (from `mixsparse plan`) with a spec per module")
    prune.add_argument("--out", required=True, help="artifact directory to create")
    prune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prune.add_argument("--include", metavar="REGEX", help="prune only modules whose qualified name matches")
    prune.add_argument("--exclude", metavar="REGEX", help="keep modules whose qualified name matches dense")
    prune.add_argument(
        "--prune-lm-head", action="store_true", help="also prune lm_head (default: embeddings and lm_head stay dense)"
    )
    prune.add_argument(
        "--eval-windows",
        type=common.windows,
        metavar="N|all",
        help="also measure dense and pruned perplexity on the first N test windows (quick "
        "protocol: 40) and record them in the model card",
    )
    prune.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="dtype stored in the artifact (default: the model's)",
    )
    prune.add_argument(
        "--blocksize", type=common.POSITIVE, default=128, help="SparseGPT lazy-update block (default: 128)"
    )
    prune.add_argument(
        "--damp",
        type=common.POSITIVE_REAL,
        default=0.01,
        help="SparseGPT dampening, fraction of mean(diag H) (default: 0.01)",
    )
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")
    common.add_calibration(prune)
    common.add_recovery(prune)
    common.add_device(prune)


def run(args) -> None:
    from mixsparse.pruner import pipeline
    from mixsparse.pruner.core.prune import PruneOptions
    from mixsparse.pruner.jobs import PruneJob

    job = PruneJob(
        model=args.model,
        metric=args.metric,
        out=args.out,
        sparsity=args.sparsity,
        plan=args.plan,
        include=args.include,
        exclude=args.exclude,
        prune_lm_head=args.prune_lm_head,
        calibration=common.calibration(args),
        evaluation=common.evaluation(args),
        device=args.device,
        dtype=args.dtype,
        options=PruneOptions(args.blocksize, args.damp),
        overwrite=args.overwrite,
        recover=common.recover_options(args),
        gradients=args.gradients,
    )
    summary = pipeline.prune(job, common.progress())
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        common.print_rows("mixsparse prune", summary.rows())
