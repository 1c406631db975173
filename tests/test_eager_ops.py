"""qalgebra.eager_ops: the faster eager equivalents compute what the ops compute, bit for bit.

The checks' references run through these functions, so a difference here would move every
self-check verdict; each case is compared with the op itself on the same tensor.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from qalgebra import eager_ops
from qalgebra.eager_ops import (
    EAGER,
    dequantize_per_channel,
    dequantize_per_tensor,
    quantize_per_tensor,
    values_only,
)
from qalgebra.ops import quantized_decomposed as qd
from qalgebra.trial import evaluate

_LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(1, 3)
    if layout == "sliced":
        return t[:, 1:]
    return t


def _layout(t: torch.Tensor) -> list[tuple[int, int]]:
    """Size and stride of each dim that has more than one element (the others' strides do
    not address memory)."""
    return [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1]


@dataclass(frozen=True)
class _Case:
    """What both ops' properties draw: a seeded shape in a layout, qparams and a range."""

    seed: int
    shape: tuple[int, ...]
    layout: str
    scale: float
    zero_point: int
    dtype: torch.dtype
    low: int
    high: int

    @property
    def args(self) -> tuple[float, int, int, int, torch.dtype]:
        return (self.scale, self.zero_point, self.low, self.high, self.dtype)


@st.composite
def _cases(draw: st.DrawFn) -> _Case:
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    info = torch.iinfo(dtype)
    low = draw(st.integers(info.min, info.max))
    return _Case(
        seed=draw(st.integers(0, 2**16)),
        shape=draw(st.tuples(*[st.integers(1, 5)] * 2, *[st.integers(2, 6)] * 2)),
        layout=draw(st.sampled_from(_LAYOUTS)),
        scale=draw(st.floats(1e-6, 1e3, allow_nan=False).map(float)),
        zero_point=draw(st.integers(-200, 200)),
        dtype=dtype,
        low=low,
        high=draw(st.integers(low, info.max)),
    )


@settings(max_examples=150, deadline=None)
@given(
    case=_cases(),
    in_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    spread=st.sampled_from([1.0, 100.0, 1e6]),
    specials=st.booleans(),
)
def test_quantize_is_bit_exact(
    case: _Case, in_dtype: torch.dtype, spread: float, specials: bool
) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.shape, generator=gen) * spread
    if specials:  # inputs at rounding edges, signed zeros, infinities and NaN
        flat = x.view(-1)
        flat[:4] = torch.tensor([0.5, 1.5, -0.5, -2.5]) * case.scale  # shapes hold >= 4
        flat[-1] = -0.0
        flat[len(flat) // 2] = math.inf
        flat[len(flat) // 3] = -math.inf
        flat[len(flat) // 4] = math.nan
    x = _laid_out(x.to(in_dtype), case.layout)
    expected = qd.quantize_per_tensor.default(x, *case.args)
    got = quantize_per_tensor(x, *case.args)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert _layout(got) == _layout(expected)


@settings(max_examples=150, deadline=None)
@given(
    case=_cases(),
    out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]),
)
def test_dequantize_is_bit_exact(case: _Case, out_dtype: torch.dtype | None) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randint(case.low, case.high + 1, case.shape, generator=gen).to(case.dtype)
    q = _laid_out(q, case.layout)
    expected = qd.dequantize_per_tensor.default(q, *case.args, out_dtype=out_dtype)
    got = dequantize_per_tensor(q, *case.args, out_dtype=out_dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert _layout(got) == _layout(expected)
    assert q.numel() == 0 or got.data_ptr() != q.data_ptr()  # the input is not written


@pytest.mark.parametrize("zero_point", [-3, 0, 3, 4])
def test_halves_round_to_even_before_the_zero_point_is_added(zero_point: int) -> None:
    # x / scale = k + 0.5 exactly: rounding after adding an odd zero point lands elsewhere
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75])
    args = (0.5, zero_point, -128, 127, torch.int8)
    assert torch.equal(quantize_per_tensor(x, *args), qd.quantize_per_tensor.default(x, *args))


def test_the_input_is_left_as_it_was() -> None:
    x = torch.randn(2, 3, 4, 4)
    before = x.clone()
    quantize_per_tensor(x, 0.1, 3, 0, 255, torch.uint8)
    assert torch.equal(x, before)


def test_cases_outside_the_plain_one_raise_the_ops_own_errors() -> None:
    ints = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(AssertionError, match="float32"):
        quantize_per_tensor(ints, 0.1, 0, 0, 255, torch.uint8)
    floats = torch.zeros(2, 3)
    with pytest.raises(Exception) as by_op:
        qd.quantize_per_tensor.default(floats, 0.1, 0, -5, 255, torch.uint8)
    with pytest.raises(type(by_op.value)):
        quantize_per_tensor(floats, 0.1, 0, -5, 255, torch.uint8)
    u8 = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(AssertionError, match="int8"):
        dequantize_per_tensor(u8, 0.1, 0, -128, 127, torch.int8)


def test_other_dtypes_are_computed_by_the_op() -> None:
    q16 = torch.tensor([-300, 0, 300], dtype=torch.int16)
    args = (0.5, 1, -32768, 32767, torch.int16)
    assert torch.equal(
        dequantize_per_tensor(q16, *args), qd.dequantize_per_tensor.default(q16, *args)
    )


# --------------------------------------------------------------------------------------------
# Per-channel dequantize (the weight side of each reference)


@contextlib.contextmanager
def _op_called() -> Iterator[list[int]]:
    """Count the calls :func:`dequantize_per_channel` hands to the op itself."""
    calls: list[int] = []
    op = qd.dequantize_per_channel.default

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return op(*args, **kwargs)

    packet = SimpleNamespace(default=counted)
    with mock.patch.object(eager_ops, "qd", SimpleNamespace(dequantize_per_channel=packet)):
        yield calls


@settings(max_examples=150, deadline=None)
@given(
    case=_cases(),
    axis=st.integers(0, 3),
    scale_spread=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    zero_points=st.sampled_from(["none", "zeros", "random", "large"]),
    zp_dtype=st.sampled_from([torch.int64, torch.int32]),
    out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]),
)
def test_per_channel_dequantize_is_bit_exact(
    case: _Case,
    axis: int,
    scale_spread: float,
    zero_points: str,
    zp_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randint(case.low, case.high + 1, case.shape, generator=gen).to(case.dtype)
    q = _laid_out(q, case.layout)
    channels = q.shape[axis]
    scales = torch.rand(channels, generator=gen) * scale_spread + 1e-9
    zps: torch.Tensor | None = {
        "none": None,
        "zeros": torch.zeros(channels, dtype=zp_dtype),
        "random": torch.randint(-200, 201, (channels,), generator=gen, dtype=zp_dtype),
        # past 2**24 float32 cannot hold the difference exactly: the op computes it
        "large": torch.full((channels,), 2**24 + 1, dtype=zp_dtype),
    }[zero_points]
    args = (scales, zps, axis, case.low, case.high, case.dtype)
    expected = qd.dequantize_per_channel.default(q, *args, out_dtype=out_dtype)
    with _op_called() as calls:
        got = dequantize_per_channel(q, *args, out_dtype=out_dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert _layout(got) == _layout(expected)
    # else the scratch computed it
    assert calls == ([1] if zero_points == "large" or q.numel() == 0 else [])


def test_per_channel_dequantize_leaves_its_inputs_as_they_were() -> None:
    q = torch.randint(-128, 128, (4, 3, 2, 2), dtype=torch.int8)
    scales, zps = torch.rand(4), torch.randint(-5, 5, (4,))
    before = (q.clone(), scales.clone(), zps.clone())
    out = dequantize_per_channel(q, scales, zps, 0, -128, 127, torch.int8)
    assert all(torch.equal(a, b) for a, b in zip((q, scales, zps), before, strict=True))
    assert out.data_ptr() not in (q.data_ptr(), scales.data_ptr(), zps.data_ptr())


@pytest.mark.parametrize(
    "case",
    ["float64 scales", "float zero points", "negative axis", "int16"],
)
def test_per_channel_cases_outside_the_plain_one_are_the_ops_own(case: str) -> None:
    q = torch.randint(-100, 100, (3, 4, 2), dtype=torch.int8)
    scales, zps, axis, dtype, low, high = (
        torch.rand(3) / 7,
        torch.arange(3),
        0,
        torch.int8,
        -128,
        127,
    )
    if case == "float64 scales":  # the op multiplies in float64 and rounds once more
        scales = scales.double()
    elif case == "float zero points":
        zps = zps.float() + 0.5
    elif case == "negative axis":
        axis = -3
    else:
        q, dtype, low, high = q.to(torch.int16) * 300, torch.int16, -32768, 32767
    args = (scales, zps, axis, low, high, dtype)
    with _op_called() as calls:
        got = dequantize_per_channel(q, *args)
    assert calls == [1]
    assert torch.equal(got, qd.dequantize_per_channel.default(q, *args))


def test_per_channel_errors_are_the_ops_own() -> None:
    u8 = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(AssertionError, match="int8"):
        dequantize_per_channel(u8, torch.ones(2), None, 0, -128, 127, torch.int8)
    with pytest.raises(AssertionError, match="axis"):
        dequantize_per_channel(u8, torch.ones(2), None, 2, 0, 255, torch.uint8)


def test_the_table_maps_each_op_to_its_function() -> None:
    assert EAGER[qd.quantize_per_tensor.default] is quantize_per_tensor
    assert EAGER[qd.dequantize_per_tensor.default] is dequantize_per_tensor
    assert EAGER[qd.dequantize_per_channel.default] is dequantize_per_channel
    assert isinstance(EAGER, MappingProxyType)  # read-only: nobody swaps a reference op


# --------------------------------------------------------------------------------------------
# Inductor's low-memory max pool: values only, where no user reads the offsets


def _pool_graph(read_offsets: bool) -> tuple[fx.Graph, fx.Node]:
    import torch._inductor.inductor_prims

    graph = fx.Graph()
    x = graph.placeholder("x")
    pool = graph.call_function(
        torch.ops.prims._low_memory_max_pool_with_offsets.default,
        (x, [3, 3], [2, 2], [1, 1], [1, 1], False),
    )
    values = graph.call_function(operator.getitem, (pool, 0))
    outputs: tuple[fx.Node, ...] = (values,)
    if read_offsets:
        outputs += (graph.call_function(operator.getitem, (pool, 1)),)
    graph.output(outputs)
    return graph, pool


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_pool_read_for_its_values_computes_the_same_values(
    ceil_mode: bool, channels_last: bool
) -> None:
    _, pool = _pool_graph(read_offsets=False)
    faster = values_only(pool)
    assert faster is not None
    x = torch.randn(2, 5, 9, 10)
    x[0, 0, :3, :3] = x[0, 0, 0, 0]  # ties inside a window
    x[1, 2, 4, 4] = math.nan
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, [3, 3], [2, 2], [1, 1], [1, 1], ceil_mode)
    expected, _ = torch.ops.prims._low_memory_max_pool_with_offsets.default(*args)
    result = faster(*args)
    assert isinstance(result, tuple)
    got, offsets = result
    assert offsets is None
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert _layout(got) == _layout(expected)


def test_a_pool_whose_offsets_are_read_runs_as_it_is() -> None:
    _, pool = _pool_graph(read_offsets=True)
    assert values_only(pool) is None
    graph = fx.Graph()
    relu = graph.call_function(torch.ops.aten.relu.default, (graph.placeholder("x"),))
    assert values_only(relu) is None


def test_evaluating_a_pool_for_its_values_skips_the_offsets() -> None:
    graph, pool = _pool_graph(read_offsets=False)
    x_node = next(iter(graph.nodes))
    values_node = next(iter(pool.users))
    x = torch.randn(1, 2, 8, 8)
    env: dict[fx.Node, object] = {x_node: x}
    evaluate([pool, values_node], env, None)
    expected, _ = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1])
    got = env[values_node]
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
    pool_value = env[pool]
    assert isinstance(pool_value, tuple) and pool_value[1] is None
