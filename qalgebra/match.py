"""The matcher: find pattern matches in ``torch.fx`` graphs, and explain why one failed.

- ``find_matches(pattern, graph)`` returns non-overlapping matches, in graph order. Candidate roots
  come from one pass over the graph filtered by the pattern's possible root targets; larger
  matches win because candidates are tried from the end of the graph backwards.
- ``match_node(pattern, node)`` tries one node; ``explain(pattern, node)`` returns the deepest
  ``Mismatch`` (reason, pattern path such as ``root.args[0].args[1]``, graph value) or None.

Matching is a backtracking search written with generators: optional nodes try "present" then
"absent", alternatives are tried in order, commutative calls try both operand orders, and a Var
bound twice must bind equal values. Bindings live in persistent maps, so a failed branch leaves
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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias, TypeVar

import torch
from pyrsistent import pmap
from torch import fx
from torch._ops import OpOverload

from qalgebra.errors import PatternError
from qalgebra.pattern import (
    AnyOf,
    Call,
    Capture,
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

__all__ = ["explain", "find_matches", "iter_matches", "match_node"]

Path: TypeAlias = tuple[str, ...]
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Graph facts
# --------------------------------------------------------------------------------------------


class _Arg(NamedTuple):
    name: str
    kwarg_only: bool
    has_default: bool
    default: object


@functools.cache
def _schema_args(op: OpOverload[..., Any]) -> tuple[_Arg, ...]:
    out: list[_Arg] = []
    for a in op._schema.arguments:
        has_default = a.has_default_value()
        out.append(
            _Arg(a.name, a.kwarg_only, has_default, a.default_value if has_default else None)
        )
    return tuple(out)


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
    deepest: Mismatch | None = None
    _deepest_rank: tuple[int, int] = (-1, -1)
    _normalized: dict[fx.Node, dict[str, object] | None] = field(default_factory=dict)
    #: (pattern, node, bindings of its Vars) that were tried and yielded nothing: trying them
    #: again cannot succeed, and without this k nested optionals cost 2^k on a failing graph.
    failed: set[tuple[object, ...]] = field(default_factory=set)
    _order: dict[fx.Node, int] | None = None

    def fail(self, st: _State, path: Path, at: object, template: str, *args: object) -> None:
        """Record a failure; ``explain`` reports the one reached after the most progress.

        Progress is what the search had matched when it failed (nodes and bindings), then the
        depth of the path: a later alternative that fails early at a deep place (another spelling
        of a conversion tried after the first one matched) must not hide the real failure.
        """
        if not self.record:
            return
        rank = (len(st.nodes) + len(st.bindings), len(path))
        if self.deepest is None or rank > self._deepest_rank:
            self.deepest = Mismatch(template, args, path, at)
            self._deepest_rank = rank

    def arguments(self, node: fx.Node) -> dict[str, object] | None:
        """The node's arguments by schema name with defaults filled in (None: no schema)."""
        try:
            return self._normalized[node]
        except KeyError:
            pass
        result: dict[str, object] | None = None
        target = node.target
        if isinstance(target, OpOverload):
            schema = _schema_args(target)
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

_Matcher: TypeAlias = Callable[[Any, object, _State, Path, _Context], Iterator[_State]]


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


def _m(p: Pattern, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    if type(p) is not Optional or not isinstance(value, fx.Node):
        return _DISPATCH[type(p)](p, value, st, path, ctx)
    memo_vars = _memo_vars(p)
    if memo_vars is None:
        return _DISPATCH[type(p)](p, value, st, path, ctx)
    bound = st.bindings
    # By identity: structurally equal sub-patterns share a hash, and comparing them deeply on
    # every lookup cost more than the memo saved (the pattern lives for the whole search).
    key: tuple[object, ...] = (id(p), value)
    if bound:
        key += tuple((type(b), _hashable(b)) for b in map(bound.get, memo_vars))
    try:
        if key in ctx.failed:
            return iter(())
    except TypeError:  # an unhashable bound value: no memo
        return _DISPATCH[type(p)](p, value, st, path, ctx)
    return _remember_failure(p, value, st, path, ctx, key)


_R = TypeVar("_R")
_P = TypeVar("_P", bound=Pattern)


def _by_identity(fn: Callable[[_P], _R]) -> Callable[[_P], _R]:
    """Cache ``fn`` per pattern object.

    ``functools.cache`` would look patterns up by structural equality: equal but distinct
    sub-patterns share a hash, and each lookup then compares them deeply, which cost more than
    the matching itself. The cached pattern is kept alive, so its id cannot be reused.
    """
    cache: dict[int, tuple[_P, _R]] = {}

    def cached(p: _P) -> _R:
        hit = cache.get(id(p))
        if hit is None:
            hit = cache[id(p)] = (p, fn(p))
        return hit[1]

    return cached


@_by_identity
def _memo_vars(p: Pattern) -> tuple[Var[Any], ...] | None:
    """The Vars a sub-search of ``p`` depends on, or None when it is not worth memoizing.

    Only optional nodes are memoized (they are what makes the search branch at one node); one
    with a ``where`` check inside is not (a check may read any binding or the matched nodes).
    """
    if not isinstance(p, Optional):
        return None
    stack: list[Pattern] = [p]
    while stack:
        q = stack.pop()
        if isinstance(q, Where):
            return None
        stack.extend(q.children())
    return tuple(sorted(p.vars, key=lambda v: v.name))


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _remember_failure(
    p: Pattern, value: object, st: _State, path: Path, ctx: _Context, key: tuple[object, ...]
) -> Iterator[_State]:
    found = False
    for out in _DISPATCH[type(p)](p, value, st, path, ctx):
        found = True
        yield out
    if not found:
        ctx.failed.add(key)


def _m_var(p: Var[Any], value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    out = _bind(p, value, st, path, ctx)
    if out is not None:
        yield out


def _m_ignored(
    p: Ignored, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    yield st


def _m_literal(
    p: Literal, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    if _const_eq(p.value, value):
        yield st
    else:
        ctx.fail(st, path, value, "expected {}, got {}", p.value, value)


class _TargetNames:
    """The targets of a call pattern in English (``aten.relu.default``), named only if shown."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def __repr__(self) -> str:
        return " | ".join(_target_name(t) for t in self.call.targets)


def _target_ok(targets: Collection[object], target: object) -> bool:
    if target in targets:
        return True
    return isinstance(target, OpOverload) and target.overloadpacket in targets


@dataclass(frozen=True, slots=True)
class _Unfit:
    """A call pattern that cannot match any node of one target, and why (the node goes first)."""

    template: str
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a call pattern reads a node of one OpOverload target, worked out once per target.

    ``pairs``: (sub-pattern, schema argument, path step), leaves first (each matches at most
    one way, so a constant that differs ends the trial before a deep argument is enumerated);
    ``defaults``: arguments the pattern leaves out, which must hold their schema default.
    """

    pairs: tuple[tuple[Pattern, str, str], ...]
    defaults: tuple[tuple[str, object], ...]


_PlanOrNot: TypeAlias = "_Plan | _Unfit | bool"


def _plan_for(p: Call, target: object) -> _PlanOrNot:
    """False: ``target`` is not one of ``p``'s; True: match the node's raw args; else a plan."""
    if not _target_ok(p.targets, target):
        return False
    if not isinstance(target, OpOverload):
        return True
    schema = _schema_args(target)
    positional = [a.name for a in schema if not a.kwarg_only]
    if len(p.args) > len(positional):
        return _Unfit(
            "{} takes {} positional arguments, the pattern gives {}",
            (len(positional), len(p.args)),
        )
    names = {a.name for a in schema}
    pairs = [(sub, positional[i], f".args[{i}]") for i, sub in enumerate(p.args)]
    for name in sorted(p.kwargs):
        if name not in names:
            return _Unfit("{} has no argument {}", (_Text(name),))
        pairs.append((p.kwargs[name], name, f".{name}"))
    specified = {name for _, name, _ in pairs}
    defaults = tuple(
        (a.name, a.default) for a in schema if a.name not in specified and a.has_default
    )
    pairs.sort(key=lambda pair: _is_composite(pair[0]))
    return _Plan(tuple(pairs), defaults)


@_by_identity
def _plans(p: Call) -> dict[int, tuple[object, _PlanOrNot]]:
    """Per call pattern: target id -> (target, its plan). Targets are long-lived op objects; the
    entry keeps its target alive and is checked by identity, so an id is never misread."""
    return {}


def _plan(p: Call, target: object) -> _PlanOrNot:
    plans = _plans(p)
    hit = plans.get(id(target))
    if hit is None or hit[0] is not target:
        hit = plans[id(target)] = (target, _plan_for(p, target))
    return hit[1]


def _call_pairs(
    p: Call, node: fx.Node, plan: _PlanOrNot, st: _State, path: Path, ctx: _Context
) -> list[tuple[Pattern, object, str]] | None:
    """(pattern, graph value, path step) for each argument, or None after recording why not."""
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
    if len(node.args) != len(p.args) or set(node.kwargs) != set(p.kwargs):
        ctx.fail(
            st,
            path,
            node,
            "{} has {} args and kwargs {}, the pattern expects {} and {}",
            node,
            len(node.args),
            sorted(node.kwargs),
            len(p.args),
            sorted(p.kwargs),
        )
        return None
    pairs: list[tuple[Pattern, object, str]] = [
        (sub, node.args[i], f".args[{i}]") for i, sub in enumerate(p.args)
    ]
    pairs.extend((p.kwargs[k], node.kwargs[k], f".{k}") for k in sorted(p.kwargs))
    pairs.sort(key=lambda pair: _is_composite(pair[0]))
    return pairs


def _m_seq(
    pairs: Sequence[tuple[Pattern, object, str]], i: int, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    if i == len(pairs):
        yield st
        return
    sub, value, step = pairs[i]
    for st2 in _m(sub, value, st, (*path, step), ctx):
        yield from _m_seq(pairs, i + 1, st2, path, ctx)


def _m_call(p: Call, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    if not isinstance(value, fx.Node) or value.op != "call_function":
        ctx.fail(st, path, value, "expected a call to {}, got {}", _TargetNames(p), value)
        return
    plan = _plan(p, value.target)
    if plan is False:
        ctx.fail(st, path, value, "expected a call to {}, got {}", _TargetNames(p), value)
        return
    if p.users is not None and len(value.users) != p.users:
        ctx.fail(
            st,
            path,
            value,
            "expected {} user(s), {} has {}",
            p.users,
            _Text(value.name),
            len(value.users),
        )
        return
    pairs = _call_pairs(p, value, plan, st, path, ctx)
    if pairs is None:
        return
    orders = [pairs]
    if p.commutative:
        (a, va, sa), (b, vb, sb) = pairs
        orders.append([(a, vb, sb), (b, va, sa)])
    for order in orders:
        for st2 in _m_seq(order, 0, st, path, ctx):
            yield st2 if value in st2.nodes else st2.with_node(value)


def _is_composite(p: Pattern) -> bool:
    return not isinstance(p, Var | Literal | Ignored | Reciprocal)


def _m_any_of(p: AnyOf, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    alternatives = p.alternatives if ctx.record else _alternatives_at(p, value)
    for alt in alternatives:
        yield from _m(alt, value, st, path, ctx)


_NOT_A_CALL = object()


@_by_identity
def _alternatives_by_target(p: AnyOf) -> dict[int, tuple[object, tuple[Pattern, ...]]]:
    """Per any_of: target id -> (target, the alternatives whose root may have that target)."""
    return {}


def _alternatives_at(p: AnyOf, value: object) -> Sequence[Pattern]:
    """The alternatives of ``p`` that can match ``value``, in order; the others would fail at
    their root's target. Only when failures are not recorded (``explain`` sees them all)."""
    if not isinstance(value, fx.Node):
        return p.alternatives
    target = value.target if value.op == "call_function" else _NOT_A_CALL
    table = _alternatives_by_target(p)
    hit = table.get(id(target))
    if hit is None or hit[0] is not target:
        kept = tuple(
            alt
            for alt in p.alternatives
            if (roots := _roots(alt)) is None
            or (target is not _NOT_A_CALL and _target_ok(roots, target))
        )
        hit = table[id(target)] = (target, kept)
    return hit[1]


def _m_optional(
    p: Optional, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    yield from _m(p.present, value, st, path, ctx)
    for st2 in _m(p.absent, value, st, path, ctx):
        out: _State | None = st2
        for var, default in p.defaults.items():
            assert out is not None
            out = _bind(var, default, out, path, ctx)
            if out is None:
                break
        if out is not None:
            yield out


def _m_list_of(p: ListOf, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    if not isinstance(value, list | tuple) or not value:
        ctx.fail(st, path, value, "expected a non-empty list, got {}", value)
        return
    per_element = {v: list(st.per_element.get(v, ())) for v in p.element.vars}
    nodes = st.nodes
    for i, item in enumerate(value):
        first = next(_m(p.element, item, _EMPTY, (*path, f"[{i}]"), ctx), None)
        if first is None:
            return
        for v in p.element.vars:
            per_element[v].append(first.bindings.get(v))
        nodes = (*nodes, *(n for n in first.nodes if n not in nodes))
    merged = {**st.per_element, **{v: tuple(vals) for v, vals in per_element.items()}}
    yield _State(st.bindings, merged, nodes)


def _m_capture(
    p: Capture, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    for st2 in _m(p.pattern, value, st, path, ctx):
        out = _bind(p.var, value, st2, path, ctx)
        if out is not None:
            yield out


def _m_tag(p: Tag, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    for st2 in _m(p.pattern, value, st, path, ctx):
        out = _bind(p.var, p.value, st2, path, ctx, coerce=False)
        if out is not None:
            yield out


def _m_where(p: Where, value: object, st: _State, path: Path, ctx: _Context) -> Iterator[_State]:
    for st2 in _m(p.pattern, value, st, path, ctx):
        root = value if isinstance(value, fx.Node) else (st2.nodes[-1] if st2.nodes else None)
        if root is None:
            ctx.fail(st2, path, value, "a check needs a matched node, got {}", value)
            continue
        why = p.check.failure(Match(root, pmap(st2.bindings), pmap(st2.per_element), st2.nodes))
        if why is None:
            yield st2
        else:
            ctx.fail(st2, (*path, "<check>"), value, "check failed: {}", _Text(why))


class _Text(str):
    """A reason that should be shown as-is, not repr'd."""

    def __repr__(self) -> str:
        return str(self)


def _m_dtype_of(
    p: DtypeOf, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    for st2 in _m(p.pattern, value, st, path, ctx):
        dt = ctx.dtype(value)
        if dt is None:
            ctx.fail(st2, path, value, "the dtype of {} is unknown (no meta['val'])", value)
            continue
        out = _bind(p.var, dt, st2, path, ctx, coerce=False)
        if out is not None:
            yield out


def _m_reciprocal(
    p: Reciprocal, value: object, st: _State, path: Path, ctx: _Context
) -> Iterator[_State]:
    ok, number = _coerce(float, value, ctx)
    if not ok or number == 0.0:
        ctx.fail(
            st, path, value, "expected a non-zero number (1/{}), got {}", _Text(p.var.name), value
        )
        return
    assert isinstance(number, float)
    out = _bind(p.var, 1.0 / number, st, path, ctx, coerce=False)
    if out is not None:
        yield out


_DISPATCH: dict[type[Any], _Matcher] = {
    Var: _m_var,
    Ignored: _m_ignored,
    Literal: _m_literal,
    Call: _m_call,
    AnyOf: _m_any_of,
    Optional: _m_optional,
    ListOf: _m_list_of,
    Capture: _m_capture,
    Tag: _m_tag,
    Where: _m_where,
    DtypeOf: _m_dtype_of,
    Reciprocal: _m_reciprocal,
}


# --------------------------------------------------------------------------------------------
# Root index
# --------------------------------------------------------------------------------------------


@_by_identity
def _roots(p: Pattern) -> frozenset[object] | None:
    """Targets a matched root node may have; None when any node may be a root."""
    if isinstance(p, Call):
        return frozenset(p.targets)
    if isinstance(p, AnyOf):
        out: frozenset[object] = frozenset()
        for alt in p.alternatives:
            sub = _roots(alt)
            if sub is None:
                return None
            out |= sub
        return out
    if isinstance(p, Optional):
        present, absent = _roots(p.present), _roots(p.absent)
        return None if present is None or absent is None else present | absent
    if isinstance(p, Capture | Tag | Where | DtypeOf):
        return _roots(p.pattern)
    return None


@_by_identity
def _required(p: Pattern) -> frozenset[frozenset[object]]:
    """Target sets a graph must each meet (hold one of) for ``p`` to match anywhere in it.

    A call needs its own targets and what its arguments need; alternatives need what all of
    them need, and one of their roots. A graph without a conv then skips the conv fusions
    without trying each of its quantize nodes as a root.
    """
    if isinstance(p, Call):
        out: set[frozenset[object]] = {frozenset(p.targets)}
        for child in p.children():
            out |= _required(child)
        return frozenset(out)
    if isinstance(p, AnyOf | Optional):
        alternatives = p.alternatives if isinstance(p, AnyOf) else (p.present, p.absent)
        common = frozenset.intersection(*(_required(alt) for alt in alternatives))
        roots = _roots(p)
        return common if roots is None else common | {roots}
    if isinstance(p, ListOf | Capture | Tag | Where | DtypeOf):
        return _required(p.children()[0])
    return frozenset()


def _targets_in(graph: fx.Graph) -> set[object]:
    """The node targets of ``graph``, with the packet of each overload."""
    targets: set[object] = {node.target for node in graph.nodes}
    return targets | {t.overloadpacket for t in targets if isinstance(t, OpOverload)}


@_by_identity
def _root_table(p: Pattern) -> dict[int, tuple[object, bool]]:
    """Per pattern: target id -> (target, whether a root may have it), filled as targets come."""
    return {}


@_by_identity
def _validate(p: Pattern) -> None:
    """Refuse Vars used both inside a list_of (bound per element) and outside it."""
    reachable: set[Var[Any]] = set()
    stack = [p]
    while stack:
        q = stack.pop()
        if isinstance(q, ListOf):
            continue
        if isinstance(q, Var):
            reachable.add(q)
        if isinstance(q, Capture | Tag | DtypeOf | Reciprocal):
            reachable.add(q.var)
        stack.extend(q.children())
    both = reachable & p.element_vars
    if both:
        names = ", ".join(sorted(v.name for v in both))
        raise PatternError(f"Var(s) {names} are used both inside and outside a list_of")


def _context_for(node: fx.Node, record: bool) -> _Context:
    return _Context(node.graph.owning_module, record)


def _to_match(root: fx.Node, st: _State, ctx: _Context) -> Match:
    nodes = tuple(sorted(st.nodes, key=ctx.order))
    return Match(root, pmap(st.bindings), pmap(st.per_element), nodes)


def _check_pattern(pattern: object) -> Pattern:
    if not isinstance(pattern, Pattern):
        raise PatternError(f"expected a Pattern, got {pattern!r} ({type(pattern).__name__})")
    _validate(pattern)
    return pattern


def iter_matches(pattern: Pattern, node: fx.Node) -> Iterator[Match]:
    """Every way ``pattern`` matches with ``node`` as its root, in preference order."""
    pattern = _check_pattern(pattern)
    ctx = _context_for(node, record=False)
    for st in _m(pattern, node, _EMPTY, (), ctx):
        yield _to_match(node, st, ctx)


def match_node(pattern: Pattern, node: fx.Node) -> Match | None:
    """The preferred match of ``pattern`` rooted at ``node``, or None."""
    return next(iter_matches(pattern, node), None)


def explain(pattern: Pattern, node: fx.Node) -> Mismatch | None:
    """Why ``pattern`` does not match at ``node`` (the deepest failure), or None if it matches."""
    pattern = _check_pattern(pattern)
    ctx = _context_for(node, record=True)
    if next(_m(pattern, node, _EMPTY, (), ctx), None) is not None:
        return None
    return ctx.deepest or Mismatch("no alternative matched {}", (node,), (), node)


#: meta key where a rewrite records the dtype of a node it inserted (read like meta['val']).
DTYPE_KEY = "qalgebra_dtype"


def node_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype of ``node``'s value as ``dtype_of`` infers it, or None when unknown."""
    return _Context(node.graph.owning_module, record=False).dtype(node)


#: Readers that only check a tensor's metadata (export adds one after each ``Tensor.to``):
#: they do not make a matched node's value needed outside the match.
METADATA_ASSERTS = frozenset({torch.ops.aten._assert_tensor_metadata.default})


def _closed(st: _State, root: fx.Node) -> bool:
    """Every matched node but the root is read only by matched nodes (or metadata asserts)."""
    inside = set(st.nodes)
    return all(
        u in inside or u.target in METADATA_ASSERTS
        for n in st.nodes
        if n is not root
        for u in n.users
    )


def find_matches(
    pattern: Pattern, graph: fx.Graph | fx.GraphModule, *, exclusive: bool = False
) -> list[Match]:
    """Non-overlapping matches of ``pattern`` in ``graph``, in graph order of their roots.

    Roots are tried from the end of the graph backwards so that a match is preferred over any
    match it contains; a node already claimed by a match cannot be part of another. With
    ``exclusive``, a match whose inner nodes are also read outside it is passed over (replacing
    it would leave those nodes computed twice) and the search goes on with the next way to match.
    """
    pattern = _check_pattern(pattern)
    if isinstance(graph, fx.GraphModule):
        module: torch.nn.Module | None = graph
        g = graph.graph
    elif isinstance(graph, fx.Graph):
        g = graph
        module = graph.owning_module
    else:
        raise PatternError(f"find_matches: expected an fx.Graph or fx.GraphModule, got {graph!r}")
    required = _required(pattern)
    if required:
        present = _targets_in(g)
        if not all(present.intersection(targets) for targets in required):
            return []
    roots = _roots(pattern)
    ctx = _Context(module, record=False)
    claimed: set[fx.Node] = set()
    found: list[Match] = []
    root_ok = _root_table(pattern)
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
        for st in _m(pattern, node, _EMPTY, (), ctx):
            if exclusive and not _closed(st, node):
                continue
            if not claimed.intersection(st.nodes):
                claimed.update(st.nodes)
                found.append(_to_match(node, st, ctx))
                break
    found.reverse()
    return found
