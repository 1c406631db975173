"""Pattern values: immutability, structural equality, repr as code, describe() as English, and
construction errors that name the offending part."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import pytest
import torch
from pyrsistent import PMap, PVector
from torch import fx

import qalgebra
import qalgebra.checks
import qalgebra.combinators
from qalgebra import (
    Match,
    MatchError,
    Mismatch,
    Pattern,
    PatternError,
    QAlgebraError,
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
from qalgebra.checks import dtype_in, single_user
from qalgebra.combinators import (
    Unary,
    dequantize_per_tensor,
    quantize_per_tensor,
    weight_dequant,
    with_binary,
    with_output_quant,
    with_reshape,
    with_unary,
)
from qalgebra.pattern import AnyOf, Call, Literal, Optional
from qalgebra.qparams import channel_qparams, qparams

aten = torch.ops.aten

X = Var("x", fx.Node)
Y = Var("y", fx.Node)
S = Var("s", float)
ZP = Var("zp", int)
DT = Var("dt", torch.dtype)
U = Var("unary", Unary)

#: The namespace a pattern's repr is evaluated in (what `from qalgebra import *`,
#: `from qalgebra.combinators import *` and `from qalgebra.checks import *` give, plus torch and
#: operator for targets and types).
NS: dict[str, Any] = {
    **vars(qalgebra.checks),
    **vars(qalgebra),
    **vars(qalgebra.combinators),
    "torch": torch,
    "operator": operator,
    "qalgebra": qalgebra,
}


def _roundtrip(p: Pattern) -> Pattern:
    q = eval(repr(p), NS)
    assert isinstance(q, Pattern)
    return q


REPRESENTATIVE: list[Pattern] = [
    X,
    ignored(),
    literal(3),
    literal(1.5),
    literal(True),
    literal(None),
    literal("tanh"),
    literal(torch.float32),
    literal(torch.channels_last),
    literal(float("inf")),
    literal((1,)),
    literal([1, 2]),
    call(aten.relu.default, X),
    call(aten.relu, X),
    call((aten.view.default, aten.reshape.default), X, Var("shape", list)),
    call(operator.getitem, X, 0),
    call(aten.add.Tensor, X, Y, users=1),
    call(aten.gelu.default, X, approximate="tanh"),
    call(aten.relu.default, X) | call(aten.sigmoid.default, X),
    optional(call(aten.sub.Tensor, X, ZP), defaults={ZP: 0}),
    optional(call(aten.mul.Tensor, S, X), through=1, defaults={S: 1.0}),
    call(aten.cat.default, list_of(call(aten.relu.default, X))),
    capture(Y, call(aten.relu.default, X)),
    tag(call(aten.relu.default, X), U, Unary.RELU),
    dtype_of(X, DT),
    call(aten.mul.Tensor, X, reciprocal(S)),
    where(call(aten.relu.default, X), dtype_in(DT, (torch.uint8, torch.int8))),
    dequantize_per_tensor(X, qparams("x")),
    quantize_per_tensor(X, qparams("y")),
    with_unary(call(aten.relu.default, X), U, Unary.NONE, Unary.HARDTANH, Unary.GELU_TANH),
    with_binary(X, Y),
    with_reshape(X, Var("shape", list)),
    with_output_quant(X, qparams("o")),
    weight_dequant(
        X, channel_qparams("w"), compute_dtype=DT, permuted=Var("perm", list)
    ),
]


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", REPRESENTATIVE, ids=lambda p: type(p).__name__)
def test_repr_evaluates_back_to_an_equal_pattern(p: Pattern) -> None:
    q = _roundtrip(p)
    assert q == p
    assert hash(q) == hash(p)
    assert repr(q) == repr(p)


@pytest.mark.parametrize("p", REPRESENTATIVE, ids=lambda p: type(p).__name__)
def test_patterns_are_frozen_and_slotted(p: Pattern) -> None:
    assert dataclasses.is_dataclass(p)
    assert not hasattr(p, "__dict__")
    fields = dataclasses.fields(p)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, fields[0].name, None)
    # A slotted class has no room for a new attribute.
    with pytest.raises(AttributeError):
        object.__setattr__(p, "extra", None)


def test_container_fields_are_pyrsistent() -> None:
    c = call(aten.add.Tensor, X, Y)
    assert isinstance(c.args, PVector)
    assert isinstance(c.kwargs, PMap)
    a = any_of(call(aten.relu.default, X), call(aten.sigmoid.default, X))
    assert isinstance(a, AnyOf)
    assert isinstance(a.alternatives, PVector)
    o = optional(call(aten.sub.Tensor, X, ZP), defaults={ZP: 0})
    assert isinstance(o.defaults, PMap)
    longer = c.args.append(X)
    assert len(longer) == 3
    assert len(c.args) == 2  # persistent: the pattern's vector is unchanged


def test_structural_equality_and_hash() -> None:
    def build() -> Pattern:
        return call(aten.mul.Tensor, optional(call(aten.sub.Tensor, X, ZP), defaults={ZP: 0}), S)

    a, b = build(), build()
    assert a is not b
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1
    assert call(aten.mul.Tensor, X, S) != call(aten.mul.Tensor, X, Var("s", int))
    assert call(aten.mul.Tensor, X, S) != call(aten.mul.Tensor, X, S, users=1)
    assert Var("s", float) != Var("t", float)


def test_sugar_equals_the_explicit_form() -> None:
    assert call(aten.mul.Tensor, X, 1) == call(aten.mul.Tensor, X, literal(1))
    explicit = call(aten.mul.Tensor, X, literal(torch.float32))
    assert call(aten.mul.Tensor, X, torch.float32) == explicit
    a, b, c = (call(t, X) for t in (aten.relu.default, aten.sigmoid.default, aten.tanh.default))
    assert a | b == any_of(a, b)
    assert (a | b) | c == any_of(a, b, c) == a | (b | c)
    assert any_of(any_of(a, b), c) == any_of(a, b, c)
    sugar = 1 | X
    assert sugar == any_of(literal(1), X)
    assert a | a == a
    assert any_of(a) == a
    assert call((aten.relu.default, aten.relu.default), X) == call(aten.relu.default, X)


def test_literal_bool_differs_from_the_number_it_equals() -> None:
    assert literal(True) != literal(1)
    assert literal((1, True)) != literal((1, 1))
    assert literal(1) == literal(1.0)
    alternatives = any_of(literal(1), literal(True))
    assert isinstance(alternatives, AnyOf)
    assert len(alternatives.alternatives) == 2


def test_a_pattern_has_no_truth_value() -> None:
    with pytest.raises(PatternError, match="no truth value"):
        bool(call(aten.relu.default, X))
    with pytest.raises(PatternError):
        if X:
            pass


def test_vars_and_element_vars() -> None:
    p = call(aten.cat.default, list_of(call(aten.relu.default, X)), Var("dim", int))
    assert p.vars == {X, Var("dim", int)}
    assert p.element_vars == {X}
    assert optional(call(aten.sub.Tensor, X, ZP), defaults={ZP: 0}).vars == {X, ZP}
    assert tag(X, U, Unary.RELU).vars == {X, U}
    assert reciprocal(S).vars == {S}


def test_commutative_targets() -> None:
    assert call(aten.add.Tensor, X, Y).commutative
    assert call(aten.mul.Tensor, X, Y).commutative
    assert call(aten.add.Scalar, X, 1).commutative
    assert call(operator.mul, X, Y).commutative
    assert not call(aten.sub.Tensor, X, Y).commutative
    assert not call(aten.add.Tensor, X, Y, alpha=2).commutative
    assert not call((aten.add.Tensor, aten.sub.Tensor), X, Y).commutative


def test_optional_absent_is_the_argument_through() -> None:
    o = optional(call(aten.mul.Tensor, S, X), through=1, defaults={S: 1})
    assert o.absent == X
    assert o.defaults[S] == 1.0
    assert isinstance(o.defaults[S], float)  # an int default of a float Var is stored as float


# --------------------------------------------------------------------------------------------
# English
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (call(aten.relu.default, X), "aten.relu.default(x)"),
        (call(aten.add.Tensor, X, 1.5), "aten.add.Tensor(x, 1.5)"),
        (call(aten.relu.default, X, users=1), "aten.relu.default(x) with 1 user"),
        (call(aten.relu.default, X, users=2), "aten.relu.default(x) with 2 users"),
        (
            call(aten.gelu.default, X, approximate="tanh"),
            "aten.gelu.default(x, approximate='tanh')",
        ),
        (
            call((aten.view.default, aten.reshape.default), X, ignored()),
            "(aten.view.default | aten.reshape.default)(x, _)",
        ),
        (call(operator.getitem, X, 0), "operator.getitem(x, 0)"),
        (
            call(aten.relu.default, X) | call(aten.sigmoid.default, X),
            "(aten.relu.default(x) | aten.sigmoid.default(x))",
        ),
        (
            optional(call(aten.sub.Tensor, X, ZP), defaults={ZP: 0}),
            "optional aten.sub.Tensor(x, zp)",
        ),
        (call(aten.cat.default, list_of(X)), "aten.cat.default([x, ...])"),
        (capture(Y, call(aten.relu.default, X)), "y=aten.relu.default(x)"),
        (tag(call(aten.relu.default, X), U, Unary.RELU), "aten.relu.default(x) [unary=Unary.RELU]"),
        (dtype_of(X, DT), "x of dtype dt"),
        (call(aten.mul.Tensor, X, reciprocal(S)), "aten.mul.Tensor(x, 1/s)"),
        (
            where(call(aten.relu.default, X), single_user(X)),
            "aten.relu.default(x) where x has at most 1 user(s)",
        ),
        (
            dequantize_per_tensor(X, qparams("x")),
            "((quantized_decomposed.dequantize_per_tensor.default"
            " | quantized_decomposed.dequantize_per_tensor.tensor)"
            "(x, x_scale, x_zp, x_qmin, x_qmax, x_dtype)"
            " | aten.mul.Tensor(optional aten.sub.Tensor("
            "(prims.convert_element_type.default(x of dtype x_dtype, torch.float32)"
            " | aten._to_copy.default(x of dtype x_dtype, device=_, dtype=torch.float32, layout=_,"
            " memory_format=_, pin_memory=_)"
            " | aten.to.dtype(x of dtype x_dtype, torch.float32, memory_format=_))"
            " where x_dtype in (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32,"
            " torch.float8_e5m2, torch.float8_e4m3fn), x_zp), x_scale))",
        ),
    ],
)
def test_describe(p: Pattern, text: str) -> None:
    assert p.describe() == text


# --------------------------------------------------------------------------------------------
# Construction errors name the offending part
# --------------------------------------------------------------------------------------------


def _any(value: object) -> Any:
    """``value`` typed as Any: these tests pass what mypy would rightly refuse."""
    return value


def test_pattern_error_is_a_qalgebra_error() -> None:
    assert issubclass(PatternError, QAlgebraError)
    assert issubclass(MatchError, QAlgebraError)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: call(_any(3), X), "call: expected an OpOverload, OpOverloadPacket or Python "
         "callable as target, got 3 (int)"),
        (lambda: call(int, X), "as target, got <class 'int'> (type)"),
        (lambda: call(aten.relu.default), "call(aten.relu.default): argument 'self' has no "
         "default; pass it (ignored() accepts any value)"),
        (lambda: call(aten.relu.default, X, X), "call(aten.relu.default): takes 1 positional "
         "arguments, pattern gives 2"),
        (lambda: call(aten.relu.default, X, foo=1), "call(aten.relu.default): has no argument "
         "named 'foo'"),
        (lambda: call(aten.relu.default, X, users=-1), "call(aten.relu.default): expected users "
         ">= 0 or None, got -1"),
        (lambda: call(aten.relu.default, _any(object())), "call(aten.relu.default).args[0]: "
         "expected a Pattern or a constant"),
        (lambda: call(aten.add.Tensor, Var("a", float), Var("a", int)), "call(aten.add.Tensor): "
         "Var 'a' is bound to two types, float and int"),
        (lambda: call(aten.add.Tensor, X, call(aten.relu.default, Var("x", float))),
         "Var 'x' is bound to two types, torch.fx.node.Node and float"),
        (lambda: optional(call(aten.relu.default, X), through=1), "optional(aten.relu.default(x))"
         ": through=1 is out of range; the call has 1 positional argument(s)"),
        (lambda: optional(call(aten.relu.default, X), through=-1), "through=-1 is out of range"),
        (lambda: optional(call(aten.mul.Tensor, X, S)), "optional(aten.mul.Tensor(x, s)): Var(s) "
         "s are bound only by the optional call; give each a default"),
        (lambda: optional(call(aten.mul.Tensor, X, S), defaults={S: "a"}),
         "optional(aten.mul.Tensor(x, s)): default for Var 's' must be a float, got 'a'"),
        (lambda: optional(call(aten.mul.Tensor, X, S), defaults={S: 1.0, X: 1}),
         "default given for Var 'x', which the call does not bind or which its argument also "
         "binds"),
        (lambda: optional(X), "optional: expected a call pattern (or any_of of calls), got "
         "Var('x', torch.fx.node.Node)"),
        (lambda: optional(call(aten.add.Tensor, X, 1) | call(aten.sub.Tensor, Y, 1)),
         "optional: every alternative must have the same argument 0; aten.sub.Tensor(y, 1) "
         "differs"),
        (lambda: Var("1x", int), "Var: expected an identifier as name, got '1x'"),
        (lambda: Var("class", int), "Var: expected an identifier as name, got 'class'"),
        (lambda: Var("x", _any(3)), "Var 'x': expected a type (float, int, torch.fx.Node, ...), "
         "got 3"),
        (lambda: tag(X, Var("t", int), _any(1.5)), "tag(t): expected a int, got 1.5"),
        (lambda: tag(X, Var("t", int), True), "tag(t): expected a int, got True"),
        (lambda: dtype_of(X, _any(Var("d", int))), "dtype_of: expected a Var of torch.dtype, got "
         "Var('d', int)"),
        (lambda: reciprocal(_any(Var("r", int))), "reciprocal: expected a Var of float, got "
         "Var('r', int)"),
        (lambda: where(X, _any(3)), "where: expected a Check (with .failure(match)), got 3"),
        (lambda: capture(_any(3), X), "capture: expected a Var, got 3"),
        (lambda: any_of(), "any_of: expected at least one alternative"),
        (lambda: any_of(X, _any(object())), "any_of[1]: expected a Pattern or a constant"),
        (lambda: literal(_any({1: 2})), "literal: expected a hashable constant"),
    ],
)
def test_construction_errors(build: Any, message: str) -> None:
    with pytest.raises(PatternError) as info:
        build()
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------
# Match and Mismatch values
# --------------------------------------------------------------------------------------------


def _node() -> fx.Node:
    g = fx.Graph()
    return g.placeholder("a")


def test_match_reads_typed_bindings() -> None:
    from pyrsistent import pmap

    a = _node()
    each = Var("each", int)
    bindings: dict[Var[Any], object] = {X: a, S: 0.5}
    m = Match(a, pmap(bindings), pmap({each: (1, 2)}), (a,))
    assert m[X] is a
    assert m[S] == 0.5
    assert m.get(ZP, 7) == 7
    assert m.get(S, 7.0) == 0.5
    assert S in m and ZP not in m
    assert m.each(each) == (1, 2)
    assert repr(m) == "<Match at a: s=0.5, x=a>"
    with pytest.raises(MatchError, match=r"did not bind Var 'zp' \(it bound s, x\)"):
        m[ZP]
    with pytest.raises(MatchError, match=r"bound per element of a list_of; use Match.each"):
        m[each]
    with pytest.raises(MatchError, match="not bound inside a list_of"):
        m.each(S)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.root = a  # type: ignore[misc]  # frozen: that the assignment fails is the point


def test_mismatch_formats_lazily() -> None:
    a = _node()

    class Loud:
        def __repr__(self) -> str:
            raise AssertionError("formatted eagerly")

    lazy = Mismatch("expected {}, got {}", (Loud(), a), (".args[0]",), a)
    assert lazy.path_str == "root.args[0]"
    assert lazy.node is a
    mm = Mismatch("expected {}, got {}", (3, a), (".args[0]", ".args[1]"), a)
    assert mm.reason == "expected 3, got node a (placeholder)"
    assert str(mm) == "at root.args[0].args[1] (node a (placeholder)): expected 3, got node a " \
        "(placeholder)"
    assert Mismatch("x", (), (), 2.5).node is None


def test_call_target_forms() -> None:
    assert call(aten.add, X, Y).targets == (aten.add,)
    assert call(aten.add.Tensor, X, Y).targets == (aten.add.Tensor,)
    p = call((aten.view.default, aten.reshape.default), X, ignored())
    assert isinstance(p, Call)
    assert p.targets == (aten.view.default, aten.reshape.default)
    assert call(operator.getitem, X, 0).targets == (operator.getitem,)
    # A packet has no single schema: arguments are not checked against it at construction.
    assert isinstance(call(aten.add, X), Call)


def test_factories_build_the_private_classes() -> None:
    assert isinstance(literal(1), Literal)
    assert isinstance(optional(call(aten.relu.default, X)), Optional)
    assert optional(call(aten.relu.default, X)).defaults == {}


_PICKLED_PATTERN = """
import operator
from qalgebra.pattern import Var, any_of, call, literal, optional
x = Var("x", float)
p = any_of(call(operator.add, x, literal(2)), optional(call(operator.neg, Var("y", int))))
"""


def test_a_pattern_pickled_by_another_process_hashes_like_one_built_here() -> None:
    """Patterns cache their hash; string hashes differ between processes (PYTHONHASHSEED), so an
    unpickled pattern must recompute it or it would miss every dict and set lookup here."""
    import os
    import pickle
    import subprocess
    import sys

    code = _PICKLED_PATTERN + "import pickle, sys\nsys.stdout.buffer.write(pickle.dumps((x, p)))\n"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    theirs = pickle.loads(out.stdout)
    namespace: dict[str, Any] = {}
    exec(_PICKLED_PATTERN, namespace)
    ours = (namespace["x"], namespace["p"])
    assert theirs == ours
    assert [hash(t) for t in theirs] == [hash(o) for o in ours]
    assert {ours[0]: "bound"}[theirs[0]] == "bound"
