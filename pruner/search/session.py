"""The msp search run for a plan: held-out fitness sequences, a resumable state tied to what it searched
(its fingerprint), and the summary plan.json keeps. The genomes (research ratios or deployment bits)
are the caller's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.progress import Progress
from mixsparse.pruner.io import data
from mixsparse.pruner.plans.evidence import Evidence
from mixsparse.pruner.plans.request import PlanRequest
from mixsparse.pruner.search.evolve import SearchSettings, SearchState, evolve
from mixsparse.pruner.search.fitness import PlanEvaluator

HELD_OUT_FACTOR = 4  # held-out check sequences per sequence of the search's final step


FITNESS_SEED_OFFSET = 1  # the search scores windows of the calibration split drawn with seed + 1
HELD_OUT_SEED_OFFSET = 2  # the held-out check, windows drawn with seed + 2 that the search never scores


def search_windows(request: PlanRequest, tokenizer, samples: int, seed_offset: int) -> torch.Tensor:
    """``samples`` random windows of the calibration split at the search's sequence length, drawn with the
    calibration seed + ``seed_offset`` so they are other windows than the ones the model is calibrated on."""
    protocol = replace(
        request.calibration,
        samples=samples,
        seqlen=request.search.fitness_seqlen,
        seed=request.calibration.seed + seed_offset,
    )
    return data.calibration_windows(tokenizer, protocol)


def fitness_sequences(request: PlanRequest, tokenizer) -> torch.Tensor:
    """The sequences the search scores: as many as its final step."""
    return search_windows(request, tokenizer, max(request.search.settings.steps), FITNESS_SEED_OFFSET)


def held_out_sequences(request: PlanRequest, tokenizer) -> torch.Tensor:
    """Sequences the search never scores, four times its final step: the plan is chosen among the search's best
    and its seeds by their fitness here, so a search that fits its own few sequences cannot return a plan worse
    on other text than where it started."""
    samples = HELD_OUT_FACTOR * max(request.search.settings.steps)
    return search_windows(request, tokenizer, samples, HELD_OUT_SEED_OFFSET)


def evaluator_for(
    request: PlanRequest, evidence: Evidence, weights_24: dict[str, torch.Tensor] | None = None, levels=None
) -> PlanEvaluator:
    return PlanEvaluator(
        evidence.adapter,
        list(evidence.shapes),
        fitness_sequences(request, evidence.loaded.tokenizer),
        request.device,
        request.search.fitness,
        weights_24,
        levels,
        matmul.resolve(request.search.precision, request.device),
    )


def fingerprint(request: PlanRequest, evidence: Evidence, what: dict) -> dict:
    shapes = hashlib.sha256(json.dumps(sorted(evidence.shapes.items())).encode()).hexdigest()[:16]
    search = request.search
    return {
        "model": evidence.loaded.path,
        "shapes": shapes,
        "metric": request.metric,
        "fitness": search.fitness,
        "precision": matmul.resolve(search.precision, request.device),
        "steps": list(search.settings.steps),
        "fitness_seqlen": search.fitness_seqlen,
        "calibration": request.calibration.to_json(),
        "seed": search.settings.seed,
        **what,
    }


def run_search(
    request: PlanRequest,
    evidence: Evidence,
    ops,
    seeds,
    to_specs,
    fingerprint: dict,
    label: str,
    progress: Progress,
    state_path: Path | None,
    evaluator: PlanEvaluator | None = None,
    settings: SearchSettings | None = None,
    notes: dict | None = None,
) -> tuple[SearchState, PlanEvaluator]:
    """Run (or, with --resume and a saved state at ``state_path``, continue) one search. ``notes`` are kept
    in a new search's state; a resumed one has its own."""
    settings = settings or request.search.settings
    if evaluator is None:
        evaluator = evaluator_for(request, evidence)
    # a search in phases resumes the one it stopped in: the phases before it are finished, those after unstarted
    if request.search.resume and state_path is not None and state_path.is_file():
        state = SearchState.load(state_path, fingerprint)
        # the plan records what the search ran under: a resume may give it more generations or patience
        state.settings = asdict(settings)
    else:
        state = SearchState(settings=asdict(settings), fingerprint=fingerprint, notes=notes or {})
    # the evaluator may have scored an earlier phase's candidates: count only this search's tokens
    tokens_before = state.tokens - evaluator.tokens

    def evaluate(genome, count: int) -> float:
        return evaluator.evaluate(to_specs(genome), count)

    remaining = 0 if state.stalled(settings.patience) else max(settings.generations - state.generation, 0)
    remaining += 0 if state.population else 1
    with progress.task(f"search ({label})", remaining) as advance:

        def on_generation(current: SearchState) -> None:
            current.tokens = tokens_before + evaluator.tokens
            if state_path is not None:
                current.save(state_path)
            last = current.history[-1]
            advance(f"gen {current.generation}: best {last['best']:.4f} median {last['median']:.4f}")

        state = evolve(ops, evaluate, seeds, settings, state, on_generation)
    state.tokens = tokens_before + evaluator.tokens
    if state_path is not None:
        state.save(state_path)
    return state, evaluator


def held_out_choice(
    request: PlanRequest,
    evidence: Evidence,
    evaluator: PlanEvaluator,
    to_specs: Callable,
    candidates: dict[str, tuple],
    progress: Progress,
) -> tuple[str, dict | None]:
    """The search's best (``candidates["search"]``) against its seeds on held-out sequences it never scored
    (``held_out_sequences``), by the search's own fitness: the lowest wins, the search's best on a tie. Where the
    true differences are small a search can fit its few fitness sequences and end worse on other text than a
    seed it started from; then that seed's plan is written. (It does not see the test split: at 0.5 with
    SparseGPT on the default model the search's plan wins here and still loses to uniform on test.) When every
    candidate is the same genome there is nothing to check: ("search", None)."""
    distinct = list(dict.fromkeys(candidates.values()))
    if len(distinct) == 1:
        return "search", None
    sequences = held_out_sequences(request, evidence.loaded.tokenizer)
    batch = max(request.search.settings.steps)
    label = f"held-out check ({len(distinct)} plans x {len(sequences)} sequences)"
    with progress.task(label, -(-len(sequences) // batch)) as advance:
        held_out = evaluator.held_out([to_specs(g) for g in distinct], sequences, batch, lambda: advance())
    scores = dict(zip(distinct, held_out))
    fitness = {name: scores[genome] for name, genome in candidates.items()}
    chosen = min(candidates, key=lambda name: (fitness[name], name != "search"))
    return chosen, {
        "fitness": request.search.fitness,
        "sequences": len(sequences),
        "seqlen": int(sequences.shape[1]),
        "seed": request.calibration.seed + HELD_OUT_SEED_OFFSET,
        "scores": fitness,
        "chosen": chosen,
    }


def search_summary(state: SearchState, request: PlanRequest) -> dict:
    search = request.search
    return {
        "settings": state.settings,
        "delta": search.delta,
        "fitness": search.fitness,
        "precision": matmul.resolve(search.precision, request.device),
        "fitness_seqlen": search.fitness_seqlen,
        "evaluation_steps_sequences": list(search.settings.steps),
        "generations": state.generation,
        "evaluations": state.evaluations,
        "tokens": state.tokens,
        "seconds": round(state.seconds, 1),
        "best_fitness": state.best["fitness"],
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in state.history],
    }
