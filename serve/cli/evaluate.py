"""``mixsparse eval``: measurements of a model or artifact, one kind per subcommand (``ppl`` so far)."""

from __future__ import annotations

import json

from mixsparse.serve.cli import common

NAME = "eval"


def add_parser(verbs) -> None:
    evaluate = verbs.add_parser(
        NAME, help="evaluate a model or artifact", description="Evaluate a model or mixsparse artifact."
    )
    kinds = evaluate.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    ppl = kinds.add_parser(
        "ppl",
        help="perplexity on non-overlapping windows of the test split",
        description="Perplexity on non-overlapping 2048-token windows of the test split (all of them by "
        "default; --windows 40 is the quick protocol), plus the measured linear sparsity.",
        epilog=common.EPILOG,
    )
    ppl.add_argument("model", help="model or artifact directory")
    ppl.add_argument(
        "--windows",
        type=common.windows,
        default="all",
        metavar="N|all",
        help="evaluate the first N windows (default: all)",
    )
    ppl.add_argument(
        "--data",
        default="wikitext2",
        metavar="SOURCE",
        help="wikitext2 (bundled), hf:wikitext2, hf:c4, or a .txt/.jsonl file (default: %(default)s)",
    )
    ppl.add_argument("--seqlen", type=common.TOKENS, default=2048, help="tokens per window (default: %(default)s)")
    ppl.add_argument("--no-cache", action="store_true", help="recompute even if this exact measurement is cached")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_device(ppl)


def run(args) -> None:
    from mixsparse.pruner.evaluate import evaluate_model
    from mixsparse.pruner.io import data

    protocol = data.EvaluationProtocol(args.data, args.seqlen, common.count(args.windows))
    result = evaluate_model(args.model, protocol, args.device, common.progress(), use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return
    ppl = result.perplexity
    common.print_rows(
        f"mixsparse eval ppl {args.model}",
        [
            ("perplexity", f"{ppl.perplexity:.3f}"),
            (
                "tokens evaluated",
                f"{ppl.tokens} ({ppl.windows} windows of {protocol.seqlen}, "
                f"{data.describe(protocol.source, data.EVALUATION)})",
            ),
            ("linear sparsity (decoder)", f"{result.sparsity:.2%}"),
            ("seconds", f"{ppl.seconds:.1f}"),
        ],
    )
