"""Composable checks: each passes or says why not, composes with & | ~, describes itself, has a
repr that evaluates back, and its reason shows up in explain()."""

from __future__ import annotations

import math
import operator
from typing import Any

import pytest
import torch
from graphs import QP, GraphBuilder, dequantize
from pyrsistent import pmap
from torch import fx

import qalgebra
import qalgebra.checks
import qalgebra.combinators
from qalgebra import Match, PatternError, Var, call, capture, where
from qalgebra.checks import (
    AllOf,
    AnyCheck,
    Check,
    Not,
    dtype_in,
    made_by_graph,
    only_used_by,
    same_qparams,
    same_shape,
    satisfies,
    single_user,
    users_at_most,
    valid_qparams,
)
from qalgebra.match import explain, match_node
from qalgebra.qparams import qparams

aten = torch.ops.aten

X = Var("x", fx.Node)
Y = Var("y", fx.Node)
DT = Var("dt", torch.dtype)
A, B = qparams("a"), qparams("b")


def _match(root: fx.Node, **bindings: object) -> Match:
    all_vars: tuple[Var[Any], ...] = (X, Y, DT, *_qp_vars())
    known = {v.name: v for v in all_vars}
    by_var: dict[Var[Any], object] = {known[name]: value for name, value in bindings.items()}
    return Match(root, pmap(by_var), pmap(), (root,))


def _qp_vars() -> tuple[Var[Any], ...]:
    return tuple(
        v for qp in (A, B) for v in (qp.scale, qp.zero_point, qp.dtype, qp.quant_min, qp.quant_max)
    )


@pytest.fixture
def graph() -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """(input, relu of input with 2 users, neg reading the relu, sigmoid reading the relu)."""
    b = GraphBuilder()
    x = b.input("x", (2, 3))
    r = b.op(aten.relu.default, x)
    n = b.op(aten.neg.default, r)
    s = b.op(aten.sigmoid.default, r)
    return x, r, n, s


# --------------------------------------------------------------------------------------------
# Each check
# --------------------------------------------------------------------------------------------


def test_dtype_in(graph: tuple[fx.Node, ...]) -> None:
    root = graph[1]
    c = dtype_in(DT, (torch.uint8, torch.int8))
    assert c.failure(_match(root, dt=torch.uint8)) is None
    assert c(_match(root, dt=torch.int8))
    assert c.failure(_match(root, dt=torch.float32)) == (
        "dt is torch.float32, expected one of (torch.uint8, torch.int8)"
    )
    assert not c(_match(root, dt=torch.float32))
    assert c.failure(_match(root)) == "dt is not bound"
    assert c.describe() == "dt in (torch.uint8, torch.int8)"
    with pytest.raises(PatternError, match="dtype_in: expected a Var"):
        dtype_in(_any("dt"), (torch.uint8,))


def _any(value: object) -> Any:
    """``value`` typed as Any: the test passes what mypy would rightly refuse."""
    return value


def test_users_at_most_and_single_user(graph: tuple[fx.Node, ...]) -> None:
    x, r, n, _ = graph
    assert single_user(X).failure(_match(n, x=n)) is None  # no user at all is fine
    assert single_user(X).failure(_match(n, x=x)) is None
    assert single_user(X).failure(_match(n, x=r)) == "x (relu_default) has 2 users, at most 1 " \
        "allowed"
    assert users_at_most(X, 2).failure(_match(n, x=r)) is None
    assert single_user(X).failure(_match(n)) == "x is not bound"
    assert single_user(X).describe() == "x has at most 1 user(s)"
    assert users_at_most(X, 3).describe() == "x has at most 3 user(s)"
    assert single_user(X) == users_at_most(X, 1)


def test_same_qparams(graph: tuple[fx.Node, ...]) -> None:
    root = graph[1]
    c = same_qparams(A, B)
    assert c.failure(_match(root, a_scale=0.5, a_zp=3, b_scale=0.5, b_zp=3)) is None
    assert c.failure(_match(root, a_scale=0.5, a_zp=3, b_scale=0.25, b_zp=3)) == (
        "a_scale = 0.5 differs from b_scale = 0.25"
    )
    assert c.failure(_match(root, a_scale=0.5, a_zp=3, b_scale=0.5, b_zp=4)) == (
        "a_zp = 3 differs from b_zp = 4"
    )
    assert c.failure(_match(root, a_scale=0.5, a_zp=3)) == "a_scale or b_scale is not bound"
    assert c.describe() == "a and b share scale and zero point"


@pytest.mark.parametrize(
    ("bindings", "reason"),
    [
        ({"a_scale": 0.5, "a_zp": 3, "a_qmin": 0, "a_qmax": 255, "a_dtype": torch.uint8}, None),
        ({"a_scale": 0.5}, None),
        ({}, "a_scale = nan is not a finite positive number"),
        ({"a_scale": 0.0}, "a_scale = 0.0 is not a finite positive number"),
        ({"a_scale": -0.5}, "a_scale = -0.5 is not a finite positive number"),
        ({"a_scale": math.inf}, "a_scale = inf is not a finite positive number"),
        ({"a_scale": math.nan}, "a_scale = nan is not a finite positive number"),
        (
            {"a_scale": 0.5, "a_zp": 300, "a_qmin": 0, "a_qmax": 255},
            "a_zp = 300 is outside [0, 255]",
        ),
        (
            {"a_scale": 0.5, "a_zp": -1, "a_qmin": 0, "a_qmax": 255},
            "a_zp = -1 is outside [0, 255]",
        ),
        ({"a_scale": 0.5, "a_dtype": torch.float32}, "a_dtype = torch.float32 is not an integer "
         "dtype"),
        ({"a_scale": 0.5, "a_zp": 200, "a_dtype": torch.int8}, "a_zp = 200 does not fit "
         "torch.int8"),
    ],
)
def test_valid_qparams(
    graph: tuple[fx.Node, ...], bindings: dict[str, object], reason: str | None
) -> None:
    assert valid_qparams(A).failure(_match(graph[1], **bindings)) == reason


def test_valid_qparams_describe() -> None:
    assert valid_qparams(A).describe() == "a_scale > 0 and a_zp in range"


def test_same_shape() -> None:
    b = GraphBuilder()
    x = b.input("x", (2, 3))
    y = b.input("y", (2, 3))
    z = b.input("z", (3, 2))
    bare = b.input("bare", meta=False)
    c = same_shape(X, Y)
    assert c.failure(_match(x, x=x, y=y)) is None
    assert c.failure(_match(x, x=x, y=z)) == "x has shape [2, 3], y has shape [3, 2]"
    assert c.failure(_match(x, x=x, y=bare)) == "the shape of bare is unknown"
    assert c.failure(_match(x, x=x)) == "y is not bound"
    assert c.describe() == "x and y have the same shape"


def test_same_shape_reads_through_dequantize_without_meta() -> None:
    """``convert_pt2e`` leaves ``meta['val']`` off q/dq nodes: the shape is read upstream."""
    b = GraphBuilder()
    x = b.input("x", (2, 3), torch.uint8)
    y = b.input("y", (2, 3))
    z = b.input("z", (3, 2))
    dq = dequantize(b, x, QP(), "op_default", meta=False)
    assert "val" not in dq.meta
    c = same_shape(X, Y)
    assert c.failure(_match(dq, x=dq, y=y)) is None
    assert c.failure(_match(dq, x=dq, y=z)) == "x has shape [2, 3], y has shape [3, 2]"


def test_made_by_graph(graph: tuple[fx.Node, ...]) -> None:
    x, r, _, _ = graph
    b = GraphBuilder()
    w = b.const(torch.zeros(2))
    c = made_by_graph(X)
    assert c.failure(_match(r, x=r)) is None
    assert c.failure(_match(r, x=x)) == "x (x) is a placeholder, not a tensor the graph computes"
    assert c.failure(_match(r, x=w)) == (
        "x (_const0) is a get_attr, not a tensor the graph computes"
    )
    assert c.describe() == "x is computed by the graph"


def test_only_used_by(graph: tuple[fx.Node, ...]) -> None:
    x, r, n, _ = graph
    c = only_used_by(X, Y)
    assert c.failure(_match(n, x=x, y=r)) is None
    assert c.failure(_match(n, x=r, y=n)) == "x (relu_default) is also read by sigmoid_default"
    assert c.failure(_match(n, x=r)) == "y is not bound"
    assert c.describe() == "x is read only by y"


def test_satisfies(graph: tuple[fx.Node, ...]) -> None:
    root = graph[1]
    c = satisfies(lambda m: m.root.name.startswith("relu"), "the root is a relu")
    assert c.failure(_match(root)) is None
    assert c.failure(_match(graph[2])) == "expected the root is a relu"
    assert c.describe() == "the root is a relu"
    with pytest.raises(PatternError, match="satisfies: expected a callable"):
        satisfies(_any(3), "three")


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def test_and_or_not(graph: tuple[fx.Node, ...]) -> None:
    root = graph[1]
    u8, i8 = dtype_in(DT, (torch.uint8,)), dtype_in(DT, (torch.int8,))
    m_u8, m_f32 = _match(root, dt=torch.uint8), _match(root, dt=torch.float32)
    both = u8 & ~i8
    assert both.failure(m_u8) is None
    assert both.failure(m_f32) == "dt is torch.float32, expected one of (torch.uint8,)"
    either = u8 | i8
    assert either.failure(m_u8) is None
    assert either.failure(m_f32) == (
        "none of: dt is torch.float32, expected one of (torch.uint8,); "
        "dt is torch.float32, expected one of (torch.int8,)"
    )
    assert (~u8).failure(m_u8) == "expected not (dt in (torch.uint8,))"
    assert (~u8).failure(m_f32) is None
    assert (u8 & i8).describe() == "(dt in (torch.uint8,) and dt in (torch.int8,))"
    assert (u8 | i8).describe() == "(dt in (torch.uint8,) or dt in (torch.int8,))"
    assert (~u8).describe() == "not (dt in (torch.uint8,))"


def test_composition_flattens_and_double_negation_cancels() -> None:
    a, b, c = (dtype_in(DT, (t,)) for t in (torch.uint8, torch.int8, torch.int32))
    conj = (a & b) & c
    assert isinstance(conj, AllOf) and len(conj.checks) == 3
    assert conj == a & (b & c)
    disj = a | (b | c)
    assert isinstance(disj, AnyCheck) and len(disj.checks) == 3
    assert disj == (a | b) | c
    assert isinstance(~a, Not)
    assert ~~a == a
    assert isinstance(a & b | c, AnyCheck)


def test_checks_are_values() -> None:
    assert dtype_in(DT, (torch.uint8,)) == dtype_in(DT, (torch.uint8,))
    assert hash(single_user(X)) == hash(single_user(X))
    assert isinstance(single_user(X), Check)
    with pytest.raises(AttributeError):
        object.__setattr__(single_user(X), "extra", 2)  # slotted: no room for a new field
    with pytest.raises(AttributeError):
        setattr(single_user(X), _any("limit"), 2)  # frozen


NS: dict[str, Any] = {
    **vars(qalgebra.checks),
    **vars(qalgebra),
    **vars(qalgebra.combinators),
    "torch": torch,
    "operator": operator,
}


@pytest.mark.parametrize(
    "check",
    [
        dtype_in(DT, (torch.uint8, torch.int8)),
        single_user(X),
        users_at_most(X, 3),
        same_qparams(A, B),
        valid_qparams(A),
        same_shape(X, Y),
        made_by_graph(X),
        only_used_by(X, Y),
        (single_user(X) & made_by_graph(X)) | ~dtype_in(DT, (torch.float32,)),
    ],
    ids=repr,
)
def test_repr_evaluates_back(check: Check) -> None:
    again = eval(repr(check), NS)
    assert again == check
    assert repr(again) == repr(check)


# --------------------------------------------------------------------------------------------
# With where() and explain()
# --------------------------------------------------------------------------------------------


def test_where_check_reason_shows_in_explain(graph: tuple[fx.Node, ...]) -> None:
    _, r, n, _ = graph
    p = where(call(aten.neg.default, capture(Y, call(aten.relu.default, X))), only_used_by(Y, Y))
    assert match_node(p, n) is None
    mm = explain(p, n)
    assert mm is not None
    assert mm.path_str == "root<check>"
    assert mm.node is n
    assert mm.reason == (
        "check failed: y (relu_default) is also read by neg_default, sigmoid_default"
    )
    relaxed = where(call(aten.neg.default, capture(Y, call(aten.relu.default, X))),
                    users_at_most(Y, 2))
    m = match_node(relaxed, n)
    assert m is not None and m[Y] is r
    assert relaxed.describe() == "aten.neg.default(y=aten.relu.default(x)) where y has at most 2 " \
        "user(s)"
