import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.pruner.core.masks import mask_nm
from mixsparse.runtime import cpu_sparse
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import Bitmask

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def random_sparse(rows, cols, sparsity, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=generator) + 0.01  # no accidental zeros among the kept
    dense[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    return dense.to(dtype)


def expected_mask(dense):
    """The kernel's reading of the mask, written out bit by bit: bit j of byte b <=> column 8b + j kept."""
    rows, cols = dense.shape
    mask = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            if dense[r, c] != 0:
                mask[r, c // 8] |= 1 << (c % 8)
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 8), (7, 13), (2, 17), (16, 64)])
def test_layout_is_the_kernels_and_round_trip_is_exact(dtype, shape):
    dense = random_sparse(*shape, 0.6, dtype)
    packed = Bitmask.pack(dense, "m")
    keep = dense != 0
    assert packed.values.dtype == dtype and packed.values.shape == (int(keep.sum()),)
    assert torch.equal(packed.values, torch.cat([dense[r][keep[r]] for r in range(shape[0])]))
    assert packed.mask.dtype == torch.uint8 and torch.equal(packed.mask, expected_mask(dense))
    assert packed.offsets.dtype == torch.int64
    assert packed.offsets.tolist() == [0, *keep.sum(1).cumsum(0).tolist()]
    assert torch.equal(packed.unpack(), dense) and packed.unpack().dtype == dtype
    again = Bitmask.from_tensors(packed.values.clone(), packed.mask.clone(), packed.offsets.clone(), shape, "m")
    assert torch.equal(again.unpack(), dense)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    sparsity=st.sampled_from([0.0, 0.1, 0.5, 0.7, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
    empty_row=st.booleans(),
    full_row=st.booleans(),
)
def test_round_trip_property(rows, cols, sparsity, seed, dtype, empty_row, full_row):
    dense = random_sparse(rows, cols, sparsity, dtype, seed)
    if empty_row:
        dense[0] = 0
    if full_row:
        dense[-1] = torch.randn(cols, generator=torch.Generator().manual_seed(seed)).abs().to(dtype) + 1
    packed = Bitmask.pack(dense)
    assert torch.equal(packed.unpack(), dense)
    assert packed.nnz == int((dense != 0).sum())
    checked = Bitmask.from_tensors(packed.values, packed.mask, packed.offsets, (rows, cols))
    assert torch.equal(checked.unpack(), dense)
    if cols % 8:  # padding bits of the last byte stay clear
        assert not (packed.mask[:, -1] >> (cols % 8)).any()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_weights_round_trip(n, m):
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(6, 24, generator=generator)
    dense = (dense * mask_nm(dense.abs(), n, m)).to(torch.bfloat16)
    assert torch.equal(Bitmask.pack(dense).unpack(), dense)


def test_bytes_follow_the_formula():
    dense = random_sparse(64, 256, 0.7, torch.bfloat16)
    packed = Bitmask.pack(dense)
    nnz = int((dense != 0).sum())
    assert packed.nbytes == nnz * 2 + 64 * 32 + 65 * 8 == Bitmask.stored_nbytes((64, 256), nnz, 2)
    assert packed.dense_nbytes == 64 * 256 * 2
    sparsity = 1 - nnz / dense.numel()
    per_weight = (1 - sparsity) * 2 + 1 / 8 + 8 / 256  # docs/design.md's bytes per weight, plus one offset per row
    assert packed.nbytes / dense.numel() == pytest.approx(per_weight, abs=8 / dense.numel())


def test_kernel_rows_are_the_same_tensors_both_ways():
    dense = random_sparse(5, 19, 0.5, torch.bfloat16)
    packed = Bitmask.pack(dense)
    rows = packed.to_rows()
    assert rows.shape == (5, 19) and rows.values is packed.values and rows.mask is packed.mask
    assert torch.equal(cpu_sparse.unpack(rows), dense)
    from_kernel = cpu_sparse.from_dense(dense, torch.float32)
    assert from_kernel.values.dtype == torch.float32
    assert torch.equal(Bitmask.from_rows(from_kernel).unpack(), dense.float())
    assert packed.to_rows(torch.float32).values.dtype == torch.float32


def test_pack_refuses_what_it_cannot_pack():
    with pytest.raises(MixsparseError, match="layers.0.q_proj: bitmask packing needs a 2-D weight"):
        Bitmask.pack(torch.zeros(4), "layers.0.q_proj")
    with pytest.raises(MixsparseError, match="m: bitmask packing needs a floating weight"):
        Bitmask.pack(torch.zeros(2, 3, dtype=torch.int32), "m")


def corrupt_cases():
    dense = random_sparse(4, 13, 0.5, torch.bfloat16)
    dense[1] = 0
    p = Bitmask.pack(dense)
    offsets_off_by_one = p.offsets.clone()
    offsets_off_by_one[2] += 1
    decreasing = p.offsets.clone()
    decreasing[1], decreasing[2] = decreasing[2] + 1, decreasing[1]
    past_the_end = p.mask.clone()
    past_the_end[3, -1] |= 0x80  # column 15 of a 13-column row
    flipped = p.mask.clone()
    flipped[0, 0] ^= 1
    return [
        ("short values", (p.values[:-1], p.mask, p.offsets, (4, 13)), "values hold .* but the mask keeps"),
        ("2-D values", (p.values.reshape(1, -1), p.mask, p.offsets, (4, 13)), "1-D floating tensor"),
        ("integer values", (p.values.to(torch.int16), p.mask, p.offsets, (4, 13)), "1-D floating tensor"),
        ("wrong shape", (p.values, p.mask, p.offsets, (4, 17)), "do not match shape"),
        ("wrong rows", (p.values, p.mask, p.offsets[:-1], (4, 13)), "do not match shape"),
        ("int32 offsets", (p.values, p.mask, p.offsets.int(), (4, 13)), "offsets int64"),
        ("int8 mask", (p.values, p.mask.to(torch.int8), p.offsets, (4, 13)), "mask must be uint8"),
        ("offset off by one", (p.values, p.mask, offsets_off_by_one, (4, 13)), "offsets disagree .* entry 2"),
        ("offsets not monotone", (p.values, p.mask, decreasing, (4, 13)), "offsets disagree .* entry 1"),
        ("bits past the input", (p.values, past_the_end, p.offsets, (4, 13)), "row 3 keeps columns past"),
        ("mask bit flipped", (p.values, flipped, p.offsets, (4, 13)), "offsets disagree"),
    ]


@pytest.mark.parametrize("case", corrupt_cases(), ids=lambda case: case[0])
def test_from_tensors_refuses_corrupt_inputs_naming_the_module(case):
    _, args, message = case
    with pytest.raises(MixsparseError, match=f"model.layers.1.mlp.down_proj: .*{message}"):
        Bitmask.from_tensors(*args, name="model.layers.1.mlp.down_proj")
