"""The ``prune`` verb as a function: load, calibrate, prune block by block under a plan, optionally recover
and evaluate, and write the artifact atomically. The CLI and ``deploy`` are thin layers over it; tests and
benchmarks call it directly."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from mixsparse.pruner.core.adapter import ModelAdapter, adapt, fused_groups, select
from mixsparse.pruner.core.importance import get_metric
from mixsparse.pruner.core.perplexity import Perplexity
from mixsparse.pruner.core.precision import check_device, compute_dtype
from mixsparse.pruner.core.progress import Progress, Silent
from mixsparse.pruner.core.prune import linear_sparsity, prune_model
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.evaluate import cached_perplexity, run_perplexity
from mixsparse.pruner.io import data, models
from mixsparse.pruner.io.card import model_card, plan_text
from mixsparse.pruner.io.export import module_entries, save_artifact, unique_state_dict
from mixsparse.pruner.io.gradient_file import GradientFile, check_gradients
from mixsparse.pruner.io.provenance import request_of, stored_dtype
from mixsparse.pruner.io.sizes import check_windows, hidden_size
from mixsparse.pruner.jobs import PruneJob, PruneSummary
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover import chat_data
from mixsparse.pruner.recover.inputs import recovery_state_dir
from mixsparse.pruner.recover.run import run_recovery
from mixsparse.pruner.recover.state import RecoveryState
from mixsparse.runtime.atomic import refuse_existing
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact

log = logging.getLogger(__name__)


def build_plan(job: PruneJob, adapter: ModelAdapter) -> Plan:
    shapes = adapter.shapes()
    head = adapter.lm_head()
    if job.prune_lm_head:
        if head is None:
            raise MixsparseError("--prune-lm-head: this model has no linear lm_head")
        embeddings = adapter.model.get_input_embeddings()
        if embeddings is not None and embeddings.weight is head[1].weight:
            raise MixsparseError(
                "--prune-lm-head: lm_head shares its weight with the input embeddings "
                "(tie_word_embeddings), so pruning it would prune the embeddings too"
            )
        shapes[head[0]] = tuple(head[1].weight.shape)
        adapter.final_norm()  # fail now, not after the blocks, if it cannot be calibrated
    if job.plan:
        plan = Plan.load(job.plan)
        plan.validate(shapes)
        levels = plan.info.get("levels")
        if levels and levels.get("metric") == job.metric and plan.info.get("calibration") != job.calibration.to_json():
            log.warning(
                "%s was searched over %s levels with calibration %s; pruning with %s writes weights other than "
                "the ones the search scored (pass the plan's calibration flags to get exactly those)",
                job.plan,
                job.metric,
                plan.info.get("calibration"),
                job.calibration.to_json(),
            )
        return plan
    chosen = select(list(shapes), job.include, job.exclude)
    spec = Spec.parse(job.sparsity)
    plan = Plan.uniform({n: shapes[n] for n in chosen}, spec)
    plan.validate(shapes)
    return plan


def prune(job: PruneJob, progress: Progress = Silent()) -> PruneSummary:
    """Load, calibrate, prune block by block, optionally evaluate, and write the artifact atomically."""
    if (job.sparsity is None) == (job.plan is None):
        raise MixsparseError("give exactly one of --sparsity or --plan")
    check_gradients(job.gradients, job.metric)
    check_device(job.device)
    refuse_existing(job.out, job.overwrite)
    if job.sparsity is not None:
        Spec.parse(job.sparsity)  # reject a bad ratio before loading anything
    if job.recover is not None and job.recover.data != "text":
        chat_data.load_prompts(job.recover.chat_prompts)  # a bad prompt file fails before hours of work
    start = time.perf_counter()
    path = models.resolve(job.model)
    if get_metric(job.metric).needs_calibration or job.recover is not None:
        check_windows("--samples", job.calibration.samples, job.calibration.seqlen, hidden_size(path))
    stored = stored_dtype(path, job.dtype)
    loaded = models.load(job.model, dtype=compute_dtype(job.device, stored))
    wants_chat = job.recover is not None and job.recover.data == "text+chat"
    if wants_chat and not chat_data.has_chat_template(loaded.tokenizer):
        raise MixsparseError(
            f"--recover-data text+chat: {job.model}'s tokenizer has no chat template; use text (or auto)"
        )
    adapter = adapt(loaded.model)
    plan = build_plan(job, adapter)
    # the reference recovery matches; kept on the CPU, its blocks visit the device one at a time
    dense = copy.deepcopy(loaded.model) if job.recover is not None else None
    groups = fused_groups(adapter)
    load_seconds = time.perf_counter() - start

    perplexities: dict[str, Perplexity] = {}
    windows = None
    if job.evaluation is not None:
        windows = data.evaluation_windows(loaded.tokenizer, job.evaluation)
        perplexities["dense"] = cached_perplexity(loaded, windows, job.evaluation, job.device, progress, "dense")

    metric = get_metric(job.metric)
    needs_calibration = metric.needs_calibration or job.recover is not None
    calibration = data.calibration_windows(loaded.tokenizer, job.calibration) if needs_calibration else None
    # gblm: one backward per calibration sequence on the dense model first, then the blocks
    samples = len(calibration) if metric.needs_gradients else 0
    gradient_pass = f"{samples} gradient samples, " if samples else ""
    blocks = len(adapter.blocks)
    with progress.task(f"pruning ({job.metric}, {gradient_pass}{blocks} blocks)", samples + blocks) as advance:
        result = prune_model(
            adapter,
            plan,
            job.metric,
            calibration if metric.needs_calibration else None,
            job.device,
            job.options,
            after_block=lambda index: advance(),
            after_sample=lambda index: advance(),
            kept_gradients=GradientFile.of(
                job.gradients, path, job.calibration, next(loaded.model.parameters()).dtype, job.device
            ),
        )
    loaded.model.to("cpu")
    recovery = None
    state = RecoveryState(recovery_state_dir(job.out), request_of(job, path)) if job.recover is not None else None
    if job.recover is not None:
        if windows is not None:
            perplexities["one_shot"] = run_perplexity(
                loaded.model, windows, job.evaluation, job.device, progress, "one-shot"
            )
            loaded.model.to("cpu")
        recovery = run_recovery(
            adapter, adapt(dense), loaded.tokenizer, plan, calibration, job.recover, job.device, state, progress
        )
        del dense
        loaded.model.to("cpu")
    pruned_names = {n for n, s in plan.modules.items() if not s.is_dense}
    zeros, total = linear_sparsity({n: m for n, m in adapter.linears().items() if n in pruned_names})

    if windows is not None:
        perplexities["pruned"] = run_perplexity(loaded.model, windows, job.evaluation, job.device, progress, "pruned")
        loaded.model.to("cpu")

    save_start = time.perf_counter()
    record = {
        "request": request_of(job, path),
        "metric": job.metric,
        "model": {"name": job.model, "path": loaded.path},
        "calibration": job.calibration.to_json() if needs_calibration else None,
        "prune": {
            **result.to_json(),
            "options": vars(job.options),
            "module_seconds": {k: round(v, 3) for k, v in result.module_seconds.items()},
        },
        **({"recover": recovery.to_json()} if recovery else {}),
        "measurements": {
            "linear_sparsity": zeros / max(total, 1),
            "perplexity": {k: v.to_json() for k, v in perplexities.items()},
        },
    }
    entries = module_entries(adapter, plan, groups, stored)
    summary = PruneSummary(
        Path(job.out),
        plan,
        result,
        zeros / max(total, 1),
        artifact.planned_weight_bytes(unique_state_dict(loaded.model), entries, stored),
        perplexities,
        load_seconds,
        0.0,
        recovery,
    )
    save_artifact(
        loaded.model,
        loaded.tokenizer,
        entries,
        groups,
        job.out,
        stored,
        {"plan.json": plan_text(plan, record), "README.md": model_card(job, summary, stored)},
        overwrite=job.overwrite,
    )
    if state is not None:
        state.remove()  # only now: the artifact holds the tuned weights
    summary.save_seconds = time.perf_counter() - save_start
    return summary
