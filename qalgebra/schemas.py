"""Operator schemas as qalgebra reads them, in one place for patterns, matcher, rewriter and stubs.

A pattern's ``call`` (:func:`argument_problems`), the matcher's argument plans (:func:`arguments`),
the Rewriter building a node from keyword arguments (:func:`value_problem`, :func:`layout`), the
typed emission namespaces choosing an overload (:func:`emittable`) and the stub generator all read
an ``OpOverload``'s schema through these functions, so they agree on what an argument is.

>>> import torch
>>> add = torch.ops.aten.add.Tensor
>>> [a.name for a in arguments(add)]
['self', 'other', 'alpha']
>>> argument_problems(add, 1, [])
"argument 'other' has no default; pass it (ignored() accepts any value)"
>>> value_problem(add, "other", 2.0)
"argument 'other' takes a graph node (Tensor), got 2.0"
>>> [str(op) for op in emittable(torch.ops.aten.add)]
['aten.add.Tensor', 'aten.add.Scalar']
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import fx
from torch._ops import OpOverload, OpOverloadPacket

__all__ = [
    "Argument",
    "argument_problems",
    "arguments",
    "emittable",
    "given_arguments",
    "layout",
    "mentions_tensor",
    "overload_names",
    "value_problem",
]


class Argument(NamedTuple):
    """One argument of an overload's schema."""

    name: str
    kwarg_only: bool
    has_default: bool
    default: object
    type: torch._C.JitType
    #: The fixed length of a list argument such as ``int[2]`` (a bare int is broadcast), or None.
    n: int | None
    #: The op writes into this argument (``Tensor(a!)``).
    writes: bool


@functools.cache
def arguments(op: OpOverload[..., Any]) -> tuple[Argument, ...]:
    """The schema's arguments, in order (read once per overload)."""
    out: list[Argument] = []
    for a in op._schema.arguments:
        has_default = a.has_default_value()
        n = getattr(a, "N", None)  # exists at runtime, not in torch's stubs
        out.append(
            Argument(
                a.name,
                a.kwarg_only,
                has_default,
                a.default_value if has_default else None,
                a.real_type,
                n if isinstance(n, int) else None,
                a.alias_info is not None and a.alias_info.is_write,
            )
        )
    return tuple(out)


@functools.cache
def _by_name(op: OpOverload[..., Any]) -> Mapping[str, Argument]:
    return {a.name: a for a in arguments(op)}


def argument_problems(
    op: object,
    n_args: int,
    kwarg_names: Iterable[str],
    *,
    hint: str = " (ignored() accepts any value)",
) -> str | None:
    """Why ``n_args`` positional arguments and these keywords do not fit ``op``'s schema, or None.

    Every argument without a default must be given (a pattern or an emitted call says what it
    expects of each one; ``hint`` says how); a target that is not an ``OpOverload`` has no
    schema to check.
    """
    if not isinstance(op, OpOverload):
        return None
    args = arguments(op)
    positional = [a for a in args if not a.kwarg_only]
    if n_args > len(positional):
        return f"takes {len(positional)} positional arguments, pattern gives {n_args}"
    names = _by_name(op)
    kwarg_names = list(kwarg_names)
    for name in kwarg_names:
        if name not in names:
            return f"has no argument named {name!r}"
    given = {a.name for a in positional[:n_args]} | set(kwarg_names)
    for a in args:
        if a.name not in given and not a.has_default:
            return f"argument {a.name!r} has no default; pass it{hint}"
    return None


def mentions_tensor(t: torch._C.JitType) -> bool:
    """Whether a schema type is a tensor, an optional tensor or a list of them."""
    kind = t.kind()
    if kind == "TensorType":
        return True
    if kind in ("OptionalType", "ListType"):
        return mentions_tensor(t.getElementType())
    return False


#: Schema types whose graph values may be nodes besides constants (symbolic sizes).
_SYMBOLIC = frozenset({"SymIntType", "SymFloatType", "SymBoolType"})


def _accepts(t: torch._C.JitType, value: object, n: int | None = None) -> bool:
    """Whether a graph may pass ``value`` for an argument of schema type ``t``."""
    kind = t.kind()
    if kind == "OptionalType":
        return value is None or _accepts(t.getElementType(), value, n)
    if kind == "TensorType":
        return isinstance(value, fx.Node)
    if kind == "ListType":
        element = t.getElementType()
        if n is not None and _accepts(element, value):
            return True  # ``int[2]`` also takes a bare int
        return isinstance(value, list | tuple) and all(_accepts(element, v) for v in value)
    if isinstance(value, fx.Node):
        return kind in _SYMBOLIC
    if kind in ("IntType", "SymIntType"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("FloatType", "SymFloatType"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("BoolType", "SymBoolType"):
        return isinstance(value, bool)
    if kind == "NumberType":  # Scalar
        return isinstance(value, int | float | bool)
    if kind == "StringType":
        return isinstance(value, str)
    if kind == "ScalarTypeType":
        return isinstance(value, torch.dtype)
    if kind == "MemoryFormatType":
        return isinstance(value, torch.memory_format)
    if kind == "LayoutType":
        return isinstance(value, torch.layout)
    if kind == "DeviceObjType":
        return isinstance(value, torch.device | str | int)
    return True  # a type no catalog op takes: the op itself will say


def _kind(t: torch._C.JitType) -> str:
    """A schema type for people: ``Tensor``, ``float``, ``int[]``, ``Tensor?``, ..."""
    return str(t.annotation_str)


def _shown(value: object) -> str:
    if isinstance(value, fx.Node):
        return f"node {value.name}"
    return repr(value)


def value_problem(op: OpOverload[..., Any], name: str, value: object) -> str | None:
    """Why a graph cannot pass ``value`` as argument ``name`` of ``op``, or None.

    A node goes where the schema takes a tensor (or a symbolic size); a constant where it takes
    a constant: a ``Var[float]`` bound in a match passed where the op takes a tensor is caught
    here, when the rewrite runs, as well as by mypy through the generated stubs.
    """
    arg = _by_name(op).get(name)
    if arg is None:
        return f"has no argument named {name!r}"
    if _accepts(arg.type, value, arg.n):
        return None
    if mentions_tensor(arg.type) and not isinstance(value, fx.Node | list | tuple):
        return f"argument {name!r} takes a graph node ({_kind(arg.type)}), got {_shown(value)}"
    return f"argument {name!r} takes {_kind(arg.type)}, got {_shown(value)}"


def layout(
    op: OpOverload[..., Any], values: Mapping[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """The ``(args, kwargs)`` of a node calling ``op`` with these keyword arguments.

    The form export leaves: positional arguments in schema order up to the last one given (an
    omitted one before it takes its default), keyword-only arguments as keywords. Assumes
    :func:`argument_problems` found nothing.
    """
    positional = [a for a in arguments(op) if not a.kwarg_only]
    last = max((i for i, a in enumerate(positional) if a.name in values), default=-1)
    args = tuple(
        values.get(a.name, a.default) for a in positional[: last + 1]
    )
    kwargs = {a.name: values[a.name] for a in arguments(op) if a.kwarg_only and a.name in values}
    return args, kwargs


def overload_names(packet: OpOverloadPacket[..., Any]) -> list[str]:
    """The packet's overload names, in the order a packet call tries them (``packet.overloads()``,
    which torch leaves untyped)."""
    return [name or "default" for name in packet._overload_names]


def given_arguments(node: fx.Node) -> dict[str, object]:
    """A call node's arguments by schema name, as the node gives them (no default filled in):
    what :meth:`qalgebra.rewriter.Rewriter.call` takes to build the same call of a twin op."""
    op = node.target
    if not isinstance(op, OpOverload):
        raise TypeError(f"{node.name} does not call an OpOverload: {op!r}")
    positional = [a.name for a in arguments(op) if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise TypeError(f"{node.name} passes more positional arguments than {op} takes")
    return {**dict(zip(positional, node.args, strict=False)), **node.kwargs}


@functools.cache
def emittable(packet: OpOverloadPacket[..., Any]) -> tuple[OpOverload[..., Any], ...]:
    """The overloads a graph may be given by name of their packet alone, in the runtime's order.

    Those that take a tensor (not TorchScript's scalar arithmetic, ``add.int``) and write into no
    keyword-only argument (``out=``: a lowered graph allocates its results).
    """
    chosen = []
    for name in overload_names(packet):
        op = getattr(packet, name)
        args = arguments(op)
        takes_tensor = any(mentions_tensor(a.type) for a in args)
        if takes_tensor and not any(a.kwarg_only and a.writes for a in args):
            chosen.append(op)
    return tuple(chosen)
