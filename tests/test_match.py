"""The matcher, node kind by node kind, on hand-built graphs; find_matches' policy; explain()."""

from __future__ import annotations

import gc
import operator
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from graphs import QP, GraphBuilder, convert, dequantize, quantize
from torch import fx

from qalgebra import (
    Match,
    MatchError,
    Pattern,
    PatternError,
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
from qalgebra.checks import satisfies, single_user
from qalgebra.combinators import dequantize_per_tensor
from qalgebra.match import Matcher, explain, find_matches, iter_matches, match_node
from qalgebra.qparams import qparams

aten = torch.ops.aten
prims = torch.ops.prims

X = Var("x", fx.Node)
Y = Var("y", fx.Node)
S = Var("s", float)
K = Var("k", int)
T = Var("t", torch.Tensor)
DT = Var("dt", torch.dtype)
WHICH = Var("which", int)


def _two_inputs() -> tuple[GraphBuilder, fx.Node, fx.Node]:
    b = GraphBuilder()
    return b, b.input("a"), b.input("b")


def _any(value: object) -> Any:
    """``value`` typed as Any: these tests pass what mypy would rightly refuse."""
    return value


def _must(m: Match | None) -> Match:
    assert m is not None
    return m


# --------------------------------------------------------------------------------------------
# Var
# --------------------------------------------------------------------------------------------


def test_var_binds_a_node() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    m = _must(match_node(call(aten.relu.default, X), r))
    assert m[X] is a
    assert m.root is r
    assert m.nodes == (r,)


def test_float_var_accepts_ints_and_floats_but_not_bools() -> None:
    b, a, _ = _two_inputs()
    by_int = b.op(aten.mul.Tensor, a, 3)
    by_float = b.op(aten.mul.Tensor, a, 0.5)
    by_bool = b.op(aten.mul.Tensor, a, True)
    p = call(aten.mul.Tensor, X, S)
    got = _must(match_node(p, by_int))[S]
    assert got == 3.0 and type(got) is float
    assert _must(match_node(p, by_float))[S] == 0.5
    assert match_node(p, by_bool) is None


def test_int_var_refuses_floats_and_bools() -> None:
    b, a, _ = _two_inputs()
    p = call(aten.add.Tensor, X, K)
    assert _must(match_node(p, b.op(aten.add.Tensor, a, 4)))[K] == 4
    assert match_node(p, b.op(aten.add.Tensor, a, 4.0)) is None
    assert match_node(p, b.op(aten.add.Tensor, a, False)) is None


def test_scalar_vars_read_one_element_get_attr_tensors() -> None:
    b, a, _ = _two_inputs()
    fs = b.const(torch.tensor([0.25]))
    fs2 = b.const(torch.tensor([0.25, 0.5, 0.75]))
    i1 = b.const(torch.tensor(7, dtype=torch.int64))
    mul_f = b.op(aten.mul.Tensor, a, fs)
    mul_f2 = b.op(aten.mul.Tensor, a, fs2)
    mul_i = b.op(aten.mul.Tensor, a, i1)
    assert _must(match_node(call(aten.mul.Tensor, X, S), mul_f))[S] == 0.25
    assert match_node(call(aten.mul.Tensor, X, S), mul_f2) is None  # not one element
    assert _must(match_node(call(aten.mul.Tensor, X, K), mul_i))[K] == 7
    assert match_node(call(aten.mul.Tensor, X, K), mul_f) is None  # a float tensor is no int
    # A float Var reads 7 from the int tensor? No: an int tensor is not a float constant.
    assert match_node(call(aten.mul.Tensor, X, S), mul_i) is None
    tensor_match = _must(match_node(call(aten.mul.Tensor, X, T), mul_f2))
    assert torch.equal(tensor_match[T], torch.tensor([0.25, 0.5, 0.75]))
    # A Node Var binds the get_attr node itself.
    assert _must(match_node(call(aten.mul.Tensor, X, Y), mul_f2))[Y].op == "get_attr"


def test_tensor_var_needs_a_get_attr() -> None:
    b, a, c = _two_inputs()
    assert match_node(call(aten.mul.Tensor, X, T), b.op(aten.mul.Tensor, a, c)) is None


def test_list_tuple_and_dtype_vars() -> None:
    b, a, _ = _two_inputs()
    v = b.op(aten.view.default, a, [3, 2])
    shape_list = Var("shape", list)
    shape_tuple = Var("shape_t", tuple)
    m = _must(match_node(call(aten.view.default, X, shape_list), v))
    assert m[shape_list] == [3, 2] and isinstance(m[shape_list], list)
    m = _must(match_node(call(aten.view.default, X, shape_tuple), v))
    assert m[shape_tuple] == (3, 2)
    conv = convert(b, a, torch.bfloat16)
    assert _must(match_node(call(prims.convert_element_type.default, X, DT), conv))[DT] is (
        torch.bfloat16
    )
    # A wrong runtime type is a non-match, not a crash.
    assert match_node(call(prims.convert_element_type.default, X, K), conv) is None
    assert match_node(call(aten.view.default, X, DT), v) is None


def test_var_used_twice_must_bind_equal_values() -> None:
    b, a, c = _two_inputs()
    same = b.op(aten.mul.Tensor, a, a)
    other = b.op(aten.mul.Tensor, a, c)
    p = call(aten.mul.Tensor, X, X)
    assert _must(match_node(p, same))[X] is a
    assert match_node(p, other) is None
    scaled = call(aten.add.Tensor, call(aten.mul.Tensor, X, S), S)
    ok = b.op(aten.add.Tensor, b.op(aten.mul.Tensor, a, 2), 2.0)  # 2 and 2.0 are equal floats
    bad = b.op(aten.add.Tensor, b.op(aten.mul.Tensor, a, 2.0), 3.0)
    assert _must(match_node(scaled, ok))[S] == 2.0
    assert match_node(scaled, bad) is None


# --------------------------------------------------------------------------------------------
# ignored, literal
# --------------------------------------------------------------------------------------------


def test_ignored_matches_anything_and_binds_nothing() -> None:
    b, a, c = _two_inputs()
    for second in (c, 3, 0.5, None):
        node = (
            b.op(aten.mul.Tensor, a, second) if second is not None else b.op(aten.relu.default, a)
        )
        p = (
            call(aten.mul.Tensor, X, ignored())
            if second is not None
            else call(aten.relu.default, ignored())
        )
        m = _must(match_node(p, node))
        assert set(m.bindings) <= {X}


def test_literal_numbers_compare_by_value_bools_only_with_bools() -> None:
    b, a, _ = _two_inputs()
    two = b.op(aten.mul.Tensor, a, 2)
    two_f = b.op(aten.mul.Tensor, a, 2.0)
    true = b.op(aten.mul.Tensor, a, True)
    one = b.op(aten.mul.Tensor, a, 1)
    assert match_node(call(aten.mul.Tensor, X, 2.0), two) is not None
    assert match_node(call(aten.mul.Tensor, X, 2), two_f) is not None
    assert match_node(call(aten.mul.Tensor, X, 3), two) is None
    assert match_node(call(aten.mul.Tensor, X, True), true) is not None
    assert match_node(call(aten.mul.Tensor, X, True), one) is None
    assert match_node(call(aten.mul.Tensor, X, 1), true) is None
    assert match_node(call(aten.mul.Tensor, X, literal(torch.float32)), two) is None
    view = b.op(aten.view.default, a, [3, 2])
    assert match_node(call(aten.view.default, X, [3, 2]), view) is not None
    assert match_node(call(aten.view.default, X, (3, 2)), view) is not None
    assert match_node(call(aten.view.default, X, [2, 3]), view) is None


# --------------------------------------------------------------------------------------------
# call
# --------------------------------------------------------------------------------------------


def test_call_targets_overload_packet_tuple_and_callable() -> None:
    b, a, c = _two_inputs()
    add_t = b.op(aten.add.Tensor, a, c)
    add_s = b.op(aten.add.Scalar, a, 2)
    sub_t = b.op(aten.sub.Tensor, a, c)
    assert match_node(call(aten.add.Tensor, X, Y), add_t) is not None
    assert match_node(call(aten.add.Tensor, X, 2), add_s) is None  # another overload
    packet = call(aten.add, X, ignored())
    assert match_node(packet, add_t) is not None
    assert match_node(packet, add_s) is not None
    assert match_node(packet, sub_t) is None
    either = call((aten.add.Tensor, aten.sub.Tensor), X, Y)
    assert match_node(either, add_t) is not None
    assert match_node(either, sub_t) is not None
    assert match_node(either, add_s) is None
    pair = b.op(aten.split.Tensor, a, 1)
    first = b.op(operator.getitem, pair, 0, meta=False)
    m = _must(match_node(call(operator.getitem, call(aten.split.Tensor, X, 1), 0), first))
    assert m[X] is a
    assert m.nodes == (pair, first)
    assert match_node(call(operator.getitem, X, 1), first) is None


def test_arguments_left_out_must_hold_their_schema_default() -> None:
    b, a, c = _two_inputs()
    alpha2 = b.op(aten.add.Tensor, a, c, alpha=2)
    alpha1 = b.op(aten.add.Tensor, a, c, alpha=1)
    p = call(aten.add.Tensor, X, Y)
    assert match_node(p, alpha2) is None
    assert match_node(p, alpha1) is not None  # explicitly the default
    assert match_node(call(aten.add.Tensor, X, Y, alpha=2), alpha2) is not None
    assert match_node(call(aten.add.Tensor, X, Y, alpha=K), alpha2) is not None
    gelu = b.op(aten.gelu.default, a, approximate="tanh")
    assert match_node(call(aten.gelu.default, X), gelu) is None
    assert match_node(call(aten.gelu.default, X, approximate="tanh"), gelu) is not None


def test_arguments_are_normalized_by_schema_name() -> None:
    b, a, c = _two_inputs()
    by_kw = b.op(aten.add.Tensor, a, other=c)
    assert _must(match_node(call(aten.add.Tensor, X, Y), by_kw))[Y] is c
    positional = b.op(aten.gelu.default, a)
    assert match_node(call(aten.gelu.default, X, approximate="none"), positional) is not None
    assert match_node(call(aten.add.Tensor, X, other=Y), b.op(aten.add.Tensor, a, c)) is not None


def test_python_callable_arguments_must_fit_exactly() -> None:
    b, a, _ = _two_inputs()
    node = b.op(operator.add, a, 1, meta=False)
    assert match_node(call(operator.add, X, 1), node) is not None
    assert match_node(call(operator.add, X), node) is None


def test_users_constraint() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    b.op(aten.neg.default, r)
    assert match_node(call(aten.relu.default, X, users=1), r) is not None
    assert match_node(call(aten.relu.default, X, users=2), r) is None
    b.op(aten.sigmoid.default, r)
    assert match_node(call(aten.relu.default, X, users=2), r) is not None


@pytest.mark.parametrize("target", [aten.add.Tensor, aten.mul.Tensor, operator.add, operator.mul])
def test_commutative_targets_match_both_operand_orders(target: Callable[..., Any]) -> None:
    b, a, c = _two_inputs()
    r = b.op(aten.relu.default, a)
    meta = target not in (operator.add, operator.mul)
    left = b.op(target, r, c, meta=meta)
    right = b.op(target, c, r, meta=meta)
    p = call(target, call(aten.relu.default, X), Y)
    for node in (left, right):
        m = _must(match_node(p, node))
        assert m[X] is a
        assert m[Y] is c
    # Both orders also come out of iter_matches when both are possible.
    both = b.op(target, r, r, meta=meta)
    assert len(list(iter_matches(call(target, X, Y), both))) == 2


def test_scalar_overloads_commute() -> None:
    b, a, _ = _two_inputs()
    add_s = b.op(aten.add.Scalar, a, 2)
    assert _must(match_node(call(aten.add.Scalar, 2, X), add_s))[X] is a


def test_non_commutative_targets_keep_their_order() -> None:
    b, a, c = _two_inputs()
    r = b.op(aten.relu.default, a)
    assert (
        match_node(
            call(aten.sub.Tensor, call(aten.relu.default, X), Y), b.op(aten.sub.Tensor, r, c)
        )
        is not None
    )
    assert (
        match_node(
            call(aten.sub.Tensor, call(aten.relu.default, X), Y), b.op(aten.sub.Tensor, c, r)
        )
        is None
    )


# --------------------------------------------------------------------------------------------
# optional, any_of
# --------------------------------------------------------------------------------------------


def test_optional_present_or_absent_with_defaults() -> None:
    b, a, _ = _two_inputs()
    p = call(aten.relu.default, optional(call(aten.mul.Tensor, X, S), defaults={S: 1.0}))
    present = b.op(aten.relu.default, b.op(aten.mul.Tensor, a, 0.5))
    absent = b.op(aten.relu.default, a)
    m = _must(match_node(p, present))
    assert (m[X], m[S]) == (a, 0.5)
    assert len(m.nodes) == 2
    m = _must(match_node(p, absent))
    assert (m[X], m[S]) == (a, 1.0)
    assert m.nodes == (absent,)


def test_optional_through_another_argument() -> None:
    b, a, _ = _two_inputs()
    p = call(aten.relu.default, optional(call(aten.div.Tensor, S, X), through=1, defaults={S: 1}))
    present = b.op(aten.relu.default, b.op(aten.div.Tensor, 2.0, a, meta=False))
    absent = b.op(aten.relu.default, a)
    assert _must(match_node(p, present))[S] == 2.0
    m = _must(match_node(p, absent))
    assert m[S] == 1.0 and m[X] is a


def test_optional_prefers_present() -> None:
    b, a, _ = _two_inputs()
    node = b.op(aten.relu.default, a)
    p = optional(call(aten.relu.default, X), defaults={})
    ms = list(iter_matches(p, node))
    assert [m[X] for m in ms] == [a, node]  # present (x = a) first, then absent (x = the relu)


def test_optional_list_default_binds_a_list() -> None:
    b, a, _ = _two_inputs()
    shape = Var("shape", list)
    p = optional(call(aten.view.default, X, shape), defaults={shape: []})
    r = b.op(aten.relu.default, a)
    m = _must(match_node(call(aten.relu.default, p), b.op(aten.relu.default, r)))
    assert m[shape] == [] and isinstance(m[shape], list)


def test_any_of_is_ordered() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    p = any_of(
        tag(call(aten.relu.default, X), WHICH, 1),
        tag(call(aten.relu.default, ignored()), WHICH, 2),
        tag(X, WHICH, 3),
    )
    assert [m[WHICH] for m in iter_matches(p, r)] == [1, 2, 3]
    assert _must(match_node(p, r))[WHICH] == 1
    assert _must(match_node(p, a))[WHICH] == 3


def test_captures_exist_only_when_the_whole_match_succeeds() -> None:
    b, a, _ = _two_inputs()
    node = b.op(aten.add.Tensor, a, 3)
    first = capture(Y, call(aten.add.Tensor, X, 5))  # binds x = a, then fails on 5 != 3
    second = call(aten.add.Tensor, Var("z", fx.Node), ignored())
    m = _must(match_node(first | second, node))
    assert X not in m and Y not in m
    assert m[Var("z", fx.Node)] is a
    assert match_node(call(aten.mul.Tensor, capture(Y, X), 3), node) is None


# --------------------------------------------------------------------------------------------
# list_of, capture, tag, where, dtype_of, reciprocal
# --------------------------------------------------------------------------------------------


def test_list_of_binds_per_element() -> None:
    b, a, c = _two_inputs()
    ra, rc = b.op(aten.relu.default, a), b.op(aten.relu.default, c)
    cat = b.op(aten.cat.default, [ra, rc], 1)
    p = call(aten.cat.default, list_of(call(aten.relu.default, X)), K)
    m = _must(match_node(p, cat))
    assert m.each(X) == (a, c)
    assert m[K] == 1
    assert set(m.nodes) == {ra, rc, cat}
    with pytest.raises(MatchError, match="list_of"):
        m[X]
    mixed = b.op(aten.cat.default, [ra, c])
    assert match_node(call(aten.cat.default, list_of(call(aten.relu.default, X))), mixed) is None
    empty = b.op(aten.cat.default, [], meta=False)
    assert match_node(call(aten.cat.default, list_of(X)), empty) is None


def test_a_var_inside_and_outside_list_of_is_refused() -> None:
    b, a, _ = _two_inputs()
    cat = b.op(aten.cat.default, [a], 0)
    with pytest.raises(PatternError, match="both inside and outside a list_of"):
        match_node(call(aten.cat.default, list_of(X), X), cat)


def test_capture_binds_what_the_pattern_matched() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    n = b.op(aten.neg.default, r)
    m = _must(match_node(call(aten.neg.default, capture(Y, call(aten.relu.default, X))), n))
    assert (m[X], m[Y]) == (a, r)


def test_tag_binds_a_constant() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    assert _must(match_node(tag(call(aten.relu.default, X), WHICH, 7), r))[WHICH] == 7
    assert match_node(tag(call(aten.neg.default, X), WHICH, 7), r) is None


def test_where_adds_a_check() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    b.op(aten.neg.default, r)
    p = call(aten.neg.default, capture(Y, call(aten.relu.default, X)))
    assert match_node(where(p, single_user(Y)), r.next) is not None
    b.op(aten.sigmoid.default, r)
    assert match_node(where(p, single_user(Y)), r.next) is None
    seen: list[Match] = []

    def record(m: Match) -> bool:
        seen.append(m)
        return True

    assert match_node(where(p, satisfies(record, "anything")), r.next) is not None
    assert seen[0][Y] is r


def test_dtype_of_reads_meta_get_attr_and_conversion_arguments() -> None:
    b = GraphBuilder()
    x = b.input("x", dtype=torch.bfloat16)
    bare = b.input("bare", meta=False)
    w = b.const(torch.zeros(2, dtype=torch.int8))
    p = dtype_of(X, DT)
    assert _must(match_node(p, x))[DT] is torch.bfloat16
    assert match_node(p, bare) is None  # nothing tells its dtype
    w.meta.pop("val")
    assert _must(match_node(p, w))[DT] is torch.int8  # read from the get_attr tensor
    conv = convert(b, bare, torch.float16, meta=False)
    to_copy = convert(b, bare, torch.float16, "to_copy", meta=False)
    to_dtype = convert(b, bare, torch.float16, "to_dtype", meta=False)
    for node in (conv, to_copy, to_dtype):
        assert "val" not in node.meta
        assert _must(match_node(p, node))[DT] is torch.float16
    q = quantize(b, bare, QP(dtype=torch.int8, quant_min=-128, quant_max=127), meta=False)
    assert _must(match_node(p, q))[DT] is torch.int8
    # A dequantize's `dtype` argument is its input's dtype: its output is float32.
    dq = dequantize(b, q, QP(dtype=torch.int8, quant_min=-128, quant_max=127), meta=False)
    assert _must(match_node(p, dq))[DT] is torch.float32
    relu = b.op(aten.relu.default, bare, meta=False)
    assert match_node(p, relu) is None


def test_reciprocal_binds_one_over_the_value() -> None:
    b, a, _ = _two_inputs()
    p = call(aten.mul.Tensor, X, reciprocal(S))
    assert _must(match_node(p, b.op(aten.mul.Tensor, a, 4)))[S] == 0.25
    assert match_node(p, b.op(aten.mul.Tensor, a, 0.0)) is None
    assert match_node(p, b.op(aten.mul.Tensor, a, a)) is None


# --------------------------------------------------------------------------------------------
# find_matches
# --------------------------------------------------------------------------------------------


def _relu_chain(n: int) -> tuple[GraphBuilder, list[fx.Node]]:
    b = GraphBuilder()
    x = b.input()
    nodes = []
    for _ in range(n):
        x = b.op(aten.relu.default, x)
        nodes.append(x)
    return b, nodes


def test_find_matches_is_non_overlapping_in_graph_order_larger_first() -> None:
    b, relus = _relu_chain(5)
    p = call(aten.relu.default, call(aten.relu.default, X))
    ms = find_matches(p, b.module())
    # Tried from the end: (r3, r4), then (r1, r2); r0 is left alone.
    assert [m.root for m in ms] == [relus[2], relus[4]]
    assert [m.nodes for m in ms] == [(relus[1], relus[2]), (relus[3], relus[4])]
    assert ms[0][X] is relus[0]


def test_find_matches_prefers_the_larger_match() -> None:
    b = GraphBuilder()
    a = b.input()
    mul = b.op(aten.mul.Tensor, a, 0.5)
    relu = b.op(aten.relu.default, mul)
    p = optional(call(aten.relu.default, call(aten.mul.Tensor, X, S)), defaults={}) | call(
        aten.mul.Tensor, X, S
    )
    ms = find_matches(p, b.module())
    assert len(ms) == 1
    assert ms[0].root is relu
    assert ms[0].nodes == (mul, relu)


def test_find_matches_alternatives_claim_their_own_nodes() -> None:
    # Per node, a | b matches where b | a does; but the non-overlapping choice follows the
    # alternative that fires: relu(x) claims one relu, relu(relu(x)) claims two.
    b, relus = _relu_chain(2)
    gm = b.module()
    one = call(aten.relu.default, X)
    two = call(aten.relu.default, call(aten.relu.default, X))
    assert [m.root for m in find_matches(one | two, gm)] == relus
    assert [m.root for m in find_matches(two | one, gm)] == [relus[1]]
    for node in relus:
        assert (match_node(one | two, node) is None) == (match_node(two | one, node) is None)


def test_find_matches_exclusive_passes_over_matches_read_from_outside() -> None:
    b = GraphBuilder()
    a = b.input()
    mul = b.op(aten.mul.Tensor, a, 0.5)
    relu = b.op(aten.relu.default, mul)
    b.op(aten.neg.default, mul)  # the mul is also read outside relu(mul(...))
    gm = b.module()
    p = call(aten.relu.default, optional(call(aten.mul.Tensor, X, S), defaults={S: 1.0}))
    (shared,) = find_matches(p, gm)
    assert (shared.root, shared.nodes, shared[S]) == (relu, (mul, relu), 0.5)
    # Exclusive: the way that takes the mul in is passed over, the next way (mul absent) wins.
    (alone,) = find_matches(p, gm, exclusive=True)
    assert (alone.root, alone.nodes, alone[S], alone[X]) == (relu, (relu,), 1.0, mul)


def test_find_matches_accepts_a_graph_or_a_module() -> None:
    b, relus = _relu_chain(2)
    gm = b.module()
    p = call(aten.relu.default, X)
    assert [m.root for m in find_matches(p, gm)] == relus
    assert [m.root for m in find_matches(p, gm.graph)] == relus
    with pytest.raises(PatternError, match=r"expected an fx\.Graph or fx\.GraphModule"):
        find_matches(p, _any(relus[0]))
    with pytest.raises(PatternError, match="expected a Pattern"):
        find_matches(_any("relu"), gm)


def test_find_matches_never_roots_at_the_output_node() -> None:
    b, _ = _relu_chain(1)
    gm = b.module()
    roots = [m.root for m in find_matches(X, gm)]
    assert [n.op for n in roots] == ["placeholder", "call_function"]


def test_get_attr_values_need_the_owning_module() -> None:
    b = GraphBuilder(owned=False)
    a = b.input()
    s = b.const(torch.tensor([0.5]))
    mul = b.op(aten.mul.Tensor, a, s)
    p = call(aten.mul.Tensor, X, S)
    assert match_node(p, mul) is None  # the bare graph has no module to read `s` from
    assert find_matches(p, b.graph) == []
    gm = b.module()
    assert [m[S] for m in find_matches(p, gm)] == [0.5]
    assert [m[S] for m in find_matches(p, gm.graph)] == [0.5]  # gm owns its graph


def test_twenty_nested_optionals_match_with_half_present() -> None:
    # Level i is clamp(_, i, max_i); levels with an even i are present in the graph.
    k = 20
    maxima = [Var(f"max{i}", float) for i in range(k)]
    p: Pattern = X
    for i, v in enumerate(maxima):
        p = optional(call(aten.clamp.default, p, float(i), v), defaults={v: -1.0})
    b = GraphBuilder()
    node = b.input()
    for i in range(0, k, 2):
        node = b.op(aten.clamp.default, node, float(i), 100.0 + i)
    pattern = call(aten.relu.default, p)
    root = b.op(aten.relu.default, node)
    m = _must(match_node(pattern, root))
    assert [m[v] for v in maxima] == [100.0 + i if i % 2 == 0 else -1.0 for i in range(k)]
    assert m[X].op == "placeholder"
    assert len(m.nodes) == k // 2 + 1
    assert [mm.root for mm in find_matches(pattern, b.module())] == [root]


def test_nested_optionals_that_cannot_match_fail() -> None:
    k = 20
    p: Pattern = call(aten.relu.default, X)
    for i in range(k):
        v = Var(f"c{i}", float)
        p = optional(call(aten.mul.Tensor, p, v), defaults={v: 1.0})
    b = GraphBuilder()
    node = b.input()
    for i in range(k // 2):
        node = b.op(aten.mul.Tensor, node, float(i + 2))
    # Every split of the 10 muls between the 20 optionals is ambiguous and all of them fail at
    # the placeholder, which is no relu; the answer must still come back (memoized failures).
    assert match_node(p, node) is None
    assert find_matches(p, b.module()) == []


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------


def test_explain_returns_none_when_the_pattern_matches() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    assert explain(call(aten.relu.default, X), r) is None


def test_explain_golden_messages() -> None:
    b, a, c = _two_inputs()
    add2 = b.op(aten.add.Tensor, a, c, alpha=2)
    relu = b.op(aten.relu.default, add2)
    mul = b.op(aten.mul.Tensor, a, c)
    gelu = b.op(aten.gelu.default, a, approximate="tanh")
    cat = b.op(aten.cat.default, [a, c])
    cases = [
        (
            call(aten.relu.default, call(aten.add.Tensor, X, Y)),
            relu,
            "at root.args[0].alpha (2): argument alpha is 2, the pattern leaves it at its "
            "default 1",
        ),
        (
            # mul commutes: the swapped operand order fails as far in, but only mirrors this.
            call(aten.mul.Tensor, X, S),
            mul,
            "at root.args[1] (node b (placeholder)): Var s expects type float, got node b "
            "(placeholder)",
        ),
        (
            call(aten.mul.Tensor, X, X),
            mul,
            "at root.args[1] (node b (placeholder)): Var x is already bound to node a "
            "(placeholder), here it would be node b (placeholder)",
        ),
        (
            call(aten.relu.default, X),
            mul,
            "at root (node mul_tensor = aten.mul.Tensor(...)): expected a call to "
            "aten.relu.default, got node mul_tensor = aten.mul.Tensor(...)",
        ),
        (
            call(aten.gelu.default, X, approximate="none"),
            gelu,
            "at root.approximate ('tanh'): expected 'none', got 'tanh'",
        ),
        (
            call(aten.relu.default, X, users=2),
            relu,
            "at root (node relu_default = aten.relu.default(...)): expected 2 user(s), "
            "relu_default has 0",
        ),
        (
            call(aten.cat.default, list_of(call(aten.relu.default, X))),
            cat,
            "at root.args[0][0] (node a (placeholder)): expected a call to aten.relu.default, "
            "got node a (placeholder)",
        ),
        (
            where(call(aten.mul.Tensor, X, Y), single_user(X)),
            mul,
            "at root<check> (node mul_tensor = aten.mul.Tensor(...)): check failed: x (a) has "
            "4 users, at most 1 allowed",
        ),
        (
            call(aten.mul.Tensor, X, reciprocal(S)),
            mul,
            "at root.args[1] (node b (placeholder)): expected a non-zero number (1/s), got node "
            "b (placeholder)",
        ),
    ]
    for pattern, node, text in cases:
        mm = explain(pattern, node)
        assert mm is not None
        assert str(mm) == text


def test_explain_a_dequant_that_multiplies_by_a_tensor_instead_of_a_scale() -> None:
    b = GraphBuilder()
    q = b.input("q", dtype=torch.uint8)
    other = b.input("other")
    shifted = b.op(aten.sub.Tensor, convert(b, q, torch.float32), 84)
    mul = b.op(aten.mul.Tensor, shifted, other)
    p = dequantize_per_tensor(X, qparams("x"))
    mm = explain(p, mul)
    assert mm is not None
    # The conversion and the zero point matched; the scale is where it fails -- not at one of
    # the other conversion spellings tried after the first one had matched.
    assert mm.path_str == "root.args[1]"
    assert mm.node is other
    assert str(mm) == (
        "at root.args[1] (node other (placeholder)): Var x_scale expects type float, got node "
        "other (placeholder)"
    )


def test_explain_a_decomposed_dequant_whose_input_dtype_is_unknown() -> None:
    b = GraphBuilder()
    q = b.input("q", meta=False)
    d = dequantize(b, q, QP(), "decomposed", meta=False)
    mm = explain(dequantize_per_tensor(X, qparams("x")), d)
    assert mm is not None
    assert mm.path_str == "root.args[0].args[0].args[0]"
    assert mm.node is q
    assert mm.reason == "the dtype of node q (placeholder) is unknown (no meta['val'])"


def test_a_failed_match_leaves_nothing_behind() -> None:
    b, a, _ = _two_inputs()
    r = b.op(aten.relu.default, a)
    p = call(aten.neg.default, capture(Y, X))
    for _ in range(2):
        assert match_node(p, r) is None
        assert list(iter_matches(p, r)) == []
        mm = explain(p, r)
        assert mm is not None and mm.path_str == "root"
    assert match_node(capture(Y, call(aten.relu.default, X)), r) is not None


def _relu_neg_graph(*, extra_reader: bool) -> tuple[fx.Graph, fx.Node]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    inner = graph.call_function(aten.relu.default, (x,))
    graph.call_function(aten._assert_tensor_metadata.default, (inner,), {"dtype": torch.float32})
    root = graph.call_function(aten.neg.default, (inner,))
    outputs: tuple[fx.Node, ...] = (root,)
    if extra_reader:
        outputs = (root, graph.call_function(aten.sin.default, (inner,)))
    graph.output(outputs)
    return graph, root


def test_exclusive_ignores_metadata_asserts_but_not_other_readers() -> None:
    # torch.export adds aten._assert_tensor_metadata after Tensor.to(): a check, not a reader
    # that needs the value, so it must not make a match non-exclusive.
    pattern = call(aten.neg.default, call(aten.relu.default, Var("x", fx.Node)))
    graph, root = _relu_neg_graph(extra_reader=False)
    assert [m.root for m in find_matches(pattern, graph, exclusive=True)] == [root]
    graph, _ = _relu_neg_graph(extra_reader=True)
    assert find_matches(pattern, graph, exclusive=True) == []


def test_targets_a_pattern_needs_are_looked_up_by_overload_and_by_packet() -> None:
    """find_matches skips a graph lacking a target every alternative needs; a packet in the
    pattern is met by any of its overloads in the graph, an overload only by itself."""
    aten = torch.ops.aten
    b = GraphBuilder()
    x = b.input()
    neg = b.op(aten.neg.default, b.op(aten.relu.default, x))
    b.output(neg)
    gm = b.module()
    by_packet = any_of(
        call(aten.neg.default, call(aten.relu, X)), call(aten.neg, call(aten.sigmoid, X))
    )
    (m,) = find_matches(by_packet, gm)
    assert m.root is neg and m[X] is x
    needs_sigmoid = any_of(
        call(aten.neg.default, call(aten.sigmoid, X)), call(aten.neg, call(aten.sigmoid.default, X))
    )
    assert find_matches(needs_sigmoid, gm) == []
    assert "sigmoid" in str(explain(needs_sigmoid, neg))
    other_overload = call(aten.neg.default, call(aten.relu.out, X, out=ignored()))
    assert find_matches(other_overload, gm) == []


def test_explain_lists_every_alternative_that_fails_as_far_in() -> None:
    b, a, _ = _two_inputs()
    add3 = b.op(aten.add.Tensor, a, 3)
    mm = explain(any_of(call(aten.add.Tensor, X, 1), call(aten.add.Tensor, X, 2)), add3)
    assert mm is not None
    assert str(mm) == (
        "at root.args[1] (3): expected 1, got 3\n  or at root.args[1] (3): expected 2, got 3"
    )
    assert [t.reason for t in mm.tied] == ["expected 2, got 3"]
    # A failure after less progress is no tie: the second alternative fails at its root.
    mm = explain(any_of(call(aten.add.Tensor, X, 1), call(aten.neg.default, X)), add3)
    assert mm is not None and mm.tied == ()
    # Alternatives of other targets at one place are one failure naming them all.
    mm = explain(call(aten.relu.default, X) | call(aten.sigmoid.default, X) | X, add3)
    assert mm is None
    mm = explain(call(aten.relu.default, X) | call(aten.sigmoid.default, X), add3)
    assert mm is not None and mm.tied == ()
    assert mm.reason == (
        "expected a call to aten.relu.default | aten.sigmoid.default, got node add_tensor = "
        "aten.add.Tensor(...)"
    )


def test_explain_does_not_list_the_mirror_of_a_commutative_call() -> None:
    b, a, c = _two_inputs()
    mm = explain(call(aten.mul.Tensor, X, S), b.op(aten.mul.Tensor, a, c))
    assert mm is not None
    assert mm.tied == ()  # the swapped order fails as far in, at the mirrored place
    assert mm.node is c


# --------------------------------------------------------------------------------------------
# Compiled matchers
# --------------------------------------------------------------------------------------------


def test_a_matcher_matches_like_its_pattern() -> None:
    b, relus = _relu_chain(3)
    gm = b.module()
    p = call(aten.relu.default, call(aten.relu.default, X))
    compiled = Matcher(p)
    assert [m.root for m in compiled.find_matches(gm)] == [m.root for m in find_matches(p, gm)]
    assert [m.root for m in find_matches(compiled, gm)] == [relus[2]]
    m = compiled.match_node(relus[1])
    assert m is not None and m == match_node(compiled, relus[1]) == match_node(p, relus[1])
    assert list(iter_matches(compiled, relus[0])) == []
    assert explain(compiled, relus[0]) == compiled.explain(relus[0]) == explain(p, relus[0])
    with pytest.raises(PatternError, match="expected a Pattern, got 'relu'"):
        Matcher(_any("relu"))


def test_a_pattern_is_checked_when_it_is_compiled() -> None:
    with pytest.raises(PatternError, match="both inside and outside a list_of"):
        Matcher(call(aten.cat.default, list_of(X), X))


def test_matching_throwaway_patterns_keeps_none_of_them_alive() -> None:
    """10,000 patterns built, matched through the entry points in turn and dropped: none stays
    alive, nor does anything made for it (module caches used to keep every pattern matched)."""
    b, a, _ = _two_inputs()
    node = b.op(aten.mul.Tensor, b.op(aten.relu.default, a), 0.5)
    gm = b.module()
    uses: list[Callable[[Pattern], bool]] = [
        lambda p: len(find_matches(p, gm)) == 1,
        lambda p: match_node(p, node) is not None,
        lambda p: explain(p, node) is None and explain(p, a) is not None,
        lambda p: len(list(iter_matches(p, node))) == 2,  # relu present, then absent
    ]
    sample: list[weakref.ref[Pattern]] = []
    baseline = 0
    for i in range(10_000):
        if i == 1_000:
            gc.collect()
            baseline = len(gc.get_objects())
        p = call(aten.mul.Tensor, optional(call(aten.relu.default, X)), Var(f"s{i % 7}", float))
        assert uses[i % len(uses)](p)
        if i % 100 == 0:
            sample.append(weakref.ref(p))
    del p
    gc.collect()
    assert [r for r in sample if r() is not None] == []
    grown = len(gc.get_objects()) - baseline
    assert grown < 500, f"{grown} more objects after 9,000 more patterns"
