"""The self-check's reference on sampled rows (qalgebra.row_sample): exact where it claims to be.

Soundness is checked against the whole graph run eagerly: whenever :func:`sampled_reference`
answers, its rows are the full run's rows (on hand-written graphs of every rule, and on the
fuzz families' graphs given a larger batch). Every rule that must refuse (a view moving rows,
a reduction over dim 0, a constant with rows of its own, ...) has its own graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from qalgebra.ops import quantized_decomposed as qd
from qalgebra.row_sample import Sample, sample_rows, sampled_reference, take_rows
from qalgebra.testing.strategies import examples, flat_tensors

F = torch.nn.functional
aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("one_thread")


def _traced(fn: Callable[..., Any], *inputs: torch.Tensor) -> fx.GraphModule:
    """``fn`` as an aten graph; tensors it closes over become ``get_attr`` constants."""
    return make_fx(fn)(*inputs)


def _sampled(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Sample | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = [n for n in gm.graph.nodes if n.op in ("call_function", "get_attr")]
    values = dict(zip(placeholders, inputs, strict=True))
    return sampled_reference(order, values, gm, drawn=set(placeholders))


def _outputs(gm: fx.GraphModule, env: dict[fx.Node, object]) -> list[object]:
    out = gm.graph.output_node().args[0]
    nodes = list(out) if isinstance(out, list | tuple) else [out]
    return [env[n] if isinstance(n, fx.Node) else n for n in nodes]


def _assert_rows_match(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Sample:
    """Sampling happens, and gives the full run's rows (integer outputs within a step)."""
    sample = _sampled(gm, inputs)
    assert sample is not None
    full = flat_tensors(gm(*inputs))
    part = [t for v in _outputs(gm, sample.env) for t in flat_tensors(v)]
    assert len(full) == len(part)
    for whole, rows in zip(full, part, strict=True):
        batched = whole.dim() > 0 and whole.shape[0] == sample.batch
        expected = whole.index_select(0, sample.rows) if batched else whole
        _assert_close(rows, expected)
    return sample


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.is_floating_point():
        scale = float(expected.float().abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 + 1e-5 * scale)
    else:  # a float result on a rounding edge may land one level over
        diff = (actual.long() - expected.long()).abs()
        assert diff.numel() == 0 or int(diff.max()) <= 1


# --------------------------------------------------------------------------------------------
# Which rows


@given(st.integers(3, 300))
def test_rows_are_sorted_distinct_and_include_the_first_and_last(batch: int) -> None:
    rows = sample_rows(batch)
    assert rows is not None
    values = rows.tolist()
    assert values == sorted(set(values)) and values[0] == 0 and values[-1] == batch - 1
    assert len(values) == max(2, -(-batch // 8))


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_small_batches_are_not_sampled(batch: int) -> None:
    assert sample_rows(batch) is None
    x = torch.randn(batch, 4)
    assert _sampled(_traced(torch.relu, x), [x]) is None


def test_take_rows_keeps_the_layout() -> None:
    x = torch.randn(6, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    rows = torch.tensor([0, 5])
    picked = take_rows(x, rows)
    assert isinstance(picked, torch.Tensor)
    assert picked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(picked, x[[0, 5]])
    both = take_rows((x, None, 3), rows)
    assert isinstance(both, tuple) and both[1:] == (None, 3)


# --------------------------------------------------------------------------------------------
# Rules that keep rows apart: the sample is the full run's rows


def _per_channel_round_trip(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` per channel along ``axis``."""
    n = x.shape[axis]
    args = (W_SCALES[:n], W_ZPS[:n], axis, -128, 127, torch.int8)
    return qd.dequantize_per_channel.default(qd.quantize_per_channel.default(x, *args), *args)


WEIGHT = torch.randn(8, 4, 3, 3)
W_SCALES = torch.rand(8) / 50 + 0.01
W_ZPS = torch.zeros(8, dtype=torch.int64)


def _q_conv_block(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    xq = qd.quantize_per_tensor.default(x, 0.05, 3, 0, 255, torch.uint8)
    xf = qd.dequantize_per_tensor.default(xq, 0.05, 3, 0, 255, torch.uint8)
    wq = qd.quantize_per_channel.default(WEIGHT, W_SCALES, W_ZPS, 0, -128, 127, torch.int8)
    wf = qd.dequantize_per_channel.default(wq, W_SCALES, W_ZPS, 0, -128, 127, torch.int8)
    y = aten.convolution.default(xf, wf, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    y = aten.relu_.default(aten.add.Tensor(y, residual))
    yq = qd.quantize_per_tensor.default(y, 0.1, 0, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor.default(yq, 0.1, 0, 0, 255, torch.uint8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_quantized_conv_block_with_a_residual_is_sampled(channels_last: bool) -> None:
    x, residual = torch.randn(8, 4, 6, 6), torch.randn(8, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sample = _assert_rows_match(_traced(_q_conv_block, x, residual), [x, residual])
    assert sample.rows.tolist() == [0, 7] and sample.batch == 8
    weights = {n for n in sample.env if n.op == "get_attr"}
    assert weights and not weights & sample.batched  # the weight side is computed whole


BIAS = torch.randn(5)
LIN_W = torch.randn(5, 6)


@pytest.mark.parametrize(
    ("fn", "shapes"),
    [
        pytest.param(
            lambda x: F.max_pool2d(x, 2, return_indices=True), [(5, 3, 6, 6)], id="max_pool_indices"
        ),
        pytest.param(lambda x: F.adaptive_avg_pool2d(x, 1), [(5, 3, 6, 6)], id="adaptive_pool"),
        pytest.param(lambda x: x.mean([-1, -2], keepdim=True), [(5, 3, 6, 6)], id="mean_hw"),
        pytest.param(lambda x: torch.softmax(x, -1), [(5, 3, 6)], id="softmax"),
        pytest.param(lambda x: torch.addmm(BIAS, x, LIN_W.t()), [(7, 6)], id="addmm"),
        pytest.param(lambda x, y: torch.bmm(x, y), [(4, 3, 6), (4, 6, 2)], id="bmm"),
        pytest.param(lambda x, y: torch.cat([x, y], 1), [(4, 3, 2), (4, 5, 2)], id="cat_dim1"),
        pytest.param(lambda x, y: x * y + BIAS, [(4, 1, 5), (4, 3, 1)], id="broadcast"),
        # a constant of one row broadcasts
        pytest.param(lambda x: x + torch.ones(1, 5), [(4, 5)], id="one_row_constant"),
        pytest.param(lambda x: _per_channel_round_trip(x, 1), [(4, 3, 2)], id="per_channel_axis1"),
    ],
)
def test_ops_that_keep_rows_apart_are_sampled(
    fn: Callable[..., Any], shapes: list[tuple[int, ...]]
) -> None:
    inputs = [torch.randn(s) for s in shapes]
    _assert_rows_match(_traced(fn, *inputs), inputs)


def test_an_aten_linear_on_3d_rows_is_sampled() -> None:
    # make_fx decomposes linear; an exported graph keeps aten.linear, as symbolic_trace here
    gm = fx.symbolic_trace(lambda x: aten.linear.default(x, LIN_W, BIAS))
    assert any(n.target is aten.linear.default for n in gm.graph.nodes)
    x = torch.randn(4, 3, 6)
    _assert_rows_match(gm, [x])


# --------------------------------------------------------------------------------------------
# Rules that refuse: the caller runs the whole reference

ROWS4 = torch.randn(4, 5)


@pytest.mark.parametrize(
    ("fn", "shapes"),
    [
        pytest.param(lambda x: x.mean([0]), [(4, 5)], id="mean_dim0"),
        pytest.param(lambda x: x.sum(), [(4, 5)], id="sum_all"),
        pytest.param(lambda x: torch.softmax(x, 0), [(4, 5)], id="softmax_dim0"),
        pytest.param(lambda x: x.view(2, 10), [(4, 5)], id="view"),
        pytest.param(lambda x: x.reshape(-1), [(4, 5)], id="reshape"),
        pytest.param(lambda x: x.t(), [(4, 5)], id="transpose"),
        pytest.param(lambda x: torch.flip(x, [0]), [(4, 5)], id="flip_rows"),
        pytest.param(lambda x, y: torch.cat([x, y]), [(4, 5), (4, 5)], id="cat_dim0"),
        # a constant with rows of its own
        pytest.param(lambda x: x + ROWS4, [(4, 5)], id="constant_with_rows"),
        # the batch as the reduced dim
        pytest.param(lambda x: torch.mm(ROWS4.t(), x), [(4, 5)], id="mm_rows_reduced"),
        # a bias with rows
        pytest.param(
            lambda x: torch.addmm(ROWS4, x, LIN_W.t()[:5]), [(4, 5)], id="addmm_bias_rows"
        ),
        pytest.param(lambda x: torch.bmm(x, torch.randn(4, 5, 2)), [(4, 3, 5)], id="bmm_free_rows"),
        pytest.param(lambda x: _per_channel_round_trip(x, 0), [(4, 3)], id="per_channel_axis0"),
        pytest.param(
            lambda x: torch.ops.quantized_decomposed.choose_qparams.tensor(
                x, 0, 255, 1e-5, torch.uint8
            ),
            [(4, 5)],
            id="dynamic_qparams",
        ),
    ],
)
def test_ops_that_mix_rows_are_not_sampled(
    fn: Callable[..., Any], shapes: list[tuple[int, ...]]
) -> None:
    inputs = [torch.randn(s) for s in shapes]
    gm = _traced(fn, *inputs)
    gm(*inputs)  # the graph itself runs
    assert _sampled(gm, inputs) is None


def test_an_aten_linear_on_one_row_is_not_sampled() -> None:
    gm = fx.symbolic_trace(lambda x: aten.linear.default(x, LIN_W[:, :4]))
    x = torch.randn(4)  # dim 0 is the features: 4 of them, not 4 rows
    gm(x)
    assert _sampled(gm, [x]) is None


def test_drawn_inputs_of_different_batches_are_not_sampled() -> None:
    x, y = torch.randn(4, 5), torch.randn(6, 5)
    gm = _traced(lambda a, b: (a.relu(), b.relu()), x, y)
    assert _sampled(gm, [x, y]) is None


def test_constants_do_not_decide_the_batch() -> None:
    # the weight's 5 rows are not a batch: only drawn inputs are
    x = torch.randn(3, 6)
    sample = _assert_rows_match(_traced(lambda a: F.linear(a, LIN_W, BIAS), x), [x])
    assert sample.batch == 3


# --------------------------------------------------------------------------------------------
# The fuzz families' graphs, at a batch that is sampled


def _more_rows(x: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """``x`` with new rows drawn like its own, up to ``batch`` rows."""
    generator = torch.Generator().manual_seed(seed)
    extra = [batch - x.shape[0], *x.shape[1:]]
    if x.is_floating_point():
        std = float(x.float().std()) if x.numel() > 1 else 1.0
        new = torch.randn(extra, generator=generator) * (std or 1.0)
    else:
        low, high = int(x.min()), int(x.max())
        new = torch.randint(low, high + 1, extra, generator=generator)
    return torch.cat([x, new.to(x.dtype)])


@settings(max_examples=60)
@given(examples(), st.integers(3, 9), st.integers(0, 2**16))
def test_the_families_graphs_sample_to_the_full_runs_rows(
    example: Any, batch: int, seed: int
) -> None:
    inputs = [
        _more_rows(x, batch, seed + i)
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] < batch
        else x
        for i, x in enumerate(example.inputs)
    ]
    gm = example.gm
    try:
        gm(*inputs)
    except (RuntimeError, ValueError, IndexError, AssertionError):
        assume(False)  # a graph whose views or export guards fix the batch it was drawn with
    sample = _sampled(gm, inputs)
    event("sampled" if sample is not None else "whole reference")
    if sample is None:
        return
    full = flat_tensors(gm(*inputs))
    part = [t for v in _outputs(gm, sample.env) for t in flat_tensors(v)]
    for whole, rows in zip(full, part, strict=True):
        batched = whole.dim() > 0 and whole.shape[0] == sample.batch
        _assert_close(rows, whole.index_select(0, sample.rows) if batched else whole)
