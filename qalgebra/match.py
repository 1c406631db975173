"""The matcher: find pattern matches in ``torch.fx`` graphs, and explain why one failed.

- ``find_matches(pattern, graph)`` returns non-overlapping matches, in graph order. Candidate roots
  come from one pass over the graph filtered by the pattern's possible root targets; larger
  matches win because candidates are tried from the end of the graph backwards.
- ``match_node(pattern, node)`` tries one node; ``explain(pattern, node)`` returns the deepest
  ``Mismatch`` (reason, pattern path such as ``root.args[0].args[1]``, graph value), with the
  alternatives that fail as far in as its ``tied`` failures, or None.

Each takes a pattern or a :class:`Matcher`: the pattern compiled, each distinct sub-pattern once
(see :mod:`qalgebra.sharing`), with its root index, the targets a graph must hold and, per call
pattern, how it reads a node of each target it meets. A fusion holds its matcher; a pattern
passed directly is compiled on first use and its matcher kept while the pattern lives.

Matching is a backtracking search written with generators: optional nodes try "present" then
"absent", alternatives are tried in order, commutative calls try both operand orders, and a Var
bound twice must bind equal values. Bindings are copied on write, so a failed branch leaves
nothing behind and captures exist only in the final ``Match``.

>>> import torch
>>> from qalgebra import Var, call
>>> class M(torch.nn.Module):
...     def forward(self, a: torch.Tensor) -> torch.Tensor:
...         return torch.ops.aten.relu.default(torch.ops.aten.mul.Tensor(a, 2.0))
>>> gm = torch.fx.symbolic_trace(M())
>>> k = Var("k", float)
>>> [m[k] for m in find_matches(call(torch.ops.aten.mul.Tensor, k, Var("a", torch.fx.Node)), gm)]
[2.0]
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeAlias

import torch
from pyrsistent import pmap
from torch import fx
from torch._ops import OpOverload

from qalgebra.errors import PatternError
from qalgebra.pattern import (
    AnyOf,
    Call,
    Capture,
    Check,
    DtypeOf,
    Ignored,
    ListOf,
    Literal,
    Match,
    Mismatch,
    Optional,
    Pattern,
    Reciprocal,
    Tag,
    Var,
    Where,
    _target_name,
)
from qalgebra.schemas import arguments as schema_arguments
from qalgebra.sharing import Dag

__all__ = [
    "Matcher",
    "explain",
    "find_matches",
    "iter_matches",
    "match_node",
    "node_dtype",
    "outside_reader",
]

Path: TypeAlias = tuple[str, ...]
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Graph facts
# --------------------------------------------------------------------------------------------


#: Ops whose output dtype is one of their arguments (read by ``dtype_of``).
_DTYPE_ARGUMENT = "dtype"


def _output_dtype_from_args(node: fx.Node, args: dict[str, object] | None) -> torch.dtype | None:
    if args is None:
        return None
    target = node.target
    if isinstance(target, OpOverload) and target.namespace == "quantized_decomposed":
        # The `dtype` of a dequantize is its *input's* quantized dtype; it outputs `out_dtype`
        # (None: float32). choose_qparams & co. output qparams, not a tensor of `dtype`.
        if target._opname.startswith("dequantize"):
            out = args.get("out_dtype")
            return out if isinstance(out, torch.dtype) else torch.float32
        if not target._opname.startswith("quantize"):
            return None
    value = args.get(_DTYPE_ARGUMENT)
    return value if isinstance(value, torch.dtype) else None


def _const_eq(a: object, b: object) -> bool:
    """Equality of graph constants: numbers by value, bools only with bools, nodes by identity."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_const_eq(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


@dataclass(slots=True)
class _Context:
    """Per-search caches (graph facts) and the deepest failure seen, for ``explain``."""

    module: torch.nn.Module | None
    record: bool
    #: The failures reached after the most progress, in the order they were met.
    deepest: list[Mismatch] = field(default_factory=list)
    deepest_rank: tuple[int, int] = (-1, -1)
    #: While a commutative call tries its swapped operand order: the rank its first order
    #: reached. Failures tied at that rank mirror the first order's and are not listed.
    mirrored_rank: tuple[int, int] | None = None
    _normalized: dict[fx.Node, dict[str, object] | None] = field(default_factory=dict)
    #: (optional node, graph value, bindings of its Vars) tried that yielded nothing: trying them
    #: again cannot succeed, and without this k nested optionals cost 2^k on a failing graph.
    failed: set[tuple[object, ...]] = field(default_factory=set)
    _order: dict[fx.Node, int] | None = None
    #: A ``where`` check refused something since this was last cleared (near misses).
    check_refused: bool = False

    def fail(self, st: _State, path: Path, at: object, template: str, *args: object) -> None:
        """Record a failure; ``explain`` reports the one reached after the most progress.

        Progress is what the search had matched when it failed (nodes and bindings), then the
        depth of the path: a later alternative that fails early at a deep place (another spelling
        of a conversion tried after the first one matched) must not hide the real failure.
        """
        if not self.record:
            return
        rank = (len(st.nodes) + len(st.bindings), len(path))
        if rank > self.deepest_rank:
            self.deepest = [Mismatch(template, args, path, at)]
            self.deepest_rank = rank
        elif rank == self.deepest_rank and rank != self.mirrored_rank:
            self.deepest.append(Mismatch(template, args, path, at))

    def mismatch(self) -> Mismatch | None:
        """The first deepest failure, the others tied with it as its ``tied`` (or None).

        Calls of other targets tried at one place are one failure naming every target; a
        failure met twice (the same sub-pattern tried again) is listed once.
        """
        merged: list[Mismatch] = []
        targets: dict[int, list[str]] = {}  # index in merged -> the targets expected there
        calls: dict[tuple[Path, int], int] = {}  # (path, id of the value) -> index in merged
        seen: set[tuple[Path, str]] = set()
        for mm in self.deepest:
            if mm.template == _EXPECTED_CALL:
                where = (mm.path, id(mm.at))
                if where in calls:
                    names = targets[calls[where]]
                    names.extend(n for n in str(mm.template_args[0]).split(" | ") if n not in names)
                    continue
                calls[where] = len(merged)
                targets[len(merged)] = str(mm.template_args[0]).split(" | ")
            else:
                key = (mm.path, str(mm))
                if key in seen:
                    continue
                seen.add(key)
            merged.append(mm)
        if not merged:
            return None
        for i, names in targets.items():
            merged[i] = replace(merged[i], template_args=(_Text(" | ".join(names)), merged[i].at))
        return replace(merged[0], tied=tuple(merged[1:]))

    def arguments(self, node: fx.Node) -> dict[str, object] | None:
        """The node's arguments by schema name with defaults filled in (None: no schema)."""
        try:
            return self._normalized[node]
        except KeyError:
            pass
        result: dict[str, object] | None = None
        target = node.target
        if isinstance(target, OpOverload):
            schema = schema_arguments(target)
            positional = [a for a in schema if not a.kwarg_only]
            if len(node.args) <= len(positional):
                result = {a.name: v for a, v in zip(positional, node.args, strict=False)}
                result.update(node.kwargs)
                for a in schema:
                    if a.name not in result:
                        if not a.has_default:
                            result = None
                            break
                        result[a.name] = a.default
        self._normalized[node] = result
        return result

    def attr(self, node: fx.Node) -> object:
        if self.module is None or not isinstance(node.target, str):
            return _MISSING
        obj: object = self.module
        for part in node.target.split("."):
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj

    def dtype(self, value: object) -> torch.dtype | None:
        if isinstance(value, torch.Tensor):
            return value.dtype
        if not isinstance(value, fx.Node):
            return None
        for key in ("val", "tensor_meta"):
            meta = value.meta.get(key)
            dt = getattr(meta, "dtype", None)
            if isinstance(dt, torch.dtype):
                return dt
        recorded = value.meta.get(DTYPE_KEY)
        if isinstance(recorded, torch.dtype):
            return recorded
        if value.op == "get_attr":
            t = self.attr(value)
            return t.dtype if isinstance(t, torch.Tensor) else None
        if value.op == "call_function":
            return _output_dtype_from_args(value, self.arguments(value))
        return None

    def order(self, node: fx.Node) -> int:
        if self._order is None:
            self._order = {n: i for i, n in enumerate(node.graph.nodes)}
        return self._order.get(node, -1)


def _coerce(tp: type[Any], value: object, ctx: _Context) -> tuple[bool, object]:
    """Convert ``value`` to what a ``Var`` of type ``tp`` binds, or report it cannot."""
    if tp is fx.Node:
        return isinstance(value, fx.Node), value
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            return False, None
        t = ctx.attr(value)
        if not isinstance(t, torch.Tensor):
            return False, None
        if tp is torch.Tensor or tp is object:
            return True, t
        if tp is float and t.numel() == 1 and t.dtype.is_floating_point:
            return True, float(t.item())
        if tp is int and t.numel() == 1 and not t.dtype.is_floating_point and t.dtype != torch.bool:
            return True, int(t.item())
        return False, None
    if isinstance(value, bool):
        return tp is bool or tp is object, value
    if tp is float:
        return (True, float(value)) if isinstance(value, int | float) else (False, None)
    if tp is int:
        return isinstance(value, int), value
    if tp is list:
        return (True, list(value)) if isinstance(value, list | tuple) else (False, None)
    if tp is tuple:
        return (True, tuple(value)) if isinstance(value, list | tuple) else (False, None)
    return isinstance(value, tp), value


def _same(a: object, b: object) -> bool:
    return a is b or _const_eq(a, b)


# --------------------------------------------------------------------------------------------
# Search state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    """One partial match. Never mutated: every step builds a new state (copy on write).

    Plain dicts and tuples rather than pyrsistent containers: the maps hold a few dozen entries
    and live only during one search, where copying is cheaper than PMap's rebalancing (which
    showed up as a third of the lowering time). ``Match`` gets PMaps.
    """

    bindings: Mapping[Var[Any], object]
    per_element: Mapping[Var[Any], tuple[object, ...]]
    nodes: tuple[fx.Node, ...]

    def bind(self, var: Var[Any], value: object) -> _State:
        return _State({**self.bindings, var: value}, self.per_element, self.nodes)

    def with_node(self, node: fx.Node) -> _State:
        return _State(self.bindings, self.per_element, (*self.nodes, node))


_EMPTY = _State({}, {}, ())


def _bind(
    var: Var[Any], raw: object, st: _State, path: Path, ctx: _Context, coerce: bool = True
) -> _State | None:
    if coerce:
        ok, value = _coerce(var.type, raw, ctx)
        if not ok:
            ctx.fail(
                st,
                path,
                raw,
                "Var {} expects type {}, got {}",
                _Text(var.name),
                _Text(var.type.__name__),
                raw,
            )
            return None
    else:
        value = raw
    existing = st.bindings.get(var, _MISSING)
    if existing is _MISSING:
        return st.bind(var, value)
    if _same(existing, value):
        return st
    ctx.fail(
        st,
        path,
        raw,
        "Var {} is already bound to {}, here it would be {}",
        _Text(var.name),
        existing,
        value,
    )
    return None


class _Text(str):
    """A reason that should be shown as-is, not repr'd."""

    def __repr__(self) -> str:
        return str(self)


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _target_ok(targets: Collection[object], target: object) -> bool:
    if target in targets:
        return True
    return isinstance(target, OpOverload) and target.overloadpacket in targets


#: The failure of a call pattern at a node of another target (``explain`` merges tied ones).
_EXPECTED_CALL = "expected a call to {}, got {}"


# --------------------------------------------------------------------------------------------
# Compiled nodes: one per distinct sub-pattern
# --------------------------------------------------------------------------------------------


class _Node:
    """A distinct sub-pattern compiled: what it needs to match, worked out once.

    A compiled node holds the Vars, targets, constants and checks of its sub-pattern and its
    compiled children, never the pattern objects: a matcher cached for a pattern must not keep
    that pattern alive (see :func:`_matcher_of`).
    """

    __slots__ = ()
    #: A leaf matches at most one way: a call tries its leaves before its deeper arguments.
    leaf = False

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        raise NotImplementedError


class _VarNode(_Node):
    __slots__ = ("var",)
    leaf = True

    def __init__(self, var: Var[Any]) -> None:
        self.var = var

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        out = _bind(self.var, value, st, path, ctx)
        if out is not None:
            yield out


class _IgnoredNode(_Node):
    __slots__ = ()
    leaf = True

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        yield st


class _LiteralNode(_Node):
    __slots__ = ("value",)
    leaf = True

    def __init__(self, value: object) -> None:
        self.value = value

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        if _const_eq(self.value, value):
            yield st
        else:
            ctx.fail(st, path, value, "expected {}, got {}", self.value, value)


class _ReciprocalNode(_Node):
    __slots__ = ("var",)
    leaf = True

    def __init__(self, var: Var[float]) -> None:
        self.var = var

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        ok, number = _coerce(float, value, ctx)
        if not ok or number == 0.0:
            ctx.fail(
                st,
                path,
                value,
                "expected a non-zero number (1/{}), got {}",
                _Text(self.var.name),
                value,
            )
            return
        assert isinstance(number, float)
        out = _bind(self.var, 1.0 / number, st, path, ctx, coerce=False)
        if out is not None:
            yield out


@dataclass(frozen=True, slots=True)
class _Unfit:
    """A call pattern that cannot match any node of one target, and why (the node goes first)."""

    template: str
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a call pattern reads a node of one OpOverload target, worked out once per target.

    ``pairs``: (compiled argument, schema argument, path step), leaves first (each matches at
    most one way, so a constant that differs ends the trial before a deep argument is
    enumerated); ``defaults``: arguments the pattern leaves out, which must hold their default.
    """

    pairs: tuple[tuple[_Node, str, str], ...]
    defaults: tuple[tuple[str, object], ...]


_PlanOrNot: TypeAlias = "_Plan | _Unfit | bool"
_Pairs: TypeAlias = "Sequence[tuple[_Node, object, str]]"


class _CallNode(_Node):
    """A call pattern; its plans per target are filled as targets come (targets live forever)."""

    __slots__ = ("args", "commutative", "kwargs", "names", "plans", "targets", "users")

    def __init__(self, p: Call, args: tuple[_Node, ...], kwargs: dict[str, _Node]) -> None:
        self.targets = p.targets
        self.users = p.users
        self.commutative = p.commutative
        self.args = args
        self.kwargs = kwargs
        self.names = _Text(" | ".join(_target_name(t) for t in p.targets))
        #: target id -> (target, plan): the entry keeps its target, checked by identity.
        self.plans: dict[int, tuple[object, _PlanOrNot]] = {}

    def plan(self, target: object) -> _PlanOrNot:
        hit = self.plans.get(id(target))
        if hit is None or hit[0] is not target:
            hit = self.plans[id(target)] = (target, self._plan_for(target))
        return hit[1]

    def _plan_for(self, target: object) -> _PlanOrNot:
        """False: not one of the targets; True: match the node's raw args; else a plan."""
        if not _target_ok(self.targets, target):
            return False
        if not isinstance(target, OpOverload):
            return True
        schema = schema_arguments(target)
        positional = [a.name for a in schema if not a.kwarg_only]
        if len(self.args) > len(positional):
            return _Unfit(
                "{} takes {} positional arguments, the pattern gives {}",
                (len(positional), len(self.args)),
            )
        names = {a.name for a in schema}
        pairs = [(sub, positional[i], f".args[{i}]") for i, sub in enumerate(self.args)]
        for name, sub in self.kwargs.items():
            if name not in names:
                return _Unfit("{} has no argument {}", (_Text(name),))
            pairs.append((sub, name, f".{name}"))
        specified = {name for _, name, _ in pairs}
        defaults = tuple(
            (a.name, a.default) for a in schema if a.name not in specified and a.has_default
        )
        pairs.sort(key=lambda pair: not pair[0].leaf)
        return _Plan(tuple(pairs), defaults)

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        if not isinstance(value, fx.Node) or value.op != "call_function":
            ctx.fail(st, path, value, _EXPECTED_CALL, self.names, value)
            return
        plan = self.plan(value.target)
        if plan is False:
            ctx.fail(st, path, value, _EXPECTED_CALL, self.names, value)
            return
        if self.users is not None and len(value.users) != self.users:
            ctx.fail(
                st,
                path,
                value,
                "expected {} user(s), {} has {}",
                self.users,
                _Text(value.name),
                len(value.users),
            )
            return
        pairs = self._pairs(value, plan, st, path, ctx)
        if pairs is None:
            return
        for st2 in _match_all(pairs, 0, st, path, ctx):
            yield st2 if value in st2.nodes else st2.with_node(value)
        if not self.commutative:
            return
        (a, va, sa), (b, vb, sb) = pairs
        mirrored, ctx.mirrored_rank = ctx.mirrored_rank, ctx.deepest_rank
        try:
            for st2 in _match_all([(a, vb, sb), (b, va, sa)], 0, st, path, ctx):
                yield st2 if value in st2.nodes else st2.with_node(value)
        finally:
            ctx.mirrored_rank = mirrored

    def _pairs(
        self, node: fx.Node, plan: _PlanOrNot, st: _State, path: Path, ctx: _Context
    ) -> _Pairs | None:
        """(compiled argument, graph value, path step) per argument, or None after failing."""
        if isinstance(plan, _Unfit):
            ctx.fail(st, path, node, plan.template, node, *plan.args)
            return None
        if isinstance(plan, _Plan):
            args = ctx.arguments(node)
            if args is None:
                ctx.fail(st, path, node, "the arguments of {} do not fit its schema", node)
                return None
            for name, default in plan.defaults:
                if not _const_eq(default, args[name]):
                    ctx.fail(
                        st,
                        (*path, f".{name}"),
                        args[name],
                        "argument {} is {}, the pattern leaves it at its default {}",
                        _Text(name),
                        args[name],
                        default,
                    )
                    return None
            return [(sub, args[name], step) for sub, name, step in plan.pairs]
        if len(node.args) != len(self.args) or set(node.kwargs) != set(self.kwargs):
            ctx.fail(
                st,
                path,
                node,
                "{} has {} args and kwargs {}, the pattern expects {} and {}",
                node,
                len(node.args),
                sorted(node.kwargs),
                len(self.args),
                sorted(self.kwargs),
            )
            return None
        pairs = [(sub, node.args[i], f".args[{i}]") for i, sub in enumerate(self.args)]
        pairs.extend((sub, node.kwargs[k], f".{k}") for k, sub in self.kwargs.items())
        pairs.sort(key=lambda pair: not pair[0].leaf)
        return pairs


def _match_all(pairs: _Pairs, i: int, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    if i == len(pairs):
        yield st
        return
    sub, value, step = pairs[i]
    for st2 in sub.match(value, st, (*path, step), ctx):
        yield from _match_all(pairs, i + 1, st2, path, ctx)


_NOT_A_CALL = object()


class _AnyOfNode(_Node):
    """Ordered alternatives; per target, the alternatives whose root may have it."""

    __slots__ = ("alternatives", "by_target", "roots")

    def __init__(
        self, alternatives: tuple[_Node, ...], roots: tuple[frozenset[object] | None, ...]
    ) -> None:
        self.alternatives = alternatives
        self.roots = roots
        self.by_target: dict[int, tuple[object, tuple[_Node, ...]]] = {}

    def at(self, value: object) -> Sequence[_Node]:
        """The alternatives that can match ``value``, in order; the others would fail at their
        root's target. Only when failures are not recorded (``explain`` sees them all)."""
        if not isinstance(value, fx.Node):
            return self.alternatives
        target = value.target if value.op == "call_function" else _NOT_A_CALL
        hit = self.by_target.get(id(target))
        if hit is None or hit[0] is not target:
            kept = tuple(
                alt
                for alt, roots in zip(self.alternatives, self.roots, strict=True)
                if roots is None or (target is not _NOT_A_CALL and _target_ok(roots, target))
            )
            hit = self.by_target[id(target)] = (target, kept)
        return hit[1]

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        for alt in self.alternatives if ctx.record else self.at(value):
            yield from alt.match(value, st, path, ctx)


class _OptionalNode(_Node):
    """The call, or its argument ``through`` with the defaults bound.

    Optional nodes are what makes the search branch at one node: a sub-search of one that
    yielded nothing is remembered per (node, graph value, bindings of its Vars) for the search,
    or k nested optionals would cost 2^k on a failing graph. Not one with a ``where`` inside
    (a check may read any binding or the matched nodes): ``memo_vars`` is None then.
    """

    __slots__ = ("absent", "defaults", "memo_vars", "present")

    def __init__(
        self,
        present: _Node,
        absent: _Node,
        defaults: tuple[tuple[Var[Any], object], ...],
        memo_vars: tuple[Var[Any], ...] | None,
    ) -> None:
        self.present = present
        self.absent = absent
        self.defaults = defaults
        self.memo_vars = memo_vars

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        if self.memo_vars is None or not isinstance(value, fx.Node):
            return self._either(value, st, path, ctx)
        key: tuple[object, ...] = (self, value)
        bound = st.bindings
        if bound:
            key += tuple((type(b), _hashable(b)) for b in map(bound.get, self.memo_vars))
        try:
            if key in ctx.failed:
                return iter(())
        except TypeError:  # an unhashable bound value: no memo
            return self._either(value, st, path, ctx)
        return self._remembering_failure(value, st, path, ctx, key)

    def _remembering_failure(
        self, value: object, st: _State, path: Path, ctx: _Context, key: tuple[object, ...]
    ) -> Iterator[_State]:
        found = False
        for out in self._either(value, st, path, ctx):
            found = True
            yield out
        if not found:
            ctx.failed.add(key)

    def _either(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        yield from self.present.match(value, st, path, ctx)
        for st2 in self.absent.match(value, st, path, ctx):
            out: _State | None = st2
            for var, default in self.defaults:
                assert out is not None
                out = _bind(var, default, out, path, ctx)
                if out is None:
                    break
            if out is not None:
                yield out


class _ListOfNode(_Node):
    __slots__ = ("element", "element_vars")

    def __init__(self, element: _Node, element_vars: tuple[Var[Any], ...]) -> None:
        self.element = element
        self.element_vars = element_vars

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        if not isinstance(value, list | tuple) or not value:
            ctx.fail(st, path, value, "expected a non-empty list, got {}", value)
            return
        per_element = {v: list(st.per_element.get(v, ())) for v in self.element_vars}
        nodes = st.nodes
        for i, item in enumerate(value):
            first = next(self.element.match(item, _EMPTY, (*path, f"[{i}]"), ctx), None)
            if first is None:
                return
            for v in self.element_vars:
                per_element[v].append(first.bindings.get(v))
            nodes = (*nodes, *(n for n in first.nodes if n not in nodes))
        merged = {**st.per_element, **{v: tuple(vals) for v, vals in per_element.items()}}
        yield _State(st.bindings, merged, nodes)


class _CaptureNode(_Node):
    __slots__ = ("inner", "var")

    def __init__(self, var: Var[Any], inner: _Node) -> None:
        self.var = var
        self.inner = inner

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        for st2 in self.inner.match(value, st, path, ctx):
            out = _bind(self.var, value, st2, path, ctx)
            if out is not None:
                yield out


class _TagNode(_Node):
    __slots__ = ("inner", "value", "var")

    def __init__(self, var: Var[Any], value: object, inner: _Node) -> None:
        self.var = var
        self.value = value
        self.inner = inner

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        for st2 in self.inner.match(value, st, path, ctx):
            out = _bind(self.var, self.value, st2, path, ctx, coerce=False)
            if out is not None:
                yield out


class _WhereNode(_Node):
    __slots__ = ("check", "inner")

    def __init__(self, check: Check, inner: _Node) -> None:
        self.check = check
        self.inner = inner

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        for st2 in self.inner.match(value, st, path, ctx):
            root = value if isinstance(value, fx.Node) else (st2.nodes[-1] if st2.nodes else None)
            if root is None:
                ctx.fail(st2, path, value, "a check needs a matched node, got {}", value)
                continue
            m = Match(root, pmap(st2.bindings), pmap(st2.per_element), st2.nodes)
            why = self.check.failure(m)
            if why is None:
                yield st2
            else:
                ctx.check_refused = True
                ctx.fail(st2, (*path, "<check>"), value, "check failed: {}", _Text(why))


class _DtypeOfNode(_Node):
    __slots__ = ("inner", "var")

    def __init__(self, var: Var[torch.dtype], inner: _Node) -> None:
        self.var = var
        self.inner = inner

    def match(self, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
        for st2 in self.inner.match(value, st, path, ctx):
            dt = ctx.dtype(value)
            if dt is None:
                ctx.fail(st2, path, value, "the dtype of {} is unknown (no meta['val'])", value)
                continue
            out = _bind(self.var, dt, st2, path, ctx, coerce=False)
            if out is not None:
                yield out


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------


class _Compiled(NamedTuple):
    """What the compiler works out per distinct sub-pattern, children first."""

    node: _Node
    #: Targets a matched root node may have; None when any node may be a root.
    roots: frozenset[object] | None
    #: Target sets a graph must each meet (hold one of) for the sub-pattern to match in it.
    required: frozenset[frozenset[object]]
    #: Whether a ``where`` check is inside (its failures cannot be remembered).
    checked: bool


def _compile(dag: Dag) -> list[_Compiled]:
    out: list[_Compiled] = []

    def of(child: Pattern) -> _Compiled:
        return out[dag.index(child)]

    for p in dag.nodes:
        out.append(_compile_one(p, of))
    return out


def _compile_one(p: Pattern, of: Callable[[Pattern], _Compiled]) -> _Compiled:
    kids = [of(c) for c in p.children()]
    checked = isinstance(p, Where) or any(k.checked for k in kids)
    if isinstance(p, Var):
        return _Compiled(_VarNode(p), None, frozenset(), False)
    if isinstance(p, Ignored):
        return _Compiled(_IgnoredNode(), None, frozenset(), False)
    if isinstance(p, Literal):
        return _Compiled(_LiteralNode(p.value), None, frozenset(), False)
    if isinstance(p, Reciprocal):
        return _Compiled(_ReciprocalNode(p.var), None, frozenset(), False)
    if isinstance(p, Call):
        args = tuple(of(a).node for a in p.args)
        kwargs = {k: of(p.kwargs[k]).node for k in sorted(p.kwargs)}
        roots = frozenset(p.targets)
        # A call needs its own targets and what its arguments need.
        required = frozenset({roots}).union(*(k.required for k in kids))
        return _Compiled(_CallNode(p, args, kwargs), roots, required, checked)
    if isinstance(p, AnyOf | Optional):
        branches = kids if isinstance(p, AnyOf) else [kids[0], of(p.absent)]
        roots_of = [b.roots for b in branches]
        known = [r for r in roots_of if r is not None]
        any_roots = frozenset().union(*known) if len(known) == len(roots_of) else None
        # Alternatives need what all of them need, and one of their roots: a graph without a
        # conv skips the conv fusions without trying each of its quantize nodes as a root.
        common = frozenset.intersection(*(b.required for b in branches))
        required = common if any_roots is None else common | {any_roots}
        if isinstance(p, AnyOf):
            node: _Node = _AnyOfNode(tuple(b.node for b in branches), tuple(roots_of))
        else:
            defaults = tuple(p.defaults.items())
            memo = None if checked else tuple(sorted(p.vars, key=lambda v: v.name))
            node = _OptionalNode(branches[0].node, branches[1].node, defaults, memo)
        return _Compiled(node, any_roots, required, checked)
    (inner,) = kids
    if isinstance(p, ListOf):
        element_vars = tuple(sorted(p.element.vars, key=lambda v: v.name))
        return _Compiled(_ListOfNode(inner.node, element_vars), None, inner.required, checked)
    if isinstance(p, Capture):
        node = _CaptureNode(p.var, inner.node)
    elif isinstance(p, Tag):
        node = _TagNode(p.var, p.value, inner.node)
    elif isinstance(p, Where):
        node = _WhereNode(p.check, inner.node)
    elif isinstance(p, DtypeOf):
        node = _DtypeOfNode(p.var, inner.node)
    else:
        raise PatternError(f"cannot match a {type(p).__name__}")
    return _Compiled(node, inner.roots, inner.required, checked)


def _validate(dag: Dag) -> None:
    """Refuse Vars used both inside a list_of (bound per element) and outside it."""
    root = dag.nodes[-1]
    reachable: set[Var[Any]] = set()
    seen: set[int] = set()
    stack = [len(dag.nodes) - 1]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        q = dag.nodes[i]
        if isinstance(q, ListOf):
            continue
        if isinstance(q, Var):
            reachable.add(q)
        if isinstance(q, Capture | Tag | DtypeOf | Reciprocal):
            reachable.add(q.var)
        stack.extend(dag.edges[i])
    both = reachable & root.element_vars
    if both:
        names = ", ".join(sorted(v.name for v in both))
        raise PatternError(f"Var(s) {names} are used both inside and outside a list_of")


def _targets_in(graph: fx.Graph) -> set[object]:
    """The node targets of ``graph``, with the packet of each overload."""
    targets: set[object] = {node.target for node in graph.nodes}
    return targets | {t.overloadpacket for t in targets if isinstance(t, OpOverload)}


# --------------------------------------------------------------------------------------------
# Matchers
# --------------------------------------------------------------------------------------------


class Matcher:
    """A pattern compiled for matching: each distinct sub-pattern once, with its plans and indexes.

    Compiling merges the pattern's equal sub-patterns, works out which targets a root may have
    and which a graph must hold, and checks the pattern's Vars; each call pattern then plans
    how it reads a node once per target it meets. A :class:`~qalgebra.fusion.Fusion`
    holds the matcher of its pattern. The module functions take a pattern or a matcher.

    >>> import torch
    >>> from qalgebra import Var, call
    >>> relu = Matcher(call(torch.ops.aten.relu.default, Var("x", torch.fx.Node)))
    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> [m.root.name for m in relu.find_matches(gm)]
    []
    """

    __slots__ = ("_required", "_root", "_root_ok", "_roots")

    def __init__(self, pattern: Pattern) -> None:
        if not isinstance(pattern, Pattern):
            raise PatternError(f"expected a Pattern, got {pattern!r} ({type(pattern).__name__})")
        dag = Dag(pattern)
        _validate(dag)
        root = _compile(dag)[-1]
        self._root = root.node
        self._roots = root.roots
        self._required = root.required
        #: target id -> (target, whether a root may have it), filled as targets come.
        self._root_ok: dict[int, tuple[object, bool]] = {}

    def iter_matches(self, node: fx.Node) -> Iterator[Match]:
        """Every way the pattern matches with ``node`` as its root, in preference order."""
        ctx = _Context(node.graph.owning_module, record=False)
        for st in self._root.match(node, _EMPTY, (), ctx):
            yield _to_match(node, st, ctx)

    def match_node(self, node: fx.Node) -> Match | None:
        """The preferred match rooted at ``node``, or None."""
        return next(self.iter_matches(node), None)

    def explain(self, node: fx.Node) -> Mismatch | None:
        """Why the pattern does not match at ``node`` (the deepest failures), or None."""
        ctx = _Context(node.graph.owning_module, record=True)
        if next(self._root.match(node, _EMPTY, (), ctx), None) is not None:
            return None
        return ctx.mismatch() or Mismatch("no alternative matched {}", (node,), (), node)

    def find_matches(
        self,
        graph: fx.Graph | fx.GraphModule,
        *,
        exclusive: bool = False,
        near_misses: list[fx.Node] | None = None,
    ) -> list[Match]:
        """Non-overlapping matches in ``graph``, in graph order (see :func:`find_matches`).

        ``near_misses``, when given, gets the roots tried without a match where a ``where``
        check refused (the structure got that far): :meth:`explain` says which and why.
        """
        if isinstance(graph, fx.GraphModule):
            module: torch.nn.Module | None = graph
            g = graph.graph
        elif isinstance(graph, fx.Graph):
            g = graph
            module = graph.owning_module
        else:
            raise PatternError(
                f"find_matches: expected an fx.Graph or fx.GraphModule, got {graph!r}"
            )
        if self._required:
            present = _targets_in(g)
            if not all(present.intersection(targets) for targets in self._required):
                return []
        roots = self._roots
        ctx = _Context(module, record=False)
        claimed: set[fx.Node] = set()
        found: list[Match] = []
        root_ok = self._root_ok
        for node in reversed(g.nodes):
            if roots is not None:
                if node.op != "call_function":
                    continue
                hit = root_ok.get(id(node.target))
                if hit is None or hit[0] is not node.target:
                    hit = root_ok[id(node.target)] = (node.target, _target_ok(roots, node.target))
                if not hit[1]:
                    continue
            elif node.op == "output":  # the output node is not a value
                continue
            if node in claimed:
                continue
            ctx.check_refused = False
            for st in self._root.match(node, _EMPTY, (), ctx):
                if exclusive and not _closed(st, node):
                    continue
                if not claimed.intersection(st.nodes):
                    claimed.update(st.nodes)
                    found.append(_to_match(node, st, ctx))
                    break
            else:
                if ctx.check_refused and near_misses is not None:
                    near_misses.append(node)
        found.reverse()
        return found


def _to_match(root: fx.Node, st: _State, ctx: _Context) -> Match:
    nodes = tuple(sorted(st.nodes, key=ctx.order))
    return Match(root, pmap(st.bindings), pmap(st.per_element), nodes)


#: Matchers of the patterns passed to the module functions, by pattern identity. An entry
#: holds a weak reference to its pattern and goes when the pattern does (a matcher holds no
#: pattern object, see ``_Node``): module-level patterns compile once, throwaway ones leave
#: nothing behind.
_MATCHERS: dict[int, tuple[weakref.ref[Pattern], Matcher]] = {}


def _forget(ref: weakref.ref[Pattern], key: int) -> None:
    entry = _MATCHERS.get(key)
    if entry is not None and entry[0] is ref:
        del _MATCHERS[key]


def _matcher_of(pattern: Pattern | Matcher) -> Matcher:
    """The matcher of ``pattern`` (compiled on its first use while it lives)."""
    if isinstance(pattern, Matcher):
        return pattern
    entry = _MATCHERS.get(id(pattern))
    if entry is not None and entry[0]() is pattern:
        return entry[1]
    matcher = Matcher(pattern)
    if pattern.children():  # a leaf's matcher holds the leaf itself: it would never go
        key = id(pattern)
        _MATCHERS[key] = (weakref.ref(pattern, functools.partial(_forget, key=key)), matcher)
    return matcher


def iter_matches(pattern: Pattern | Matcher, node: fx.Node) -> Iterator[Match]:
    """Every way ``pattern`` matches with ``node`` as its root, in preference order."""
    return _matcher_of(pattern).iter_matches(node)


def match_node(pattern: Pattern | Matcher, node: fx.Node) -> Match | None:
    """The preferred match of ``pattern`` rooted at ``node``, or None."""
    return _matcher_of(pattern).match_node(node)


def explain(pattern: Pattern | Matcher, node: fx.Node) -> Mismatch | None:
    """Why ``pattern`` does not match at ``node``, or None if it matches.

    The failure reached after the most progress; when several alternatives (or both operand
    orders of a commutative call) fail after as much, the others are its ``tied`` failures.
    """
    return _matcher_of(pattern).explain(node)


#: meta key where a rewrite records the dtype of a node it inserted (read like meta['val']).
DTYPE_KEY = "qalgebra_dtype"


def node_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype of ``node``'s value as ``dtype_of`` infers it, or None when unknown."""
    return _Context(node.graph.owning_module, record=False).dtype(node)


#: Readers that only check a tensor's metadata (export adds one after each ``Tensor.to``):
#: they do not make a matched node's value needed outside the match.
METADATA_ASSERTS = frozenset({torch.ops.aten._assert_tensor_metadata.default})


def outside_reader(nodes: Collection[fx.Node], root: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """An inner node of a match (any of ``nodes`` but ``root``) read outside it, with its reader;
    None when the match is closed. Metadata asserts do not count as readers.

    Replacing a match that is not closed would leave that inner node computed twice: the
    lowering passes such matches over for ``exclusive`` fusions, and the check
    :func:`qalgebra.checks.closed` refuses them where a pattern asks.
    """
    inside = nodes if isinstance(nodes, set | frozenset) else set(nodes)
    for n in nodes:
        if n is root:
            continue
        for u in n.users:
            if u not in inside and u.target not in METADATA_ASSERTS:
                return n, u
    return None


def _closed(st: _State, root: fx.Node) -> bool:
    """Every matched node but the root is read only by matched nodes (or metadata asserts)."""
    return outside_reader(st.nodes, root) is None


def find_matches(
    pattern: Pattern | Matcher, graph: fx.Graph | fx.GraphModule, *, exclusive: bool = False
) -> list[Match]:
    """Non-overlapping matches of ``pattern`` in ``graph``, in graph order of their roots.

    Roots are tried from the end of the graph backwards so that a match is preferred over any
    match it contains; a node already claimed by a match cannot be part of another. With
    ``exclusive``, a match whose inner nodes are also read outside it is passed over (replacing
    it would leave those nodes computed twice) and the search goes on with the next way to match.
    """
    return _matcher_of(pattern).find_matches(graph, exclusive=exclusive)
