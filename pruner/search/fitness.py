"""Cheap candidate evaluation for plan search (docs/design.md, The evolutionary search).

A candidate's modules hold what the base metric itself makes of them, computed before the search: for
research plans each module at every level (core/levels.py: one anchored calibration pass; score ranks or stored
SparseGPT levels), for deployment plans every module pruned to 2:4 once, sequentially as ``prune`` does.
Only the modules whose spec changed since the last candidate are touched, so the search ranks what
``prune --plan`` will produce. Fitness is the mean next-token NLL (or the KL divergence to the dense model)
on held-out calibration sequences; the number of sequences is the evaluation step, so the same tokens serve
every candidate of a step.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.adapter import ModelAdapter
from mixsparse.pruner.core.spec import Spec

FITNESS = ("loss", "kl")


class PlanEvaluator:
    def __init__(
        self,
        adapter: ModelAdapter,
        names: list[str],
        sequences: torch.Tensor,
        device: str | torch.device = "cpu",
        fitness: str = "loss",
        weights_24: dict[str, torch.Tensor] | None = None,
        levels=None,
        precision: str = "float32",
    ):
        if fitness not in FITNESS:
            raise ValueError(f"fitness must be one of {FITNESS}")
        self.model = adapter.model.to(device)
        self.device = torch.device(device)
        linears = adapter.linears()
        self.modules = {name: linears[name] for name in names}
        self.dense = {name: module.weight.detach().clone() for name, module in self.modules.items()}
        self.weights_24 = weights_24 or {}  # the base metric's own 2:4 weights, used for 2:4 specs
        self.levels = levels  # levels.LevelStore: every module pruned by the base metric itself, per level
        self.current = {name: Spec.dense() for name in names}
        self.sequences = sequences
        self.fitness = fitness
        matmul.check(precision, "fitness")
        self.precision = matmul.resolve(precision, self.device)
        self.evaluations = 0
        self.tokens = 0
        self.seconds = 0.0
        self._reference: torch.Tensor | None = None

    @torch.no_grad()
    def apply(self, specs: dict[str, Spec]) -> None:
        for name, spec in specs.items():
            if spec == self.current[name]:
                continue
            dense = self.dense[name]
            weight = self.modules[name].weight
            if spec.is_dense:
                weight.copy_(dense)
            elif spec.kind == "nm":
                if (spec.n, spec.m) != (2, 4) or name not in self.weights_24:
                    raise ValueError(
                        f"{name}: {spec} candidates need the base metric's own 2:4 weights "
                        f"(deployment_plans.deploy_evaluator)"
                    )
                weight.copy_(self.weights_24[name])
            else:
                if self.levels is None:
                    raise ValueError(f"{name}: {spec} candidates need the base metric's levels (levels.build_levels)")
                weight.copy_(self.levels.weight(name, dense, spec.sparsity))
            self.current[name] = spec

    def restore(self) -> None:
        self.apply({name: Spec.dense() for name in self.modules})

    @torch.no_grad()
    def _logprobs_of(self, ids: torch.Tensor) -> torch.Tensor:
        with matmul.autocast(self.precision, self.device):
            logits = self.model(ids, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    @torch.no_grad()
    def _fitness_of(self, ids: torch.Tensor, reference: torch.Tensor | None) -> float:
        """The current weights' fitness on ``ids``: next-token loss, or KL(dense || current) from the dense
        ``reference`` log-probabilities of the same ids."""
        if self.fitness == "loss":
            with matmul.autocast(self.precision, self.device):
                return self.model(ids, labels=ids, use_cache=False).loss.item()
        return (reference.exp() * (reference - self._logprobs_of(ids))).sum(-1).mean().item()

    @torch.no_grad()
    def evaluate(self, specs: dict[str, Spec], count: int) -> float:
        """Fitness (lower is better) of ``specs`` on the first ``count`` held-out sequences."""
        start = time.perf_counter()
        self.apply(specs)
        ids = self.sequences[:count].to(self.device)
        value = self._fitness_of(ids, self.reference(count) if self.fitness == "kl" else None)
        self.evaluations += 1
        self.tokens += ids.numel()
        self.seconds += time.perf_counter() - start
        return value

    @torch.no_grad()
    def held_out(
        self,
        candidates: list[dict[str, Spec]],
        sequences: torch.Tensor,
        batch: int,
        after_batch: Callable[[], None] = lambda: None,
    ) -> list[float]:
        """The fitness of each candidate on other ``sequences`` (equal lengths), ``batch`` sequences at a time:
        batch by batch, so KL's dense reference is computed once per batch and never held for all of them.
        Not counted as search work."""
        totals = [0.0] * len(candidates)
        for start in range(0, len(sequences), batch):
            ids = sequences[start : start + batch].to(self.device)
            reference = None
            if self.fitness == "kl":
                self.restore()
                reference = self._logprobs_of(ids)
            for index, specs in enumerate(candidates):
                self.apply(specs)
                totals[index] += self._fitness_of(ids, reference) * len(ids)
            after_batch()
        return [total / len(sequences) for total in totals]

    def reference(self, count: int) -> torch.Tensor:
        """Dense next-token log-probabilities for KL fitness (computed once, on every fitness sequence)."""
        if self._reference is None or self._reference.shape[0] < count:
            saved = dict(self.current)
            self.restore()
            self._reference = self._logprobs_of(self.sequences.to(self.device)).to(torch.bfloat16)
            self.apply(saved)
        return self._reference[:count].float()
