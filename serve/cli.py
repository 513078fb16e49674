"""``mixsparse``: one verb per user action, each a thin layer over functions the tests call directly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mixsparse.runtime.errors import MixsparseError

EPILOG = "Models: a local HF directory, a hub id, or the built-in 'smollm2-135m' (fetched once from PyPI)."


def _windows(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of windows or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive number of windows or 'all'")
    return value


def _count(windows: int | str) -> int | None:
    return None if windows == "all" else windows


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration (default protocol: 64 random windows of 512 tokens, "
                                      "WikiText-2 valid, seed 0)")
    group.add_argument("--calib", default="wikitext2", metavar="SOURCE",
                       help="wikitext2 (bundled), hf:wikitext2, hf:c4, or a .txt/.jsonl file (default: %(default)s)")
    group.add_argument("--samples", type=int, default=64, help="calibration windows (default: %(default)s)")
    group.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed for the window offsets (default: %(default)s)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixsparse",
        description="Prune LLMs to mixed-sparsity plans, store 2:4 layers packed, serve them with sparse GEMMs.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"mixsparse {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    prune = verbs.add_parser(
        "prune", help="prune a model into a mixsparse artifact",
        description="Prune the decoder blocks' linear layers block by block (sequential calibration) and write "
                    "an artifact: 2:4 modules packed, others dense, plan.json, tokenizer and a model card.",
        epilog="Examples:\n  mixsparse prune smollm2-135m --metric sparsegpt --sparsity 2:4 --out sgpt-24\n"
               "  mixsparse prune smollm2-135m --metric wanda --sparsity 0.5 --out wanda-50 --eval-windows 40\n"
               "  mixsparse prune smollm2-135m --metric sparsegpt --plan plan.json --out msp-70\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("model", help="model to prune")
    prune.add_argument("--metric", required=True, choices=["magnitude", "wanda", "sparsegpt"],
                       help="base importance metric")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", help="the same spec for every module: a ratio in [0, 1) such as 0.5 "
                                           "(unstructured) or N:M such as 2:4")
    target.add_argument("--plan", help="a plan.json (from `mixsparse plan`) with a spec per module")
    prune.add_argument("--out", required=True, help="artifact directory to create")
    prune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prune.add_argument("--include", metavar="REGEX", help="prune only modules whose qualified name matches")
    prune.add_argument("--exclude", metavar="REGEX", help="keep modules whose qualified name matches dense")
    prune.add_argument("--prune-lm-head", action="store_true",
                       help="also prune lm_head (default: embeddings and lm_head stay dense)")
    prune.add_argument("--eval-windows", type=_windows, metavar="N|all",
                       help="also measure dense and pruned perplexity on the first N test windows (quick "
                            "protocol: 40) and record them in the model card")
    prune.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="dtype stored in the artifact (default: the model's)")
    prune.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block (default: 128)")
    prune.add_argument("--damp", type=float, default=0.01,
                       help="SparseGPT dampening, fraction of mean(diag H) (default: 0.01)")
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_calibration(prune)
    _add_device(prune)

    evaluate = verbs.add_parser("eval", help="evaluate a model or artifact",
                                description="Evaluate a model or mixsparse artifact.")
    kinds = evaluate.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    ppl = kinds.add_parser(
        "ppl", help="perplexity on non-overlapping windows of the test split",
        description="Perplexity on non-overlapping 2048-token windows of the test split (all of them by "
                    "default; --windows 40 is the quick protocol), plus the measured linear sparsity.",
        epilog=EPILOG)
    ppl.add_argument("model", help="model or artifact directory")
    ppl.add_argument("--windows", type=_windows, default="all", metavar="N|all",
                     help="evaluate the first N windows (default: all)")
    ppl.add_argument("--data", default="wikitext2", metavar="SOURCE",
                     help="wikitext2 (bundled), hf:wikitext2, hf:c4, or a .txt/.jsonl file (default: %(default)s)")
    ppl.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: %(default)s)")
    ppl.add_argument("--no-cache", action="store_true", help="recompute even if this exact measurement is cached")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device(ppl)

    export = verbs.add_parser(
        "export", help="write a plain transformers copy of an artifact",
        description="Write a plain transformers-loadable copy of an artifact (dense weights with zeros).")
    export.add_argument("--dense", required=True, metavar="ARTIFACT", help="the mixsparse artifact to export")
    export.add_argument("out", help="directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixsparse")
    except PackageNotFoundError:
        return "unknown"


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def cmd_prune(args) -> None:
    from mixsparse.pruner import data, pipeline
    from mixsparse.pruner.progress import RichProgress
    from mixsparse.pruner.prune import PruneOptions

    job = pipeline.PruneJob(
        model=args.model, metric=args.metric, out=args.out, sparsity=args.sparsity, plan=args.plan,
        include=args.include, exclude=args.exclude, prune_lm_head=args.prune_lm_head,
        calibration=data.CalibrationProtocol(args.calib, args.samples, args.seqlen, args.seed),
        evaluation=None if args.eval_windows is None else data.EvaluationProtocol(windows=_count(args.eval_windows)),
        device=args.device, dtype=args.dtype, options=PruneOptions(args.blocksize, args.damp),
        overwrite=args.overwrite)
    summary = pipeline.prune(job, RichProgress())
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        _print_rows("mixsparse prune", summary.rows())


def cmd_eval(args) -> None:
    from mixsparse.pruner import data, pipeline
    from mixsparse.pruner.progress import RichProgress

    protocol = data.EvaluationProtocol(args.data, args.seqlen, _count(args.windows))
    result = pipeline.evaluate_model(args.model, protocol, args.device, RichProgress(), use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return
    ppl = result.perplexity
    _print_rows(f"mixsparse eval ppl {args.model}", [
        ("perplexity", f"{ppl.perplexity:.3f}"),
        ("tokens evaluated", f"{ppl.tokens} ({ppl.windows} windows of {protocol.seqlen}, "
                             f"{data.describe(protocol.source, data.EVALUATION)})"),
        ("linear sparsity (decoder)", f"{result.sparsity:.2%}"),
        ("seconds", f"{ppl.seconds:.1f}"),
    ])


def cmd_export(args) -> None:
    from mixsparse.pruner.export import export_dense

    out = export_dense(args.dense, args.out, args.overwrite)
    print(f"wrote {out} (plain transformers, dense weights with zeros)")


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        COMMANDS[args.verb](args)
    except MixsparseError as error:
        print(f"mixsparse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixsparse: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
