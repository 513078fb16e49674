"""``mixsparse bench`` against stand-in servers: results, reports, the recorded gain, and failures.

The stand-in (tests/stub_openai.py) streams like vLLM's server, so these tests need no engine; the real
engine path is covered in test_serving.py.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from serving_helpers import free_port

from mixsparse.pruner import pipeline
from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime.errors import MixsparseError
from mixsparse.serve import bench as bench_module
from mixsparse.serve.metrics import Metrics
from mixsparse.serve.workload import PromptSource, make_workload

pytestmark = pytest.mark.slow  # bench starts vLLM servers (stubbed or real)

STUB = str(Path(__file__).resolve().parent.parent / "stub_openai.py")


@pytest.fixture(scope="module")
def tiny_24(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("bench-art") / "tiny-24"
    pipeline.prune(PruneJob(model=str(tiny_llama), metric="magnitude", sparsity="2:4", out=str(out)))
    return out


@pytest.fixture
def artifact_copy(tiny_24, tmp_path):
    copy = tmp_path / "tiny-24"
    shutil.copytree(tiny_24, copy)
    return copy


def stub_servers(monkeypatch, delays: dict, die_after: dict | None = None):
    """Replace `mixsparse serve` by the stand-in; per model kind ('dense' or 'sparse') a delay per token."""
    die_after = die_after or {}

    def command(job, model, log):
        kind = "sparse" if (Path(model) / "plan.json").exists() else "dense"
        extra = [str(die_after[kind])] if kind in die_after else []
        return [sys.executable, STUB, str(job.port), str(delays[kind]), *extra]

    monkeypatch.setattr(bench_module, "server_command", command)


def job_for(dense, sparse, out, **kw):
    defaults = dict(
        workload=make_workload("decode", prompt_tokens=12, output_tokens=5),
        concurrency=(1, 3),
        requests=4,
        warmup=2,
        port=free_port(),
    )
    return bench_module.BenchJob(dense=str(dense), sparse=str(sparse), out=str(out), **(defaults | kw))


def test_bench_measures_both_engines_and_records_the_gain(monkeypatch, tiny_llama, artifact_copy, tmp_path):
    stub_servers(monkeypatch, {"dense": 0.02, "sparse": 0.01})
    result = bench_module.bench(job_for(tiny_llama, artifact_copy, tmp_path / "report"))
    report = tmp_path / "report"
    data = json.loads((report / "bench.json").read_text())
    assert data["complete"] and {p.name for p in report.iterdir()} >= {"bench.json", "bench.md", "bench.png"}
    for kind in ("dense", "sparse"):
        levels = data["engines"][kind]["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 3]
        # fixed lengths: every request brings exactly its prompt and its 5 tokens
        assert all(lv["requests"] == 4 and lv["failed"] == 0 for lv in levels)
        assert all(lv["output_tokens"] == 20 and lv["prompt_tokens"] == 48 for lv in levels)
        assert all(lv["ttft_p50"] > 0 and lv["itl_p50"] > 0 for lv in levels)
        assert data["engines"][kind]["weight_bytes"]["stored"] == 600.0
        assert data["engines"][kind]["peak_process_bytes"] > 0
    dense3, sparse3 = (data["engines"][k]["levels"][1] for k in ("dense", "sparse"))
    ratio = sparse3["output_tokens_per_second"] / dense3["output_tokens_per_second"]
    assert data["output_tokens_per_second_ratio"] == pytest.approx(ratio) and data["ratio_concurrency"] == 3
    assert "| 3 | output tok/s |" in (report / "bench.md").read_text()
    recorded = json.loads((artifact_copy / "bench.json").read_text())
    assert recorded["output_tokens_per_second_ratio"] == pytest.approx(ratio) and result["out"] == str(report)
    # the gauge /metrics shows comes from that record
    registry = CollectorRegistry()
    Metrics(artifact_copy, tmp_path, "float32", registry=registry)
    assert registry.get_sample_value("mixsparse_throughput_gain_ratio") == pytest.approx(ratio)


def test_a_server_that_dies_stops_the_run_and_keeps_what_was_measured(monkeypatch, tiny_llama, artifact_copy, tmp_path):
    # the sparse server answers the 2 warm-up requests and the 4 of concurrency 1, then exits
    stub_servers(monkeypatch, {"dense": 0.0, "sparse": 0.0}, die_after={"sparse": 6})
    with pytest.raises(MixsparseError, match="sparse, concurrency 3: the server died"):
        bench_module.bench(job_for(tiny_llama, artifact_copy, tmp_path / "report"))
    data = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert not data["complete"] and "the server died" in data["error"]
    assert [lv["failed"] for lv in data["engines"]["dense"]["levels"]] == [0, 0]
    assert [lv["concurrency"] for lv in data["engines"]["sparse"]["levels"]] == [1, 3]
    assert data["engines"]["sparse"]["levels"][1]["failed"] > 0
    assert "Incomplete run" in (tmp_path / "report" / "bench.md").read_text()
    assert not (artifact_copy / "bench.json").exists()  # no gain recorded from a broken run


def test_bench_refuses_models_of_another_base(tiny_llama_odd, artifact_copy, tmp_path):
    with pytest.raises(MixsparseError, match="not the same base model.*intermediate_size: 68 vs 96"):
        bench_module.bench(job_for(tiny_llama_odd, artifact_copy, tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_bench_input_errors(tiny_llama, artifact_copy, tmp_path):
    with pytest.raises(MixsparseError, match="is not a mixsparse artifact"):
        bench_module.bench(job_for(tiny_llama, tiny_llama, tmp_path / "r"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(MixsparseError, match="already exists"):
        bench_module.bench(job_for(tiny_llama, artifact_copy, tmp_path / "taken"))
    with pytest.raises(MixsparseError, match="--concurrency"):
        bench_module.bench(job_for(tiny_llama, artifact_copy, tmp_path / "r", concurrency=(0,)))
    with pytest.raises(MixsparseError, match="unknown workload"):
        make_workload("train")


def test_percentiles_and_prompt_lengths(tiny_llama):
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    def level(ttfts):  # what vLLM's request functions return, summarised by its calculate_metrics
        return bench_module.summarise(
            1,
            [
                RequestFuncOutput(success=True, ttft=t, latency=t + 1, output_tokens=2, itl=[1.0], prompt_len=3)
                for t in ttfts
            ],
            10.0,
        )

    assert level([5.0]).ttft_p99 == 5.0 and bench_module.summarise(1, [RequestFuncOutput()], 1.0).ttft_p50 is None
    assert level([float(i) for i in range(1, 102)]).ttft_p50 == 51.0
    from transformers import AutoTokenizer

    source = PromptSource(AutoTokenizer.from_pretrained(tiny_llama), make_workload("prefill", 40))
    first, second = source.take(3), source.take(3)
    assert all(len(p) == 40 for p in first + second) and first != second  # exact length, never repeated


@pytest.mark.parametrize("serving", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["dense", "cpu_sparse"])
def test_weight_gauges_agree_in_any_serving_dtype(artifact_copy, tmp_path, serving, backend):
    """dense_equivalent and resident count in the serving dtype and the ratio is their quotient (float32
    serving of a bf16 artifact showed resident 2.0x dense_equivalent beside a ratio of 1.0)."""
    from mixsparse.runtime.formats import artifact

    config = artifact.read_config(artifact_copy)
    element = {"float32": 4, "bfloat16": 2}[serving]
    dense_model = artifact.weight_bytes(config)["dense_equivalent"] // config.dtype.itemsize * element
    report = {}
    for name, entry in config.modules.items():  # what each worker writes after loading its layers
        dense = entry.shape[0] * entry.shape[1] * element
        kept = dense if backend == "dense" else entry.shape[0] * (entry.shape[1] // 2 * element + entry.shape[1] // 8)
        report[name] = {"bytes": kept, "dense_bytes": dense, "backend": backend}
    (tmp_path / "resident-1.json").write_text(json.dumps(report))
    registry = CollectorRegistry()
    Metrics(artifact_copy, tmp_path, serving, registry=registry).update()

    def weight_bytes(kind):
        return registry.get_sample_value("mixsparse_weight_bytes", {"kind": kind})

    assert weight_bytes("dense_equivalent") == dense_model
    assert weight_bytes("stored") == artifact.weight_bytes(config)["stored"]
    ratio = registry.get_sample_value("mixsparse_weight_memory_ratio")
    assert ratio == pytest.approx(weight_bytes("resident") / weight_bytes("dense_equivalent"))
    if backend == "dense":
        assert weight_bytes("resident") == weight_bytes("dense_equivalent") and ratio == 1.0
    else:
        saved = sum(r["dense_bytes"] - r["bytes"] for r in report.values())
        assert weight_bytes("resident") == dense_model - saved and ratio < 1.0
