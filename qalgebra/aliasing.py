"""Which nodes of an fx graph may share storage, and whether an in-place write could be seen.

``torch.export`` keeps the in-place ops a model calls (``nn.ReLU(inplace=True)`` is
``aten.relu_``, ``x += y`` is ``aten.add_``). Such a write is *unobservable* -- replacing it by
its functional form computes the same values -- when nothing reads the written storage through
another name afterwards: not the written tensor itself, not a view of it, not the tensor it is a
view of. :func:`observable_write` says why a write is observable, or None.

Storage sharing is read from the ops' schemas (``view(Tensor(a) self) -> Tensor(a)``: the
result may alias ``self``), plus the composite ops whose schema does not say so although they
return their input (``dropout`` in eval, ``type_as``). Anything else unknown (a Python callable,
a submodule call) is assumed to alias every tensor it reads. A written tensor whose storage
comes from a graph input or a module attribute is always observable (the caller, or the next
call, sees it).

>>> import torch
>>> from torch import fx
>>> g = fx.Graph()
>>> x = g.placeholder("x")
>>> y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
>>> r = g.call_function(torch.ops.aten.relu_.default, (y,))
>>> out = g.output((r,))
>>> print(observable_write(r))
None
>>> out.args = ((r, y),)
>>> observable_write(r)
'output reads mul_tensor after relu__default wrote it'
>>> print(observable_write(g.call_function(torch.ops.aten.relu_.default, (x,))))
it writes into graph input x
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch import fx
from torch._ops import OpOverload

__all__ = ["aliased_inputs", "observable_write", "runs_after", "written_input"]

aten = torch.ops.aten

#: Composite ops that may return their input although their schema declares a fresh result.
_UNDECLARED_ALIASES = frozenset(
    {
        aten.dropout.default,
        aten.feature_dropout.default,
        aten.alpha_dropout.default,
        aten.feature_alpha_dropout.default,
        aten.type_as.default,
    }
)


@functools.cache
def _aliasing_positions(op: OpOverload[..., Any]) -> tuple[tuple[int, str], ...] | None:
    """(position, name) of the arguments the op's result may alias; None: all of them."""
    if op in _UNDECLARED_ALIASES:
        return ((0, op._schema.arguments[0].name),)
    returned: set[str] = set()
    for r in op._schema.returns:
        if r.alias_info is not None:
            returned |= set(r.alias_info.before_set)
    if not returned:
        return ()
    out = []
    for i, a in enumerate(op._schema.arguments):
        if a.alias_info is not None and returned & set(a.alias_info.before_set):
            out.append((i, a.name))
    return tuple(out)


def _nodes_in(value: object) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, list | tuple):
        return [n for v in value for n in _nodes_in(v)]
    return []


def aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose storage ``node``'s value may share (empty: a fresh tensor, or none)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    target = node.target
    if node.op == "call_function" and isinstance(target, OpOverload):
        positions = _aliasing_positions(target)
        if positions is None:
            return node.all_input_nodes
        out: list[fx.Node] = []
        for i, name in positions:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
            out.extend(_nodes_in(value))
        return out
    if node.op == "call_function" and target is operator.getitem:
        return _nodes_in(node.args[0])  # an element of a split / chunk: a view
    return node.all_input_nodes  # unknown: assume the worst


def written_input(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes (its ``Tensor(a!)`` argument), or None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, OpOverload):
        return None
    for i, a in enumerate(target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            return value if isinstance(value, fx.Node) else None
    return None


def _closure(starts: list[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node whose value may share storage with one of them, transitively."""
    seen: set[fx.Node] = set()
    work = list(starts)
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        work.extend(u for u in n.users if n in aliased_inputs(u))
    return seen


def _bases(node: fx.Node) -> set[fx.Node]:
    """The nodes whose storage ``node``'s value lives in (followed back through aliases)."""
    bases: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    work = [node]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        parents = aliased_inputs(n)
        if parents:
            work.extend(parents)
        else:
            bases.add(n)
    return bases


def runs_after(later: fx.Node, earlier: fx.Node) -> bool:
    """Whether ``later`` comes after ``earlier`` in their graph's order.

    Walks both ways from ``earlier`` at once, so the cost is the distance between the two
    nodes, not the size of the graph (a reader is usually close to the writer).
    """
    ahead, behind = earlier.next, earlier.prev
    while ahead.op != "root" or behind.op != "root":
        if ahead is later:
            return True
        if behind is later:
            return False
        if ahead.op != "root":
            ahead = ahead.next
        if behind.op != "root":
            behind = behind.prev
    return False


def observable_write(node: fx.Node, written: fx.Node | None = None) -> str | None:
    """Why the in-place write of ``node`` could be seen by anything but ``node``'s readers.

    None when the written storage is a tensor the graph made and, after ``node``, is read only
    through ``node``'s result (or what aliases that result): then ``node`` may be replaced by
    its functional form. ``written``: the tensor ``node`` writes, for an op whose schema does
    not say so (oneDNN's linear ``sum`` writes into ``other``); else its ``Tensor(a!)``.
    """
    written = written_input(node) if written is None else written
    if written is None:
        return f"{node.name} writes no tensor argument known to the lowering"
    for base in sorted(_bases(written), key=lambda n: n.name):
        if base.op == "placeholder":
            return f"it writes into graph input {base.name}"
        if base.op == "get_attr":
            return f"it writes into module attribute {base.target}"
        if base.op != "call_function":
            return f"it writes into the result of {base.name} ({base.op})"
    shared = _closure(sorted(_bases(written), key=lambda n: n.name))
    after_write = _closure([node])
    for member in sorted(shared - after_write, key=lambda n: n.name):
        for user in member.users:
            if user is not node and runs_after(user, node):
                return f"{user.name} reads {member.name} after {node.name} wrote it"
    return None
