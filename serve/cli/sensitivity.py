"""``mixsparse sensitivity``: the Fisher traces on their own, to read, plot, or reuse in ``plan --sensitivity``."""

from __future__ import annotations

import argparse
import json

from mixsparse.serve.cli import common

NAME = "sensitivity"


def add_parser(verbs) -> None:
    sensitivity = verbs.add_parser(
        NAME,
        help="per-block and per-module trace of the empirical Fisher information",
        description="Trace of the empirical Fisher information (sum of squared per-sample gradients of the LM "
        "loss) of every decoder linear, per module and per block, one backward per calibration "
        "sequence with bounded memory.",
        epilog="Example:\n  mixsparse sensitivity smollm2-135m --samples 32 --out sens.json --plot sens.png\n\n"
        + common.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sensitivity.add_argument("model", help="model to measure")
    sensitivity.add_argument(
        "--samples",
        type=common.POSITIVE,
        default=32,
        help="calibration sequences, one backward each (default: %(default)s)",
    )
    sensitivity.add_argument("--out", default="sensitivity.json", help="JSON to write (default: %(default)s)")
    sensitivity.add_argument("--plot", metavar="PNG", help="also draw the traces per block and per module")
    sensitivity.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    sensitivity.add_argument("--json", action="store_true", help="print the per-block traces as JSON")
    # --samples above counts backward passes, so the calibration group must not add its own
    common.add_calibration(sensitivity, samples=False, gradients=False)
    common.add_device(sensitivity)


def run(args) -> None:
    from mixsparse.pruner.io import data
    from mixsparse.pruner.plans.evidence import sensitivity_command

    result = sensitivity_command(
        args.model,
        args.out,
        args.samples,
        data.CalibrationProtocol(args.calib, seqlen=args.seqlen, seed=args.seed),
        args.device,
        args.plot,
        args.overwrite,
        common.progress(),
    )
    blocks = {b: result.block_per_weight(b) for b in result.blocks}
    if args.json:
        print(json.dumps({"out": args.out, "per_weight_trace": blocks}, indent=2))
        return
    ranked = sorted(blocks, key=blocks.get)
    common.print_rows(
        f"mixsparse sensitivity {args.model}",
        [
            ("samples", f"{result.info['samples']} x {args.seqlen} tokens ({result.info['seconds']:.1f} s)"),
            ("least sensitive blocks", ", ".join(b.rsplit(".", 1)[-1] for b in ranked[:5])),
            ("most sensitive blocks", ", ".join(b.rsplit(".", 1)[-1] for b in ranked[-5:][::-1])),
            ("written", args.out + (f", {args.plot}" if args.plot else "")),
        ],
    )
