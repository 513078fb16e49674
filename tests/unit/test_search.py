import json

import pytest

from mixsparse.pruner.search.evolve import SearchSettings, SearchState, evolve
from mixsparse.pruner.search.genome import Budget, RatioOps, from_ratios
from mixsparse.runtime.errors import MixsparseError

SIZES = [1000] * 6
SENSITIVITY = [1, 1, 30, 1, 1, 1]  # gene 2 is planted as very sensitive


def fitness(genome, sequences):
    # a separable, convex cost: the optimum moves sparsity away from the sensitive gene
    return sum(s * (c / 1000) ** 2 for s, c in zip(SENSITIVITY, genome))


class Interrupted(Exception):
    pass


def run(state=None, generations=25, path=None, stop_after=None, patience=100):
    budget = Budget.for_target(SIZES, 0.5)
    settings = SearchSettings(
        generations=generations, population=6, offspring=8, survivors=3, steps=(1, 2), patience=patience, seed=3
    )
    state = state or SearchState(settings={}, fingerprint={"test": 1})
    seed = tuple(from_ratios([0.5] * 6, budget))

    def on_generation(current):
        if path:
            current.save(path)
        if stop_after is not None and current.generation == stop_after:
            raise Interrupted  # as if the user pressed Ctrl-C here

    return evolve(RatioOps(budget, 0.02), fitness, [seed], settings, state, on_generation), seed


def test_search_improves_on_its_seed_and_spares_the_sensitive_gene():
    state, seed = run()
    assert state.best["fitness"] < fitness(seed, 2) * 0.8
    best = state.best["genome"]
    assert best[2] / 1000 < 0.4 and sum(best) == sum(seed)
    assert [h["best"] for h in state.history] == sorted((h["best"] for h in state.history), reverse=True)


def test_resume_continues_exactly(tmp_path):
    path = tmp_path / "state.json"
    whole, _ = run(generations=12)
    with pytest.raises(Interrupted):
        run(generations=12, path=path, stop_after=5)
    resumed_state = SearchState.load(path, {"test": 1})
    resumed_state.finished = False
    resumed, _ = run(state=resumed_state, generations=12)
    assert resumed.best == whole.best and resumed.generation == 12
    assert [h["best"] for h in resumed.history] == [h["best"] for h in whole.history]


def test_a_search_patience_stopped_stays_stopped_when_resumed(tmp_path):
    """Resuming with more generations continues a search that ran out of them, not one that stopped improving:
    for msp's block phase another generation could change the block plan the module phase's state belongs to."""
    path = tmp_path / "state.json"
    stopped, _ = run(generations=200, path=path, patience=2)
    assert stopped.generation < 200 and stopped.generation - stopped.best_since == 2
    resumed, _ = run(state=SearchState.load(path, {"test": 1}), generations=400, patience=2)
    assert resumed.finished and resumed.generation == stopped.generation
    assert resumed.evaluations == stopped.evaluations and resumed.best == stopped.best
    longer, _ = run(state=SearchState.load(path, {"test": 1}), generations=400, patience=4)
    assert longer.generation > stopped.generation  # more patience: it goes on


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "corrupt"),
        ('{"format": "x"}', "corrupt"),
        (
            '{"format": "mixsparse-search-state", "settings": {}, "fingerprint": {"test": 1}, "population": []}',
            "empty population",
        ),
    ],
)
def test_corrupt_state(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(MixsparseError, match=message):
        SearchState.load(path, {"test": 1})


def test_state_of_another_search_is_refused(tmp_path):
    path = tmp_path / "state.json"
    run(generations=1, path=path)
    with pytest.raises(MixsparseError, match="belongs to another search"):
        SearchState.load(path, {"test": 2})
    assert json.loads(path.read_text())["generation"] == 1


def test_settings_are_checked():
    with pytest.raises(MixsparseError, match="non-decreasing"):
        SearchSettings(steps=(4, 1))
