"""The reference engine equals the plain dense model with the unpacked weights."""

import pytest
import torch

from mixsparse.pruner import pipeline
from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime import kernels
from mixsparse.runtime.formats.hf import load_dense
from mixsparse.runtime.reference import load_reference, resident_weight_bytes
from mixsparse.runtime.sparse_linear import SparseLinear


@pytest.fixture(scope="module")
def artifact_24(tiny_llama, tmp_path_factory):
    from mixsparse.pruner.io.data import CalibrationProtocol

    out = tmp_path_factory.mktemp("ref") / "art"
    pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="sparsegpt",
            sparsity="2:4",
            out=str(out),
            calibration=CalibrationProtocol(samples=4, seqlen=32),
        )
    )
    return out


def test_reference_logits_equal_the_unpacked_dense_model(artifact_24):
    """On the dense fallback bit for bit; on the native CPU kernel (weights kept packed) to fp32 rounding."""
    dense, _ = load_dense(artifact_24, torch.float32)
    ids = torch.randint(0, 384, (2, 17))
    with torch.no_grad():
        want = dense(ids).logits
    reference, config, backends = load_reference(artifact_24, dtype=torch.float32, backend=kernels.DENSE)
    assert len(backends) == 14 and set(backends.values()) == {kernels.DENSE}
    assert isinstance(reference.get_submodule("model.layers.1.mlp.down_proj"), SparseLinear)
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, want)
    assert resident_weight_bytes(reference) == resident_weight_bytes(dense)
    if kernels.CPU_SPARSE not in kernels.available("cpu"):
        return
    reference, _, backends = load_reference(artifact_24, dtype=torch.float32)
    assert set(backends.values()) == {kernels.CPU_SPARSE}
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, want, rtol=1e-4, atol=1e-4)
    pruned_bytes = sum(dense.get_submodule(name).weight.numel() * 4 for name in backends)
    saved = resident_weight_bytes(dense) - resident_weight_bytes(reference)
    # fp32 values of half the weights + 1 mask bit per weight + row offsets: ~0.53 of every pruned linear's bytes
    assert 0.4 * pruned_bytes < saved < 0.5 * pruned_bytes


def test_reference_generates_like_the_dense_model(artifact_24):
    reference, _, _ = load_reference(artifact_24, dtype=torch.float32)
    dense, _ = load_dense(artifact_24, torch.float32)
    ids = torch.tensor([[5, 17, 42, 7]])
    a = reference.generate(ids, max_new_tokens=12, do_sample=False)
    b = dense.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
