import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.pruner.core.masks import mask_nm
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import Packed24


def random_24(rows, cols, dtype, seed=0, extra_zeros=0.1):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=generator)
    dense = dense * mask_nm(torch.rand(rows, cols, generator=generator), 2, 4)
    dense[torch.rand(rows, cols, generator=generator) < extra_zeros] = 0  # groups with fewer than 2 non-zeros
    return dense.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (7, 20), (16, 64), (5, 1540)])
def test_round_trip_is_bit_exact(dtype, shape):
    dense = random_24(*shape, dtype)
    packed = Packed24.pack(dense)
    assert packed.values.shape == (shape[0], shape[1] // 2) and packed.values.dtype == dtype
    assert packed.meta.shape == (shape[0], (shape[1] + 7) // 8) and packed.meta.dtype == torch.uint8
    restored = packed.unpack()
    assert restored.dtype == dtype
    assert torch.equal(restored, dense)
    again = Packed24.from_tensors(packed.values.clone(), packed.meta.clone(), shape)
    assert torch.equal(again.unpack(), dense)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_round_trip_property(rows, groups, seed, dtype):
    dense = random_24(rows, 4 * groups, dtype, seed, extra_zeros=0.3)
    assert torch.equal(Packed24.pack(dense).unpack(), dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bytes_are_56_25_percent_of_dense(dtype):
    packed = Packed24.pack(random_24(64, 256, dtype))
    assert packed.nbytes / packed.dense_nbytes == pytest.approx(0.5625)


def test_pack_refuses_a_group_with_three_non_zeros_and_names_it():
    dense = random_24(4, 16, torch.float32)
    dense[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(MixsparseError, match=r"layers\.0\.q_proj.*row 2, columns 8\.\.11"):
        Packed24.pack(dense, "layers.0.q_proj")


def test_pack_refuses_an_input_size_that_is_not_a_multiple_of_4():
    with pytest.raises(MixsparseError, match="not a multiple of 4"):
        Packed24.pack(torch.zeros(2, 6), "m")


def test_from_tensors_rejects_wrong_shapes_and_corrupt_indices():
    packed = Packed24.pack(random_24(4, 16, torch.bfloat16))
    with pytest.raises(MixsparseError, match="do not match shape"):
        Packed24.from_tensors(packed.values, packed.meta, (4, 24), "m")
    corrupt = packed.meta.clone()
    corrupt[0, 0] = 0  # i0 == i1 == 0
    with pytest.raises(MixsparseError, match="invalid 2:4 indices"):
        Packed24.from_tensors(packed.values, corrupt, (4, 16), "m")
