"""End to end on CPU through vLLM: dense vs 2:4 served on mixsparse's native kernel (`mixsparse bench`).

Two models: the default model (smollm2-135m) and a ~1B Llama built from the public Llama-3.2-1B shape
(hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads; vocabulary resized to the default model's
tokenizer) with **random weights** — tokens/s does not depend on the weights' values. Each is pruned to 2:4
with magnitude (every decoder linear), then `mixsparse bench` serves the dense model and the artifact one
after the other with the same flags and dtype (bf16 where the CPU has it): decode at concurrency 1 and 8,
and a prefill workload. Reported: output tok/s, prompt tok/s, TTFT/ITL, resident weight bytes (from the
servers' /metrics) and peak RSS of the server process tree.

    python benchmarks/e2e_cpu.py                       # both models
    python benchmarks/e2e_cpu.py --models smollm2 --output-tokens 128
    python benchmarks/e2e_cpu.py --models none --stored-dense runs/smollm2-msp70-sparsegpt --name e2e-cpu-msp70

``--stored-dense ART`` compares an artifact served compressed with the same pruned weights stored dense
(`mixsparse export --dense`): what compressed storage buys for a mixed-sparsity (e.g. MSP) plan.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import machine, machine_line, markdown_table, mixsparse, save

from mixsparse.runtime.machine import cpu_serving_dtype

RUNS = Path("runs")
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def build_llama_1b(directory: Path) -> Path:
    """Random-weight Llama-3.2-1B-shaped model with the default model's tokenizer (made once)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mixsparse.pruner.io.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **LLAMA_1B
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def bench(
    dense: str,
    sparse: Path,
    workload: str,
    concurrency: str,
    requests: int,
    output_tokens: int | None,
    out: Path,
    fresh: bool,
) -> dict:
    report = out / "bench.json"
    if fresh or not (report.exists() and json.loads(report.read_text()).get("complete")):
        mixsparse(
            "bench",
            "--dense",
            dense,
            "--sparse",
            str(sparse),
            "--workload",
            workload,
            "--concurrency",
            concurrency,
            "--requests",
            str(requests),
            "--warmup",
            "2",
            "--out",
            str(out),
            "--overwrite",
            "--no-record",
            *(["--output-tokens", str(output_tokens)] if output_tokens else []),
        )
    return json.loads(report.read_text())


def rows_of(model: str, data: dict, phase: str) -> list[list]:
    rows = []
    dense, sparse = data["engines"]["dense"], data["engines"]["sparse"]
    for d, s in zip(dense["levels"], sparse["levels"]):
        key = "prompt_tokens_per_second" if phase == "prefill" else "output_tokens_per_second"
        rows.append(
            [
                model,
                phase,
                d["concurrency"],
                f"{d[key]:.1f}",
                f"{s[key]:.1f}",
                f"**{s[key] / d[key]:.2f}**",
                f"{_ms(d['ttft_p50'], 0)} / {_ms(s['ttft_p50'], 0)}",
                f"{_ms(d['itl_p50'], 1)} / {_ms(s['itl_p50'], 1)}",
                _mib(dense.get("weight_bytes", {}).get("resident"))
                + " / "
                + _mib(sparse.get("weight_bytes", {}).get("resident")),
                f"{dense['peak_process_bytes'] / 2**30:.2f} / {sparse['peak_process_bytes'] / 2**30:.2f}",
            ]
        )
    return rows


def _ms(seconds, digits: int) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"  # prefill generates one token: no ITL


def _mib(value) -> str:
    return f"{value / 2**20:.0f}" if value else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-1b", help="comma-separated: smollm2, llama-1b")
    parser.add_argument("--output-tokens", type=int, default=64, help="generated tokens per decode request")
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a complete run exists")
    parser.add_argument(
        "--stored-dense",
        action="append",
        default=[],
        metavar="ARTIFACT",
        help="also bench this artifact against its own weights exported dense (repeatable)",
    )
    parser.add_argument("--name", default="e2e-cpu", help="result name under benchmarks/results")
    args = parser.parse_args()
    RUNS.mkdir(exist_ok=True)
    models = {"smollm2": "smollm2-135m", "llama-1b": None}
    rows, data = [], {}
    pairs = []
    for name in [m for m in args.models.split(",") if m and m != "none"]:
        dense = models[name] or str(build_llama_1b(RUNS / "llama-1b-random"))
        sparse = RUNS / f"{name}-magnitude-2of4"
        if not sparse.exists():
            mixsparse("prune", dense, "--metric", "magnitude", "--sparsity", "2:4", "--out", str(sparse))
        pairs.append((name, dense, sparse))
    for artifact_dir in map(Path, args.stored_dense):
        plain = artifact_dir.with_name(artifact_dir.name + "-stored-dense")
        if not plain.exists():
            mixsparse("export", "--dense", str(artifact_dir), str(plain))
        pairs.append((artifact_dir.name, str(plain), artifact_dir))
    for name, dense, sparse in pairs:
        decode = bench(
            dense,
            sparse,
            "decode",
            "1,8",
            args.requests,
            args.output_tokens,
            RUNS / f"bench-e2e-{name}-decode",
            args.fresh,
        )
        prefill = bench(
            dense,
            sparse,
            "prefill",
            "1",
            max(4, args.requests // 2),
            None,
            RUNS / f"bench-e2e-{name}-prefill",
            args.fresh,
        )
        data[name] = {"decode": decode, "prefill": prefill}
        rows += rows_of(name, decode, "decode") + rows_of(name, prefill, "prefill")
    info = machine()
    workload = data[next(iter(data))]["decode"]["workload"]
    what = (
        "dense and 2:4 (magnitude, every decoder linear); llama-1b has random weights (Llama-3.2-1B shape)"
        if not args.stored_dense
        else "the pruned model stored dense (`mixsparse export --dense`) and the same "
        "weights served compressed from the artifact (bitmask / 2:4 per module)"
    )
    markdown = (
        f"CPU: **{info['cpu']}**, {info['cores']} cores; {machine_line(info)}.\n\n"
        f"`mixsparse bench` per model: decode ({workload['prompt_tokens']} prompt -> "
        f"{workload['output_tokens']} generated tokens, EOS ignored) at concurrency 1 and 8, and prefill "
        f"(1024 -> 1) at concurrency 1: {what}, served one after the other with the same flags and dtype "
        f"({cpu_serving_dtype()}, the CPU default). Resident weight bytes come from the servers' "
        f'`mixsparse_weight_bytes{{kind="resident"}}`; peak RSS is the server process tree\'s.\n\n'
        + markdown_table(
            [
                "model",
                "phase",
                "concurrency",
                "dense tok/s",
                "sparse tok/s",
                "sparse / dense",
                "TTFT p50 ms (dense / sparse)",
                "ITL p50 ms (dense / sparse)",
                "resident weights MiB (dense / sparse)",
                "peak RSS GiB (dense / sparse)",
            ],
            rows,
        )
    )
    print(markdown)
    title = (
        "End to end on CPU through vLLM: dense vs 2:4 on the native kernel"
        if not args.stored_dense
        else "End to end on CPU through vLLM: a mixed-sparsity artifact stored dense vs compressed"
    )
    save(args.name, title, markdown, data, order=36)


if __name__ == "__main__":
    main()
