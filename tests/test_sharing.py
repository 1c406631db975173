"""Shared sub-patterns: merged once (``walk``, ``Dag``), described and printed once by name."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from test_pattern import NS
from torch import fx

from qalgebra import Pattern, PatternError, Var, any_of, call, let, optional, tag
from qalgebra.combinators import Unary, dequantize_per_tensor
from qalgebra.fusions.conv import QCONV
from qalgebra.fusions.linear import QLINEAR
from qalgebra.pattern import walk
from qalgebra.qparams import qparams
from qalgebra.sharing import NAMED_FROM, Dag

aten = torch.ops.aten

X = Var("x", fx.Node)
S = Var("s", float)
ZP = Var("zp", int)

def _spelled_out(p: Pattern) -> int:
    """The number of nodes of ``p`` written out as a tree (counted through shared objects)."""
    memo: dict[int, int] = {}

    def size(q: Pattern) -> int:
        if id(q) not in memo:
            memo[id(q)] = 1 + sum(size(c) for c in q.children())
        return memo[id(q)]

    return size(p)


def _any(value: object) -> Any:
    """``value`` typed as Any: these tests pass what mypy would rightly refuse."""
    return value


def _dequant() -> Pattern:
    return call(aten.mul.Tensor, call(aten.sub.Tensor, X, ZP), S)  # 41 characters of English


# --------------------------------------------------------------------------------------------
# Distinct sub-patterns
# --------------------------------------------------------------------------------------------


def test_walk_yields_each_distinct_sub_pattern_once_parents_first() -> None:
    p = QLINEAR.pattern
    nodes = list(walk(p))
    assert len(nodes) == len(set(nodes))  # equal sub-patterns (built apart) are merged
    assert len(nodes) < 200 < 100_000 < _spelled_out(p)
    seen: set[Pattern] = set()
    for q in reversed(nodes):  # children come after their parents
        assert all(c in seen for c in q.children())
        seen.add(q)
    everything: set[Pattern] = set()
    stack = [p]
    done: set[int] = set()
    while stack:  # every sub-pattern object, by identity
        q = stack.pop()
        if id(q) not in done:
            done.add(id(q))
            everything.add(q)
            stack.extend(q.children())
    assert everything == seen
    assert nodes[0] is p


def test_the_dag_merges_equal_sub_patterns_built_apart() -> None:
    a, b = _dequant(), _dequant()
    assert a is not b
    dag = Dag(call(aten.add.Tensor, a, b))
    assert dag.index(a) == dag.index(b)
    assert dag.occurrences()[dag.index(a)] == 2
    # Told apart: another Var type, another literal (a bool is no int), another target.
    assert len(Dag(any_of(call(aten.neg.default, 1), call(aten.neg.default, True))).nodes) == 5


# --------------------------------------------------------------------------------------------
# Descriptions and reprs
# --------------------------------------------------------------------------------------------


def test_a_long_shared_part_is_described_once_by_name() -> None:
    p = call(aten.add.Tensor, _dequant(), _dequant())
    assert p.describe() == (
        "aten.add.Tensor(<mul>, <mul>)\nwith\n  <mul> = aten.mul.Tensor(aten.sub.Tensor(x, zp), s)"
    )
    assert len("aten.mul.Tensor(aten.sub.Tensor(x, zp), s)") >= NAMED_FROM


def test_short_or_single_parts_are_described_in_place() -> None:
    relu = call(aten.relu.default, X)
    assert call(aten.add.Tensor, relu, relu).describe() == (
        "aten.add.Tensor(aten.relu.default(x), aten.relu.default(x))"
    )
    # The add is printed once (in place), the mul it reads twice is named.
    d = _dequant()
    outer = call(aten.neg.default, call(aten.add.Tensor, d, d))
    assert outer.describe().splitlines() == [
        "aten.neg.default(aten.add.Tensor(<mul>, <mul>))",
        "with",
        "  <mul> = aten.mul.Tensor(aten.sub.Tensor(x, zp), s)",
    ]


def test_the_largest_shared_part_gets_the_name() -> None:
    # The dequantize (two forms) is shared by the three conversion spellings: named as one, its
    # forms printed inside its definition.
    text = dequantize_per_tensor(X, qparams("x")).describe()
    assert "\nwith\n" not in text  # a single dequantize shares nothing long
    text = call(aten.add.Tensor, dequantize_per_tensor(X, qparams("x")), X).describe()
    assert "\nwith\n" not in text
    p = dequantize_per_tensor(X, qparams("x"))
    text = call(aten.add.Tensor, p, dequantize_per_tensor(X, qparams("x"))).describe()
    named = "<dequantize_per_tensor>"
    assert text.splitlines()[0] == f"aten.add.Tensor({named}, {named})"
    assert text.count(" = ") == 1


def test_catalog_descriptions_are_short() -> None:
    assert len(QLINEAR.pattern.describe().encode()) < 8_000
    assert len(repr(QLINEAR.pattern).encode()) < 16_000
    assert len(QCONV.pattern.describe().encode()) < 8_000


def test_names_are_unique_and_tell_alternatives_apart() -> None:
    unary = Var("unary", Unary)
    d = _dequant()
    p = any_of(
        tag(call(aten.relu.default, d), unary, Unary.RELU),
        tag(call(aten.tanh.default, d), unary, Unary.TANH),
    )
    text = call(aten.add.Tensor, p, p).describe()
    assert text.splitlines()[0] == "aten.add.Tensor(<unary>, <unary>)"
    assert "  <unary> = (aten.relu.default(<mul>) [unary=Unary.RELU] | " in text
    other = call(aten.mul.Tensor, call(aten.sub.Tensor, X, ZP), Var("t", float))
    two = call(aten.add.Tensor, call(aten.add.Tensor, d, d), call(aten.add.Tensor, other, other))
    assert two.describe().splitlines()[0] == (
        "aten.add.Tensor(aten.add.Tensor(<mul>, <mul>), aten.add.Tensor(<mul_2>, <mul_2>))"
    )


def _roundtrip(p: Pattern) -> Pattern:
    q = eval(repr(p), NS)
    assert isinstance(q, Pattern)
    return q


def test_repr_names_a_shared_part_in_a_let_that_evaluates_back() -> None:
    p = call(aten.add.Tensor, _dequant(), _dequant())
    assert repr(p).startswith("let(\n    lambda mul: call(torch.ops.aten.add.Tensor, mul, mul),\n")
    q = _roundtrip(p)
    assert q == p and repr(q) == repr(p)
    assert QLINEAR.pattern == _roundtrip(QLINEAR.pattern)


def call_(x: object) -> object:
    """A target named like the ``call`` factory: a part named after it must not hide it."""
    return x


def any_of_(x: object) -> object:
    """A target named like the ``any_of`` factory."""
    return x


def test_a_name_never_hides_what_the_repr_reads() -> None:
    package = __name__.split(".")[0]
    ns = {**NS, package: importlib.import_module(package)}
    first = call(call_, _dequant())
    second = call(any_of_, call(aten.mul.Tensor, call(aten.sub.Tensor, X, ZP), Var("t", float)))
    pair = any_of(call(aten.sub.Tensor, second, second), X)
    p = call(aten.add.Tensor, call(aten.add.Tensor, first, first), pair)
    text = repr(p)
    assert text.startswith("let(\n    lambda call_2, any_of_2: ")
    assert eval(text, ns) == p  # with a parameter named call or any_of, it would not


def test_let_builds_the_spelled_out_pattern_and_refuses_unknown_names() -> None:
    relu = call(aten.relu.default, X)
    p = let(
        lambda r, n: call(aten.add.Tensor, r, n),
        r=lambda: relu,
        n=lambda r: call(aten.neg.default, r),
    )
    assert p == call(aten.add.Tensor, relu, call(aten.neg.default, relu))
    with pytest.raises(PatternError, match="n reads 'r', which is not defined before it"):
        let(lambda r: r, n=lambda r: r, r=lambda: relu)
    with pytest.raises(PatternError, match="must be a function returning a pattern"):
        let(lambda: relu, r=_any(X))
    with pytest.raises(PatternError, match="expected a Pattern or a constant"):
        let(lambda: _any(object()))


def test_an_optional_default_shows_in_the_named_part() -> None:
    shifted = optional(call(aten.sub.Tensor, call(aten.mul.Tensor, X, S), ZP), defaults={ZP: 0})
    p = call(aten.add.Tensor, shifted, shifted)
    assert p.describe().splitlines()[0] == "aten.add.Tensor(<maybe_sub>, <maybe_sub>)"
    assert _roundtrip(p) == p
    assert "defaults={Var('zp', int): 0}" in repr(p)
