"""--gradients: gblm's gradient norms computed once and shared by plan and prune, with the same weights."""

import pytest
import torch

from mixsparse.pruner import pipeline
from mixsparse.pruner.core.adapter import adapt
from mixsparse.pruner.core.progress import Silent
from mixsparse.pruner.io import data
from mixsparse.pruner.jobs import PruneJob
from mixsparse.pruner.plans.evidence import gather
from mixsparse.pruner.plans.request import PlanRequest, Research
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.hf import load_dense
from mixsparse.serve.cli import main

pytestmark = pytest.mark.slow  # GBLM's gradient passes, plan and deploy

CALIBRATION = data.CalibrationProtocol(samples=4, seqlen=32)


def prune(model, out, **kw):
    job = PruneJob(
        model=str(model),
        metric="gblm",
        out=str(out),
        sparsity="0.6",
        calibration=CALIBRATION,
        include=r"layers\.1\.",  # a subset: the file still holds every module's norms
        **kw,
    )
    return pipeline.prune(job)


def weights(out):
    model, _ = load_dense(out, torch.float32)
    return {n: m.weight.detach().clone() for n, m in adapt(model).linears().items()}


def test_a_gradients_file_is_written_once_then_read_and_prunes_the_same_weights(tiny_llama, tmp_path, monkeypatch):
    from safetensors import safe_open

    from mixsparse.pruner.io import gradient_file

    kept = tmp_path / "grads.safetensors"
    prune(tiny_llama, tmp_path / "none")
    prune(tiny_llama, tmp_path / "writes", gradients=str(kept))
    with safe_open(str(kept), framework="pt") as handle:
        assert len(list(handle.keys())) == 14  # every decoder linear, not only the pruned ones
        assert handle.metadata()["samples"] == "4"
    before = kept.read_bytes()

    def no_backward(*args, **kwargs):
        raise AssertionError("the norms were computed again instead of read")

    monkeypatch.setattr(gradient_file, "weight_gradients", no_backward)
    prune(tiny_llama, tmp_path / "reads", gradients=str(kept))
    assert kept.read_bytes() == before
    reference = weights(tmp_path / "none")
    for out in ("writes", "reads"):
        for name, weight in weights(tmp_path / out).items():
            assert torch.equal(weight, reference[name]), (out, name)

    # plan's evidence reads the same file: the norms it ranks with are the ones prune computed
    request = PlanRequest(
        str(tiny_llama), str(tmp_path / "p.json"), Research(0.6), metric="gblm", calibration=CALIBRATION
    )
    monkeypatch.undo()
    computed = gather(request, Silent(), need_fisher=False, need_stats=False, need_gradients=True).gradients
    monkeypatch.setattr(gradient_file, "weight_gradients", no_backward)
    read = gather(
        PlanRequest(**{**vars(request), "gradients": str(kept)}),
        Silent(),
        need_fisher=False,
        need_stats=False,
        need_gradients=True,
    ).gradients
    assert set(read) == set(computed)
    assert all(torch.equal(read[n].norm, computed[n].norm) and read[n].samples == 4 for n in read)


def test_a_gradients_file_of_other_calibration_is_refused_and_kept(tiny_llama, tmp_path):
    kept = tmp_path / "grads.safetensors"
    prune(tiny_llama, tmp_path / "first", gradients=str(kept))
    before = kept.read_bytes()
    other = PruneJob(
        model=str(tiny_llama),
        metric="gblm",
        out=str(tmp_path / "second"),
        sparsity="0.6",
        calibration=data.CalibrationProtocol(samples=4, seqlen=32, seed=1),
        gradients=str(kept),
    )
    with pytest.raises(MixsparseError, match=r"computed from other calibration .*'seed': 0.*'seed': 1"):
        pipeline.prune(other)
    assert kept.read_bytes() == before and not (tmp_path / "second").exists()


def test_a_file_that_is_not_a_gradients_file_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    stray = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(stray))
    with pytest.raises(MixsparseError, match="is not a mixsparse gradients file"):
        prune(tiny_llama, tmp_path / "out", gradients=str(stray))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--metric", "wanda", "--gradients", "g.safetensors"], "--metric wanda uses none"),
        (["--metric", "gblm", "--gradients", "g.json"], "expected a .safetensors file"),
    ],
)
@pytest.mark.parametrize("verb", ["prune", "deploy"])
def test_gradients_flag_misuse_is_refused_before_any_work(tiny_llama, tmp_path, capsys, argv, message, verb):
    out = tmp_path / "out"
    code = main([verb, str(tiny_llama), "--sparsity", "0.5", "--out", str(out), *argv])
    assert code != 0 and message in capsys.readouterr().err
    assert not out.exists()


def test_deploy_with_a_budget_takes_one_gradient_pass_for_its_plan_and_its_prune(tiny_llama, tmp_path, monkeypatch):
    """deploy --budget --metric gblm plans (every group pruned to 2:4 by gblm) and then prunes: without
    --gradients the norms are kept for the command in a temporary file beside the artifact, then removed."""
    import socket

    from mixsparse.pruner.io import gradient_file
    from mixsparse.serve.deploy import DeployJob, prepare
    from mixsparse.serve.server import ServeOptions

    passes = []
    computed = gradient_file.weight_gradients

    def counted(*args, **kwargs):
        passes.append(1)
        return computed(*args, **kwargs)

    monkeypatch.setattr(gradient_file, "weight_gradients", counted)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "served" / "art"
    job = PruneJob(model=str(tiny_llama), metric="gblm", out=str(out), calibration=CALIBRATION)
    deploy = DeployJob(prune=job, serve=ServeOptions(model="", port=port), budget=0.5)
    served, reused = prepare(deploy, Silent(), show=lambda *args: None)
    assert served == out and not reused and len(passes) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["art", "art.plan.json"]  # the norms' file is gone
    assert job.gradients is None

    # the weights are those of a prune with the same plan that computes the norms itself
    pipeline.prune(
        PruneJob(
            model=str(tiny_llama), metric="gblm", out=str(tmp_path / "ref"), plan=job.plan, calibration=CALIBRATION
        )
    )
    assert len(passes) == 2
    expected = weights(tmp_path / "ref")
    assert all(torch.equal(w, expected[n]) for n, w in weights(out).items())


def test_an_msp_gblm_plan_takes_its_fisher_traces_and_gradient_norms_from_one_pass(tiny_llama, tmp_path, monkeypatch):
    """The Fisher windows are the first of the calibration windows, so one backward per calibration window
    gives both, each bit-equal to what its own pass gives; a --gradients file is written from that pass."""
    from mixsparse.pruner.plans import sensitivity
    from mixsparse.pruner.plans.request import FisherOptions

    def request(**kw):
        return PlanRequest(
            str(tiny_llama),
            str(tmp_path / "p.json"),
            Research(0.6),
            metric="gblm",
            calibration=CALIBRATION,
            fisher=FisherOptions(samples=3),
            **kw,
        )

    passes = []
    backward = sensitivity._per_sample_backward

    def counted(adapter, windows, *args):
        passes.append(len(windows))
        return backward(adapter, windows, *args)

    monkeypatch.setattr(sensitivity, "_per_sample_backward", counted)
    kept = tmp_path / "grads.safetensors"
    shared = gather(request(gradients=str(kept)), Silent(), need_fisher=True, need_stats=False, need_gradients=True)
    assert passes == [4] and kept.exists()  # one pass over the 4 calibration windows; the Fisher takes 3
    assert shared.sensitivity.info["samples"] == 3 and shared.sensitivity.info["shared_with_gradient_norms"] == 4

    passes.clear()
    alone = gather(request(), Silent(), need_fisher=True, need_stats=False, need_gradients=False)
    assert shared.sensitivity.traces == alone.sensitivity.traces  # exactly, not approximately
    gradients = gather(request(), Silent(), need_fisher=False, need_stats=False, need_gradients=True).gradients
    assert passes == [3, 4]
    assert all(torch.equal(shared.gradients[n].norm, gradients[n].norm) for n in gradients)

    # norms already in a file are read, and the Fisher takes its own (shorter) pass
    passes.clear()
    gather(request(gradients=str(kept)), Silent(), need_fisher=True, need_stats=False, need_gradients=True)
    assert passes == [3]
