"""The Rewriter: every graph edit of a rewrite, as a transaction that can be undone exactly.

Replacement code (a :class:`~qalgebra.fusion.Fusion`'s ``rewrite``) never edits the graph
itself: it builds nodes through a Rewriter -- typed, by keyword, with the namespaces of
:mod:`qalgebra.emit`; :meth:`Rewriter.call` is what they call -- and redirects, replaces or
erases through it. Whatever the rewrite raises, the lowering rolls its edits back.

>>> import torch
>>> from torch import fx
>>> gm = fx.symbolic_trace(torch.nn.ReLU())
>>> before = gm.code
>>> relu = next(n for n in gm.graph.nodes if n.op == "call_function")
>>> rw = Rewriter(gm.graph, gm, relu, {})
>>> sigmoid = rw.call(torch.ops.aten.sigmoid.default, self=relu.args[0])
>>> rw.replace(relu, sigmoid, consumed=[relu])
>>> rw.operations
('call', 'replace')
>>> rw.rollback()
>>> gm.recompile().src == before
True
>>> rw = Rewriter(gm.graph, gm, relu, {})
>>> rw.call(torch.ops.aten.sigmoid.default, self=0.5)
Traceback (most recent call last):
...
qalgebra.errors.EmitError: aten.sigmoid.default: argument 'self' takes a graph node (Tensor), ...
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, cast

import torch
from torch import fx
from torch._ops import OpOverload

from qalgebra.errors import EmitError
from qalgebra.match import DTYPE_KEY, node_dtype
from qalgebra.schemas import argument_problems, layout, value_problem
from qalgebra.shapes import SHAPE_KEY, known_shape

__all__ = ["Rewriter"]


_counter = itertools.count()

#: What a replaced root passes on to the node taking its place (later patterns read them).
_CARRIED_META = ("val", "tensor_meta")


class Rewriter:
    """One match's graph edits, as a transaction: every edit goes through it, so it can be undone.

    Replacement code builds new nodes before ``anchor`` (:meth:`call`, :meth:`constant`,
    :meth:`duplicate`), may move the anchor, redirect an existing node's input
    (:meth:`redirect`), replace every use of a node (:meth:`replace`; several roots may be
    replaced, each with the nodes it consumed), mark nodes for erasure (:meth:`erase`) and
    write metadata (:meth:`set_meta`). Each operation records how to undo itself before it
    edits anything, so :meth:`rollback` -- after a :class:`Refusal`, any error, or a failed
    check of the result -- restores the graph (nodes, arguments, the order of every node's
    users, metadata) and the module (its constants) exactly as they were. :meth:`commit` ends
    the transaction; only then are erased nodes removed (an erasure cannot be undone).

    Nodes bound in a match may have been replaced by an earlier rewrite of the same pass: every
    node argument is resolved through ``replaced`` (:meth:`node`), which :meth:`replace` extends.
    """

    def __init__(
        self,
        graph: fx.Graph,
        module: torch.nn.Module,
        anchor: fx.Node,
        replaced: MutableMapping[fx.Node, fx.Node],
    ):
        #: The graph being rewritten, and the module its ``get_attr`` nodes read from (where
        #: :meth:`constant` stores new tensors).
        self.graph = graph
        self.module = module
        self._anchor = anchor
        self._replaced = replaced
        self._undo: list[Callable[[], None]] = []
        self._created: set[fx.Node] = set()
        self._doomed: list[fx.Node] = []
        self._consumed: list[tuple[fx.Node, ...]] = []
        self._operations: list[str] = []
        self._state = "open"
        # fx hands out node names by counting per base name ("relu", "relu_1", ...): a rollback
        # gives back the names its nodes took, so later nodes are named as without the rewrite.
        self._name_counts = dict(graph._graph_namespace._base_count)

    # ----------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------

    @property
    def created(self) -> tuple[fx.Node, ...]:
        """The nodes built so far and not undone (constants' ``get_attr`` nodes included)."""
        return tuple(self._created)

    def node(self, n: fx.Node) -> fx.Node:
        """The current stand-in for ``n`` (itself unless an earlier rewrite replaced it)."""
        while n in self._replaced:
            n = self._replaced[n]
        return n

    @property
    def operations(self) -> tuple[str, ...]:
        """The operations so far, in order (for reports and tests)."""
        return tuple(self._operations)

    @property
    def consumed(self) -> tuple[tuple[fx.Node, ...], ...]:
        """The node chains the replaced roots leave behind (erased when nothing reads them)."""
        return tuple(self._consumed)

    @property
    def anchor(self) -> fx.Node:
        """New nodes go right before this node."""
        return self._anchor

    @anchor.setter
    def anchor(self, node: fx.Node) -> None:
        self._begin("anchor")
        self._require_live(node, "anchor")
        previous = self._anchor
        self._undo.append(lambda: setattr(self, "_anchor", previous))
        self._anchor = node

    # ----------------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------------

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self.node(value)
        if isinstance(value, list | tuple):
            return type(value)(self._resolve(v) for v in value)
        return value

    def call(self, op: OpOverload[..., Any], /, **arguments: object) -> fx.Node:
        """A new node calling ``op`` before the anchor, its arguments given by schema name.

        The arguments are checked against ``op``'s schema before anything is built: each one
        without a default is given, none is unknown, a node goes where the op takes a tensor
        and a constant where it takes a constant (:func:`qalgebra.schemas.value_problem`);
        else :class:`~qalgebra.errors.EmitError`. The node is laid out as export lays it out
        (positional arguments, keyword-only ones as keywords). :mod:`qalgebra.emit` types
        this call per op for mypy.
        """
        if not isinstance(op, OpOverload):
            raise EmitError(f"Rewriter.call: expected an OpOverload, got {op!r}")
        problem = argument_problems(op, 0, arguments, hint="")
        values = {name: self._resolve(v) for name, v in arguments.items()}
        for name, value in values.items():
            if problem is not None:
                break
            problem = value_problem(op, name, value)
        if problem is not None:
            raise EmitError(f"{op}: {problem}")
        self._begin("call")
        args, kwargs = layout(op, values)
        with self.graph.inserting_before(self._anchor):
            # The values passed value_problem: nodes, numbers, dtypes and lists of them.
            fx_args = cast(tuple[fx.node.Argument, ...], args)
            fx_kwargs = cast(dict[str, fx.node.Argument], kwargs)
            node = self.graph.call_function(op, fx_args, fx_kwargs)
        self._created_node(node)
        return node

    def getitem(self, node: fx.Node, index: int) -> fx.Node:
        """A new node reading element ``index`` of ``node``'s tuple result (``split``, ...)."""
        self._begin("getitem")
        with self.graph.inserting_before(self._anchor):
            item = self.graph.call_function(operator.getitem, (self.node(node), index))
        self._created_node(item)
        return item

    def constant(self, hint: str, value: torch.Tensor) -> fx.Node:
        """Store ``value`` on the output module and return a ``get_attr`` node reading it.

        Stored detached (the same storage): a bias taken from a module's parameter would
        otherwise make every kernel output require grad, and an accumulator that requires grad
        cannot be summed into under fake tensors (``torch.compile`` / ``torch.export`` of the
        lowered module in grad mode).
        """
        self._begin("constant")
        name = f"_qalgebra_{hint}_{next(_counter)}"
        while hasattr(self.module, name):
            name = f"_qalgebra_{hint}_{next(_counter)}"
        self._undo.append(lambda: delattr(self.module, name))
        self.module.register_buffer(name, value.detach(), persistent=False)
        with self.graph.inserting_before(self._anchor):
            # create_node, not get_attr: get_attr walks the module to warn about unknown names
            node = self.graph.create_node("get_attr", name)
        self._created_node(node)
        return node

    def duplicate(self, nodes: Sequence[fx.Node]) -> fx.Node:
        """Copies of ``nodes`` (in graph order, each reading earlier ones) before the anchor.

        Returns the copy of the last node; inputs from outside ``nodes`` are shared.
        """
        self._begin("duplicate")
        copies: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            with self.graph.inserting_before(self._anchor):
                copy = self.graph.node_copy(n, lambda a: copies.get(a, self.node(a)))
            copies[n] = copy
            self._created_node(copy)
        return copies[nodes[-1]]

    # ----------------------------------------------------------------------------------------
    # Editing what exists
    # ----------------------------------------------------------------------------------------

    def redirect(self, user: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """Make ``user`` read ``new`` wherever it read ``old`` (one consumer's input)."""
        self._begin("redirect")
        self._require_live(user, "redirect")
        self._snapshot_args([user], [old, new])
        user.replace_input_with(old, new)

    def replace(self, old: fx.Node, new: fx.Node, *, consumed: Sequence[fx.Node] = ()) -> None:
        """Every use of ``old`` reads ``new`` instead: ``new`` takes the place of a root.

        ``new`` carries on what later patterns read of ``old`` (its value metadata, its shape
        and dtype); later rewrites of the pass see ``new`` through :meth:`node`. ``consumed``
        is what the root's match covered: the lowering erases what of it nothing reads any
        more once the transaction commits. A rewrite that replaces several roots (a group
        fused into one op) calls this once per root besides the one the lowering replaces.
        """
        self._begin("replace")
        self._require_live(old, "replace")
        self._require_live(new, "replace")
        if old is new:
            raise ValueError(f"Rewriter.replace: {old.name} cannot replace itself")
        self._snapshot_args(list(old.users), [old, new])
        shape = known_shape(old)
        dtype = node_dtype(old)
        for key in _CARRIED_META:
            if key in old.meta:
                self._write_meta(new, key, old.meta[key])
        if shape is not None:
            self._write_meta(new, SHAPE_KEY, shape)
        if dtype is not None and "val" not in new.meta:
            self._write_meta(new, DTYPE_KEY, dtype)  # later patterns (a decomposed dequant) read it
        had, before = old in self._replaced, self._replaced.get(old)
        self._undo.append(lambda: self._restore_replaced(old, had, before))
        self._replaced[old] = new
        self._consumed.append(tuple(consumed))
        self._undo.append(lambda: _drop_last(self._consumed))
        old.replace_all_uses_with(new)

    def erase(self, node: fx.Node) -> None:
        """Erase ``node`` when the transaction commits (it must be unread by then)."""
        self._begin("erase")
        self._require_live(node, "erase")
        self._doomed.append(node)
        self._undo.append(lambda: _drop_last(self._doomed))

    def set_meta(self, node: fx.Node, key: str, value: Any) -> None:
        """``node.meta[key] = value``, undone by a rollback."""
        self._begin("set_meta")
        self._write_meta(node, key, value)

    # ----------------------------------------------------------------------------------------
    # Ending the transaction
    # ----------------------------------------------------------------------------------------

    def commit(self) -> None:
        """End the transaction: erase what :meth:`erase` marked. No rollback after this."""
        self._begin("commit")
        doomed = set(self._doomed)
        for node in self._doomed:
            readers = [u.name for u in node.users if u not in doomed]
            if readers:
                raise RuntimeError(
                    f"Rewriter.erase: {node.name} is still read by {', '.join(readers)}"
                )
        order = {n: i for i, n in enumerate(self.graph.nodes) if n in doomed}
        for node in sorted(doomed, key=order.__getitem__, reverse=True):
            self.graph.erase_node(node)
        self._state = "committed"
        self._undo.clear()

    def rollback(self) -> None:
        """Undo every operation, newest first: graph and module are as before the first one."""
        if self._state == "committed":
            raise RuntimeError("Rewriter.rollback: the transaction was committed")
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()
        self._state = "rolled back"

    # ----------------------------------------------------------------------------------------
    # Bookkeeping
    # ----------------------------------------------------------------------------------------

    def _begin(self, operation: str) -> None:
        """Every operation starts here, before it edits anything (tests inject faults here)."""
        if self._state != "open":
            raise RuntimeError(f"Rewriter.{operation}: the transaction is {self._state}")
        self._operations.append(operation)

    def _require_live(self, node: fx.Node, operation: str) -> None:
        if node.graph is not self.graph or node._erased:
            raise RuntimeError(f"Rewriter.{operation}: {node.name} is not in this graph")

    def _created_node(self, node: fx.Node) -> None:
        self._created.add(node)
        self._undo.append(lambda: self._erase_created(node))

    def _erase_created(self, node: fx.Node) -> None:
        self._created.discard(node)
        self.graph.erase_node(node)
        names = self.graph._graph_namespace
        names._used_names.discard(node.name)
        names._obj_to_name.pop(node, None)
        names._base_count.clear()
        names._base_count.update(self._name_counts)

    def _write_meta(self, node: fx.Node, key: str, value: Any) -> None:
        if node not in self._created:  # a created node's meta goes with it
            had, before = key in node.meta, node.meta.get(key)
            self._undo.append(lambda: _restore_meta(node, key, had, before))
        node.meta[key] = value

    def _restore_replaced(self, old: fx.Node, had: bool, before: fx.Node | None) -> None:
        if had and before is not None:
            self._replaced[old] = before
        else:
            self._replaced.pop(old, None)

    def _snapshot_args(self, users: Sequence[fx.Node], inputs: Sequence[fx.Node]) -> None:
        """Record the arguments of ``users`` and the order of the users of ``inputs`` (and of
        whatever the users read) before an edit changes them; the undo restores both."""
        saved = [(u, u.args, u.kwargs) for u in users]
        touched = {n: None for n in inputs}
        for u in users:
            touched.update(dict.fromkeys(u.all_input_nodes))
        orders = [(n, list(n.users)) for n in touched]

        def undo() -> None:
            for u, args, kwargs in saved:
                u.args, u.kwargs = args, kwargs
            for n, order in orders:
                if not n._erased and set(n.users) == set(order) and list(n.users) != order:
                    n.users.clear()
                    n.users.update(dict.fromkeys(order))

        self._undo.append(undo)


def _restore_meta(node: fx.Node, key: str, had: bool, before: Any) -> None:
    if had:
        node.meta[key] = before
    else:
        node.meta.pop(key, None)


def _drop_last(items: list[Any]) -> None:
    items.pop()
