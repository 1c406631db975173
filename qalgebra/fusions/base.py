"""What a fusion is, and the rewriter its replacement code builds nodes with.

A :class:`Fusion` pairs one pattern with typed replacement code: ``rewrite(m, rw)`` reads the
match's Vars (``m[x_scale]``), builds the replacement through ``rw`` and returns the node that
takes the place of ``m.root``. Replacement code that finds the match unsafe raises
:class:`Refusal` with a reason: the lowering then leaves the subgraph as it was and reports why.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qalgebra.errors import QAlgebraError
from qalgebra.pattern import Match, Pattern

__all__ = ["Fusion", "Refusal", "Rewriter"]


class Refusal(QAlgebraError):
    """Raised by replacement code that will not lower this match; the reason is reported.

    ``cause`` says what decided, for the report: ``"rule"`` (the fusion's own checks),
    ``"probe:<name>"`` (a :mod:`qalgebra.isa` probe found this CPU computes it wrongly) or
    ``"selfcheck"`` (the fused op disagreed with its reference, :mod:`qalgebra.selfcheck`).
    """

    def __init__(self, reason: str, *, cause: str = "rule") -> None:
        super().__init__(reason)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Fusion:
    """One catalog entry: a pattern, and the typed code that replaces what it matches."""

    name: str
    family: str
    pattern: Pattern
    rewrite: Callable[[Match, Rewriter], fx.Node]
    doc: str = ""
    #: Inner nodes of a match must be read only inside it (else fusing would compute them
    #: twice); off for fusions that keep their inner nodes (promotion, clone elision).
    exclusive: bool = True

    def __repr__(self) -> str:
        return f"<Fusion {self.name} ({self.family})>"


_counter = itertools.count()


class Rewriter:
    """Builds replacement nodes right before a match's root and registers module constants.

    Nodes bound in a match may have been replaced by an earlier rewrite of the same pass; every
    node argument is resolved through ``replaced`` first. ``rollback`` removes what was built.
    """

    def __init__(
        self,
        graph: fx.Graph,
        module: torch.nn.Module,
        anchor: fx.Node,
        replaced: Mapping[fx.Node, fx.Node],
    ):
        #: The graph being rewritten, and the module its ``get_attr`` nodes read from (where
        #: :meth:`constant` stores new tensors).
        self.graph = graph
        self.module = module
        self.anchor = anchor
        self._replaced = replaced
        self._created: list[fx.Node] = []
        self._attrs: list[str] = []

    @property
    def created(self) -> tuple[fx.Node, ...]:
        """The nodes built so far (constants' ``get_attr`` nodes included), in creation order."""
        return tuple(self._created)

    def node(self, n: fx.Node) -> fx.Node:
        """The current stand-in for ``n`` (itself unless an earlier rewrite replaced it)."""
        while n in self._replaced:
            n = self._replaced[n]
        return n

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self.node(value)
        if isinstance(value, list | tuple):
            return type(value)(self._resolve(v) for v in value)
        return value

    def call(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        """A new ``call_function`` node before the anchor."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(
                target,
                tuple(self._resolve(a) for a in args),
                {k: self._resolve(v) for k, v in kwargs.items()},
            )
        self._created.append(node)
        return node

    def constant(self, hint: str, value: torch.Tensor) -> fx.Node:
        """Store ``value`` on the output module and return a ``get_attr`` node reading it."""
        name = f"_qalgebra_{hint}_{next(_counter)}"
        while hasattr(self.module, name):
            name = f"_qalgebra_{hint}_{next(_counter)}"
        self.module.register_buffer(name, value, persistent=False)
        self._attrs.append(name)
        with self.graph.inserting_before(self.anchor):
            # create_node, not get_attr: get_attr walks the module to warn about unknown names
            node = self.graph.create_node("get_attr", name)
        self._created.append(node)
        return node

    def duplicate(self, nodes: Sequence[fx.Node]) -> fx.Node:
        """Copies of ``nodes`` (in graph order, each reading earlier ones) before the anchor.

        Returns the copy of the last node; inputs from outside ``nodes`` are shared.
        """
        copies: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            with self.graph.inserting_before(self.anchor):
                copy = self.graph.node_copy(n, lambda a: copies.get(a, self.node(a)))
            copies[n] = copy
            self._created.append(copy)
        return copies[nodes[-1]]

    def rollback(self) -> None:
        """Erase every node and constant this rewriter created."""
        for node in reversed(self._created):
            if not node.users:
                self.graph.erase_node(node)
        for name in self._attrs:
            delattr(self.module, name)
        self._created.clear()
        self._attrs.clear()
