"""``mixsparse export``: an artifact as plain transformers weights, for tools that know nothing of mixsparse."""

from __future__ import annotations

NAME = "export"


def add_parser(verbs) -> None:
    export = verbs.add_parser(
        NAME,
        help="write a plain transformers copy of an artifact",
        description="Write a plain transformers-loadable copy of an artifact (dense weights with zeros).",
    )
    export.add_argument("--dense", required=True, metavar="ARTIFACT", help="the mixsparse artifact to export")
    export.add_argument("out", help="directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> None:
    from mixsparse.pruner.io.export import export_dense

    out = export_dense(args.dense, args.out, args.overwrite)
    print(f"wrote {out} (plain transformers, dense weights with zeros)")
