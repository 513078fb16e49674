"""``mixsparse bench``: the dense model and its sparse artifact served alike and measured side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixsparse.serve.cli import common

NAME = "bench"
PASSES_FLAGS_TO_VLLM = True


def add_parser(verbs) -> None:
    bench = verbs.add_parser(
        NAME,
        help="dense vs sparse tokens/s, latency and memory through vLLM, side by side",
        description="Serve the dense model, then the sparse artifact, with the same vLLM flags; warm each up, "
        "then stream the same prompts at each concurrency. Reports output/prompt tokens/s, requests/s, "
        "time to first token and inter-token latency (p50/p99), weight bytes (dense-equivalent, "
        "stored, resident), peak process and GPU memory, and the sparse/dense ratio of each. Writes "
        "bench.json, bench.md and bench.png into --out, and records the sparse/dense output tokens/s "
        "into the artifact for the mixsparse_throughput_gain_ratio gauge. Other flags go to vLLM.",
        epilog="Examples:\n  mixsparse bench --dense smollm2-135m --sparse runs/demo-sparsegpt-2of4\n"
        "  mixsparse bench --dense ./llama --sparse ./llama-24 --workload decode --concurrency 1,16,64 "
        "--max-num-seqs 64\n\n" + common.EPILOG,
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
    bench.add_argument("--prompt-tokens", type=common.POSITIVE, help="override the workload's prompt length")
    bench.add_argument("--output-tokens", type=common.POSITIVE, help="override the workload's generated tokens")
    bench.add_argument(
        "--concurrency",
        type=common.listed(common.POSITIVE),
        default="1,4,16,64",
        help="comma-separated requests in flight (default: %(default)s)",
    )
    bench.add_argument(
        "--requests",
        type=common.POSITIVE,
        help="requests per concurrency level (default: 4 x concurrency, at least 8)",
    )
    bench.add_argument("--warmup", type=common.COUNT, default=4, help="unmeasured requests per engine (default: 4)")
    bench.add_argument("--out", help="report directory (default: runs/bench-<artifact>-<workload>)")
    bench.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    bench.add_argument("--no-record", action="store_true", help="do not write bench.json into the artifact")
    bench.add_argument("--seed", type=common.SEED, default=0, help="seed of the prompt sampling (default: 0)")
    # not common.add_server: bench starts both servers itself and only needs where to put them
    bench.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default: %(default)s)")
    bench.add_argument("--port", type=common.PORT, default=8000, help="port the servers use (default: %(default)s)")


def run(args) -> None:
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
    result = bench(job, common.progress())
    print((Path(result["out"]) / "bench.md").read_text())
    where = f"wrote {result['out']}/ (bench.json, bench.md, bench.png)"
    if job.record and "output_tokens_per_second_ratio" in result:
        where += f"; recorded the gain in {args.sparse}/bench.json"
    print(where)
