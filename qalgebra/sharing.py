"""Sub-patterns used in several places: found once, described once, printed once by name.

Combinators build equal sub-patterns again and again (each ``activation()`` is a new object) and
share objects too (one dequantize read by three conversion spellings), so the tree a pattern
spells out can be thousands of times the size of its distinct parts: the linear fusion's tree
has 283,506 nodes, 143 of them distinct. Everything that walks a whole pattern -- its
description, its repr, the matcher's compiler -- walks a :class:`Dag` of the distinct
sub-patterns instead (structurally equal ones merged, found in time linear in the objects).

``describe()`` and ``repr()`` print a long sub-pattern that occurs more than once by name, once:
the description names it ``<name>`` and defines it below the body, after ``with``; the repr is a
:func:`~qalgebra.pattern.let` expression that evaluates back to an equal pattern.

>>> import torch
>>> from qalgebra.pattern import Var, call, let
>>> aten = torch.ops.aten
>>> x, z, s = Var("x", int), Var("z", int), Var("s", float)
>>> dq = call(aten.mul.Tensor, call(aten.sub.Tensor, x, z), s)
>>> p = call(aten.add.Tensor, dq, dq)
>>> print(p.describe())
aten.add.Tensor(<mul>, <mul>)
with
  <mul> = aten.mul.Tensor(aten.sub.Tensor(x, z), s)
>>> print(repr(p).replace("torch.ops.aten.", ""))
let(
    lambda mul: call(add.Tensor, mul, mul),
    mul=lambda: call(mul.Tensor, call(sub.Tensor, Var('x', int), Var('z', int)), Var('s', float)),
)
>>> eval(repr(p)) == p
True
"""

from __future__ import annotations

import builtins
import enum
import keyword
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, cast

from pyrsistent import PMap, PVector
from torch._ops import OpOverload, OpOverloadPacket

from qalgebra.pattern import (
    AnyOf,
    Call,
    Capture,
    DtypeOf,
    ListOf,
    Optional,
    Pattern,
    Tag,
    Where,
)

__all__ = ["NAMED_FROM", "Dag", "distinct", "render"]

#: A sub-pattern is printed by name when its inline English is at least this long: shorter ones
#: (``x of dtype x_dtype``) read better in place than as a name to look up.
NAMED_FROM = 40


# --------------------------------------------------------------------------------------------
# Distinct sub-patterns
# --------------------------------------------------------------------------------------------


class Dag:
    """The distinct sub-patterns of ``root``, children before parents (the root is last).

    Sub-patterns are merged by structure, through keys that name already merged children by
    index: no deep comparison of equal trees, which is what spelling them out costs.
    """

    __slots__ = ("_index", "edges", "nodes")

    def __init__(self, root: Pattern) -> None:
        #: One representative of each distinct sub-pattern.
        self.nodes: list[Pattern] = []
        #: The indexes of each node's children, in ``children()`` order.
        self.edges: list[tuple[int, ...]] = []
        self._index: dict[int, int] = {}  # id of every sub-pattern object -> its node's index
        interned: dict[object, int] = {}
        stack: list[tuple[Pattern, bool]] = [(root, False)]
        while stack:
            p, expanded = stack.pop()
            if id(p) in self._index:
                continue
            kids = p.children()
            if not expanded and kids:
                stack.append((p, True))
                stack.extend((c, False) for c in reversed(kids) if id(c) not in self._index)
                continue
            key = _shape_key(p, self._index) if kids else p
            i = interned.get(key)
            if i is None:
                i = interned[key] = len(self.nodes)
                self.nodes.append(p)
                self.edges.append(tuple(self._index[id(c)] for c in kids))
            self._index[id(p)] = i

    def index(self, p: Pattern) -> int:
        """The index of the node ``p`` (a sub-pattern object of the root) was merged into."""
        return self._index[id(p)]

    def occurrences(self) -> list[int]:
        """How many times each node occurs in the spelled-out tree."""
        counts = [0] * len(self.nodes)
        counts[-1] = 1
        for i in reversed(range(len(self.nodes))):
            for c in self.edges[i]:
                counts[c] += counts[i]
        return counts


_COMPARED: dict[type[Pattern], tuple[str, ...]] = {}  # per pattern class: its compared fields


def _compared_fields(cls: type[Pattern]) -> tuple[str, ...]:
    names = _COMPARED.get(cls)
    if names is None:
        names = _COMPARED[cls] = tuple(f.name for f in fields(cast(Any, cls)) if f.compare)
    return names


def _shape_key(p: Pattern, index: dict[int, int]) -> tuple[object, ...]:
    """``p``'s structure, with its composite sub-patterns replaced by their nodes' indexes."""
    return (type(p), *(_field_key(getattr(p, name), index) for name in _compared_fields(type(p))))


def _field_key(value: object, index: dict[int, int]) -> object:
    if isinstance(value, Pattern):
        # Leaves compare cheaply by value; a Var may also be a field that is no child.
        return ("#", index[id(value)]) if value.children() else value
    if isinstance(value, PVector):
        return tuple(_field_key(v, index) for v in value)
    if isinstance(value, PMap):
        return frozenset((k, _field_key(v, index)) for k, v in value.items())
    return value


def distinct(root: Pattern) -> Iterator[Pattern]:
    """Every distinct sub-pattern of ``root`` once, parents before children."""
    return reversed(Dag(root).nodes)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _op_word(target: object) -> str:
    """A target's op name as an identifier (``to_copy`` for ``aten._to_copy.default``)."""
    if isinstance(target, OpOverload):
        word = target._opname
    elif isinstance(target, OpOverloadPacket):
        word = target.__name__
    else:
        word = str(getattr(target, "__name__", None) or type(target).__name__)
    word = re.sub(r"\W", "_", word).strip("_") or "call"
    return word if word.isidentifier() else f"op_{word}"


def _common_name(names: list[str]) -> str:
    """What ``names`` share as a leading word (``conv`` of conv1d | conv2d, ``clamp`` of clamp_max
    | clamp), else the first of them."""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("_")
    while prefix and not all(n[len(prefix) :][:1] in ("", "_", *"0123456789") for n in names):
        prefix = prefix.rpartition("_")[0]
    return prefix or names[0]


def _base_name(p: Pattern) -> str:
    """A name for a sub-pattern, from what it matches (made unique by the caller)."""
    if isinstance(p, Call):
        return _common_name([_op_word(t) for t in p.targets])
    if isinstance(p, AnyOf):
        tags = {a.var for a in p.alternatives if isinstance(a, Tag)}
        if len(tags) == 1 and all(isinstance(a, Tag) for a in p.alternatives):
            return next(iter(tags)).name  # with_unary: the alternatives are the unary Var's
        composite = [a for a in p.alternatives if a.children()] or list(p.alternatives)
        return _common_name([_base_name(a) for a in composite])
    if isinstance(p, Optional):
        return "maybe_" + _base_name(p.present)
    if isinstance(p, Tag):
        return p.value.name.lower() if isinstance(p.value, enum.Enum) else _base_name(p.pattern)
    if isinstance(p, Capture | Where | DtypeOf):
        return _base_name(p.pattern)
    if isinstance(p, ListOf):
        return "list_of_" + _base_name(p.element)
    return type(p).__name__.lower()


_IDENTIFIER = re.compile(r"(?<![.\w])[A-Za-z_]\w*")  # not an attribute: what a name could hide
_PLACEHOLDER = re.compile("\x00([0-9]+)\x00")


def _unique_names(order: list[int], bases: dict[int, str], taken: set[str]) -> dict[int, str]:
    used = set(taken) | set(keyword.kwlist) | set(dir(builtins))
    out: dict[int, str] = {}
    for i in order:
        base = bases[i]
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out[i] = name
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render(root: Pattern, *, english: bool) -> str:
    """``root.describe()`` (``english``) or ``repr(root)``, each long shared sub-pattern once."""
    dag = Dag(root)
    named = _choose_named(dag)
    texts = _texts(dag, named, english=english)
    order = _first_referenced(len(dag.nodes) - 1, texts)
    taken = set() if english else set(_IDENTIFIER.findall(_PLACEHOLDER.sub(" ", "".join(texts))))
    names = _unique_names(order, {i: _base_name(dag.nodes[i]) for i in order}, taken)
    if english:
        body = _fill(texts[-1], names, "<{}>")
        if not order:
            return body
        defined = "\n".join(f"  <{names[i]}> = {_fill(texts[i], names, '<{}>')}" for i in order)
        return f"{body}\nwith\n{defined}"
    if not order:
        return texts[-1]
    lines = [f"    {_lambda(texts[-1], names)},"]
    lines.extend(f"    {names[i]}={_lambda(texts[i], names)}," for i in sorted(order))
    return "let(\n" + "\n".join(lines) + "\n)"


def _choose_named(dag: Dag) -> set[int]:
    """The nodes printed by name: long, and referenced more than once where they are printed.

    Long spelled out in full, so that the largest shared part gets the name (a dequantize's
    alternatives of two forms, rather than each form); and still long with its named parts
    printed as names (a tag around a named node reads better in place).
    """
    occurrences = dag.occurrences()
    lengths = _full_lengths(dag)
    named = {
        i
        for i, p in enumerate(dag.nodes)
        if occurrences[i] > 1 and lengths[i] >= NAMED_FROM and p.children()
    }
    # A name referenced once (a part only of a named part) is printed in place.
    references = dict.fromkeys(named, 0)

    def count(i: int) -> None:
        for c in dag.edges[i]:
            if c in named:
                references[c] += 1
            else:
                count(c)

    for i in (len(dag.nodes) - 1, *named):
        count(i)
    named = {i for i in named if references[i] > 1}
    texts: list[str] = []

    def sub(child: Pattern) -> str:
        i = dag.index(child)
        return f"<{_base_name(child)}>" if i in named else texts[i]

    for i, p in enumerate(dag.nodes):
        texts.append(p._describe_node(sub))
        if len(texts[i]) < NAMED_FROM:
            named.discard(i)
    return named


def _full_lengths(dag: Dag) -> list[int]:
    """The length of each node's English spelled out in full (counted, never built)."""
    lengths: list[int] = []
    for p in dag.nodes:
        inner = 0

        def sub(child: Pattern) -> str:
            nonlocal inner
            inner += lengths[dag.index(child)]
            return ""

        lengths.append(len(p._describe_node(sub)) + inner)
    return lengths


def _texts(dag: Dag, named: set[int], *, english: bool) -> list[str]:
    """Each node's text, with a placeholder where a named child goes."""
    texts: list[str] = []

    def sub(child: Pattern) -> str:
        i = dag.index(child)
        return f"\x00{i}\x00" if i in named else texts[i]

    for p in dag.nodes:
        texts.append(p._describe_node(sub) if english else p._repr_node(sub))
    return texts


def _first_referenced(root: int, texts: list[str]) -> list[int]:
    """The named nodes in the order a reader meets them: in the body, then in definitions."""
    order: list[int] = []
    seen: set[int] = set()
    queue = deque([root])
    while queue:
        for found in _PLACEHOLDER.findall(texts[queue.popleft()]):
            i = int(found)
            if i not in seen:
                seen.add(i)
                order.append(i)
                queue.append(i)
    return order


def _fill(text: str, names: dict[int, str], form: str) -> str:
    return _PLACEHOLDER.sub(lambda m: form.format(names[int(m.group(1))]), text)


def _lambda(text: str, names: dict[int, str]) -> str:
    params = dict.fromkeys(names[int(i)] for i in _PLACEHOLDER.findall(text))
    head = f"lambda {', '.join(params)}" if params else "lambda"
    return f"{head}: {_fill(text, names, '{}')}"
