"""Faster eager equivalents of ops the checks' references run: the same numbers, less work.

The checks evaluate each replaced subgraph eagerly as its reference; on batch-8 models most of
that time went to three ops:

- ``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` are written out of
  place (``clamp(round(x * (1/s)) + zp, qmin, qmax).to(dtype)``): each step allocates and
  writes a full-size float tensor. :data:`EAGER` maps them to functions running the same
  operations, in the same order and dtypes, on one scratch tensor: bit-exact and about 3x
  faster on a ``[8, 96, 112, 112]`` activation. Anything outside the plain case (another
  device, dtype or range) calls the op itself, so errors stay the op's own.
- ``quantized_decomposed.dequantize_per_channel`` (the weight side of each reference)
  subtracts the zero points in int64, a full-size tensor eight times the weight's bytes, before
  the float multiply. Where the scales are float32 and the zero points integers below 2**24,
  that difference is exact in float32 too, so one float32 scratch gives the same bits:
  8x faster on a ``[2048, 512, 1, 1]`` int8 weight (6.4 ms against 0.8 ms, one thread).
- ``prims._low_memory_max_pool_with_offsets`` computes the pooled values with
  ``max_pool2d_with_indices`` and then each maximum's offset in its window, with int64
  arithmetic over the whole output (80 ms of a 120 ms call on ``[8, 64, 112, 112]``). Where
  the graph reads only the values (:func:`values_only`), the offsets are not computed.

``tests/test_eager_ops.py`` compares each with the op itself.

>>> import torch
>>> qd = torch.ops.quantized_decomposed
>>> x = torch.tensor([-1.0, 0.26, 9.0])
>>> args = (0.5, 3, 0, 255, torch.uint8)
>>> torch.equal(EAGER[qd.quantize_per_tensor.default](x, *args),
...             qd.quantize_per_tensor.default(x, *args))
True
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import fx

from qalgebra.fusions.pointwise import LOW_MEMORY_MAX_POOL
from qalgebra.ops import quantized_decomposed as qd

__all__ = [
    "EAGER",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "eager_call",
    "quantize_per_tensor",
    "values_only",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTEGERS = (torch.uint8, torch.int8)


def _plain(tensor: object, scale: object, zero_point: object) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type == "cpu"
        and type(scale) is float
        and type(zero_point) is int
    )


def _in_range(quant_min: object, quant_max: object, dtype: object) -> bool:
    if not isinstance(dtype, torch.dtype) or dtype not in _INTEGERS:
        return False
    if type(quant_min) is not int or type(quant_max) is not int:
        return False
    info = torch.iinfo(dtype)
    return info.min <= quant_min <= quant_max <= info.max


def quantize_per_tensor(
    input: torch.Tensor,
    scale: float,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``quantized_decomposed.quantize_per_tensor.default``, in place on one fp32 scratch."""
    if not (
        _plain(input, scale, zero_point)
        and input.dtype in _FLOATS
        and _in_range(quant_min, quant_max, dtype)
    ):
        return qd.quantize_per_tensor.default(input, scale, zero_point, quant_min, quant_max, dtype)
    scratch = input.to(torch.float32) * (1.0 / scale)
    scratch.round_()
    scratch.add_(zero_point)
    scratch.clamp_(quant_min, quant_max)
    return scratch.to(dtype)


def dequantize_per_tensor(
    input: torch.Tensor,
    scale: float,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``quantized_decomposed.dequantize_per_tensor.default``, in place on one float scratch."""
    target = torch.float32 if out_dtype is None else out_dtype
    if not (
        _plain(input, scale, zero_point)
        and input.dtype == dtype
        and _in_range(quant_min, quant_max, dtype)
        and target in _FLOATS
    ):
        return qd.dequantize_per_tensor.default(
            input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=out_dtype
        )
    scratch = input.to(target)
    scratch.sub_(zero_point)
    scratch.mul_(scale)
    return scratch


#: Integers up to this magnitude are exact in float32 (a 24-bit significand).
_EXACT_IN_FLOAT32 = 2**24


def _exact_zero_points(zero_points: torch.Tensor | None, channels: int) -> bool:
    if zero_points is None:
        return True
    return (
        zero_points.device.type == "cpu"
        and not zero_points.is_floating_point()
        and not zero_points.is_complex()
        and zero_points.dim() == 1
        and zero_points.shape[0] == channels
        and (zero_points.numel() == 0 or int(zero_points.abs().max()) < _EXACT_IN_FLOAT32)
    )


def dequantize_per_channel(
    input: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    axis: int,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``quantized_decomposed.dequantize_per_channel.default`` on one float32 scratch.

    The op computes ``(input - zero_points) * scales`` with the difference in int64; here the
    difference is taken in float32, exact for 8-bit values and zero points below 2**24, and
    the product is the same float32 multiply. Anything else calls the op itself.
    """
    target = torch.float32 if out_dtype is None else out_dtype
    if not (
        isinstance(input, torch.Tensor)
        and input.device.type == "cpu"
        and input.dtype == dtype
        and input.numel() > 0  # an empty one: the op's own strides
        and _in_range(quant_min, quant_max, dtype)
        and type(axis) is int
        and 0 <= axis < input.dim()
        and isinstance(scales, torch.Tensor)
        and scales.device.type == "cpu"
        and scales.dtype == torch.float32
        and scales.dim() == 1
        and scales.shape[0] == input.shape[axis]
        and _exact_zero_points(zero_points, input.shape[axis])
        and target in _FLOATS
    ):
        return qd.dequantize_per_channel.default(
            input, scales, zero_points, axis, quant_min, quant_max, dtype, out_dtype=out_dtype
        )
    shape = [1] * input.dim()
    shape[axis] = input.shape[axis]
    scratch = input.to(torch.float32)
    if zero_points is not None:
        scratch.sub_(zero_points.view(shape))
    scratch.mul_(scales.view(shape))
    return scratch if target == torch.float32 else scratch.to(target)


def _max_pool_values(
    input: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, None]:
    """``_low_memory_max_pool_with_offsets``'s values (the offsets left out: nobody reads
    them), from the aten op that computes them for it."""
    pool = (
        torch.ops.aten.max_pool2d_with_indices
        if len(kernel_size) == 2
        else torch.ops.aten.max_pool3d_with_indices
    )
    values, _ = pool.default(input, kernel_size, stride, padding, dilation, ceil_mode)
    return values, None


def values_only(node: fx.Node) -> Callable[..., object] | None:
    """A cheaper equivalent of ``node``'s op given what the graph reads of its outputs: the
    values alone of a low-memory max pool whose offsets no user reads; else None."""
    if node.target != LOW_MEMORY_MAX_POOL:  # by name: registered once torch._inductor loads
        return None
    if all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
        return _max_pool_values
    return None


def eager_call(node: fx.Node) -> Callable[..., object]:
    """What :func:`qalgebra.trial.evaluate` calls for ``node``: its op, or a faster equivalent
    computing the same numbers (:func:`values_only`, :data:`EAGER`)."""
    target = cast(Callable[..., object], node.target)
    faster = values_only(node)
    return EAGER.get(target, target) if faster is None else faster


#: Op overload -> its in-place equivalent, for :func:`qalgebra.trial.evaluate`.
EAGER: Mapping[Any, Callable[..., torch.Tensor]] = MappingProxyType(
    {
        qd.quantize_per_tensor.default: quantize_per_tensor,
        qd.dequantize_per_tensor.default: dequantize_per_tensor,
        qd.dequantize_per_channel.default: dequantize_per_channel,
    }
)
