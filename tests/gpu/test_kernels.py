"""2:4 kernels on CUDA: numerics against a dense matmul of the unpacked weight, and memory.

Llama-7B/8B-like shapes, token counts 1..4096. Skipped without a sm80+ GPU (tests/gpu/conftest.py).
"""

import pytest
import torch

from mixsparse.runtime import kernels
from mixsparse.runtime.formats import Packed24
from mixsparse.runtime.sparse_linear import SparseLinear, prepare

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096)]
TOKENS = [1, 7, 16, 128, 1000, 4096]


def random_24(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randn(out_features, in_features // 4, 4, generator=generator)
    keep = torch.zeros_like(groups).scatter_(-1, groups.abs().topk(2, dim=-1).indices, 1.0)
    return Packed24.pack((groups * keep).reshape(out_features, in_features).to(torch.bfloat16))


def test_sparse_backends_are_available():
    assert kernels.CUSPARSELT in kernels.available("cuda:0") or kernels.CUTLASS in kernels.available("cuda:0")


@pytest.mark.parametrize("backend", [kernels.CUSPARSELT, kernels.CUTLASS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_dense_matmul_in_bf16_tolerance(backend, shape):
    if backend not in kernels.available("cuda:0"):
        pytest.skip(f"{backend} unavailable here")
    packed = random_24(*shape)
    module = SparseLinear(prepare(packed, "cuda", torch.bfloat16, backend=backend))
    dense = packed.unpack().cuda()
    for tokens in TOKENS:
        x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
        got = module(x).float()
        want = x.float() @ dense.float().T
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-2, (tokens, error)


@pytest.mark.parametrize("backend", [kernels.CUSPARSELT, kernels.CUTLASS])
def test_prepared_weight_is_at_most_0_6_of_dense(backend):
    if backend not in kernels.available("cuda:0"):
        pytest.skip(f"{backend} unavailable here")
    packed = random_24(4096, 4096)
    prepared = prepare(packed, "cuda", torch.bfloat16, backend=backend)
    assert prepared.nbytes <= 0.6 * packed.dense_nbytes
    assert (prepared.meta is not None) == (backend == kernels.CUTLASS)  # cuSPARSELt keeps its index inside values
    assert prepared.mask is None and prepared.offsets is None


def test_op_captures_in_a_cuda_graph():
    packed = random_24(4096, 4096)
    module = SparseLinear(prepare(packed, "cuda", torch.bfloat16))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    module(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(y.float(), module(x).float(), rtol=1e-2, atol=1e-2)


def test_shapes_below_the_minimum_fall_back_to_dense(caplog):
    packed = random_24(40, 96)
    assert prepare(packed, "cuda", torch.bfloat16).backend == kernels.DENSE
