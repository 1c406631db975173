"""qalgebra.draws: the checks' random inputs hold the values and layout the graph says."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalgebra.draws import dense_strides, random_floats, random_ints


def _contiguous(dims: tuple[int, ...]) -> tuple[int, ...]:
    return torch.empty(dims).stride()


def _channels_last(dims: tuple[int, int, int, int]) -> tuple[int, ...]:
    return torch.empty(dims).contiguous(memory_format=torch.channels_last).stride()


def test_dense_layouts_are_recognised_and_others_are_not() -> None:
    assert dense_strides((2, 3, 4, 5), _contiguous((2, 3, 4, 5))) == (60, 20, 5, 1)
    assert dense_strides((2, 3, 4, 5), _channels_last((2, 3, 4, 5))) == (60, 1, 15, 3)
    assert dense_strides((2, 3), (1, 2)) == (1, 2)  # transposed
    assert dense_strides((2, 1, 3), (3, 99, 1)) == (3, 99, 1)  # a size-1 dim's stride is free
    assert dense_strides((2, 3), (4, 1)) is None  # a slice: gaps between rows
    assert dense_strides((2, 3), (0, 1)) is None  # expanded: rows overlap
    assert dense_strides((2, 3), (3, 3)) is None
    assert dense_strides((2, 3), None) is None
    assert dense_strides((2, 3), (3,)) is None
    assert dense_strides((0, 3), (3, 1)) is None  # nothing to lay out


@settings(max_examples=80, deadline=None)
@given(
    dims=st.tuples(*[st.integers(1, 6)] * 4),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32]),
    data=st.data(),
)
def test_integers_stay_in_range_and_take_the_layout(
    dims: tuple[int, int, int, int], channels_last: bool, dtype: torch.dtype, data: st.DataObject
) -> None:
    info = torch.iinfo(dtype)
    low = data.draw(st.integers(max(info.min, -1000), min(info.max, 1000)), label="low")
    high = data.draw(st.integers(low, min(info.max, low + 300)), label="high")
    strides = _channels_last(dims) if channels_last else _contiguous(dims)
    t = random_ints(dims, strides, low, high, dtype, torch.Generator().manual_seed(1))
    assert t.dtype == dtype and tuple(t.shape) == dims
    assert [s for n, s in zip(dims, t.stride(), strict=True) if n > 1] == [
        s for n, s in zip(dims, strides, strict=True) if n > 1
    ]
    assert low <= int(t.min()) and int(t.max()) <= high


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(torch.uint8, 0, 255), (torch.int8, -128, 127), (torch.uint8, 0, 127), (torch.int8, -3, 4)],
)
def test_every_value_of_the_range_is_drawn(dtype: torch.dtype, low: int, high: int) -> None:
    t = random_ints([64, 1000], None, low, high, dtype, torch.Generator().manual_seed(0))
    counts = torch.bincount(t.to(torch.int64).flatten() - low, minlength=high - low + 1)
    assert len(counts) == high - low + 1
    expected = t.numel() / (high - low + 1)
    # uniform to within a few percent (folding 256 byte values onto the range adds <= 1/span)
    assert float(counts.min()) > 0.8 * expected and float(counts.max()) < 1.2 * expected


@pytest.mark.parametrize(("dtype", "low", "high"), [(torch.uint8, 0, 127), (torch.uint8, 3, 66)])
def test_a_power_of_two_range_folds_the_seeded_bytes_as_a_remainder_would(
    dtype: torch.dtype, low: int, high: int
) -> None:
    """The low bits taken for a power-of-two span are the values ``bytes % span`` gives."""
    count = 1000
    words = torch.empty((count + 7) // 8, dtype=torch.int64)
    words.random_(-(2**63), None, generator=torch.Generator().manual_seed(3))
    raw = words.view(torch.uint8)[:count].to(torch.int64)
    expected = (raw % (high - low + 1) + low).to(dtype)
    t = random_ints([count], None, low, high, dtype, torch.Generator().manual_seed(3))
    assert torch.equal(t, expected)


def test_draws_are_seeded() -> None:
    def draw(seed: int) -> torch.Tensor:
        return random_ints(
            [3, 50], None, -128, 127, torch.int8, torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_a_layout_with_gaps_is_drawn_contiguous() -> None:
    t = random_ints([2, 3], (4, 1), 0, 9, torch.uint8, torch.Generator())
    assert t.stride() == (3, 1)


def test_bad_ranges_are_errors() -> None:
    with pytest.raises(ValueError, match="empty range"):
        random_ints([2], None, 5, 4, torch.uint8, torch.Generator())
    with pytest.raises(ValueError, match="outside"):
        random_ints([2], None, -1, 4, torch.uint8, torch.Generator())


def test_floats_are_standard_normal_in_the_layout() -> None:
    dims = (4, 8, 16, 16)
    t = random_floats(dims, _channels_last(dims), torch.bfloat16, torch.Generator().manual_seed(0))
    assert t.dtype == torch.bfloat16 and t.is_contiguous(memory_format=torch.channels_last)
    values = t.float()
    assert abs(float(values.mean())) < 0.1 and abs(float(values.std()) - 1) < 0.1
    assert math.isfinite(float(values.abs().max()))
