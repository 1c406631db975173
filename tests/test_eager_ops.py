"""qalgebra.eager_ops: the faster eager equivalents compute what the ops compute, bit for bit.

The checks' references run through these functions, so a difference here would move every
self-check verdict; each case is compared with the op itself on the same tensor.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import MappingProxyType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from qalgebra.eager_ops import EAGER, dequantize_per_tensor, quantize_per_tensor, values_only
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


def test_the_table_maps_each_op_to_its_function() -> None:
    assert EAGER[qd.quantize_per_tensor.default] is quantize_per_tensor
    assert EAGER[qd.dequantize_per_tensor.default] is dequantize_per_tensor
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
