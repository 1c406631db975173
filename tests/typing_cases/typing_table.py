"""The typing table: what mypy infers for qalgebra's public API.

Every ``assert_type`` here is checked by mypy (the normal ``mypy`` run covers tests/, and
tests/test_typing_table.py runs mypy on this file as well). tests/test_typing_table.py also runs
these functions against real matches: ``assert_type`` returns its argument, so each line checks
with ``isinstance`` that the runtime value has the type mypy was told.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_type

import torch
from torch import fx

from qalgebra import (
    Match,
    Mismatch,
    Pattern,
    Var,
    any_of,
    call,
    capture,
    dtype_of,
    ignored,
    list_of,
    literal,
    optional,
    reciprocal,
    tag,
    where,
)
from qalgebra.checks import Check, dtype_in, single_user
from qalgebra.combinators import Unary, dequantize_per_tensor, with_unary
from qalgebra.match import explain, find_matches, iter_matches, match_node
from qalgebra.pattern import (
    Call,
    Capture,
    DtypeOf,
    Ignored,
    ListOf,
    Literal,
    Optional,
    Reciprocal,
    Tag,
    Where,
)
from qalgebra.qparams import (
    ChannelQParams,
    ConstantQParams,
    QParams,
    RuntimeQParams,
    channel_qparams,
    qparams,
)

aten = torch.ops.aten

X = assert_type(Var("x", fx.Node), Var[fx.Node])
S = assert_type(Var("s", float), Var[float])
K = assert_type(Var("k", int), Var[int])
DT = assert_type(Var("dt", torch.dtype), Var[torch.dtype])
T = assert_type(Var("t", torch.Tensor), Var[torch.Tensor])
SHAPE = assert_type(Var("shape", list), Var[list[Any]])
U = assert_type(Var("unary", Unary), Var[Unary])
E = assert_type(Var("e", fx.Node), Var[fx.Node])
QP = assert_type(qparams("x"), QParams)
QPR = assert_type(qparams("x", runtime=True), QParams)
CP = assert_type(channel_qparams("w"), ChannelQParams)


def pattern_table() -> list[Pattern]:
    """The factories' static types (each is also a Pattern at run time)."""
    relu = assert_type(call(aten.relu.default, X), Call)
    return [
        relu,
        assert_type(ignored(), Ignored),
        assert_type(literal(1.5), Literal),
        assert_type(any_of(relu, X), Pattern),
        assert_type(relu | X, Pattern),
        assert_type(optional(call(aten.mul.Tensor, X, S), defaults={S: 1.0}), Optional),
        assert_type(list_of(X), ListOf),
        assert_type(capture(X, relu), Capture),
        assert_type(tag(relu, U, Unary.RELU), Tag),
        assert_type(where(relu, single_user(X)), Where),
        assert_type(dtype_of(X, DT), DtypeOf),
        assert_type(reciprocal(S), Reciprocal),
        assert_type(dequantize_per_tensor(X, QP), Pattern),
        assert_type(with_unary(relu, U, Unary.NONE, Unary.RELU), Pattern),
    ]


def check_table() -> Check:
    return assert_type(single_user(X) & ~dtype_in(DT, (torch.uint8,)) | single_user(E), Check)


def qparams_table(m: Match) -> None:
    """``m`` matched ``dequantize_per_tensor(X, QP)`` in its op form."""
    assert isinstance(assert_type(m[X], fx.Node), fx.Node)
    assert isinstance(assert_type(m[QP.scale], float), float)
    assert isinstance(assert_type(m[QP.zero_point], int), int)
    assert isinstance(assert_type(m[QP.dtype], torch.dtype), torch.dtype)
    assert isinstance(assert_type(m[QP.quant_min], int), int)
    assert isinstance(assert_type(m.get(QP.quant_max, -1), int), int)
    assert isinstance(assert_type(m.root, fx.Node), fx.Node)
    assert isinstance(assert_type(m.nodes, tuple[fx.Node, ...]), tuple)
    values = assert_type(QP.read(m), ConstantQParams | RuntimeQParams)
    assert isinstance(values, ConstantQParams)  # narrowed: the scale is a float
    assert isinstance(assert_type(values.scale, float), float)
    assert isinstance(assert_type(values.zero_point, int), int)


def runtime_table(m: Match) -> None:
    """``m`` matched ``dequantize_per_tensor(X, QPR)`` with qparams computed in the graph."""
    values = assert_type(QPR.read(m), ConstantQParams | RuntimeQParams)
    assert isinstance(values, RuntimeQParams)  # narrowed: the scale is the node computing it
    assert isinstance(assert_type(values.scale, fx.Node), fx.Node)
    assert isinstance(assert_type(values.zero_point, fx.Node), fx.Node)
    assert_type(QPR.scale_node, Var[fx.Node] | None)


def scalar_table(m: Match) -> None:
    """``m`` matched ``call(aten.view.default, tag(dtype_of(X, DT), U, ...), SHAPE)``-like
    patterns binding a list, a dtype and a Unary."""
    assert isinstance(assert_type(m[SHAPE], list[Any]), list)
    assert isinstance(assert_type(m[DT], torch.dtype), torch.dtype)
    assert isinstance(assert_type(m[U], Unary), Unary)


def each_table(m: Match) -> None:
    """``m`` matched a ``list_of`` binding ``E`` per element."""
    for node in assert_type(m.each(E), tuple[fx.Node, ...]):
        assert isinstance(node, fx.Node)


def weight_table(m: Match) -> None:
    """``m`` matched ``dequantize_per_channel(X, CP)``."""
    assert isinstance(assert_type(m[CP.scales], torch.Tensor), torch.Tensor)
    assert isinstance(assert_type(m[CP.axis], int), int)


def matcher_table(p: Pattern, gm: fx.GraphModule, node: fx.Node) -> None:
    assert isinstance(assert_type(find_matches(p, gm), list[Match]), list)
    assert_type(match_node(p, node), Match | None)
    assert_type(explain(p, node), Mismatch | None)
    assert_type(iter_matches(p, node), Iterator[Match])
