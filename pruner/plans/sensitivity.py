"""Sensitivity: the trace of the empirical Fisher information of each module (docs/design.md, Sensitivity).

    Tr(F_l) ≈ (1/N) Σ_i ‖∇_{θ_l} ℓ(x_i)‖²      ℓ = next-token cross-entropy of calibration sequence i

One backward per sequence, so the squared norms are per-sample (the square of a summed gradient would
be a different, smaller quantity). Memory stays bounded: as soon as a weight's gradient is complete a
hook reduces it to one number and frees it, so at most one module's gradient lives at a time.
Only the prunable weights take gradients.

``weight_gradients`` runs the same loop for GBLM-Pruner (core/importance.py) but keeps, per weight, Σ_n g_n² over
the samples: one float32 tensor per module, i.e. the pruned weights' size again in float32 (smollm2-135m:
~0.4 GB; a 7B model: ~26 GB), on ``device`` while it accumulates and on the CPU afterwards.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.stats import GradientStats
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.json_files import read_json, write_json

SENSITIVITY_FORMAT = "mixsparse-sensitivity"


@dataclass
class Sensitivity:
    traces: dict[str, float]  # module -> Tr(F) (sum over its weights, mean over samples)
    sizes: dict[str, int]  # module -> number of weights
    blocks: dict[str, list[str]]  # block name -> its modules, in order
    info: dict = field(default_factory=dict)  # samples, tokens, seconds, calibration protocol, model

    def per_weight(self, name: str) -> float:
        return self.traces[name] / self.sizes[name]

    def block_trace(self, block: str) -> float:
        return sum(self.traces[n] for n in self.blocks[block])

    def block_per_weight(self, block: str) -> float:
        return self.block_trace(block) / sum(self.sizes[n] for n in self.blocks[block])

    def to_json(self) -> dict:
        return {
            "format": SENSITIVITY_FORMAT,
            **self.info,
            "blocks": {
                b: {"trace": self.block_trace(b), "per_weight": self.block_per_weight(b), "modules": names}
                for b, names in self.blocks.items()
            },
            "modules": {
                n: {"trace": t, "per_weight": self.per_weight(n), "weights": self.sizes[n]}
                for n, t in self.traces.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "sensitivity") -> "Sensitivity":
        if not isinstance(data, dict) or data.get("format") != SENSITIVITY_FORMAT:
            raise MixsparseError(f"{source} is not a mixsparse sensitivity file")
        try:
            traces = {n: float(m["trace"]) for n, m in data["modules"].items()}
            sizes = {n: int(m["weights"]) for n, m in data["modules"].items()}
            blocks = {b: list(v["modules"]) for b, v in data["blocks"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise MixsparseError(f"{source}: malformed sensitivity file ({error!r})") from None
        info = {k: v for k, v in data.items() if k not in {"format", "modules", "blocks"}}
        return cls(traces, sizes, blocks, info)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        write_json(path, self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        return cls.from_json(read_json(path, "sensitivity file"), str(path))

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        missing = sorted(set(shapes) - set(self.traces))
        wrong = sorted(n for n in shapes if n in self.sizes and self.sizes[n] != shapes[n][0] * shapes[n][1])
        if missing or wrong:
            raise MixsparseError(
                f"sensitivity file does not match this model: {len(missing)} modules missing, "
                f"{len(wrong)} of another size (e.g. {(missing + wrong)[0]})"
            )


def _per_sample_backward(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    weights: dict[str, torch.Tensor],
    reduce: Callable[[str, torch.Tensor], None],
    device: torch.device,
    after_sample: Callable[[int], None],
) -> None:
    """One backward of the next-token loss per window; ``reduce(name, grad)`` sees each weight's gradient
    as soon as it is complete, and the gradient is freed right after."""
    model = adapter.model
    model.to(device)
    was_training = model.training
    model.eval()  # no dropout: the gradients of the deployed model
    previous = {p: p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    hooks = []
    for name, weight in weights.items():
        weight.requires_grad_(True)

        def reduce_and_free(param, name=name):
            reduce(name, param.grad.detach())
            param.grad = None

        hooks.append(weight.register_post_accumulate_grad_hook(reduce_and_free))
    try:
        for index, window in enumerate(windows):
            ids = window.unsqueeze(0).to(device)
            with torch.enable_grad():
                loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
            after_sample(index)
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in previous.items():
            param.requires_grad_(flag)
            param.grad = None
        model.train(was_training)


def fisher_traces(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str] | None = None,
    device: str | torch.device = "cpu",
    after_sample: Callable[[int], None] = lambda index: None,
) -> Sensitivity:
    """Tr of the empirical Fisher per module over ``windows`` (samples x tokens), one backward per sample."""
    sensitivity, _ = fisher_and_gradients(adapter, windows, len(windows), names, [], device, after_sample)
    return sensitivity


def weight_gradients(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    names: list[str] | None = None,
    device: str | torch.device = "cpu",
    after_sample: Callable[[int], None] = lambda index: None,
) -> dict[str, GradientStats]:
    """GBLM-Pruner's per-weight gradient l2 norms over ``windows`` (samples x tokens), one backward per sample
    (as its gradient_computation.py: the mean next-token loss of one sequence per backward). ``names`` may
    include lm_head. Kept on the CPU, float32."""
    names = list(adapter.linears()) if names is None else names
    return fisher_and_gradients(adapter, windows, 0, [], names, device, after_sample)[1]


def fisher_and_gradients(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    fisher_samples: int,
    fisher_names: list[str] | None,
    gradient_names: list[str],
    device: str | torch.device = "cpu",
    after_sample: Callable[[int], None] = lambda index: None,
) -> tuple[Sensitivity | None, dict[str, GradientStats]]:
    """The Fisher traces of ``fisher_names`` over the first ``fisher_samples`` windows and the gradient norms of
    ``gradient_names`` over all of them, from one backward per window: an msp plan with gblm needs both, and
    the traces' samples are then a prefix of the norms'. Each is what its own pass gives, bit for bit (the same
    backward, the same reductions)."""
    if fisher_samples > len(windows):
        raise ValueError(f"{fisher_samples} Fisher samples from {len(windows)} windows")
    modules = dict(adapter.linears())
    head = adapter.lm_head()
    if head is not None:
        modules.setdefault(*head)
    fisher_names = list(adapter.linears()) if fisher_names is None else fisher_names
    device = torch.device(device)
    traces = {name: torch.zeros((), dtype=torch.float64, device=device) for name in fisher_names}
    norms = {n: torch.zeros(modules[n].weight.shape, dtype=torch.float32, device=device) for n in gradient_names}
    done = [0]  # samples whose backward is complete

    def reduce(name: str, grad: torch.Tensor) -> None:
        if name in traces and done[0] < fisher_samples:
            traces[name] += grad.double().square().sum()
        if name in norms:
            grad = grad.float()
            norms[name].addcmul_(grad, grad)

    def advance(index: int) -> None:
        done[0] = index + 1
        after_sample(index)

    start = time.perf_counter()
    # every weight either needs takes a gradient; the union is what each pass alone asks for when the names agree
    weights = {n: modules[n].weight for n in dict.fromkeys([*fisher_names, *gradient_names])}
    passes = len(windows) if gradient_names else fisher_samples
    _per_sample_backward(adapter, windows[:passes], weights, reduce, device, advance)
    sensitivity = None
    if fisher_names and fisher_samples:
        values = {name: float(total) / fisher_samples for name, total in traces.items()}
        if not all(math.isfinite(t) for t in values.values()):
            raise MixsparseError("Fisher traces are not finite (the model's loss overflowed); try --device cpu/float32")
        sizes = {name: modules[name].weight.numel() for name in fisher_names}
        blocks: dict[str, list[str]] = {}
        for name in fisher_names:
            blocks.setdefault(f"{adapter.blocks_name}.{adapter.block_of(name)}", []).append(name)
        info = {
            "samples": fisher_samples,
            "tokens": int(windows[:fisher_samples].numel()),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if passes > fisher_samples:  # the seconds are those of the shared pass
            info["shared_with_gradient_norms"] = passes
        sensitivity = Sensitivity(values, sizes, blocks, info)
    gradients = {}
    for name in gradient_names:
        norm = norms.pop(name).sqrt_().cpu()
        if not torch.isfinite(norm).all():
            raise MixsparseError(f"gradient norms of {name} are not finite (the loss overflowed); try float32")
        gradients[name] = GradientStats(norm, len(windows), int(windows.numel()))
    return sensitivity, gradients
