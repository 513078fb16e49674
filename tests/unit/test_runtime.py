"""Backends, the registered op, the weight object and SparseLinear on CPU (CUDA kernels: tests/gpu)."""

import pytest
import torch

from mixsparse.runtime import kernels, ops
from mixsparse.runtime.formats import Packed24
from mixsparse.runtime.sparse_linear import SparseLinear, candidates, prepare, sparse_linear
from mixsparse.runtime.weight import BACKEND_IDS, SparseWeight


def random_packed(out_features=64, in_features=128, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randn(out_features, in_features // 4, 4, generator=generator)
    keep = torch.zeros_like(groups).scatter_(-1, groups.abs().topk(2, dim=-1).indices, 1.0)
    return Packed24.pack((groups * keep).reshape(out_features, in_features).to(dtype))


def test_cpu_runs_the_native_kernel_with_the_dense_fallback_behind_it():
    assert kernels.available("cpu") in ((kernels.CPU_SPARSE, kernels.DENSE), (kernels.DENSE,))
    assert candidates(torch.device("cpu"), (64, 128), torch.int8) == (kernels.DENSE,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_on_the_dense_fallback_is_exact(dtype):
    packed = random_packed(dtype=dtype)
    bias = torch.randn(64).to(dtype)
    module = SparseLinear(prepare(packed, "cpu", backend=kernels.DENSE), bias)
    x = torch.randn(3, 5, 128).to(dtype)
    assert module.backend == "dense" and module.resident_bytes == packed.dense_nbytes
    assert torch.equal(module(x), torch.nn.functional.linear(x, packed.unpack(), bias))


def test_op_has_a_fake_implementation_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(7, 3, 128), torch.empty(64, 128)
        y = ops.sparse_linear(x, w, None, None, 64, BACKEND_IDS[kernels.DENSE])
        assert sparse_linear(x, SparseWeight(kernels.DENSE, w, (64, 128))).shape == (7, 3, 64)
    assert y.shape == (7, 3, 64)
    torch.library.opcheck(
        ops.sparse_linear,
        (torch.randn(4, 128), torch.randn(64, 128), None, torch.randn(64), 64, BACKEND_IDS[kernels.DENSE]),
    )


def test_module_compiles_without_graph_breaks():
    module = SparseLinear(prepare(random_packed(), "cpu", backend=kernels.DENSE))
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    x = torch.randn(2, 128)
    assert torch.equal(compiled(x), module(x))


def test_a_moved_module_runs_on_its_moved_tensors():
    """.to() replaces the buffers: the weight object the forward reads must follow them."""
    packed = random_packed()
    module = SparseLinear(prepare(packed, "cpu", backend=kernels.DENSE), torch.randn(64))
    module.to(torch.float64)
    assert module.sparse_weight.values is module.values and module.values.dtype == torch.float64
    x = torch.randn(2, 128, dtype=torch.float64)
    assert torch.equal(module(x), torch.nn.functional.linear(x, packed.unpack().double(), module.bias))


def test_a_weight_names_what_its_backend_needs():
    values = torch.randn(8, 16)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        SparseWeight("tpu", values, (8, 16))
    with pytest.raises(ValueError, match="a cpu_sparse weight needs mask, offsets"):
        SparseWeight(kernels.CPU_SPARSE, values.reshape(-1), (8, 16))
    with pytest.raises(ValueError, match="a cutlass weight needs meta"):
        SparseWeight(kernels.CUTLASS, values, (8, 16))
    weight = SparseWeight(kernels.DENSE, values, (8, 16))
    assert (weight.out_features, weight.in_features, weight.nbytes) == (8, 16, 8 * 16 * 4)


def test_shape_limits():
    assert kernels.shape_supported(576, 576) and kernels.shape_supported(1536, 576)
    assert not kernels.shape_supported(576, 100) and not kernels.shape_supported(20, 128)


def test_an_unavailable_backend_is_refused():
    with pytest.raises(ValueError, match="not available here"):
        prepare(random_packed(), "cpu", backend="cusparselt")
