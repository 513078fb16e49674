"""prune -> artifact -> load, on a tiny random Llama."""

import json

import pytest
import torch

from mixsparse.pruner import pipeline
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.evaluate import evaluate_model
from mixsparse.pruner.io import data
from mixsparse.pruner.io.export import export_dense, human_bytes
from mixsparse.pruner.jobs import PruneJob
from mixsparse.pruner.plans.plan import Plan
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.hf import load_dense


def job(model, out, calibration, **kw):
    return PruneJob(
        model=str(model), out=str(out), calibration=calibration, **{"metric": "wanda", "sparsity": "2:4", **kw}
    )


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt", "gblm"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
def test_every_metric_gives_exact_masks_and_a_loadable_artifact(
    tiny_llama, tmp_path, small_calibration, metric, sparsity
):
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
        assert entry.storage == (artifact.PACKED24 if sparsity == "2:4" else artifact.BITMASK)
        assert entry.nnz == (None if sparsity == "2:4" else int(nonzero.sum()))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["metric"] == metric and plan["modules"]["model.layers.0.mlp.down_proj"] == str(spec)
    assert (out / "README.md").read_text().startswith("# art")
    assert (out / "tokenizer.json").is_file()


def test_artifact_weights_equal_the_in_memory_pruned_model(tiny_llama, tmp_path, small_calibration):
    from mixsparse.pruner.core.adapter import adapt
    from mixsparse.pruner.core.prune import prune_model
    from mixsparse.pruner.io import models

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
    assert bytes_["stored"] == sum(
        (tmp_path / "art" / f).stat().st_size for f in ["model.safetensors"]
    ) - _header_bytes(tmp_path / "art" / "model.safetensors")
    export_dense(tmp_path / "art", tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    mine, _ = load_dense(tmp_path / "art", torch.float32)
    ids = torch.randint(0, 384, (1, 10))
    torch.testing.assert_close(plain(ids).logits, mine(ids).logits)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def _header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_a_group_that_is_not_all_24_is_stored_bitmask(tiny_llama, tmp_path, small_calibration):
    plan_path = tmp_path / "plan.json"
    from mixsparse.pruner.core.adapter import adapt
    from mixsparse.pruner.io import models

    shapes = adapt(models.load(str(tiny_llama)).model).shapes()
    specs = {name: Spec.parse("2:4") for name in shapes}
    specs["model.layers.0.self_attn.k_proj"] = Spec.parse("0.5")
    Plan(specs, shapes, {"allocator": "test"}).save(plan_path)
    pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration, sparsity=None, plan=str(plan_path)))
    config = artifact.read_config(tmp_path / "art")
    storage = {name: entry.storage for name, entry in config.modules.items()}
    # k is not 2:4, so the q/k/v GEMM cannot take the 2:4 packing: its 2:4 members go bitmask (1.25 < 2 bytes/weight)
    assert storage["model.layers.0.self_attn.q_proj"] == artifact.BITMASK
    assert storage["model.layers.0.self_attn.k_proj"] == artifact.BITMASK
    assert config.modules["model.layers.0.self_attn.q_proj"].format == "2:4"
    assert storage["model.layers.0.mlp.gate_proj"] == artifact.PACKED24
    assert storage["model.layers.1.self_attn.q_proj"] == artifact.PACKED24


def test_tied_lm_head_is_not_pruned(tiny_llama, tmp_path, small_calibration):
    with pytest.raises(MixsparseError, match="shares its weight with the input embeddings"):
        pipeline.prune(job(tiny_llama, tmp_path / "a", small_calibration, prune_lm_head=True))
    assert list(tmp_path.iterdir()) == []


def test_include_exclude_and_lm_head(tiny_llama_untied, tmp_path, small_calibration):
    summary = pipeline.prune(
        job(tiny_llama_untied, tmp_path / "a", small_calibration, exclude=r"\.layers\.0\.", prune_lm_head=True)
    )
    assert "lm_head" in summary.plan.modules and "model.layers.0.mlp.up_proj" not in summary.plan.modules
    model, config = load_dense(tmp_path / "a", torch.float32)
    assert config.modules["lm_head"].sparsity == pytest.approx(0.5)
    assert (model.get_submodule("model.layers.0.mlp.up_proj").weight != 0).all()


def test_prune_with_evaluation_records_perplexity(tiny_llama, tmp_path, small_calibration):
    summary = pipeline.prune(
        job(tiny_llama, tmp_path / "a", small_calibration, evaluation=data.EvaluationProtocol(seqlen=128, windows=2))
    )
    assert set(summary.perplexity) == {"dense", "pruned"}
    assert all(0 < p.perplexity < float("inf") and p.tokens == 2 * 127 for p in summary.perplexity.values())
    recorded = json.loads((tmp_path / "a" / "plan.json").read_text())["measurements"]["perplexity"]
    assert recorded["pruned"]["perplexity"] == pytest.approx(summary.perplexity["pruned"].perplexity)
    assert "perplexity (2 windows)" in (tmp_path / "a" / "README.md").read_text()


def test_eval_of_a_model_and_its_artifact(tiny_llama, tmp_path, small_calibration):
    pipeline.prune(job(tiny_llama, tmp_path / "a", small_calibration))
    protocol = data.EvaluationProtocol(seqlen=128, windows=3)
    dense = evaluate_model(str(tiny_llama), protocol)
    pruned = evaluate_model(str(tmp_path / "a"), protocol)
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


MIXED = {
    "model.layers.0.self_attn.q_proj": "0.1",
    "model.layers.0.self_attn.k_proj": "0.5",
    "model.layers.0.self_attn.v_proj": "0.9",
    "model.layers.0.self_attn.o_proj": "4:8",
    "model.layers.0.mlp.gate_proj": "2:4",
    "model.layers.0.mlp.up_proj": "2:4",
    "model.layers.0.mlp.down_proj": "0.7",
    "model.layers.1.mlp.down_proj": "2:4",
}


@pytest.fixture(scope="module")
def mixed_artifact(tiny_llama, tmp_path_factory):
    """A plan of every kind: sparse enough for bitmask or not, N:M, a fully 2:4 group and a lone 2:4 module."""
    from mixsparse.pruner.core.adapter import adapt
    from mixsparse.pruner.io import models

    directory = tmp_path_factory.mktemp("mixed")
    shapes = adapt(models.load(str(tiny_llama)).model).shapes()
    Plan({name: Spec.parse(spec) for name, spec in MIXED.items()}, shapes, {"allocator": "test"}).save(
        directory / "plan.json"
    )
    pipeline.prune(
        job(
            tiny_llama,
            directory / "art",
            data.CalibrationProtocol(samples=2, seqlen=32),
            metric="magnitude",
            sparsity=None,
            plan=str(directory / "plan.json"),
        )
    )
    return directory / "art"


def test_storage_is_chosen_per_module_by_its_bytes(mixed_artifact):
    config = artifact.read_config(mixed_artifact)
    storage = {name: entry.storage for name, entry in config.modules.items()}
    assert storage == {
        "model.layers.0.self_attn.q_proj": artifact.DENSE,  # 10%: 0.9 * 2 + 1/8 + 8/64 > 2 bytes per weight
        "model.layers.0.self_attn.k_proj": artifact.BITMASK,
        "model.layers.0.self_attn.v_proj": artifact.BITMASK,
        "model.layers.0.self_attn.o_proj": artifact.BITMASK,
        "model.layers.0.mlp.down_proj": artifact.BITMASK,
        "model.layers.0.mlp.gate_proj": artifact.PACKED24,
        "model.layers.0.mlp.up_proj": artifact.PACKED24,
        "model.layers.1.mlp.down_proj": artifact.PACKED24,  # alone in its GEMM: the whole group is 2:4
    }
    quant = json.loads((mixed_artifact / "config.json").read_text())["quantization_config"]
    assert quant["format_version"] == 2
    assert "nnz" not in quant["modules"]["model.layers.0.mlp.gate_proj"]
    model, _ = load_dense(mixed_artifact, torch.float32)
    for name, entry in config.bitmask.items():
        weight = model.get_submodule(name).weight
        assert entry.nnz == int((weight != 0).sum()) and entry.sparsity == pytest.approx(1 - entry.nnz / weight.numel())
    headers = artifact.tensor_headers(config)
    assert headers["model.layers.0.self_attn.v_proj.values"] == (
        (config.bitmask["model.layers.0.self_attn.v_proj"].nnz,),
        "BF16",
    )
    assert headers["model.layers.0.self_attn.v_proj.mask"] == ((32, 8), "U8")
    assert headers["model.layers.0.self_attn.v_proj.offsets"] == ((33,), "I64")
    assert "model.layers.0.self_attn.v_proj.weight" not in headers


def test_bitmask_bytes_are_recorded_and_counted(mixed_artifact):
    config = artifact.read_config(mixed_artifact)
    sizes = artifact.weight_bytes(config)
    headers = artifact.tensor_headers(config)
    on_disk = sum(
        shape[0] * (2 if dtype == "BF16" else 8 if dtype == "I64" else 1) * (shape[1] if len(shape) > 1 else 1)
        for key, (shape, dtype) in headers.items()
        if key.rpartition(".")[0] in config.bitmask
    )
    assert sizes["bitmask_stored"] == on_disk
    assert sizes["bitmask_dense_equivalent"] == sum(e.shape[0] * e.shape[1] * 2 for e in config.bitmask.values())
    assert sizes["bitmask_stored"] < 0.7 * sizes["bitmask_dense_equivalent"]
    dense_params = (
        sum(t.numel() * 2 for t in load_dense(mixed_artifact)[0].state_dict().values()) - 384 * 64 * 2
    )  # lm_head is tied to the embeddings: stored once
    assert sizes["dense_equivalent"] == dense_params
    card = (mixed_artifact / "README.md").read_text()
    assert "| bitmask modules |" in card and "bitmask-compressed" in card


def test_bitmask_artifact_exports_to_plain_transformers_and_loads_in_the_reference_engine(mixed_artifact, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixsparse.runtime.reference import load_reference

    mine, config = load_dense(mixed_artifact, torch.float32)
    export_dense(mixed_artifact, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    tensors = artifact.load_tensors(config)
    for name in config.bitmask:
        exact = artifact.bitmask_module(config, tensors, name).unpack().float()
        assert torch.equal(plain.get_submodule(name).weight, exact), name
    ids = torch.randint(0, 384, (1, 10))
    torch.testing.assert_close(plain(ids).logits, mine(ids).logits)
    reference, _, _ = load_reference(mixed_artifact, dtype=torch.float32)
    torch.testing.assert_close(reference(ids).logits, mine(ids).logits)


def test_version_1_artifacts_still_load(tiny_llama, tmp_path, small_calibration):
    pipeline.prune(job(tiny_llama, tmp_path / "art", small_calibration, metric="magnitude"))
    config_file = tmp_path / "art" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["format_version"] = 1  # version 1 is version 2 without bitmask storage
    config_file.write_text(json.dumps(config))
    model, config = load_dense(tmp_path / "art", torch.float32)
    assert config.packed and not config.bitmask
    assert ((model.get_submodule("model.layers.0.mlp.up_proj").weight != 0).reshape(-1, 4).sum(-1) <= 2).all()


def test_version_1_with_bitmask_storage_is_refused(mixed_artifact, tmp_path):
    import shutil

    shutil.copytree(mixed_artifact, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (tmp_path / "art" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MixsparseError, match="is stored as bitmask, which format_version 1 does not have"):
        artifact.read_config(tmp_path / "art")


def _rewrite(source, target, change_tensors=None, change_quant=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if change_tensors:
        tensors = load_file(target / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["files"]["model.safetensors"] = (target / "model.safetensors").stat().st_size
    if change_quant:
        change_quant(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))
    return target


V_PROJ = "model.layers.0.self_attn.v_proj"


def _bump_offset(tensors):
    tensors[f"{V_PROJ}.offsets"][5] += 1


@pytest.mark.parametrize(
    "change_tensors, change_quant, message",
    [
        (_bump_offset, None, f"{V_PROJ}: bitmask offsets disagree with the mask at entry 5"),
        (lambda t: t.pop(f"{V_PROJ}.mask"), None, f"tensor {V_PROJ}.mask of bitmask module {V_PROJ} is missing"),
        (
            None,
            lambda q: q["modules"][V_PROJ].__setitem__("nnz", q["modules"][V_PROJ]["nnz"] - 1),
            "the artifact records nnz",
        ),
        (None, lambda q: q["modules"][V_PROJ].pop("nnz"), f"module {V_PROJ}: a bitmask entry needs nnz"),
    ],
)
def test_a_corrupt_bitmask_module_is_refused_when_loaded(
    mixed_artifact, tmp_path, change_tensors, change_quant, message
):
    broken = _rewrite(mixed_artifact, tmp_path / "broken", change_tensors, change_quant)
    with pytest.raises(MixsparseError, match=message):
        load_dense(broken)


def test_the_vllm_plugin_refuses_bitmask_where_vllm_builds_no_linear_layer(mixed_artifact):
    """Bitmask layers are served (tests/integration/test_serving.py); an lm_head, vLLM's embedding, cannot be."""
    pytest.importorskip("vllm")
    from mixsparse.runtime.vllm_plugin import MixsparseConfig

    quant = json.loads((mixed_artifact / "config.json").read_text())["quantization_config"]
    config = MixsparseConfig.from_config(quant)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(
        ValueError,
        match="model.layers.0.self_attn.qkv_proj is stored bitmask-compressed, which vLLM's lm_head cannot take",
    ):
        config.get_quant_method(torch.nn.Linear(2, 2), "model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="format_version 3 is not supported by this plugin .*versions 1, 2"):
        MixsparseConfig.from_config({**quant, "format_version": 3})
    MixsparseConfig.from_config({**quant, "format_version": 1, "modules": {}})


def test_model_card_quotes_the_bytes_read_back_from_the_artifact(mixed_artifact):
    # the card is written before the weights land: its byte counts come from the module entries
    sizes = artifact.weight_bytes(artifact.read_config(mixed_artifact))
    card = (mixed_artifact / "README.md").read_text()
    for stored, dense in (
        ("stored", "dense_equivalent"),
        ("packed_stored", "packed_dense_equivalent"),
        ("bitmask_stored", "bitmask_dense_equivalent"),
    ):
        assert f"| {human_bytes(sizes[stored])} of {human_bytes(sizes[dense])} dense" in card, stored


def test_metrics_gauges_count_bitmask_modules(mixed_artifact, tmp_path):
    from prometheus_client import CollectorRegistry

    from mixsparse.serve.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(mixed_artifact, tmp_path, "bfloat16", registry=registry)
    sizes = artifact.weight_bytes(artifact.read_config(mixed_artifact))
    assert registry.get_sample_value("mixsparse_weight_bytes", {"kind": "stored"}) == sizes["stored"]
    assert (
        registry.get_sample_value("mixsparse_weight_bytes", {"kind": "dense_equivalent"})
        == sizes["dense_equivalent"]
        > sizes["stored"]
    )
    counts = {
        fmt: registry.get_sample_value("mixsparse_sparse_modules", {"format": fmt})
        for fmt in ("2:4", "4:8", "unstructured", "dense")
    }
    assert counts == {"2:4": 3, "4:8": 1, "unstructured": 4, "dense": 14 - 8}
