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
- ``constant_node(var)``: a node computed from module constants only (:mod:`qalgebra.constants`);
- ``has_rank(var, n)``: a node's known shape has ``n`` dimensions;
- ``expand_keeps_shape(x, expanded)``: an ``expand`` of ``x`` broadcasts nothing;
- ``closed()``: the match's inner nodes are read only inside it (see ``Fusion.exclusive``);
- ``satisfies(fn, text)``: any typed predicate with an English description;
  ``reason(fn, text)``: a predicate that returns why it fails (or None).

Replacement code turns a failing check into a :class:`~qalgebra.errors.Refusal` with
``require(check, m)``: the lowering reports the reason and leaves the match unlowered.

>>> import torch
>>> from qalgebra import Var
>>> dt = Var("out_dtype", torch.dtype)
>>> check = dtype_in(dt, (torch.uint8, torch.int8)) | ~dtype_in(dt, (torch.float32,))
>>> check.describe()
'(out_dtype in (torch.uint8, torch.int8) or not (out_dtype in (torch.float32,)))'
>>> positive = reason(lambda m: None if m[Var("k", int)] > 0 else "k is not positive", "k > 0")
>>> positive.describe()
'k > 0'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyrsistent import PVector, pvector
from torch import fx

from qalgebra.constants import is_constant, node_shape
from qalgebra.errors import PatternError, Refusal
from qalgebra.match import outside_reader
from qalgebra.pattern import Match, Var
from qalgebra.qparams import QParams
from qalgebra.shapes import known_shape, same_dims

__all__ = [
    "AllOf",
    "AnyCheck",
    "Check",
    "Not",
    "closed",
    "constant_node",
    "dtype_in",
    "expand_keeps_shape",
    "has_rank",
    "made_by_graph",
    "only_used_by",
    "reason",
    "require",
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


@dataclass(frozen=True, slots=True)
class _Reason(Check):
    fn: Callable[[Match], str | None]
    text: str

    def failure(self, m: Match) -> str | None:
        return self.fn(m)

    def describe(self) -> str:
        return self.text


def reason(fn: Callable[[Match], str | None], text: str) -> Check:
    """A custom predicate that says why it fails: ``fn(m)`` is None when ``m`` passes, else the
    reason (which reaches ``explain`` and the lowering report); ``text`` is the requirement."""
    if not callable(fn):
        raise PatternError(f"reason: expected a callable, got {fn!r}")
    return _Reason(fn, text)


def require(check: Check, m: Match, what: str = "") -> None:
    """Raise :class:`~qalgebra.errors.Refusal` with the check's reason (after ``what``) when it
    fails: how replacement code refuses a match, the reason going to the lowering report."""
    why = check.failure(m)
    if why is not None:
        raise Refusal(f"{what}: {why}" if what else why)


@dataclass(frozen=True, slots=True)
class _IsConstant(Check):
    var: Var[fx.Node]

    def failure(self, m: Match) -> str | None:
        node = _node(m, self.var)
        if isinstance(node, str):
            return node
        if is_constant(node):
            return None
        return f"{self.var.name} ({node.name}) is not computed from get_attr tensors only"

    def describe(self) -> str:
        return f"{self.var.name} is a constant"

    def __repr__(self) -> str:
        return f"constant_node({self.var!r})"


def constant_node(var: Var[fx.Node]) -> Check:
    """The node bound to ``var`` is a constant (:func:`qalgebra.constants.is_constant`)."""
    return _IsConstant(var)


@dataclass(frozen=True, slots=True)
class _HasRank(Check):
    var: Var[fx.Node]
    rank: int

    def failure(self, m: Match) -> str | None:
        node = _node(m, self.var)
        if isinstance(node, str):
            return node
        shape = node_shape(node)
        if shape is None:
            return f"the shape of {self.var.name} ({node.name}) is unknown"
        if len(shape) != self.rank:
            return f"{self.var.name} ({node.name}) has rank {len(shape)}, expected {self.rank}"
        return None

    def describe(self) -> str:
        return f"{self.var.name} has rank {self.rank}"

    def __repr__(self) -> str:
        return f"has_rank({self.var!r}, {self.rank})"


def has_rank(var: Var[fx.Node], rank: int) -> Check:
    """The node bound to ``var`` has a known shape (metadata, or folded) of ``rank`` dims."""
    return _HasRank(var, rank)


@dataclass(frozen=True, slots=True)
class _ExpandKeepsShape(Check):
    x: Var[fx.Node]
    expanded: Var[fx.Node]
    sizes: Var[list[Any]]

    def failure(self, m: Match) -> str | None:
        x, expanded = _node(m, self.x), _node(m, self.expanded)
        if isinstance(x, str):
            return x
        if isinstance(expanded, str):
            return expanded
        x_shape = known_shape(x)
        target = known_shape(expanded)
        if target is None and self.sizes in m and x_shape is not None:
            sizes = m[self.sizes]  # -1 keeps a dimension
            if len(sizes) == len(x_shape):
                target = tuple(d if s == -1 else s for s, d in zip(sizes, x_shape, strict=True))
        if x_shape is not None and target is not None and same_dims(x_shape, target):
            return None
        return (
            f"{self.x.name} of shape {_dims(x_shape)} is expanded to {_dims(target)}: "
            "the batch would be broadcast"
        )

    def describe(self) -> str:
        return f"the expand of {self.x.name} broadcasts nothing"

    def __repr__(self) -> str:
        return f"expand_keeps_shape({self.x!r}, {self.expanded!r}, {self.sizes!r})"


def _dims(shape: tuple[object, ...] | None) -> str:
    return "unknown" if shape is None else str(list(shape))


def expand_keeps_shape(x: Var[fx.Node], expanded: Var[fx.Node], sizes: Var[list[Any]]) -> Check:
    """The ``expand`` bound to ``expanded`` (of sizes ``sizes``) gives ``x``'s own shape: a
    matmul decomposed through ``expand -> bmm`` then computes what the fused op computes."""
    return _ExpandKeepsShape(x, expanded, sizes)


@dataclass(frozen=True, slots=True)
class _Closed(Check):
    def failure(self, m: Match) -> str | None:
        found = outside_reader(m.nodes, m.root)
        if found is None:
            return None
        inner, reader = found
        return f"{inner.name} is also read by {reader.name}, outside the match"

    def describe(self) -> str:
        return "every inner node is read only inside the match (metadata asserts aside)"

    def __repr__(self) -> str:
        return "closed()"


def closed() -> Check:
    """Inner nodes of the match are read only by matched nodes or by export's
    ``_assert_tensor_metadata`` checks (``Tensor.to`` asserts its input's dtype; the fusion
    drops those asserts with the value). Replacing a match that is not closed would leave its
    inner nodes computed twice: the check a non-``exclusive`` fusion adds where it needs it."""
    return _Closed()
