"""``mixsparse serve``: vLLM's OpenAI-compatible server with the mixsparse plugin, guard and metrics."""

from __future__ import annotations

import argparse

from mixsparse.serve.cli import common

NAME = "serve"
PASSES_FLAGS_TO_VLLM = True


def add_parser(verbs) -> None:
    serve = verbs.add_parser(
        NAME,
        help="serve a model or artifact through vLLM's OpenAI-compatible server",
        description="Start vLLM's OpenAI-compatible server (chat, completions, streaming, models list) with the "
        "mixsparse plugin: 2:4 modules run on sparse GEMMs on CUDA sm80+ and on mixsparse's native "
        "kernel on CPU (weights stay compressed), on the exact dense fallback elsewhere. /metrics keeps "
        "vLLM's metrics and adds mixsparse_* gauges (weight bytes, modules "
        "per format, memory ratio, tokens/s). Any other flag is passed to vLLM unchanged; on CPU the "
        "defaults are --enforce-eager --no-enable-prefix-caching (correct output) and --dtype bfloat16 "
        "where the CPU has native bf16 (AVX512-BF16/AMX), else float32.",
        epilog="Examples:\n  mixsparse serve runs/smollm2-135m-sparsegpt-2of4\n"
        "  mixsparse serve my-artifact --port 9000 --api-key-file key.txt --max-num-seqs 64\n\n" + common.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("model", help="artifact (or plain HF model) directory")
    common.add_server(serve)


def run(args) -> None:
    from mixsparse.serve.server import serve

    serve(common.serve_options(args, args.model))
