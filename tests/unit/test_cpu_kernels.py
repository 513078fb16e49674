"""The native CPU kernels (torch.ops.mixsparse_cpu.sparse_linear) against F.linear on the unpacked weight.

Every variant this CPU can run (portable always, avx512 where the CPU reports it) and both paths (streaming
rows for few tokens, dense tiles + GEMM for many) are driven through the kernel's test hook, and the default
variant and path through the runtime's entry point (``sparse_linear``), over random shapes, token counts,
dtypes, sparsities and bias. The fallback when the kernels cannot run is checked in a fresh process, where
its one warning is observable.
"""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mixsparse.pruner.core.masks import mask_nm
from mixsparse.runtime import cpu_sparse, kernels
from mixsparse.runtime.formats import Bitmask, Packed24
from mixsparse.runtime.sparse_linear import SparseLinear, prepare, sparse_linear

ext, why_not = cpu_sparse.load()
needs_kernels = pytest.mark.skipif(ext is None, reason=f"native CPU kernels unavailable: {why_not}")
VARIANTS = ext.variants() if ext is not None else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def sparse_weight(rows, cols, sparsity, dtype, generator, pattern="unstructured"):
    dense = torch.randn(rows, cols, generator=generator)
    if pattern == "2:4":
        dense = dense * mask_nm(torch.rand(rows, cols, generator=generator), 2, 4)
    else:
        dense[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    return dense.to(dtype)


def assert_matches_dense(y, x, weight, bias):
    """|y - exact| within one rounding of the output plus fp32 accumulation error (bound from |x|·|W|ᵀ)."""
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = x.double().abs() @ weight.double().abs().T
    allowed = 2 * UNIT_ROUNDOFF[y.dtype] * exact.abs() + 1e-5 * scale + 1e-30
    error = (y.double() - exact).abs()
    worst = (error / allowed).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the allowed bound (dtype {y.dtype}, shape {tuple(y.shape)})"


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(
    tokens=st.one_of(st.integers(1, 40), st.integers(41, 2048)),
    rows=st.integers(1, 70),
    cols=st.integers(1, 200),
    sparsity=st.sampled_from([0.0, 0.5, 0.7, 0.9, 1.0]),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    variant=st.sampled_from(VARIANTS or ["portable"]),
    path=st.sampled_from(["auto", "rows", "tiles"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_f_linear_on_the_unpacked_weight(
    tokens, rows, cols, sparsity, dtype, with_bias, variant, path, seed
):
    generator = torch.Generator().manual_seed(seed)
    if tokens > 256:  # keep the example cheap: long token counts on small layers
        rows, cols = min(rows, 24), min(cols, 96)
    weight = sparse_weight(rows, cols, sparsity, dtype, generator)
    x = torch.randn(tokens, cols, generator=generator).to(dtype)
    bias = torch.randn(rows, generator=generator).to(dtype) if with_bias else None
    compressed = cpu_sparse.from_dense(weight)
    tile_from = {"auto": -1, "rows": 1 << 30, "tiles": 0}[path]
    if path == "auto" and variant == ext.isa():  # what the runtime runs: through its entry point
        y = sparse_linear(x, compressed, bias)
    else:
        y = ext.sparse_linear_with(
            variant, x, compressed.values, compressed.mask, compressed.offsets, bias, rows, tile_min_tokens=tile_from
        )
    assert y.dtype == dtype and y.shape == (tokens, rows)
    assert_matches_dense(y, x, weight, bias)


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [11, 12, 13, 40, 63])
@pytest.mark.parametrize("rows, cols", [(5, 33), (8, 100), (13, 577), (4, 32)])
def test_streaming_path_at_panel_token_counts(variant, tokens, rows, cols):
    """Token counts where the AVX-512 kernel switches from re-expanding rows to a dense panel, with K tails."""
    generator = torch.Generator().manual_seed(tokens * cols)
    weight = sparse_weight(rows, cols, 0.6, torch.bfloat16, generator)
    x = torch.randn(tokens, cols, generator=generator).to(torch.bfloat16)
    bias = torch.randn(rows, generator=generator).to(torch.bfloat16)
    compressed = cpu_sparse.from_dense(weight)
    y = ext.sparse_linear_with(
        variant, x, compressed.values, compressed.mask, compressed.offsets, bias, rows, tile_min_tokens=1 << 30
    )
    assert_matches_dense(y, x, weight, bias)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 16, 31, 32, 33, 255, 2048])
def test_2of4_layers_of_model_shapes(dtype, tokens):
    """The default model's shapes (576 / 1536 inputs) through the op the runtime calls, bias and no bias."""
    generator = torch.Generator().manual_seed(tokens)
    for rows, cols in ((192, 576), (64, 1536)):
        weight = sparse_weight(rows, cols, 0.5, dtype, generator, pattern="2:4")
        packed = Packed24.pack(weight)
        compressed = cpu_sparse.from_packed24(packed.values, packed.meta, packed.shape)
        x = torch.randn(2, tokens, cols, generator=generator).to(dtype)[:, : (tokens + 1) // 2]  # odd M, a view
        bias = torch.randn(rows, generator=generator).to(dtype)
        for b in (None, bias):
            y = sparse_linear(x, compressed, b)
            assert y.shape == (*x.shape[:-1], rows)
            assert_matches_dense(y.reshape(-1, rows), x.reshape(-1, cols), weight, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (7, 20), (16, 64), (5, 1540)])
def test_packed24_converts_without_unpacking_and_round_trips(dtype, shape):
    generator = torch.Generator().manual_seed(1)
    weight = sparse_weight(*shape, 0.5, dtype, generator, pattern="2:4")
    weight[torch.rand(shape, generator=generator) < 0.1] = 0  # groups with fewer than 2 non-zeros
    packed = Packed24.pack(weight)
    compressed = cpu_sparse.from_packed24(packed.values, packed.meta, packed.shape)
    assert compressed.values.data_ptr() == packed.values.data_ptr()  # the packed values, not a copy
    assert torch.equal(cpu_sparse.unpack(compressed), weight)
    popcount = sum(((compressed.mask >> i) & 1).sum(1) for i in range(8))
    assert torch.equal(popcount, compressed.offsets.diff())  # every row: as many mask bits as values
    assert compressed.nbytes == packed.nbytes + 8 * (shape[0] + 1)


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 33, 100])
def test_bitmask_round_trip_is_exact(cols):
    weight = sparse_weight(9, cols, 0.6, torch.bfloat16, torch.Generator().manual_seed(cols))
    compressed = cpu_sparse.from_dense(weight)
    assert compressed.mask.shape == (9, (cols + 7) // 8)
    assert torch.equal(cpu_sparse.unpack(compressed), weight)


@needs_kernels
def test_rows_are_bitwise_identical_across_thread_counts():
    """One thread computes each output of the streaming path: results cannot depend on the thread count."""
    generator = torch.Generator().manual_seed(0)
    weight = sparse_weight(512, 576, 0.5, torch.bfloat16, generator, pattern="2:4")
    compressed = cpu_sparse.from_dense(weight)
    x = torch.randn(3, 576, generator=generator).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparse_linear(x, compressed)
        torch.set_num_threads(2)
        two = sparse_linear(x, compressed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernels
def test_bad_arguments_name_the_argument():
    compressed = cpu_sparse.from_dense(sparse_weight(8, 16, 0.5, torch.float32, torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="values are Float but x is BFloat16"):
        sparse_linear(torch.randn(2, 16).to(torch.bfloat16), compressed)
    with pytest.raises(RuntimeError, match=r"mask must be uint8 of shape \[8, 3\]"):
        sparse_linear(torch.randn(2, 20), compressed)
    with pytest.raises(RuntimeError, match="bias must be 1-D of out_features = 8"):
        sparse_linear(torch.randn(2, 16), compressed, torch.randn(7))


@needs_kernels
def test_op_has_a_fake_implementation_and_passes_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    compressed = cpu_sparse.from_dense(sparse_weight(64, 128, 0.5, torch.float32, torch.Generator().manual_seed(0)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = sparse_linear(torch.empty(7, 3, 128), compressed)
    assert y.shape == (7, 3, 64)
    torch.library.opcheck(
        torch.ops.mixsparse_cpu.sparse_linear.default,
        (torch.randn(4, 128), compressed.values, compressed.mask, compressed.offsets, torch.randn(64), 64),
    )


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_on_cpu_keeps_the_weight_compressed(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = sparse_weight(64, 128, 0.5, dtype, generator, pattern="2:4")
    packed = Packed24.pack(weight)
    module = SparseLinear(prepare(packed, "cpu"))
    assert module.backend == kernels.CPU_SPARSE
    assert module.resident_bytes == packed.nbytes + 8 * 65  # values + mask (= meta's size) + row offsets
    assert not any(t.numel() == weight.numel() for t in module.buffers())  # no dense copy anywhere
    x = torch.randn(5, 128, generator=generator).to(dtype)
    assert_matches_dense(module(x), x, weight, None)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), module(x))


FALLBACK_SCRIPT = """
import logging, warnings, torch
logging.basicConfig(level=logging.WARNING, format="WARN %(message)s")
{setup}
from mixsparse.runtime.formats import Packed24
from mixsparse.runtime.sparse_linear import SparseLinear, prepare
from mixsparse.pruner.core.masks import mask_nm
w = torch.randn(32, 64) * mask_nm(torch.rand(32, 64), 2, 4)
packed = Packed24.pack(w)
modules = [SparseLinear(prepare(packed, "cpu")) for _ in range(3)]
x = torch.randn(4, 64)
assert all(m.backend == "dense" for m in modules), [m.backend for m in modules]
assert all(torch.equal(m(x), torch.nn.functional.linear(x, packed.unpack())) for m in modules)
print("FALLBACK OK")
"""


@pytest.mark.parametrize(
    "setup, reason",
    [
        ("import os; os.environ['MIXSPARSE_CPU_KERNELS'] = '0'", "MIXSPARSE_CPU_KERNELS=0"),
        ("import sys; sys.modules['mixsparse.runtime._cpu_sparse'] = None", "the native CPU kernels are not built"),
    ],
)
def test_without_the_kernels_the_exact_dense_fallback_runs_with_one_warning(setup, reason):
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT.format(setup=setup)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "FALLBACK OK" in run.stdout
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARN")]
    assert len(warnings) == 1 and "exact dense fallback" in warnings[0] and reason in warnings[0], warnings


class RecordOps(TorchDispatchMode):
    """The ops a call dispatches, outermost only (an op's own inner ops run with the mode off)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bitmask", "2:4", "dense"])
def test_the_entry_point_runs_every_kind_of_weight_like_f_linear(kind, dtype):
    """A bitmask and a 2:4 weight run on the CPU kernel's op, a dense-fallback weight on the registered op."""
    if kind != "dense" and ext is None:
        pytest.skip(f"native CPU kernels unavailable: {why_not}")
    generator = torch.Generator().manual_seed(7)
    if kind == "bitmask":
        dense = sparse_weight(48, 100, 0.7, dtype, generator)
        weight = prepare(Bitmask.pack(dense), "cpu")
    else:
        dense = sparse_weight(48, 96, 0.5, dtype, generator, pattern="2:4")
        weight = prepare(Packed24.pack(dense), "cpu", backend="auto" if kind == "2:4" else kernels.DENSE)
    expected = {"bitmask": kernels.CPU_SPARSE, "2:4": kernels.CPU_SPARSE, "dense": kernels.DENSE}[kind]
    assert weight.backend == expected and weight.shape == tuple(dense.shape)
    assert weight.meta is None  # the CPU kernel reads a 2:4 weight as a bitmask
    assert (weight.mask is None) == (weight.offsets is None) == (kind == "dense")
    x = torch.randn(3, 5, dense.shape[1], generator=generator).to(dtype)
    for bias in (None, torch.randn(48, generator=generator).to(dtype)):
        with RecordOps() as record:
            y = sparse_linear(x, weight, bias)
        assert record.names == ["mixsparse::sparse_linear" if kind == "dense" else "mixsparse_cpu::sparse_linear"]
        assert y.shape == (3, 5, 48) and y.dtype == dtype
        if kind == "dense":
            assert torch.equal(y, torch.nn.functional.linear(x, dense, bias))
        else:
            assert_matches_dense(y.reshape(15, 48), x.reshape(15, -1), dense, bias)
        assert torch.equal(SparseLinear(weight, bias)(x), y)


def test_joined_members_are_one_weight_with_the_members_rows():
    """vLLM's fused GEMMs: members of different sparsities joined into one compressed weight, exactly."""
    generator = torch.Generator().manual_seed(3)
    members = [
        sparse_weight(rows, 40, sparsity, torch.bfloat16, generator)
        for rows, sparsity in ((8, 0.7), (4, 0.0), (6, 0.5))
    ]
    joined = cpu_sparse.join([cpu_sparse.from_dense(w) for w in members])
    assert joined.shape == (18, 40)
    assert torch.equal(cpu_sparse.unpack(joined), torch.cat(members))
    if ext is not None:
        x = torch.randn(3, 40, generator=generator).to(torch.bfloat16)
        assert_matches_dense(sparse_linear(x, joined), x, torch.cat(members), None)
