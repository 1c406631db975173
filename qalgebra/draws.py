"""Seeded random tensors for the checks' inputs: in the graph's layout, at memory speed.

The self-check runs each fused kernel on random inputs at the model's real shapes; a batch-8
activation has ten million elements. ``torch.randint`` draws one element per generator call
(49 ms for ``[8, 96, 112, 112]`` uint8); :func:`random_ints` fills int64 words over the full
64-bit range and reads them as bytes (11 ms), then folds them into the value range. The values
are laid out with the strides the graph recorded (a channels-last activation stays channels
last), so the kernel under check takes the path it takes in the model.

>>> g = torch.Generator().manual_seed(0)
>>> t = random_ints([2, 3, 4, 5], (60, 1, 15, 3), 0, 9, torch.uint8, g)
>>> t.stride(), int(t.min()) >= 0, int(t.max()) <= 9
((60, 1, 15, 3), True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["dense_strides", "random_floats", "random_ints"]

_BYTES = (torch.uint8, torch.int8)


def dense_strides(dims: Sequence[int], strides: Sequence[int] | None) -> tuple[int, ...] | None:
    """``strides`` if they lay ``dims`` out densely without overlap (a permutation of the
    contiguous layout, as channels last is), else None; size-1 dims may have any stride."""
    if strides is None or len(strides) != len(dims) or math.prod(dims) == 0:
        return None
    order = sorted(range(len(dims)), key=lambda i: (strides[i], dims[i]))
    expected = 1
    for i in order:
        if dims[i] == 1:
            continue
        if strides[i] != expected:
            return None
        expected *= dims[i]
    return tuple(strides)


def _laid_out(
    flat: torch.Tensor, dims: Sequence[int], strides: Sequence[int] | None
) -> torch.Tensor:
    dense = dense_strides(dims, strides)
    if dense is None:
        return flat.reshape(list(dims))
    return flat.as_strided(list(dims), list(dense))


def random_ints(
    dims: Sequence[int],
    strides: Sequence[int] | None,
    low: int,
    high: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    """Integers in ``[low, high]`` of ``dtype``, shaped ``dims`` with ``strides`` when dense."""
    if low > high:
        raise ValueError(f"empty range [{low}, {high}]")
    count = math.prod(dims)
    if dtype not in _BYTES or count == 0:
        flat = torch.randint(low, high + 1, (count,), generator=generator, dtype=dtype)
        return _laid_out(flat, dims, strides)
    info = torch.iinfo(dtype)
    if not info.min <= low <= high <= info.max:
        raise ValueError(f"[{low}, {high}] is outside {dtype}'s range")
    words = torch.empty((count + 7) // 8, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)  # every bit uniform
    raw = words.view(torch.uint8)[:count]
    span = high - low + 1
    if span == 256:  # the dtype's whole range: the bytes as they are
        flat = raw.view(dtype)
    elif span & (span - 1) == 0 and low >= 0:
        # a power of two (7-bit activations: 128): the low bits, the same values ``remainder_``
        # gives, 50x faster (it does not vectorize uint8: 3.6 ms for [8, 64, 56, 56])
        flat = raw.bitwise_and_(span - 1).add_(low).to(dtype)
    elif low >= 0:  # stays within uint8 arithmetic
        flat = raw.remainder_(span).add_(low).to(dtype)
    else:
        flat = raw.to(torch.int16).remainder_(span).add_(low).to(dtype)
    return _laid_out(flat, dims, strides)


def random_floats(
    dims: Sequence[int],
    strides: Sequence[int] | None,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    """Standard normal values of ``dtype``, shaped ``dims`` with ``strides`` when dense."""
    flat = torch.randn(math.prod(dims), generator=generator).to(dtype)
    return _laid_out(flat, dims, strides)
