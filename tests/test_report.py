"""What a LoweringReport says about what was not lowered: near misses and unfused q/dq nodes."""

from __future__ import annotations

import pytest
import torch
from graphs import (
    DEQUANT_FORMS,
    QP,
    QUANT_FORMS,
    DequantForm,
    GraphBuilder,
    QuantForm,
    dequantize,
    quantize,
)
from torch import fx

from qalgebra import Var, call, emit, where
from qalgebra.checks import same_shape
from qalgebra.fusions import Fusion, Rewriter
from qalgebra.lower import NearMiss, lower_with_report
from qalgebra.pattern import Match

aten = torch.ops.aten
X = Var("x", fx.Node)
Y = Var("y", fx.Node)


def _add_as_sub_of_neg(m: Match, rw: Rewriter) -> fx.Node:
    """x + y as x - (-y): the same numbers, another graph (so a test sees it fired)."""
    negated = emit.aten.mul.Scalar(rw, self=m[Y], other=-1.0)
    return emit.aten.sub.Tensor(rw, self=m[X], other=negated)


#: Fires only on an add of two tensors of the same shape.
SAME_SHAPE_ADD = Fusion(
    "same_shape_add",
    "demo",
    where(call(aten.add.Tensor, X, Y), same_shape(X, Y)),
    _add_as_sub_of_neg,
)
#: Fires on any add.
ANY_ADD = Fusion("any_add", "demo", call(aten.add.Tensor, X, Y), _add_as_sub_of_neg)


def _broadcast_add() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...], str]:
    b = GraphBuilder()
    x, y = b.input("x", (2, 3)), b.input("y", (3,))
    add = b.op(aten.add.Tensor, x, y)
    b.output(add)
    return b.module(), (torch.randn(2, 3), torch.randn(3)), add.name


def test_a_refusing_where_check_is_a_near_miss_with_its_reason() -> None:
    gm, inputs, add = _broadcast_add()
    _, report = lower_with_report(gm, inputs, fusions=[SAME_SHAPE_ADD])
    assert report.total_fired == 0 and report.refused == []
    assert report.near_misses == [
        NearMiss("same_shape_add", add, "x has shape [2, 3], y has shape [3]")
    ]
    assert f"near miss same_shape_add at {add}: x has shape [2, 3], y has shape [3]" in (
        report.summary()
    )


def test_no_near_miss_where_the_check_passes_or_the_structure_differs() -> None:
    b = GraphBuilder()
    x, y = b.input("x", (2, 3)), b.input("y", (2, 3))
    b.output(b.op(aten.mul.Tensor, b.op(aten.add.Tensor, x, y), y))
    gm = b.module()
    _, report = lower_with_report(
        gm, (torch.randn(2, 3), torch.randn(2, 3)), fusions=[SAME_SHAPE_ADD]
    )
    assert report.fired["same_shape_add"] == 1
    assert report.near_misses == []


def test_a_near_miss_a_later_fusion_lowers_is_not_reported() -> None:
    gm, inputs, _ = _broadcast_add()
    _, report = lower_with_report(gm, inputs, fusions=[SAME_SHAPE_ADD, ANY_ADD])
    assert report.fired["any_add"] == 1
    assert report.near_misses == []


@pytest.mark.parametrize("qform", QUANT_FORMS)
@pytest.mark.parametrize("dqform", DEQUANT_FORMS)
def test_unfused_quant_nodes_names_every_form(qform: QuantForm, dqform: DequantForm) -> None:
    """Op forms by their node, decomposed chains by their last node; nothing else."""
    b = GraphBuilder()
    x = b.input("x", (2, 3))
    q = quantize(b, x, QP(), qform)
    dq = dequantize(b, q, QP(), dqform)
    b.output(b.op(aten.relu.default, dq))
    gm = b.module()
    _, report = lower_with_report(gm, (torch.randn(2, 3),), fusions=[], selfcheck="off")
    assert report.unfused_quant_nodes == [q.name, dq.name]


def test_unfused_quant_nodes_ignores_float_arithmetic() -> None:
    """A float mul/round/clamp chain that is no quantize is not listed."""
    b = GraphBuilder()
    x = b.input("x", (2, 3))
    y = b.op(aten.clamp.default, b.op(aten.round.default, b.op(aten.mul.Tensor, x, 4.0)), 0, 9)
    b.output(b.op(aten.mul.Tensor, b.op(aten.sub.Tensor, y, 1), 0.5))
    _, report = lower_with_report(b.module(), (torch.randn(2, 3),), fusions=[])
    assert report.unfused_quant_nodes == []
