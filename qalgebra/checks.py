"""Typed, composable extra checks over a ``Match``; each failure says why.

A check is a small frozen value with ``failure(m) -> str | None`` (None = passes) and
``describe()``. Compose with ``&``, ``|`` and ``~``; attach to a pattern with ``where(p, check)``,
and the reason of a failing check shows up in ``explain``.

- ``dtype_in(var, dtypes)``: a dtype Var holds one of ``dtypes``;
- ``single_user(var)``, ``users_at_most(var, n)``: how many users a node has;
- ``same_qparams(a, b)``: two ``QParams`` agree on scale and zero point;
- ``valid_qparams(qp)``: scale finite and > 0, zero point within [qmin, qmax];
- ``same_shape(a, b)``: two nodes have equal known shapes;
- ``made_by_graph(var)``: a node is computed by the graph (not an input, not a constant);
- ``only_used_by(var, consumer)``: nothing but ``consumer`` reads ``var``'s node (in-place safety);
- ``satisfies(fn, text)``: any typed predicate with an English description.

>>> import torch
>>> from qalgebra import Var
>>> dt = Var("out_dtype", torch.dtype)
>>> check = dtype_in(dt, (torch.uint8, torch.int8)) | ~dtype_in(dt, (torch.float32,))
>>> check.describe()
'(out_dtype in (torch.uint8, torch.int8) or not (out_dtype in (torch.float32,)))'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pyrsistent import PVector, pvector
from torch import fx

from qalgebra.errors import PatternError
from qalgebra.pattern import Match, Var
from qalgebra.shapes import known_shape

if TYPE_CHECKING:  # combinators uses checks: importing it here at run time would be circular
    from qalgebra.combinators import QParams

__all__ = [
    "AllOf",
    "AnyCheck",
    "Check",
    "Not",
    "dtype_in",
    "made_by_graph",
    "only_used_by",
    "same_qparams",
    "same_shape",
    "satisfies",
    "single_user",
    "users_at_most",
    "valid_qparams",
]


class Check:
    """Base of every check: ``failure(m)`` is None when ``m`` passes, else the reason."""

    __slots__ = ()

    def failure(self, m: Match) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __call__(self, m: Match) -> bool:
        return self.failure(m) is None

    def __and__(self, other: Check) -> Check:
        return AllOf(pvector([*_parts(self, AllOf), *_parts(other, AllOf)]))

    def __or__(self, other: Check) -> Check:
        return AnyCheck(pvector([*_parts(self, AnyCheck), *_parts(other, AnyCheck)]))

    def __invert__(self) -> Check:
        return self.check if isinstance(self, Not) else Not(self)


def _parts(c: Check, kind: type[AllOf] | type[AnyCheck]) -> tuple[Check, ...]:
    return tuple(c.checks) if isinstance(c, kind) else (c,)


@dataclass(frozen=True, slots=True)
class AllOf(Check):
    """Every check passes; the first failure is the reason."""

    checks: PVector[Check]

    def failure(self, m: Match) -> str | None:
        for c in self.checks:
            why = c.failure(m)
            if why is not None:
                return why
        return None

    def describe(self) -> str:
        return "(" + " and ".join(c.describe() for c in self.checks) + ")"

    def __repr__(self) -> str:
        return "(" + " & ".join(repr(c) for c in self.checks) + ")"


@dataclass(frozen=True, slots=True)
class AnyCheck(Check):
    """At least one check passes; otherwise every reason is given."""

    checks: PVector[Check]

    def failure(self, m: Match) -> str | None:
        reasons: list[str] = []
        for c in self.checks:
            why = c.failure(m)
            if why is None:
                return None
            reasons.append(why)
        return "none of: " + "; ".join(reasons)

    def describe(self) -> str:
        return "(" + " or ".join(c.describe() for c in self.checks) + ")"

    def __repr__(self) -> str:
        return "(" + " | ".join(repr(c) for c in self.checks) + ")"


@dataclass(frozen=True, slots=True)
class Not(Check):
    """The check fails."""

    check: Check

    def failure(self, m: Match) -> str | None:
        if self.check.failure(m) is None:
            return f"expected not ({self.check.describe()})"
        return None

    def describe(self) -> str:
        return f"not ({self.check.describe()})"

    def __repr__(self) -> str:
        return f"~{self.check!r}"


def _node(m: Match, var: Var[fx.Node]) -> fx.Node | str:
    if var not in m:
        return f"{var.name} is not bound"
    return m[var]


@dataclass(frozen=True, slots=True)
class _DtypeIn(Check):
    var: Var[torch.dtype]
    dtypes: tuple[torch.dtype, ...]

    def failure(self, m: Match) -> str | None:
        if self.var not in m:
            return f"{self.var.name} is not bound"
        dt = m[self.var]
        if dt in self.dtypes:
            return None
        return f"{self.var.name} is {dt}, expected one of {self.dtypes}"

    def describe(self) -> str:
        return f"{self.var.name} in {self.dtypes}"

    def __repr__(self) -> str:
        return f"dtype_in({self.var!r}, {self.dtypes!r})"


def dtype_in(var: Var[torch.dtype], dtypes: tuple[torch.dtype, ...]) -> Check:
    """``m[var]`` is one of ``dtypes``."""
    if not isinstance(var, Var):
        raise PatternError(f"dtype_in: expected a Var, got {var!r}")
    return _DtypeIn(var, tuple(dtypes))


@dataclass(frozen=True, slots=True)
class _UsersAtMost(Check):
    var: Var[fx.Node]
    limit: int

    def failure(self, m: Match) -> str | None:
        node = _node(m, self.var)
        if isinstance(node, str):
            return node
        n = len(node.users)
        if n <= self.limit:
            return None
        return f"{self.var.name} ({node.name}) has {n} users, at most {self.limit} allowed"

    def describe(self) -> str:
        return f"{self.var.name} has at most {self.limit} user(s)"

    def __repr__(self) -> str:
        return f"users_at_most({self.var!r}, {self.limit})"


def users_at_most(var: Var[fx.Node], limit: int) -> Check:
    """The node bound to ``var`` has at most ``limit`` users."""
    return _UsersAtMost(var, limit)


def single_user(var: Var[fx.Node]) -> Check:
    """The node bound to ``var`` has exactly one user (or none)."""
    return _UsersAtMost(var, 1)


@dataclass(frozen=True, slots=True)
class _SameQParams(Check):
    a: QParams
    b: QParams

    def failure(self, m: Match) -> str | None:
        pairs: tuple[tuple[Var[Any], Var[Any]], ...] = (
            (self.a.scale, self.b.scale),
            (self.a.zero_point, self.b.zero_point),
        )
        for va, vb in pairs:
            if va not in m or vb not in m:
                return f"{va.name} or {vb.name} is not bound"
            left: object = m[va]
            right: object = m[vb]
            if left != right:
                return f"{va.name} = {left!r} differs from {vb.name} = {right!r}"
        return None

    def describe(self) -> str:
        return f"{self.a.scale.name[:-6]} and {self.b.scale.name[:-6]} share scale and zero point"

    def __repr__(self) -> str:
        return f"same_qparams({self.a!r}, {self.b!r})"


def same_qparams(a: QParams, b: QParams) -> Check:
    """``a`` and ``b`` bind equal scales and zero points."""
    return _SameQParams(a, b)


@dataclass(frozen=True, slots=True)
class _ValidQParams(Check):
    qp: QParams

    def failure(self, m: Match) -> str | None:
        qp = self.qp
        scale = m.get(qp.scale, math.nan)
        if not (math.isfinite(scale) and scale > 0):
            return f"{qp.scale.name} = {scale!r} is not a finite positive number"
        if qp.zero_point in m and qp.quant_min in m and qp.quant_max in m:
            zp, lo, hi = m[qp.zero_point], m[qp.quant_min], m[qp.quant_max]
            if not lo <= zp <= hi:
                return f"{qp.zero_point.name} = {zp} is outside [{lo}, {hi}]"
        if qp.dtype in m:
            dt = m[qp.dtype]
            info = torch.iinfo(dt) if not dt.is_floating_point else None
            if info is None:
                return f"{qp.dtype.name} = {dt} is not an integer dtype"
            if qp.zero_point in m and not info.min <= m[qp.zero_point] <= info.max:
                return f"{qp.zero_point.name} = {m[qp.zero_point]} does not fit {dt}"
        return None

    def describe(self) -> str:
        return f"{self.qp.scale.name} > 0 and {self.qp.zero_point.name} in range"

    def __repr__(self) -> str:
        return f"valid_qparams({self.qp!r})"


def valid_qparams(qp: QParams) -> Check:
    """Scale finite and positive; zero point within [qmin, qmax] and the dtype's range."""
    return _ValidQParams(qp)


def _shape(node: fx.Node) -> tuple[Any, ...] | None:
    return known_shape(node)


@dataclass(frozen=True, slots=True)
class _SameShape(Check):
    a: Var[fx.Node]
    b: Var[fx.Node]

    def failure(self, m: Match) -> str | None:
        na, nb = _node(m, self.a), _node(m, self.b)
        if isinstance(na, str):
            return na
        if isinstance(nb, str):
            return nb
        sa, sb = _shape(na), _shape(nb)
        if sa is None or sb is None:
            return f"the shape of {na.name if sa is None else nb.name} is unknown"
        if sa != sb:
            return f"{self.a.name} has shape {list(sa)}, {self.b.name} has shape {list(sb)}"
        return None

    def describe(self) -> str:
        return f"{self.a.name} and {self.b.name} have the same shape"

    def __repr__(self) -> str:
        return f"same_shape({self.a!r}, {self.b!r})"


def same_shape(a: Var[fx.Node], b: Var[fx.Node]) -> Check:
    """Both nodes have known, equal shapes (:func:`qalgebra.shapes.known_shape`: ``meta['val']``,
    else read upstream through shape-preserving ops, as on ``convert_pt2e``'s q/dq nodes)."""
    return _SameShape(a, b)


@dataclass(frozen=True, slots=True)
class _MadeByGraph(Check):
    var: Var[fx.Node]

    def failure(self, m: Match) -> str | None:
        node = _node(m, self.var)
        if isinstance(node, str):
            return node
        if node.op in ("call_function", "call_method", "call_module"):
            return None
        return f"{self.var.name} ({node.name}) is a {node.op}, not a tensor the graph computes"

    def describe(self) -> str:
        return f"{self.var.name} is computed by the graph"

    def __repr__(self) -> str:
        return f"made_by_graph({self.var!r})"


def made_by_graph(var: Var[fx.Node]) -> Check:
    """The node is computed inside the graph: writing into it cannot touch a caller's tensor."""
    return _MadeByGraph(var)


@dataclass(frozen=True, slots=True)
class _OnlyUsedBy(Check):
    var: Var[fx.Node]
    consumer: Var[fx.Node]

    def failure(self, m: Match) -> str | None:
        node, consumer = _node(m, self.var), _node(m, self.consumer)
        if isinstance(node, str):
            return node
        if isinstance(consumer, str):
            return consumer
        others = [u.name for u in node.users if u is not consumer]
        if others:
            return f"{self.var.name} ({node.name}) is also read by {', '.join(others)}"
        return None

    def describe(self) -> str:
        return f"{self.var.name} is read only by {self.consumer.name}"

    def __repr__(self) -> str:
        return f"only_used_by({self.var!r}, {self.consumer!r})"


def only_used_by(var: Var[fx.Node], consumer: Var[fx.Node]) -> Check:
    """Nothing but ``consumer`` reads the node: overwriting it in place is invisible."""
    return _OnlyUsedBy(var, consumer)


@dataclass(frozen=True, slots=True)
class _Satisfies(Check):
    fn: Callable[[Match], bool]
    text: str

    def failure(self, m: Match) -> str | None:
        return None if self.fn(m) else f"expected {self.text}"

    def describe(self) -> str:
        return self.text


def satisfies(fn: Callable[[Match], bool], text: str) -> Check:
    """A custom predicate; ``text`` says in English what it requires."""
    if not callable(fn):
        raise PatternError(f"satisfies: expected a callable, got {fn!r}")
    return _Satisfies(fn, text)
