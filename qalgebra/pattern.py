"""Core pattern values: immutable, typed, structurally compared.

A pattern describes a piece of a ``torch.fx`` graph. Every pattern is a frozen, slotted dataclass
whose container fields are pyrsistent vectors and maps, so a pattern can be shared, hashed, used as
a dict key and never changes after construction. ``repr(p)`` is Python that rebuilds ``p`` and
``p.describe()`` says the same thing in English.

Factories (the public way to build patterns):

- ``Var(name, type)``: a typed capture; binds the value at its position (``m[var]`` is typed).
- ``call(target, *args, users=None, **kwargs)``: a call of an op overload, of any overload of a
  packet, of one of several targets (a tuple), or of a Python callable. Arguments the pattern
  leaves out must hold the schema default in the graph; plain values become ``literal``\\s.
  ``any_call(overload, *args, **kwargs)``: the same, the arguments left out being anything.
- ``ignored()`` matches anything, ``literal(v)`` matches an equal constant.
- ``any_of(a, b, ...)`` / ``a | b``: ordered alternatives, nested ones flattened.
- ``optional(call, through=i, defaults={var: value})``: the call, or its argument ``i`` when the
  call is absent; the Vars only the call binds take their defaults.
- ``list_of(p)``: a list argument whose every element matches ``p`` (Vars inside bind per element,
  read with ``Match.each``).
- ``capture(var, p)`` binds what ``p`` matched; ``tag(p, var, value)`` binds a constant when ``p``
  matches; ``where(p, check)`` adds a predicate; ``dtype_of(p, var)`` binds the dtype of the
  matched tensor; ``reciprocal(var)`` binds ``1 / value``.
- ``let(body, **shared)`` builds a pattern from sub-patterns named once (how ``repr`` prints a
  pattern that uses a long sub-pattern in several places; ``describe()`` names it ``<name>``).

>>> import torch
>>> x = Var("x", torch.fx.Node)
>>> p = call(torch.ops.aten.relu.default, x)
>>> p
call(torch.ops.aten.relu.default, Var('x', torch.fx.node.Node))
>>> p.describe()
'aten.relu.default(x)'
>>> eval(repr(p)) == p
True
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

import torch
from pyrsistent import PMap, PVector, pmap, pvector
from torch import fx
from torch._ops import OpOverload, OpOverloadPacket

from qalgebra.errors import MatchError, PatternError
from qalgebra.schemas import argument_problems, arguments

__all__ = [
    "COMMUTATIVE_TARGETS",
    "AnyOf",
    "Call",
    "Capture",
    "Check",
    "DtypeOf",
    "Ignored",
    "ListOf",
    "Literal",
    "Match",
    "Mismatch",
    "Optional",
    "Pattern",
    "PatternLike",
    "Reciprocal",
    "Tag",
    "Target",
    "Var",
    "Where",
    "any_call",
    "any_of",
    "call",
    "capture",
    "dtype_of",
    "ignored",
    "let",
    "list_of",
    "literal",
    "optional",
    "reciprocal",
    "tag",
    "where",
]

T = TypeVar("T")

Target: TypeAlias = "OpOverload[..., Any] | OpOverloadPacket[..., Any] | Callable[..., object]"

#: Plain Python values accepted wherever a pattern is expected; they become ``literal``\s.
LiteralValue: TypeAlias = (
    "int | float | bool | str | torch.dtype | torch.memory_format | torch.layout"
    " | tuple[int | float, ...] | list[int] | list[float] | None"
)
PatternLike: TypeAlias = "Pattern | LiteralValue"

_LITERAL_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.memory_format, torch.layout)

aten = torch.ops.aten

#: Binary targets whose two operands may appear in either order.
COMMUTATIVE_TARGETS: frozenset[object] = frozenset(
    {aten.add.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.mul.Scalar, operator.add, operator.mul}
)


# --------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------


def _target_repr(target: object) -> str:
    if isinstance(target, OpOverload | OpOverloadPacket):
        return f"torch.ops.{target}"
    module = str(getattr(target, "__module__", None) or "")
    name = str(getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target)))
    if module == "_operator":
        module = "operator"
    return name if module in ("builtins", "") else f"{module}.{name}"


def _target_name(target: object) -> str:
    if isinstance(target, OpOverload | OpOverloadPacket):
        return str(target)
    return _target_repr(target)


def _type_repr(tp: type[Any]) -> str:
    module = tp.__module__
    return tp.__qualname__ if module == "builtins" else f"{module}.{tp.__qualname__}"


def _value_repr(value: object) -> str:
    if isinstance(value, tuple):
        inner = ", ".join(_value_repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def _freeze(value: object) -> object:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Pattern:
    """Base of every pattern node. Build patterns with the factories, not the classes."""

    __slots__ = ()

    def __or__(self, other: PatternLike) -> Pattern:
        return any_of(self, other)

    def __ror__(self, other: PatternLike) -> Pattern:
        return any_of(other, self)

    def __bool__(self) -> bool:
        raise PatternError(
            "a Pattern has no truth value (it is not a match result); "
            "use qalgebra.match.find_matches(pattern, graph)"
        )

    def __reduce__(self) -> tuple[type[Pattern], tuple[object, ...]]:
        """Unpickle through ``__init__``: cached hashes of strings differ between processes."""
        assert is_dataclass(self)  # every concrete pattern is a frozen dataclass
        return type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init)

    def describe(self) -> str:
        """This pattern in English; a long sub-pattern used in several places is named once."""
        from qalgebra.sharing import render  # sharing reads the classes defined here

        return render(self, english=True)

    def __repr__(self) -> str:
        """Python that rebuilds an equal pattern (a ``let`` when sub-patterns are named)."""
        from qalgebra.sharing import render

        return render(self, english=False)

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        """This node in English, ``sub(child)`` giving each child's text (or name)."""
        raise NotImplementedError

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        """This node as Python, ``sub(child)`` giving each child's code (or name)."""
        raise NotImplementedError

    def children(self) -> tuple[Pattern, ...]:
        """The sub-patterns, in matching order."""
        return ()

    @property
    def vars(self) -> frozenset[Var[Any]]:
        """Every Var this pattern may bind (including Vars inside ``list_of``)."""
        return frozenset()

    @property
    def element_vars(self) -> frozenset[Var[Any]]:
        """The Vars bound per element of a ``list_of`` somewhere inside this pattern."""
        return frozenset()


def _as_pattern(value: object, where: str) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, _LITERAL_TYPES) or (
        isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
    ):
        return Literal(_freeze(value))
    raise PatternError(
        f"{where}: expected a Pattern or a constant (int, float, bool, str, None, torch.dtype, "
        f"list of numbers), got {value!r} ({type(value).__name__})"
    )


class _Lazy:
    """Text worked out when shown: the context of an error a valid pattern never raises (a
    description costs more than building the pattern it describes)."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()

    def __format__(self, spec: str) -> str:
        return format(self._make(), spec)


def _union_vars(children: Iterable[Pattern], where: str | _Lazy) -> frozenset[Var[Any]]:
    """All Vars of the children, refusing one name used with two types."""
    result: set[Var[Any]] = set()
    by_name: dict[str, Var[Any]] = {}
    for child in children:
        for v in child.vars:
            seen = by_name.setdefault(v.name, v)
            if seen.type is not v.type:
                raise PatternError(
                    f"{where}: Var {v.name!r} is bound to two types, "
                    f"{_type_repr(seen.type)} and {_type_repr(v.type)}"
                )
            result.add(v)
    return frozenset(result)


def _union_element_vars(children: Iterable[Pattern]) -> frozenset[Var[Any]]:
    out: frozenset[Var[Any]] = frozenset()
    for child in children:
        out |= child.element_vars
    return out


class _Composite(Pattern):
    """A pattern with sub-patterns: its Vars are computed once, at construction."""

    __slots__ = ()
    _vars: frozenset[Var[Any]]
    _element_vars: frozenset[Var[Any]]

    @property
    def vars(self) -> frozenset[Var[Any]]:
        return self._vars

    @property
    def element_vars(self) -> frozenset[Var[Any]]:
        return self._element_vars


def _init_composite(self: Pattern, children: Sequence[Pattern], where: str | _Lazy) -> None:
    all_vars = _union_vars(children, where)
    object.__setattr__(self, "_vars", all_vars)
    object.__setattr__(self, "_element_vars", _union_element_vars(children))


# --------------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Var(Pattern, Generic[T]):
    """A typed capture: binds the value at its position; ``Match[var]`` returns a ``T``.

    The second argument is the runtime type bound: ``fx.Node`` binds a graph node, ``float`` /
    ``int`` bind constants (also read from a one-element ``get_attr`` tensor), ``torch.Tensor``
    binds the tensor behind a ``get_attr`` node. A Var used twice must bind equal values.
    """

    name: str
    type: builtins.type[T]
    #: Vars key every binding map of a search: hashing them once, not per lookup, matters.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((Var, self.name, self.type)))
        if (
            not isinstance(self.name, str)
            or not self.name.isidentifier()
            or keyword.iskeyword(self.name)
        ):
            raise PatternError(f"Var: expected an identifier as name, got {self.name!r}")
        if not isinstance(self.type, type):
            raise PatternError(
                f"Var {self.name!r}: expected a type (float, int, torch.fx.Node, ...), "
                f"got {self.type!r}"
            )

    def __repr__(self) -> str:
        return f"Var({self.name!r}, {_type_repr(self.type)})"

    def __hash__(self) -> int:
        return self._hash

    def describe(self) -> str:
        return self.name

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return self.describe()

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return repr(self)

    @property
    def vars(self) -> frozenset[Var[Any]]:
        return frozenset({self})


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Ignored(Pattern):
    """Matches any value and binds nothing."""

    def __repr__(self) -> str:
        return "ignored()"

    def describe(self) -> str:
        return "_"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return "_"

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return "ignored()"


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Literal(Pattern):
    """Matches a constant equal to ``value`` (numbers compare by value, bools only to bools)."""

    value: object

    def __post_init__(self) -> None:
        try:
            hash(self.value)
        except TypeError:
            raise PatternError(
                f"literal: expected a hashable constant, got {self.value!r}"
            ) from None

    # Python has True == 1 and hash(True) == hash(1), but literal(True) and literal(1) match
    # different values (bools only equal bools), so they must differ as patterns too (otherwise
    # any_of(literal(1), literal(True)) would drop its second alternative).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Literal):
            return NotImplemented
        return _literal_key(self.value) == _literal_key(other.value)

    def __hash__(self) -> int:
        return hash((Literal, _literal_key(self.value)))

    def __repr__(self) -> str:
        return f"literal({_value_repr(self.value)})"

    def describe(self) -> str:
        return _value_repr(self.value)

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return self.describe()

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return repr(self)


def _literal_key(value: object) -> object:
    """``value`` with bools told apart from the numbers they equal."""
    if isinstance(value, bool):
        return (bool, value)
    if isinstance(value, tuple):
        return tuple(_literal_key(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------


def _is_target(target: object) -> bool:
    return isinstance(target, OpOverload | OpOverloadPacket) or (
        callable(target) and not isinstance(target, type | Pattern)
    )


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Call(_Composite):
    """A ``call_function`` node of one of ``targets`` whose arguments match ``args``/``kwargs``."""

    targets: tuple[Target, ...]
    args: PVector[Pattern]
    kwargs: PMap[str, Pattern]
    users: int | None = None
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = " | ".join(_target_name(t) for t in self.targets)
        if not self.targets:
            raise PatternError("call: expected at least one target")
        for t in self.targets:
            if not _is_target(t):
                raise PatternError(
                    f"call: expected an OpOverload, OpOverloadPacket or Python callable as "
                    f"target, got {t!r} ({type(t).__name__})"
                )
            problem = argument_problems(t, len(self.args), self.kwargs.keys())
            if problem is not None:
                raise PatternError(f"call({_target_name(t)}): {problem}")
        if self.users is not None and (
            isinstance(self.users, bool) or not isinstance(self.users, int) or self.users < 0
        ):
            raise PatternError(f"call({name}): expected users >= 0 or None, got {self.users!r}")
        _init_composite(self, self.children(), f"call({name})")
        object.__setattr__(
            self,
            "_hash",
            hash((Call, self.targets, self.args, tuple(sorted(self.kwargs.items())), self.users)),
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def commutative(self) -> bool:
        """True when the two operands may appear in either order."""
        return (
            len(self.args) == 2
            and not self.kwargs
            and all(t in COMMUTATIVE_TARGETS for t in self.targets)
        )

    def children(self) -> tuple[Pattern, ...]:
        return (*self.args, *(self.kwargs[k] for k in sorted(self.kwargs)))

    def target_repr(self) -> str:
        if len(self.targets) == 1:
            return _target_repr(self.targets[0])
        return "(" + ", ".join(_target_repr(t) for t in self.targets) + ")"

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        parts = [self.target_repr(), *(sub(a) for a in self.args)]
        if self.users is not None:
            parts.append(f"users={self.users}")
        parts.extend(f"{k}={sub(self.kwargs[k])}" for k in sorted(self.kwargs))
        return f"call({', '.join(parts)})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        name = " | ".join(_target_name(t) for t in self.targets)
        if len(self.targets) > 1:
            name = f"({name})"
        parts = [sub(a) for a in self.args]
        parts.extend(f"{k}={sub(self.kwargs[k])}" for k in sorted(self.kwargs))
        text = f"{name}({', '.join(parts)})"
        if self.users is not None:
            text += f" with {self.users} user{'s' if self.users != 1 else ''}"
        return text


def call(
    target: Target | tuple[Target, ...],
    /,
    *args: PatternLike,
    users: int | None = None,
    **kwargs: PatternLike,
) -> Call:
    """A call of ``target`` (an overload, a packet = any overload, a tuple of them, a callable)."""
    targets = target if isinstance(target, tuple) else (target,)
    unique = tuple(dict.fromkeys(targets))
    name = " | ".join(_target_name(t) for t in unique) if unique else "?"
    arg_patterns = pvector(_as_pattern(a, f"call({name}).args[{i}]") for i, a in enumerate(args))
    kwarg_patterns = pmap({k: _as_pattern(v, f"call({name}).{k}") for k, v in kwargs.items()})
    return Call(unique, arg_patterns, kwarg_patterns, users)


def any_call(
    target: OpOverload[..., Any] | tuple[OpOverload[..., Any], ...],
    /,
    *args: PatternLike,
    users: int | None = None,
    **kwargs: PatternLike,
) -> Pattern:
    """A call of ``target`` whose arguments not given here may be anything.

    The overload's schema says what the others are (each is ``ignored()``), so a pattern over
    an op of 22 arguments does not count them; a tuple of overloads gives one alternative each.

    >>> import torch
    >>> any_call(torch.ops.aten.clamp.default, Var("x", torch.fx.Node)).describe()
    'aten.clamp.default(x, _, _)'
    """
    targets = target if isinstance(target, tuple) else (target,)
    alternatives: list[Pattern] = []
    for t in targets:
        if not isinstance(t, OpOverload):
            raise PatternError(
                f"any_call: expected an OpOverload (its schema lists the other arguments), "
                f"got {t!r}"
            )
        schema = arguments(t)
        positional = [a.name for a in schema if not a.kwarg_only]
        named = [i for i, name in enumerate(positional) if name in kwargs]
        stop = min(named, default=len(positional))
        filled: list[PatternLike] = [*args, *(ignored() for _ in range(len(args), stop))]
        rest = {
            a.name: ignored()
            for a in schema
            if a.name not in kwargs and (a.kwarg_only or positional.index(a.name) >= stop)
        }
        alternatives.append(call(t, *filled, users=users, **rest, **kwargs))
    return any_of(*alternatives)


# --------------------------------------------------------------------------------------------
# Combining nodes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class AnyOf(_Composite):
    """Ordered alternatives: the first that leads to a whole match wins."""

    alternatives: PVector[Pattern]
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.alternatives) < 2:
            raise PatternError("any_of: expected at least two alternatives")
        _init_composite(self, self.alternatives, "any_of")
        object.__setattr__(self, "_hash", hash((AnyOf, self.alternatives)))

    def __hash__(self) -> int:
        return self._hash

    def children(self) -> tuple[Pattern, ...]:
        return tuple(self.alternatives)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"any_of({', '.join(sub(a) for a in self.alternatives)})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return "(" + " | ".join(sub(a) for a in self.alternatives) + ")"


def any_of(*alternatives: PatternLike) -> Pattern:
    """Ordered alternatives; nested ``any_of`` are flattened and exact duplicates dropped."""
    flat: list[Pattern] = []
    for i, alt in enumerate(alternatives):
        p = _as_pattern(alt, f"any_of[{i}]")
        for q in p.alternatives if isinstance(p, AnyOf) else (p,):
            if q not in flat:
                flat.append(q)
    if not flat:
        raise PatternError("any_of: expected at least one alternative")
    return flat[0] if len(flat) == 1 else AnyOf(pvector(flat))


def _calls_of(p: Pattern) -> tuple[Call, ...] | None:
    """The calls an ``optional`` may skip: a call, alternatives of calls, or wrapped calls."""
    if isinstance(p, Call):
        return (p,)
    if isinstance(p, Tag | Capture | Where | DtypeOf):
        return _calls_of(p.pattern)
    if isinstance(p, AnyOf):
        out: list[Call] = []
        for alt in p.alternatives:
            calls = _calls_of(alt)
            if calls is None:
                return None
            out.extend(calls)
        return tuple(out)
    return None


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Optional(_Composite):
    """``present`` (a call, or alternatives of calls), or -- absent -- its argument ``through``.

    When the call is absent, Vars that only the call would bind take ``defaults``.
    """

    present: Pattern
    through: int
    defaults: PMap[Var[Any], object]
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _absent: Pattern = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        calls = _calls_of(self.present)
        if calls is None:
            raise PatternError(
                f"optional: expected a call pattern (or any_of of calls), got {self.present!r}"
            )
        if isinstance(self.through, bool) or not isinstance(self.through, int):
            raise PatternError(f"optional: expected an int for through, got {self.through!r}")
        absent: Pattern | None = None
        for c in calls:
            if not 0 <= self.through < len(c.args):
                raise PatternError(
                    f"optional({_brief(c)}): through={self.through} is out of range; "
                    f"the call has {len(c.args)} positional argument(s)"
                )
            if absent is None:
                absent = c.args[self.through]
            elif c.args[self.through] != absent:
                raise PatternError(
                    f"optional: every alternative must have the same argument {self.through}; "
                    f"{_brief(c)} differs"
                )
        assert absent is not None
        object.__setattr__(self, "_absent", absent)
        where = _Lazy(lambda: f"optional({_brief(self.present)})")
        _init_composite(self, (self.present,), where)
        only_present = self.present.vars - absent.vars
        for var, value in self.defaults.items():
            if not isinstance(var, Var):
                raise PatternError(f"{where}: defaults keys must be Vars, got {var!r}")
            if var not in only_present:
                raise PatternError(
                    f"{where}: default given for Var {var.name!r}, which the call does not bind "
                    "or which its argument also binds"
                )
            if not _default_fits(var, value):
                raise PatternError(
                    f"{where}: default for Var {var.name!r} must be a {_type_repr(var.type)}, "
                    f"got {value!r}"
                )
        missing = sorted(v.name for v in only_present - set(self.defaults) - self.element_vars)
        if missing:
            raise PatternError(
                f"{where}: Var(s) {', '.join(missing)} are bound only by the optional call; "
                "give each a default"
            )
        object.__setattr__(
            self, "_hash", hash((Optional, self.present, self.through, self.defaults))
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def absent(self) -> Pattern:
        """What is matched in place of the call when it is absent."""
        return self._absent

    def children(self) -> tuple[Pattern, ...]:
        return (self.present,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        items = sorted(self.defaults.items(), key=lambda kv: kv[0].name)
        defaults = ", ".join(f"{k!r}: {_value_repr(v)}" for k, v in items)
        present = sub(self.present)
        return f"optional({present}, through={self.through}, defaults={{{defaults}}})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"optional {sub(self.present)}"


def _frozen_default(var: object, value: object) -> object:
    """Defaults are stored hashable (lists as tuples, ints for float Vars as floats)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return _freeze(value)
    if isinstance(var, Var) and var.type is float:
        return float(value)
    return _freeze(value)


def _brief(p: Pattern, limit: int = 120) -> str:
    """``p.describe()`` cut to ``limit`` characters, for error messages about large patterns."""
    text = p.describe()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_fits(var: Var[Any], value: object) -> bool:
    if var.type in (list, tuple):
        return isinstance(value, list | tuple)
    if var.type is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if var.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, var.type)


def optional(
    present: Pattern, through: int = 0, defaults: Mapping[Var[Any], object] | None = None
) -> Optional:
    """``present``, or when that call is absent its argument ``through`` (see :class:`Optional`)."""
    if not isinstance(present, Pattern):
        raise PatternError(f"optional: expected a call pattern, got {present!r}")
    frozen = {k: _frozen_default(k, v) for k, v in (defaults or {}).items()}
    return Optional(present, through, pmap(frozen))


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class ListOf(_Composite):
    """A list/tuple argument of at least one element, each matching ``element``."""

    element: Pattern
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _init_composite(self, (self.element,), "list_of")
        object.__setattr__(self, "_element_vars", self.element.vars)

    def children(self) -> tuple[Pattern, ...]:
        return (self.element,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"list_of({sub(self.element)})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"[{sub(self.element)}, ...]"


def list_of(element: PatternLike) -> ListOf:
    """A list argument whose every element matches ``element``."""
    return ListOf(_as_pattern(element, "list_of"))


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Capture(_Composite):
    """Binds ``var`` to the value ``pattern`` matched (typically the matched node)."""

    var: Var[Any]
    pattern: Pattern
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.var, Var):
            raise PatternError(f"capture: expected a Var, got {self.var!r}")
        _init_composite(self, (self.var, self.pattern), f"capture({self.var.name})")

    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"capture({self.var!r}, {sub(self.pattern)})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"{self.var.name}={sub(self.pattern)}"


def capture(var: Var[T], pattern: PatternLike) -> Capture:
    """Bind ``var`` to what ``pattern`` matches."""
    return Capture(var, _as_pattern(pattern, f"capture({getattr(var, 'name', var)!r})"))


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Tag(_Composite):
    """Matches ``pattern`` and binds ``var`` to the constant ``value`` (which alternative fired)."""

    pattern: Pattern
    var: Var[Any]
    value: object
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.var, Var):
            raise PatternError(f"tag: expected a Var, got {self.var!r}")
        if not _default_fits(self.var, self.value):
            raise PatternError(
                f"tag({self.var.name}): expected a {_type_repr(self.var.type)}, got {self.value!r}"
            )
        _init_composite(self, (self.pattern, self.var), f"tag({self.var.name})")

    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"tag({sub(self.pattern)}, {self.var!r}, {_value_repr(self.value)})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"{sub(self.pattern)} [{self.var.name}={_value_repr(self.value)}]"


def tag(pattern: PatternLike, var: Var[T], value: T) -> Tag:
    """Match ``pattern`` and bind ``var = value``."""
    return Tag(_as_pattern(pattern, "tag"), var, value)


class Check(Protocol):
    """What ``where`` needs of a predicate (``qalgebra.checks`` builds composable ones)."""

    def failure(self, m: Match) -> str | None:
        """None when the match passes, else why it does not."""
        ...

    def describe(self) -> str:
        """The predicate in English."""
        ...


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Where(_Composite):
    """Matches ``pattern`` and then requires ``check`` to pass on the match so far."""

    pattern: Pattern
    check: Check
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(getattr(self.check, "failure", None)):
            raise PatternError(
                f"where: expected a Check (with .failure(match)), got {self.check!r}"
            )
        _init_composite(self, (self.pattern,), "where")

    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"where({sub(self.pattern)}, {self.check!r})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"{sub(self.pattern)} where {self.check.describe()}"


def where(pattern: PatternLike, check: Check) -> Where:
    """Match ``pattern``, then require ``check`` (its failure reason shows up in ``explain``)."""
    return Where(_as_pattern(pattern, "where"), check)


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class DtypeOf(_Composite):
    """Matches ``pattern`` and binds ``var`` to the dtype of the tensor it matched.

    The dtype is read from the node's ``meta['val']``, from a ``get_attr`` tensor, or from the
    dtype argument of a conversion node; a node whose dtype cannot be known does not match.
    """

    pattern: Pattern
    var: Var[torch.dtype]
    _vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)
    _element_vars: frozenset[Var[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.var, Var) or self.var.type is not torch.dtype:
            raise PatternError(f"dtype_of: expected a Var of torch.dtype, got {self.var!r}")
        _init_composite(self, (self.pattern, self.var), "dtype_of")

    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"dtype_of({sub(self.pattern)}, {self.var!r})"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return f"{sub(self.pattern)} of dtype {self.var.name}"


def dtype_of(pattern: PatternLike, var: Var[torch.dtype]) -> DtypeOf:
    """Match ``pattern`` and bind ``var`` to the dtype of the matched tensor."""
    return DtypeOf(_as_pattern(pattern, "dtype_of"), var)


@dataclass(frozen=True, slots=True, repr=False, weakref_slot=True)
class Reciprocal(Pattern):
    """Matches a non-zero number ``v`` and binds ``var = 1 / v`` (the decomposed quant's mul)."""

    var: Var[float]

    def __post_init__(self) -> None:
        if not isinstance(self.var, Var) or self.var.type is not float:
            raise PatternError(f"reciprocal: expected a Var of float, got {self.var!r}")

    @property
    def vars(self) -> frozenset[Var[Any]]:
        return frozenset({self.var})

    def __repr__(self) -> str:
        return f"reciprocal({self.var!r})"

    def describe(self) -> str:
        return f"1/{self.var.name}"

    def _describe_node(self, sub: Callable[[Pattern], str]) -> str:
        return self.describe()

    def _repr_node(self, sub: Callable[[Pattern], str]) -> str:
        return repr(self)


def reciprocal(var: Var[float]) -> Reciprocal:
    """A number ``v``; binds ``var`` to ``1 / v``."""
    return Reciprocal(var)


def ignored() -> Ignored:
    """Any value; binds nothing."""
    return Ignored()


def literal(value: LiteralValue) -> Literal:
    """A constant equal to ``value``."""
    return Literal(_freeze(value))


def let(body: Callable[..., PatternLike], /, **shared: Callable[..., PatternLike]) -> Pattern:
    """``body``'s pattern, built from sub-patterns named once: the form ``repr`` prints a
    pattern in when it uses a long sub-pattern in several places (see :mod:`qalgebra.sharing`).

    Each keyword names a sub-pattern, made by a function whose parameters name sub-patterns
    defined before it; ``body``'s parameters name any of them. Functions, because a Python
    expression cannot name a value and use it; the result is the plain pattern (each name one
    shared object), equal to the pattern spelled out in full.

    >>> import torch
    >>> add, relu = torch.ops.aten.add.Tensor, torch.ops.aten.relu.default
    >>> p = let(lambda r: call(add, r, r), r=lambda: call(relu, Var("x", int)))
    >>> p == call(add, call(relu, Var("x", int)), call(relu, Var("x", int)))
    True
    """
    made: dict[str, Pattern] = {}
    for name, make in (*shared.items(), ("the body", body)):
        if not callable(make):
            raise PatternError(f"let: {name} must be a function returning a pattern, got {make!r}")
        args: list[Pattern] = []
        for param in inspect.signature(make).parameters:
            if param not in made:
                raise PatternError(
                    f"let: {name} reads {param!r}, which is not defined before it "
                    f"(defined: {', '.join(made) or 'nothing'})"
                )
            args.append(made[param])
        made[name] = _as_pattern(make(*args), f"let: {name}")
    return made["the body"]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """A successful match: typed bindings, per-element bindings and the matched nodes."""

    root: fx.Node
    bindings: PMap[Var[Any], object]
    per_element: PMap[Var[Any], tuple[object, ...]]
    nodes: tuple[fx.Node, ...]

    def __getitem__(self, var: Var[T]) -> T:
        try:
            return cast(T, self.bindings[var])
        except KeyError:
            if var in self.per_element:
                raise MatchError(
                    f"Var {var.name!r} is bound per element of a list_of; use Match.each({var!r})"
                ) from None
            bound = ", ".join(sorted(v.name for v in self.bindings)) or "nothing"
            raise MatchError(
                f"this match did not bind Var {var.name!r} (it bound {bound})"
            ) from None

    def get(self, var: Var[T], default: T) -> T:
        """``m[var]`` when bound, else ``default``."""
        return cast(T, self.bindings.get(var, default))

    def __contains__(self, var: object) -> bool:
        return var in self.bindings

    def each(self, var: Var[T]) -> tuple[T, ...]:
        """The values a Var inside ``list_of`` bound, one per list element."""
        try:
            return cast(tuple[T, ...], self.per_element[var])
        except KeyError:
            raise MatchError(f"Var {var.name!r} is not bound inside a list_of") from None

    def __repr__(self) -> str:
        items = ", ".join(
            f"{v.name}={_short(val)}" for v, val in sorted(self.bindings.items(), key=_by_name)
        )
        return f"<Match at {self.root.name}: {items}>"


def _by_name(item: tuple[Var[Any], object]) -> str:
    return item[0].name


def _short(value: object) -> str:
    if isinstance(value, fx.Node):
        return value.name
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


@dataclass(frozen=True, slots=True)
class Mismatch:
    """Why a pattern failed at one place: a reason, the pattern path and the graph value there.

    The reason is kept as a template and its arguments and formatted only when read, so that
    recording failures keeps matching cheap.
    """

    template: str
    template_args: tuple[object, ...]
    path: tuple[str, ...]
    at: object
    #: The other failures reached after as much progress: other alternatives, or the other
    #: operand order of a commutative call, that fail as far in (``explain`` lists them all).
    tied: tuple[Mismatch, ...] = ()

    @property
    def reason(self) -> str:
        return self.template.format(*(_describe_value(a) for a in self.template_args))

    @property
    def path_str(self) -> str:
        return "root" + "".join(self.path)

    @property
    def node(self) -> fx.Node | None:
        return self.at if isinstance(self.at, fx.Node) else None

    def __str__(self) -> str:
        first = f"at {self.path_str} ({_describe_value(self.at)}): {self.reason}"
        return "\n".join([first, *(f"  or {tie}" for tie in self.tied)])


def _describe_value(value: object) -> str:
    if isinstance(value, fx.Node):
        if value.op == "call_function":
            return f"node {value.name} = {_target_name(value.target)}(...)"
        return f"node {value.name} ({value.op})"
    if isinstance(value, Pattern):
        return value.describe()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_describe_value(v) for v in value) + "]"
    return repr(value)


def walk(pattern: Pattern) -> Iterator[Pattern]:
    """Every distinct sub-pattern of ``pattern`` once (equal ones merged), parents first.

    Spelled out, a catalog pattern repeats its shared parts thousands of times (see
    :mod:`qalgebra.sharing`); what a pass over a pattern needs is each part once.
    """
    from qalgebra.sharing import distinct

    return distinct(pattern)
