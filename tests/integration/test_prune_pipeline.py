"""prune -> artifact -> load, on a tiny random Llama."""

import json

import pytest
import torch

from mixsparse.pruner import data, pipeline
from mixsparse.pruner.export import export_dense
from mixsparse.pruner.plan import Plan
from mixsparse.pruner.spec import Spec
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.hf import load_dense


def job(model, out, calibration, **kw):
    return pipeline.PruneJob(model=str(model), out=str(out), calibration=calibration,
                             **{"metric": "wanda", "sparsity": "2:4", **kw})


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
def test_every_metric_gives_exact_masks_and_a_loadable_artifact(tiny_llama, tmp_path, small_calibration, metric,
                                                                 sparsity):
    out = tmp_path / "art"
    summary = pipeline.prune(job(tiny_llama, out, small_calibration, metric=metric, sparsity=sparsity))
    spec = Spec.parse(sparsity)
    assert summary.sparsity == pytest.approx(spec.sparsity, abs=1e-3)
    model, config = load_dense(out, torch.float32)
    linears = {n: m for n, m in model.named_modules() if n in summary.plan.modules}
    assert len(linears) == 14
    for name, module in linears.items():
        nonzero = module.weight != 0
        if spec.kind == "nm":
            assert (nonzero.reshape(nonzero.shape[0], -1, spec.m).sum(-1) <= spec.n).all(), name
        entry = config.modules[name]
        assert entry.format == ("unstructured" if spec.kind == "unstructured" else sparsity)
        assert entry.storage == (artifact.PACKED24 if sparsity == "2:4" else artifact.DENSE)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["metric"] == metric and plan["modules"]["model.layers.0.mlp.down_proj"] == str(spec)
    assert (out / "README.md").read_text().startswith("# art")
    assert (out / "tokenizer.json").is_file()


def test_artifact_weights_equal_the_in_memory_pruned_model(tiny_llama, tmp_path, small_calibration):
    from mixsparse.pruner import models
    from mixsparse.pruner.adapter import adapt
    from mixsparse.pruner.prune import prune_model

    loaded = models.load(str(tiny_llama), dtype=torch.float32)
    adapter = adapt(loaded.model)
    plan = Plan.uniform(adapter.shapes(), Spec.parse("2:4"))
    prune_model(adapter, plan, "sparsegpt", data.calibration_windows(loaded.tokenizer, small_calibration))
    pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration, metric="sparsegpt"))
    restored, _ = load_dense(tmp_path / "art", torch.float32)
    for name, module in adapter.linears().items():
        assert torch.equal(restored.get_submodule(name).weight, module.weight.to(torch.bfloat16).float()), name


def test_packed_bytes_and_exported_dense_copy(tiny_llama, tmp_path, small_calibration):
    from transformers import AutoModelForCausalLM

    summary = pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration))
    bytes_ = summary.weight_bytes
    assert bytes_["packed_stored"] / bytes_["packed_dense_equivalent"] == pytest.approx(0.5625)
    assert bytes_["stored"] == sum((tmp_path / "art" / f).stat().st_size for f in ["model.safetensors"]) - \
        _header_bytes(tmp_path / "art" / "model.safetensors")
    export_dense(tmp_path / "art", tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    mine, _ = load_dense(tmp_path / "art", torch.float32)
    ids = torch.randint(0, 384, (1, 10))
    torch.testing.assert_close(plain(ids).logits, mine(ids).logits)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def _header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_a_group_that_is_not_all_24_is_stored_dense(tiny_llama, tmp_path, small_calibration):
    plan_path = tmp_path / "plan.json"
    from mixsparse.pruner import models
    from mixsparse.pruner.adapter import adapt

    shapes = adapt(models.load(str(tiny_llama)).model).shapes()
    specs = {name: Spec.parse("2:4") for name in shapes}
    specs["model.layers.0.self_attn.k_proj"] = Spec.parse("0.5")
    Plan(specs, shapes, {"allocator": "test"}).save(plan_path)
    pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration, sparsity=None, plan=str(plan_path)))
    config = artifact.read_config(tmp_path / "art")
    storage = {name: entry.storage for name, entry in config.modules.items()}
    assert storage["model.layers.0.self_attn.q_proj"] == artifact.DENSE  # k is not 2:4: the q/k/v GEMM stays dense
    assert storage["model.layers.0.mlp.gate_proj"] == artifact.PACKED24
    assert storage["model.layers.1.self_attn.q_proj"] == artifact.PACKED24


def test_tied_lm_head_is_not_pruned(tiny_llama, tmp_path, small_calibration):
    with pytest.raises(MixsparseError, match="shares its weight with the input embeddings"):
        pipeline.prune(job(tiny_llama, tmp_path / "a", small_calibration, prune_lm_head=True))
    assert list(tmp_path.iterdir()) == []


def test_include_exclude_and_lm_head(tiny_llama_untied, tmp_path, small_calibration):
    summary = pipeline.prune(job(tiny_llama_untied, tmp_path / "a", small_calibration, exclude=r"\.layers\.0\.",
                                 prune_lm_head=True))
    assert "lm_head" in summary.plan.modules and "model.layers.0.mlp.up_proj" not in summary.plan.modules
    model, config = load_dense(tmp_path / "a", torch.float32)
    assert config.modules["lm_head"].sparsity == pytest.approx(0.5)
    assert (model.get_submodule("model.layers.0.mlp.up_proj").weight != 0).all()


def test_prune_with_evaluation_records_perplexity(tiny_llama, tmp_path, small_calibration):
    summary = pipeline.prune(job(tiny_llama, tmp_path / "a", small_calibration,
                                 evaluation=data.EvaluationProtocol(seqlen=128, windows=2)))
    assert set(summary.perplexity) == {"dense", "pruned"}
    assert all(0 < p.perplexity < float("inf") and p.tokens == 2 * 127 for p in summary.perplexity.values())
    recorded = json.loads((tmp_path / "a" / "plan.json").read_text())["measurements"]["perplexity"]
    assert recorded["pruned"]["perplexity"] == pytest.approx(summary.perplexity["pruned"].perplexity)
    assert "perplexity (2 windows)" in (tmp_path / "a" / "README.md").read_text()


def test_eval_of_a_model_and_its_artifact(tiny_llama, tmp_path, small_calibration):
    pipeline.prune(job(tiny_llama, tmp_path / "a", small_calibration))
    protocol = data.EvaluationProtocol(seqlen=128, windows=3)
    dense = pipeline.evaluate_model(str(tiny_llama), protocol)
    pruned = pipeline.evaluate_model(str(tmp_path / "a"), protocol)
    assert dense.sparsity == 0 and pruned.sparsity == pytest.approx(0.5) and pruned.artifact
    assert dense.perplexity.tokens == pruned.perplexity.tokens == 3 * 127


def test_failure_leaves_no_partial_output(tiny_llama, tmp_path, small_calibration, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "_save_sharded", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_explicit(tiny_llama, tmp_path, small_calibration):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MixsparseError, match="already exists; pass --overwrite"):
        pipeline.prune(job(tiny_llama, out, small_calibration))
    assert (out / "keep.txt").read_text() == "mine"
    pipeline.prune(job(tiny_llama, out, small_calibration, overwrite=True))
    assert not (out / "keep.txt").exists() and artifact.is_artifact(out)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
