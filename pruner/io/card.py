"""What an artifact says about itself beside its weights: the model card (README.md) and plan.json's text.

Both are computed as data before the save, from the prune's summary; ``artifact.write`` only writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.io import data
from mixsparse.pruner.jobs import PruneJob, PruneSummary
from mixsparse.pruner.plans.plan import Plan
from mixsparse.runtime.formats.artifact import dtype_name


def plan_text(plan: Plan, record: dict) -> str:
    """plan.json: the plan and the record of how it was applied (request, calibration, timings, measurements)."""
    return json.dumps({**plan.to_json(), **record}, indent=2) + "\n"


def recovery_data(options) -> str:
    if options.data == "text+chat":
        source = options.chat_prompts
        prompts = "the bundled prompts" if source == "bundled" else f"the prompts of {source}"
        return (
            "half the calibration windows and as many windows of the dense model's own greedy answers "
            f"(at most {options.chat_tokens} tokens) to {prompts}, in its chat template"
        )
    return "the calibration windows"


def calibration_use(job: PruneJob, plan: Plan | None = None) -> str:
    metric = get_metric(job.metric)
    levels = plan.info.get("levels") if plan is not None else None
    if metric.needs_calibration:
        gradients = "; per-weight gradient norms from one backward per window of the dense model"
        how = "sequential, block by block"
        if levels and levels.get("metric") == job.metric:  # levels.prune_from_levels
            how = (
                f"one pass block by block with every module pruned at the plan's anchor {levels['anchor']:g}, each "
                "module then kept at its planned level: the weights the plan's search scored"
            )
        return how + (gradients if metric.needs_gradients else "")
    return f"not used by {job.metric}" + ("; used by recovery" if job.recover is not None else "")


def model_card(job: PruneJob, summary: PruneSummary, stored: torch.dtype) -> str:
    table = "\n".join(f"| {k} | {v} |" for k, v in summary.rows() if k not in ("artifact", "prune time"))
    calibration = job.calibration
    lines = [
        f"# {Path(job.out).name}",
        "",
        f"`{job.model}` pruned by [mixsparse](https://pypi.org/project/mixsparse/) with **{job.metric}**.",
        "2:4 modules are stored packed (values + 2-bit indices, 56.25% of dense bf16 bytes); other sparse modules "
        "bitmask-compressed (kept values + one bit per weight) where that is smaller than dense; the rest dense.",
        "",
        "| | |",
        "|---|---|",
        table,
        "",
        f"Calibration: {calibration.samples} windows of {calibration.seqlen} tokens from "
        f"{data.describe(calibration.source, data.CALIBRATION)}, seed {calibration.seed} "
        f"({calibration_use(job, summary.plan)}).",
    ]
    if summary.recovery is not None:
        ppl = summary.perplexity
        change = (
            f": perplexity {ppl['one_shot'].perplexity:.2f} one-shot -> {ppl['pruned'].perplexity:.2f} recovered"
            if "one_shot" in ppl
            else ""
        )
        lines.append(
            f"Recovery: masks frozen, kept weights and norms tuned block by block to match the dense "
            f"model's block outputs on {recovery_data(summary.recovery.options)} "
            f"({summary.recovery.describe()}; "
            f"{summary.recovery.seconds:.0f} s on {summary.recovery.device}){change}. Every zero stays "
            f"zero; settings and per-block errors are in `plan.json` under `recover`."
        )
    if summary.perplexity:
        protocol = job.evaluation
        lines.append(
            f"Perplexity: non-overlapping windows of {protocol.seqlen} tokens of "
            f"{data.describe(protocol.source, data.EVALUATION)}, {summary.perplexity['pruned'].windows} "
            f"windows, {summary.perplexity['pruned'].tokens} tokens."
        )
    lines += [
        "",
        "## Use",
        "",
        "```",
        f"mixsparse serve {job.out}                 # OpenAI-compatible endpoint (vLLM + mixsparse plugin)",
        f"mixsparse eval ppl {job.out}              # perplexity",
        f"mixsparse export --dense {job.out} OUT    # plain transformers copy (zeros kept)",
        "```",
        "",
        f"Pruned in {summary.result.seconds:.1f} s on {summary.result.device}. Per-module specs, timings and "
        f"the calibration protocol are in `plan.json`. Stored dtype: {dtype_name(stored)}.",
        "",
    ]
    return "\n".join(lines)
