"""``mixsparse``: one verb per user action. Each verb is a module here with ``add_parser(verbs)`` and
``run(args)``, so its flags and its output are read in one place; each is a thin layer over library functions
the tests call directly, so nothing here needs testing beyond parsing and printing."""

from __future__ import annotations

import argparse
import sys

from mixsparse.serve.cli import bench, common, deploy, evaluate, export, plan, prune, sensitivity, serve

# in the order `mixsparse --help` lists them
VERBS = {verb.NAME: verb for verb in (prune, evaluate, sensitivity, plan, serve, deploy, bench, export)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixsparse",
        description="Prune LLMs to mixed-sparsity plans, store 2:4 layers packed, serve them with sparse GEMMs.",
        epilog=common.EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"mixsparse {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for verb in VERBS.values():
        verb.add_parser(verbs)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixsparse")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verb = VERBS[args.verb]
    # the serving verbs hand flags they do not know to vLLM; anywhere else one is a typo to refuse
    if extra and not getattr(verb, "PASSES_FLAGS_TO_VLLM", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    return common.execute(verb.run, args)
