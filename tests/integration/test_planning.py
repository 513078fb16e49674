"""Sensitivity, allocators and the MSP search on tiny random Llamas."""

import json

import pytest
import torch
from tiny_models import tiny_llama_config

from mixsparse.pruner import pipeline
from mixsparse.pruner.core import precision as matmul
from mixsparse.pruner.core.adapter import adapt
from mixsparse.pruner.io import data, models
from mixsparse.pruner.jobs import PruneJob
from mixsparse.pruner.plans.make import make_plan
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.plans.request import Deployment, FisherOptions, PlanRequest, Research, SearchOptions
from mixsparse.pruner.plans.sensitivity import fisher_traces
from mixsparse.pruner.search.evolve import SearchSettings
from mixsparse.runtime.errors import MixsparseError
from mixsparse.serve.cli import main

pytestmark = pytest.mark.slow  # MSP searches and Fisher passes on tiny models

FAST = SearchSettings(generations=3, population=3, offspring=4, survivors=2, steps=(1, 2), seed=0)


def test_fisher_traces_match_a_direct_per_parameter_computation(tiny_llama):
    loaded = models.load(str(tiny_llama), dtype=torch.float64)
    adapter = adapt(loaded.model)
    windows = torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(0))
    result = fisher_traces(adapter, windows)
    weights = {name: module.weight for name, module in adapter.linears().items()}
    expected = dict.fromkeys(weights, 0.0)
    for window in windows:
        ids = window.unsqueeze(0)
        loss = loaded.model(ids, labels=ids).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            expected[name] += float(grad.square().sum()) / len(windows)
    assert result.traces == pytest.approx(expected, rel=1e-9)
    assert all(not w.requires_grad or w.grad is None for w in loaded.model.parameters())
    assert result.info["samples"] == 3 and result.sizes["model.layers.0.mlp.down_proj"] == 64 * 96


def test_gblm_gradient_norms_match_autograd_per_sample(tiny_llama):
    from mixsparse.pruner.plans.sensitivity import weight_gradients

    loaded = models.load(str(tiny_llama), dtype=torch.float64)
    adapter = adapt(loaded.model)
    windows = torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    result = weight_gradients(adapter, windows, names)
    weights = [adapter.linears()[n].weight for n in names]
    squares = [torch.zeros_like(w) for w in weights]
    for window in windows:
        ids = window.unsqueeze(0)
        for total, grad in zip(squares, torch.autograd.grad(loaded.model(ids, labels=ids).loss, weights)):
            total += grad.square()
    for name, total in zip(names, squares):
        torch.testing.assert_close(result[name].norm, total.sqrt().float(), rtol=1e-5, atol=1e-12)
        assert (result[name].samples, result[name].tokens) == (3, 72) and result[name].norm.device.type == "cpu"
    assert all(not w.requires_grad or w.grad is None for w in loaded.model.parameters())


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_llama):
    """4 blocks; every block but block 1 is scaled down 20x, so the output hangs on block 1."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    # the default context and no special token ids, as this model was first measured with
    config = tiny_llama_config(num_hidden_layers=4, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(3.0 if index == 1 else 0.05)
    directory = tmp_path_factory.mktemp("planted")
    model.save_pretrained(directory)
    for file in tiny_llama.glob("tokenizer*"):
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def plan_job(
    model,
    out,
    target=None,
    granularity="block",
    deploy=False,
    budget=None,
    memory=None,
    pareto=False,
    budgets=(0.0, 0.25, 0.5, 0.75, 1.0),
    sensitivity=None,
    search=FAST,
    fitness="loss",
    delta=0.01,
    probe_seed=False,
    **kw,
):
    goal = Deployment(budget, memory, pareto, budgets) if deploy else Research(target, granularity)
    return PlanRequest(
        model=str(model),
        out=str(out),
        goal=goal,
        **{
            "calibration": data.CalibrationProtocol(samples=4, seqlen=32),
            "fisher": FisherOptions(samples=3, sensitivity=sensitivity),
            "search": SearchOptions(search, delta=delta, fitness=fitness, fitness_seqlen=32, probe_seed=probe_seed),
            **kw,
        },
    )


def test_the_search_learns_to_keep_the_planted_sensitive_block_denser(planted, tmp_path):
    search = SearchSettings(
        generations=12, population=4, offspring=6, survivors=2, steps=(2, 4), moves=6, patience=50, seed=0
    )
    outcome = make_plan(
        plan_job(planted, tmp_path / "plan.json", allocator="msp", target=0.6, fitness="kl", search=search, delta=0.05)
    )
    info = outcome.plan.info
    ratios = {label: gene["ratio"] for label, gene in info["genes"].items()}
    assert ratios["model.layers.1"] < 0.5 < min(r for label, r in ratios.items() if label != "model.layers.1")
    uniform = info["search"]["seed_fitness"]["uniform"]
    assert info["search"]["best_fitness"] < 0.7 * uniform
    assert outcome.plan.weight_sparsity() == pytest.approx(0.6, abs=1e-6)
    history = info["search"]["history"]
    assert history[-1]["best"] <= history[0]["best"] and info["search"]["evaluations"] > 12
    assert (tmp_path / "plan.search.json").is_file()


@pytest.mark.parametrize("allocator", ["uniform", "owl", "global", "fisher", "msp"])
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_every_allocator_keeps_the_budget_and_drives_prune(tiny_llama, tmp_path, allocator, granularity):
    outcome = make_plan(
        plan_job(
            tiny_llama,
            tmp_path / "plan.json",
            allocator=allocator,
            target=0.7,
            granularity=granularity,
            plot=str(tmp_path / "plan.png"),
        )
    )
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.weight_sparsity() == pytest.approx(0.7, abs=1e-6)
    assert plan.info["allocator"] == allocator and plan.info["calibration"]["samples"] == 4
    assert (tmp_path / "plan.png").stat().st_size > 1000
    summary = pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="sparsegpt",
            plan=str(tmp_path / "plan.json"),
            out=str(tmp_path / "art"),
            calibration=data.CalibrationProtocol(samples=4, seqlen=32),
        )
    )
    assert summary.sparsity == pytest.approx(0.7, abs=0.01)
    assert outcome.plan.modules == plan.modules


def test_deployment_plan_and_memory_target(tiny_llama, tmp_path):
    outcome = make_plan(plan_job(tiny_llama, tmp_path / "d.json", allocator="msp", deploy=True, budget=0.5))
    info = outcome.plan.info
    assert abs(info["achieved_fraction"] - 0.5) <= 0.25 and info["deploy"]
    assert {str(s) for s in outcome.plan.modules.values()} == {"2:4"}
    formats = {tuple(g["modules"]): g["format"] for g in info["groups"]}
    qkv = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    assert qkv in formats  # decisions are per fused group
    summary = pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="wanda",
            plan=str(tmp_path / "d.json"),
            out=str(tmp_path / "art"),
            calibration=data.CalibrationProtocol(samples=4, seqlen=32),
        )
    )
    assert summary.weight_bytes["packed_dense_equivalent"] > 0
    memory = make_plan(plan_job(tiny_llama, tmp_path / "m.json", allocator="fisher", deploy=True, memory=0.9))
    assert memory.plan.info["weight_memory"] == pytest.approx(0.9, abs=0.05)


def test_a_deployment_plan_is_the_held_out_best_of_the_search_and_least_sensitive_first(
    tiny_llama, tmp_path, monkeypatch
):
    """As for research plans: the search's best and its seed are scored on sequences the search never saw, and
    the seed's choice is written when it does better there (the front then plots that choice's fitness)."""
    from mixsparse.pruner.search.fitness import PlanEvaluator

    plan = make_plan(plan_job(tiny_llama, tmp_path / "d.json", allocator="msp", deploy=True, budget=0.5)).plan
    search = plan.info["search"]
    check = search["held_out_check"]
    assert set(check["scores"]) == {"search", "least_sensitive_first"} and check["sequences"] == 4 * 2
    assert check["chosen"] == min(check["scores"], key=lambda n: (check["scores"][n], n != "search"))
    seed = search["seed_fitness"]["least_sensitive_first"]
    assert search["plan_fitness"] == (search["best_fitness"] if check["chosen"] == "search" else seed)

    greedy_bits = {}

    def prefers_the_seed(self, candidates, sequences, batch, after_batch):
        # candidates come as [search's best, least sensitive first]
        greedy_bits["seed"] = {n for n, s in candidates[1].items() if not s.is_dense}
        return [1.0, 0.0]

    monkeypatch.setattr(PlanEvaluator, "held_out", prefers_the_seed)
    plan = make_plan(plan_job(tiny_llama, tmp_path / "s.json", allocator="msp", deploy=True, budget=0.5)).plan
    assert plan.info["search"]["held_out_check"]["chosen"] == "least_sensitive_first"
    assert set(plan.modules) == greedy_bits["seed"]
    assert plan.info["search"]["plan_fitness"] == plan.info["search"]["seed_fitness"]["least_sensitive_first"]
    assert plan.info["search"]["plan_fitness"] > plan.info["search"]["best_fitness"]


def test_deployment_fitness_scores_what_prune_with_the_plan_produces(tiny_llama, tmp_path):
    """Deployment candidates hold the base metric's own 2:4 weights (SparseGPT: with its update), so a
    candidate's fitness is the loss of exactly the model `prune --plan --metric sparsegpt` writes."""
    from mixsparse.pruner.core.progress import Silent
    from mixsparse.pruner.core.prune import prune_model
    from mixsparse.pruner.core.spec import Spec
    from mixsparse.pruner.plans.dense_or_24 import deploy_evaluator
    from mixsparse.pruner.plans.evidence import gather

    job = plan_job(tiny_llama, tmp_path / "d.json", allocator="msp", metric="sparsegpt", deploy=True, budget=1.0)
    evidence = gather(job, Silent(), need_fisher=False, need_stats=False)
    dense = {n: m.weight.detach().clone() for n, m in evidence.adapter.linears().items()}
    evaluator = deploy_evaluator(job, evidence, Silent())
    assert all(torch.equal(m.weight, dense[n]) for n, m in evidence.adapter.linears().items())  # dense put back

    reference = models.load(str(tiny_llama), dtype=torch.float32)
    ref = adapt(reference.model)
    windows = data.calibration_windows(reference.tokenizer, job.calibration)
    prune_model(ref, Plan({n: Spec.nm(2, 4) for n in ref.shapes()}, ref.shapes()), "sparsegpt", windows)
    for name, module in ref.linears().items():
        assert torch.equal(evidence.weights_24[name], module.weight), name
    # SparseGPT's update moves the kept weights: not a mask of the dense ones
    assert any(not torch.equal(w, dense[n] * (w != 0)) for n, w in evidence.weights_24.items())

    every = {n: Spec.nm(2, 4) for n in evidence.shapes}
    ids = evaluator.sequences[:2]
    with matmul.autocast(evaluator.precision, "cpu"):  # the search's own matmul precision (auto)
        expected = reference.model(ids, labels=ids, use_cache=False).loss.item()
    assert evaluator.evaluate(every, 2) == pytest.approx(expected, rel=1e-6)
    evaluator.restore()
    assert all(torch.equal(m.weight, dense[n]) for n, m in evidence.adapter.linears().items())


@pytest.mark.parametrize("fitness", ["loss", "kl"])
def test_bf16_fitness_follows_the_swapped_weights(tiny_llama, tmp_path, fitness):
    """Under bf16 autocast every candidate is scored on its own weights (no cast cache keeps the previous
    candidate's), and the fitness stays close to float32's."""
    from mixsparse.pruner.core.progress import Silent
    from mixsparse.pruner.core.spec import Spec
    from mixsparse.pruner.plans.dense_or_24 import deploy_evaluator
    from mixsparse.pruner.plans.evidence import gather
    from mixsparse.pruner.plans.request import check

    def evaluator(precision):
        job = plan_job(tiny_llama, tmp_path / "d.json", allocator="msp", metric="sparsegpt", deploy=True, budget=1.0)
        job.search.precision, job.search.fitness = precision, fitness
        return deploy_evaluator(job, gather(job, Silent(), need_fisher=False, need_stats=False), Silent())

    scores = {}
    for precision in ("float32", "bfloat16"):
        first = evaluator(precision)
        assert first.precision == precision
        names = list(first.modules)
        half = {n: Spec.nm(2, 4) if i % 2 else Spec.dense() for i, n in enumerate(names)}
        every = {n: Spec.nm(2, 4) for n in names}
        scores[precision] = [first.evaluate(specs, 2) for specs in (half, every, half)]
        assert evaluator(precision).evaluate(every, 2) == scores[precision][1]
    assert scores["bfloat16"][0] == scores["bfloat16"][2] != scores["bfloat16"][1]
    assert scores["bfloat16"] == pytest.approx(scores["float32"], rel=2e-2, abs=2e-3)
    job = plan_job(tiny_llama, tmp_path / "r.json", target=0.6)
    job.search.precision = "fp8"
    with pytest.raises(MixsparseError, match="search precision 'fp8'"):
        check(job)


@pytest.fixture
def scored(monkeypatch) -> list[int]:
    """The tokens each fitness evaluation scores, in order."""
    from mixsparse.pruner.search.fitness import PlanEvaluator

    tokens = []
    original = PlanEvaluator.evaluate

    def counting(self, specs, count):
        tokens.append(self.sequences[:count].numel())
        return original(self, specs, count)

    monkeypatch.setattr(PlanEvaluator, "evaluate", counting)
    return tokens


def test_sparsegpt_search_per_module_keeps_the_budget_in_weights(tiny_llama, tmp_path, scored):
    """Module granularity over stored levels: modules of unlike sizes get their own grid level, and the plan
    prunes exactly the target's weights (a level step of a module counts its size). The search runs per
    block first and refines per module from there, and the two phases' token counts add up to what was scored."""
    job = plan_job(
        tiny_llama, tmp_path / "m.json", target=0.6, metric="sparsegpt", granularity="module", probe_seed=True
    )
    plan = make_plan(job).plan
    grid = plan.info["levels"]["levels"]
    ratios = {name: spec.sparsity for name, spec in plan.modules.items()}
    assert all(any(abs(r - level) < 1e-9 for level in grid) for r in ratios.values())
    assert len(set(ratios.values())) > 1
    sizes = plan.shapes
    pruned = sum(ratios[n] * sizes[n][0] * sizes[n][1] for n in ratios)
    assert pruned == pytest.approx(0.6 * sum(o * i for o, i in sizes.values()), abs=1)
    # it searched per block first, then refined per module from the block plan: never worse than it
    search = plan.info["search"]
    blocks = search["block_phase"]
    assert search["seed_fitness"]["block plan"] == blocks["best_fitness"]
    assert search["best_fitness"] <= blocks["best_fitness"]
    assert blocks["generations"] < search["generations"] <= blocks["generations"] + 20  # patience may stop it
    # the block search was seeded by probing each block alone at 8 levels around the target (and all at it),
    # on the first step's sequences; the seed it found prunes the target's weights
    probed = search["probed_seed"]
    probes = probed["evaluations"]
    assert probes == 1 + len(probed["ratios"]) * 8 and set(scored[:probes]) == {scored[0]}
    assert sum(probed["ratios"]) / len(probed["ratios"]) == pytest.approx(0.6)
    assert search["seed_fitness"]["probed"] is not None
    # the phases share one evaluator: each counts only its own candidates' tokens (once counted twice)
    assert search["evaluations"] == len(scored) and search["tokens"] == sum(scored)
    assert blocks["tokens"] == sum(scored[probes : probes + blocks["evaluations"]])
    assert job.block_state_path.is_file()


def test_a_block_search_seeded_by_probes_starts_from_them_and_a_resume_probes_no_more(tiny_llama, tmp_path, scored):
    """``--granularity block --probe-seed``: the one search is seeded by the probes (first, so generation 0
    fills around it); a resumed search has its population already, so it probes no more, and finds the probed
    seed (a held-out candidate) and what probing cost in its state."""
    from dataclasses import replace

    job = plan_job(tiny_llama, tmp_path / "b.json", target=0.6, metric="sparsegpt", probe_seed=True)
    plan = make_plan(job).plan
    search = plan.info["search"]
    probed = search["probed_seed"]
    probes = probed["evaluations"]
    blocks = len(plan.info["genes"])
    assert len(probed["ratios"]) == blocks and probes == 1 + blocks * 8
    assert set(scored[:probes]) == {FAST.steps[0] * 32}  # the first step's sequences of fitness_seqlen tokens
    assert sum(probed["ratios"]) / blocks == pytest.approx(0.6)
    assert "block_phase" not in search
    state = json.loads(job.state_path.read_text())
    assert state["seeds"][0]["fitness"] == search["seed_fitness"]["probed"]
    assert set(search["seed_fitness"]) == {"probed", "fisher", "uniform"}
    assert search["evaluations"] == len(scored) and search["tokens"] == sum(scored)
    assert search["seconds"] >= probed["seconds"]

    scored.clear()
    again = plan_job(
        tiny_llama,
        tmp_path / "b.json",
        target=0.6,
        metric="sparsegpt",
        probe_seed=True,
        search=replace(FAST, generations=FAST.generations + 1),
    )
    again.search.resume = True
    resumed = make_plan(again).plan.info["search"]
    assert resumed["generations"] == FAST.generations + 1
    assert len(scored) < probes  # one generation's children, no probes
    assert resumed["probed_seed"] == probed and resumed["seed_fitness"] == search["seed_fitness"]
    assert "probed" in resumed["held_out_check"]["scores"]
    assert resumed["evaluations"] == search["evaluations"] + len(scored)


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_the_plan_is_the_held_out_best_of_the_search_and_its_seeds(tiny_llama, tmp_path, monkeypatch, granularity):
    """The search's best and its seeds are scored on sequences the search never saw; the lowest held-out loss
    is written, so a search that fit its fitness sequences falls back to the seed it started from."""
    from mixsparse.pruner.search.fitness import PlanEvaluator
    from mixsparse.pruner.search.session import fitness_sequences, held_out_sequences

    job = plan_job(tiny_llama, tmp_path / "a.json", target=0.6, metric="sparsegpt", granularity=granularity)
    plan = make_plan(job).plan
    check = plan.info["search"]["held_out_check"]
    scores = check["scores"]
    assert check["chosen"] == min(scores, key=lambda name: (scores[name], name != "search"))
    names = {
        "block": {"search", "fisher", "uniform"},
        "module": {"search", "block plan", "fisher per module", "uniform"},
    }
    assert set(scores) == names[granularity] and check["fitness"] == "loss"
    tokenizer = models.load(str(tiny_llama), dtype=torch.float32).tokenizer
    held_out, fitness = held_out_sequences(job, tokenizer), fitness_sequences(job, tokenizer)
    assert check["sequences"] == len(held_out) == 4 * len(fitness)
    assert not any(torch.equal(row, other) for row in held_out for other in fitness)

    # a search whose best generalises worse than uniform: uniform's plan is written
    def prefers_uniform(self, candidates, sequences, batch, after_batch):
        return [0.0 if len({spec.sparsity for spec in specs.values()}) == 1 else 1.0 for specs in candidates]

    monkeypatch.setattr(PlanEvaluator, "held_out", prefers_uniform)
    plan = make_plan(
        plan_job(tiny_llama, tmp_path / "u.json", target=0.6, metric="sparsegpt", granularity=granularity)
    ).plan
    assert plan.info["search"]["held_out_check"]["chosen"] == "uniform"
    assert {spec.sparsity for spec in plan.modules.values()} == {0.6}
    assert plan.info["search"]["best_fitness"] < plan.info["search"]["seed_fitness"]["uniform"]


@pytest.mark.parametrize("metric", ["sparsegpt", "wanda", "magnitude", "gblm"])
def test_research_search_scores_what_prune_with_the_plan_produces(tiny_llama, tmp_path, metric):
    """An msp plan is searched over the base metric's own levels (an anchored calibration pass, SparseGPT with
    its weight update): the best candidate's weights and fitness are bit-equal to `prune --plan`'s model."""
    import random

    from mixsparse.pruner.core.importance import get_metric
    from mixsparse.pruner.core.levels import LevelGrid, build_levels, stores_levels
    from mixsparse.pruner.core.progress import Silent
    from mixsparse.pruner.core.prune import prune_model
    from mixsparse.pruner.core.spec import Spec
    from mixsparse.pruner.plans.evidence import gather
    from mixsparse.pruner.search.genome import LevelOps
    from mixsparse.pruner.search.session import evaluator_for

    job = plan_job(tiny_llama, tmp_path / "r.json", target=0.6, metric=metric)
    outcome = make_plan(job)
    plan = outcome.plan
    assert plan.info["levels"]["metric"] == metric and plan.info["search"]["levels"]["stored"] == (
        metric == "sparsegpt"
    )
    assert not job.levels_path.exists()  # a finished search removes its database
    # the search's own best is not uniform (the held-out check may still write a seed on this random model)
    best = json.loads(job.state_path.read_text())["population"][0]["genome"]
    assert len(set(best)) > 1 or metric != "sparsegpt"

    # a candidate unlike the anchor: random levels (sparsegpt) or ratios (scores) per block, same budget
    evidence = gather(job, Silent(), need_fisher=False, need_stats=False, need_gradients=metric == "gblm")
    names = list(evidence.shapes)
    grid = LevelGrid.around(0.6, 0.05 if metric == "sparsegpt" else 0.01, 0.2, 0.0, 0.99)
    windows = data.calibration_windows(evidence.loaded.tokenizer, job.calibration)
    dense = {n: m.weight.detach().clone() for n, m in evidence.adapter.linears().items()}
    store = build_levels(
        evidence.adapter,
        names,
        get_metric(metric),
        windows,
        grid,
        "cpu",
        tmp_path / "levels",
        {"test": 1},
        gradients=evidence.gradients,
    )
    assert all(torch.equal(m.weight, dense[n]) for n, m in evidence.adapter.linears().items())  # dense put back
    assert stores_levels(get_metric(metric)) == bool(store.files)
    blocks = sorted({n.split(".mlp")[0].split(".self_attn")[0] for n in names})
    ops = LevelOps(len(grid.levels), grid.index(0.6), (1,) * len(blocks))
    genome = ops.mutate(tuple([ops.anchor] * len(blocks)), random.Random(1), 3)
    level_of = dict(zip(blocks, (grid.levels[i] for i in genome)))
    specs = {n: Spec.unstructured(level_of[n.split(".mlp")[0].split(".self_attn")[0]]) for n in names}
    evaluator = evaluator_for(job, evidence, levels=store)
    fitness = evaluator.evaluate(specs, 2)
    scored = {n: m.weight.detach().clone() for n, m in evidence.adapter.linears().items()}

    reference = models.load(str(tiny_llama), dtype=torch.float32)
    ref = adapt(reference.model)
    candidate = Plan(specs, ref.shapes(), {"levels": {**grid.to_json(), "metric": metric}})
    prune_model(ref, candidate, metric, windows if metric != "magnitude" else None)
    for name, module in ref.linears().items():
        assert torch.equal(scored[name], module.weight), name
    ids = evaluator.sequences[:2]
    with matmul.autocast(evaluator.precision, "cpu"):
        assert fitness == reference.model(ids, labels=ids, use_cache=False).loss.item()
    if metric == "sparsegpt":  # the update moves kept weights: these are not masks of the dense weights
        assert any(not torch.equal(w, dense[n] * (w != 0)) for n, w in scored.items())
        # the CLI applies the found plan the same way, and its card says so
        out = tmp_path / "artifact"
        args = ["prune", str(tiny_llama), "--plan", str(job.out), "--metric", metric, "--out", str(out)]
        assert main([*args, "--samples", "4", "--seqlen", "32"]) == 0
        assert "pruned at the plan's anchor 0.6" in (out / "README.md").read_text()


def test_pareto_front(tiny_llama, tmp_path, capsys):
    outcome = make_plan(
        plan_job(tiny_llama, tmp_path / "front", allocator="msp", deploy=True, pareto=True, budgets=(0.0, 0.5, 1.0))
    )
    assert [round(p["budget"], 2) for p in outcome.front] == [0.0, 0.5, 1.0]
    memories = [p["weight_memory"] for p in outcome.front]
    assert memories == sorted(memories, reverse=True) and memories[0] == pytest.approx(1.0)
    written = {p.name for p in (tmp_path / "front").iterdir()}
    assert {"front.json", "front.md", "front.png", "plan-b0.50.json"} <= written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--allocator", "fisher", "--target", "0.995"], "target 0.995 is infeasible"),
        (["--allocator", "owl", "--target", "0.3", "--min-ratio", "0.5"], "infeasible"),
        (["--allocator", "uniform", "--target", "1.2"], "1.2 is out of range; expected a number in [0, 1)"),
        (["--allocator", "uniform", "--deploy", "--budget", "0.5"], "allocator 'uniform' does not apply"),
        (["--allocator", "msp", "--deploy"], "exactly one of --budget or --memory"),
        (["--allocator", "msp", "--deploy", "--memory", "0.2"], "--memory 0.2 is infeasible"),
        (["--allocator", "msp"], "--target is required"),
    ],
)
def test_plan_errors(tiny_llama, tmp_path, capsys, argv, message):
    try:
        code = main(
            [
                "plan",
                str(tiny_llama),
                "--out",
                str(tmp_path / "p.json"),
                "--samples",
                "4",
                "--seqlen",
                "32",
                "--fisher-samples",
                "2",
                "--generations",
                "1",
                *argv,
            ]
        )
    except SystemExit as stop:  # a range the parser checks is argparse's usage error
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_plan_for_another_model_lists_what_does_not_match(tiny_llama, tiny_llama_odd, tmp_path, capsys):
    make_plan(plan_job(tiny_llama, tmp_path / "plan.json", allocator="uniform", target=0.5))
    code = main(
        [
            "prune",
            str(tiny_llama_odd),
            "--metric",
            "wanda",
            "--plan",
            str(tmp_path / "plan.json"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "plan does not match this model" in err
    assert "model.layers.0.mlp.down_proj (plan [64, 96]" in err


def test_resume_and_corrupt_state(tiny_llama, tmp_path, capsys):
    args = [
        "plan",
        str(tiny_llama),
        "--allocator",
        "msp",
        "--target",
        "0.6",
        "--out",
        str(tmp_path / "p.json"),
        "--samples",
        "4",
        "--seqlen",
        "32",
        "--fisher-samples",
        "2",
        "--fitness-seqlen",
        "32",
        "--steps",
        "1,2",
        "--population",
        "3",
        "--offspring",
        "3",
        "--survivors",
        "1",
    ]
    assert main([*args, "--generations", "2"]) == 0
    state = json.loads((tmp_path / "p.search.json").read_text())
    assert state["generation"] == 2
    capsys.readouterr()
    assert main([*args, "--generations", "4"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--generations", "4", "--resume"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["search"]["generations"] == 4
    assert plan["search"]["settings"]["generations"] == 4  # the settings it continued under, not the first run's
    check = plan["search"]["held_out_check"]
    printed = capsys.readouterr().out
    assert "held-out check" in printed and f"search {check['scores']['search']:.4f}" in printed, printed
    (tmp_path / "p.search.json").write_text("{not json")
    assert main([*args, "--generations", "5", "--resume"]) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_sensitivity_command(tiny_llama, tmp_path, capsys):
    assert (
        main(
            [
                "sensitivity",
                str(tiny_llama),
                "--samples",
                "2",
                "--seqlen",
                "32",
                "--out",
                str(tmp_path / "s.json"),
                "--plot",
                str(tmp_path / "s.png"),
                "--json",
            ]
        )
        == 0
    )
    data_ = json.loads((tmp_path / "s.json").read_text())
    assert data_["samples"] == 2 and len(data_["blocks"]) == 2 and len(data_["modules"]) == 14
    assert (tmp_path / "s.png").stat().st_size > 1000
    out = make_plan(
        plan_job(tiny_llama, tmp_path / "p.json", allocator="fisher", target=0.5, sensitivity=str(tmp_path / "s.json"))
    )
    assert out.plan.info["fisher"]["samples"] == 2


def test_global_allocator_via_the_cli_is_one_magnitude_threshold(tiny_llama, tmp_path, capsys):
    out = tmp_path / "g.json"
    args = ["plan", str(tiny_llama), "--allocator", "global", "--target", "0.6", "--granularity", "module"]
    assert main([*args, "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.weight_sparsity() == pytest.approx(0.6, abs=1e-6)
    threshold = plan.info["global"]["threshold"]
    linears = adapt(models.load(str(tiny_llama), dtype=torch.float32).model).linears()
    # bfloat16 weights tie at the threshold: those under it are pruned, the ties go to the earliest modules
    left = round(0.6 * sum(m.weight.numel() for m in linears.values()))
    left -= sum(int((m.weight.abs() < threshold).sum()) for m in linears.values())
    assert 0 < left <= sum(int((m.weight.abs() == threshold).sum()) for m in linears.values())
    for name, module in linears.items():
        ties = min(left, int((module.weight.abs() == threshold).sum()))
        expected = int((module.weight.abs() < threshold).sum()) + ties
        left -= ties
        assert plan.modules[name].sparsity * module.weight.numel() == pytest.approx(expected, abs=1e-6), name
    assert len({round(s.sparsity, 6) for s in plan.modules.values()}) > 1


@pytest.mark.parametrize("allocator", ["uniform", "owl", "global", "fisher", "msp"])
def test_gblm_plans_with_every_allocator(tiny_llama, tmp_path, allocator):
    outcome = make_plan(plan_job(tiny_llama, tmp_path / "p.json", allocator=allocator, target=0.6, metric="gblm"))
    assert outcome.plan.weight_sparsity() == pytest.approx(0.6, abs=1e-6)
    assert outcome.plan.info["metric"] == "gblm"
    # msp scores gblm's own levels (with the dense gradient norms); the others just record the metric
    assert outcome.plan.info["search_scores"].startswith("gblm")


def test_gblm_msp_ranks_by_scores_with_the_dense_gradient_norms(tiny_llama, tmp_path):
    from mixsparse.pruner.core.importance import gblm_score, wanda_score
    from mixsparse.pruner.core.progress import Silent
    from mixsparse.pruner.plans.evidence import gather

    job = plan_job(tiny_llama, tmp_path / "p.json", allocator="msp", target=0.6, metric="gblm")
    evidence = gather(job, Silent(), need_fisher=False, need_stats=True, need_gradients=True)
    name = "model.layers.1.mlp.down_proj"
    stats = evidence.stats[name]
    assert stats.gradient.samples == 4 and stats.gradient.norm.shape == (64, 96)
    weight = evidence.adapter.linears()[name].weight
    assert not torch.equal(gblm_score(weight, stats).argsort(1), wanda_score(weight, stats).argsort(1))


def test_prune_gblm_via_the_cli(tiny_llama, tmp_path, capsys):
    out = tmp_path / "gblm"
    args = ["prune", str(tiny_llama), "--metric", "gblm", "--sparsity", "0.5", "--out", str(out)]
    assert main([*args, "--samples", "4", "--seqlen", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["linear_sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "plan.json").read_text())["metric"] == "gblm"
    assert "gradient norms" in (out / "README.md").read_text()
