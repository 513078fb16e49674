"""The offline verbs as functions: prune a model into an artifact, evaluate a model or artifact.

The CLI is a thin layer over these; tests and benchmarks call them directly.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixsparse.pruner import chat_data, data, evaluate, models
from mixsparse.pruner.adapter import ModelAdapter, adapt, fused_groups, select
from mixsparse.pruner.card import describe_plan, describe_recovery, model_card, plan_text
from mixsparse.pruner.export import human_bytes, module_entries, save_artifact, unique_state_dict
from mixsparse.pruner.gradient_file import GradientFile, check_gradients
from mixsparse.pruner.metrics import get_metric
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.progress import Progress, Silent
from mixsparse.pruner.prune import PruneOptions, PruneResult, linear_sparsity, prune_model
from mixsparse.pruner.recover import RecoverOptions, RecoverResult, RecoveryState, recover_model, recovery_steps
from mixsparse.pruner.spec import Spec
from mixsparse.runtime.atomic import refuse_existing
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.artifact import parse_dtype

log = logging.getLogger(__name__)


@dataclass
class PruneJob:
    model: str
    metric: str
    out: str
    sparsity: str | None = None  # uniform spec, e.g. "2:4" or "0.5"
    plan: str | None = None  # or a plan file
    include: str | None = None
    exclude: str | None = None
    prune_lm_head: bool = False
    calibration: data.CalibrationProtocol = field(default_factory=data.CalibrationProtocol)
    evaluation: data.EvaluationProtocol | None = None  # measure dense and pruned perplexity when set
    device: str = "cpu"
    dtype: str | None = None  # artifact dtype; default: the model's own
    options: PruneOptions = field(default_factory=PruneOptions)
    overwrite: bool = False
    recover: RecoverOptions | None = None  # tune the kept weights to match the dense model after pruning
    gradients: str | None = None  # gblm: keep the dense model's gradient norms in this file (gradient_file.py)


@dataclass
class PruneSummary:
    out: Path
    plan: Plan
    result: PruneResult
    sparsity: float  # measured over the pruned decoder linears
    weight_bytes: dict[str, int]
    perplexity: dict[str, evaluate.Perplexity]
    load_seconds: float
    save_seconds: float
    recovery: RecoverResult | None = None

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "metric": self.result.metric,
            "plan": describe_plan(self.plan),
            "planned_weight_sparsity": self.plan.weight_sparsity(),
            "linear_sparsity": self.sparsity,
            "weight_bytes": self.weight_bytes,
            "perplexity": {k: v.to_json() for k, v in self.perplexity.items()},
            "prune_seconds": self.result.seconds,
            "load_seconds": self.load_seconds,
            "save_seconds": self.save_seconds,
            "peak_memory_bytes": self.result.peak_memory_bytes,
            "device": self.result.device,
            **({"recovery": self.recovery.to_json()} if self.recovery else {}),
        }

    def rows(self) -> list[tuple[str, str]]:
        ppl = self.perplexity
        rows = [
            ("metric", self.result.metric),
            ("plan", describe_plan(self.plan)),
            ("linear sparsity (planned modules)", f"{self.sparsity:.2%}"),
        ]
        if ppl:
            label = f"perplexity ({ppl['pruned'].windows} windows)"
            one_shot = f"{ppl['one_shot'].perplexity:.2f} one-shot -> " if "one_shot" in ppl else ""
            rows.append(
                (
                    label,
                    f"{ppl['dense'].perplexity:.2f} dense -> {one_shot}{ppl['pruned'].perplexity:.2f} "
                    f"{'recovered' if one_shot else 'pruned'}",
                )
            )
        wb = self.weight_bytes
        rows += [
            (
                "stored weight bytes",
                f"{human_bytes(wb['stored'])} of {human_bytes(wb['dense_equivalent'])} "
                f"dense ({wb['stored'] / wb['dense_equivalent']:.1%})",
            ),
            (
                "2:4 packed modules",
                f"{human_bytes(wb['packed_stored'])} of {human_bytes(wb['packed_dense_equivalent'])} dense",
            ),
            *(
                [
                    (
                        "bitmask modules",
                        f"{human_bytes(wb['bitmask_stored'])} of {human_bytes(wb['bitmask_dense_equivalent'])} dense",
                    )
                ]
                if wb.get("bitmask_dense_equivalent")
                else []
            ),
            (
                "prune time",
                f"{self.result.seconds:.1f} s on {self.result.device} "
                f"(load {self.load_seconds:.1f} s, save {self.save_seconds:.1f} s)",
            ),
            *(
                [
                    (
                        "recovery",
                        f"{self.recovery.seconds:.1f} s on {self.recovery.device}, {describe_recovery(self.recovery)}",
                    )
                ]
                if self.recovery
                else []
            ),
            (
                "peak memory",
                human_bytes(
                    max(self.result.peak_memory_bytes, self.recovery.peak_memory_bytes if self.recovery else 0)
                ),
            ),
            ("artifact", str(self.out)),
        ]
        return rows


def compute_dtype(device: str, stored: torch.dtype) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there and the OBS update wants float32); stored dtype on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else stored


def check_device(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise MixsparseError("--device cuda was asked for, but CUDA is not available here")
    if kind not in ("cpu", "cuda"):
        raise MixsparseError(f"unsupported device {device!r}; use cpu or cuda")
    return device


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
    stored = _stored_dtype(path, job.dtype)
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

    perplexities: dict[str, evaluate.Perplexity] = {}
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


def recovery_state_dir(out: str) -> Path:
    """Where an interrupted recovery keeps its tuned blocks: beside the artifact, never inside it."""
    out_path = Path(out)
    return out_path.with_name(f".{out_path.name}.recovery")


def run_recovery(
    adapter, dense, tokenizer, plan, calibration, options, device, state, progress: Progress
) -> RecoverResult:
    """``options`` with ``data`` resolved ("auto" becomes what was used); chat windows are written by ``dense``."""
    options, windows = recovery_inputs(options, dense, tokenizer, calibration, device, state, progress)
    total = recovery_steps(options, windows.shape[0], len(adapter.blocks))
    then = f", then {options.distill_epochs} end to end" if options.distill_epochs else ""
    with progress.task(f"recovering ({len(adapter.blocks)} blocks x {options.epochs} epochs{then})", total) as advance:
        return recover_model(adapter, dense, plan, windows, options, device, state, after_step=advance)


def recovery_inputs(
    options: RecoverOptions, dense, tokenizer, calibration, device, state, progress: Progress = Silent()
) -> tuple[RecoverOptions, torch.Tensor]:
    """The options resolved for ``tokenizer`` and ``device``, and the windows recovery tunes on (the dense
    model writes the chats)."""
    options = options.resolved(tokenizer, device)
    if options.data == "text":
        return options, calibration
    prompts = chat_data.load_prompts(options.chat_prompts)
    dense.model.to(device)  # whole, to generate; back to the CPU after, as recovery expects it
    batches = -(-len(prompts) // chat_data.BATCH)
    # in float32 whatever the precision: greedy decoding under bf16 autocast was slower (58 s vs 38-46 s for 32
    # prompts, default model, 2 cores)
    with progress.task(f"chat data (the dense model answers {len(prompts)} prompts)", batches) as advance:
        windows = chat_data.recovery_windows(
            calibration,
            dense.model,
            tokenizer,
            options.chat_prompts,
            options.chat_tokens,
            options.seed,
            device,
            cache=state.directory / "chat-conversations.pt" if state else None,
            after_batch=advance,
        )
    dense.model.to("cpu")
    return options, windows


def request_of(job: PruneJob, resolved: str) -> dict:
    """What determines an artifact's weights; `deploy` reuses an artifact whose request is the same."""
    plan_digest = None
    if job.plan:
        plan_digest = hashlib.sha256(Path(job.plan).read_bytes()).hexdigest()
    return {
        "model": str(Path(resolved).resolve()) if Path(resolved).exists() else resolved,
        "metric": job.metric,
        "sparsity": job.sparsity,
        "plan_sha256": plan_digest,
        "include": job.include,
        "exclude": job.exclude,
        "prune_lm_head": job.prune_lm_head,
        "calibration": job.calibration.to_json(),
        "dtype": job.dtype,
        "options": vars(job.options),
        **({"recover": job.recover.to_json()} if job.recover else {}),
    }


def _stored_dtype(path: str, requested: str | None) -> torch.dtype:
    if requested:
        return parse_dtype(requested)
    if artifact.is_artifact(path):
        return artifact.read_config(path).dtype
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:
        return torch.bfloat16
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype) if dtype in ("bfloat16", "float16", "float32") else None
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def run_perplexity(model, windows, protocol, device, progress: Progress, label: str) -> evaluate.Perplexity:
    model.to(device)
    with progress.task(f"perplexity ({label}, {len(windows)} windows)", len(windows)) as advance:
        return evaluate.perplexity(model, windows, protocol, device, after_window=lambda index: advance())


def cached_perplexity(loaded: models.LoadedModel, windows, protocol, device, progress, label) -> evaluate.Perplexity:
    """Perplexity of an unchanged model is cached per (files, protocol, dtype): dense baselines are reused."""
    cache = models.cache_dir() / "perplexity"
    key = evaluate.result_cache_key(loaded.path, protocol, next(loaded.model.parameters()).dtype)
    hit = evaluate.cached(cache, key)
    if hit is not None:
        return hit
    result = run_perplexity(loaded.model, windows, protocol, device, progress, label)
    evaluate.store(cache, key, result)
    return result


@dataclass
class EvalSummary:
    model: str
    perplexity: evaluate.Perplexity
    sparsity: float  # over all decoder linears
    artifact: bool

    def to_json(self) -> dict:
        return {
            "model": self.model,
            **self.perplexity.to_json(),
            "linear_sparsity": self.sparsity,
            "artifact": self.artifact,
        }


def evaluate_model(
    model: str,
    protocol: data.EvaluationProtocol,
    device: str = "cpu",
    progress: Progress = Silent(),
    use_cache: bool = True,
) -> EvalSummary:
    check_device(device)
    path = models.resolve(model)
    loaded = models.load(model, dtype=compute_dtype(device, _stored_dtype(path, None)))
    adapter = adapt(loaded.model)
    zeros, total = linear_sparsity(adapter.linears())
    windows = data.evaluation_windows(loaded.tokenizer, protocol)
    if use_cache:
        result = cached_perplexity(loaded, windows, protocol, device, progress, model)
    else:
        result = run_perplexity(loaded.model, windows, protocol, device, progress, model)
    return EvalSummary(model, result, zeros / max(total, 1), loaded.artifact is not None)
