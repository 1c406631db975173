"""The Rewriter is a transaction: each operation is undone exactly by ``rollback``.

Every test edits a small graph through one operation (or a few), rolls back, and compares the
whole state with a snapshot taken before: generated code, each node's arguments and the order of
its users, each node's metadata (the same objects), and the module's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import fx

from qalgebra import emit
from qalgebra.match import DTYPE_KEY
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import SHAPE_KEY

aten = torch.ops.aten


@dataclass(frozen=True)
class State:
    """Everything a rewrite may touch, comparable exactly."""

    code: str
    nodes: tuple[tuple[str, str, str, str, str, tuple[str, ...]], ...]
    meta: dict[str, dict[str, int]]  # the identity of every value
    attrs: frozenset[str]
    alive: tuple[object, ...] = field(compare=False)  # keeps those ids unique

    @staticmethod
    def of(graph: fx.Graph, module: torch.nn.Module) -> State:
        return State(
            code=graph.python_code("self").src,
            nodes=tuple(
                (
                    n.name,
                    n.op,
                    str(n.target),
                    repr(n.args),
                    repr(n.kwargs),
                    tuple(map(str, n.users)),
                )
                for n in graph.nodes
            ),
            meta={n.name: {k: id(v) for k, v in n.meta.items()} for n in graph.nodes},
            attrs=frozenset(dict(module.named_buffers())) | frozenset(vars(module)),
            alive=tuple(v for n in graph.nodes for v in n.meta.values()),
        )


class Branches(torch.nn.Module):
    """x -> relu -> (neg, sigmoid, add(relu, relu)): a node with several users."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r = torch.relu(x)
        return torch.neg(r), torch.sigmoid(r), r + r


def _setup() -> tuple[fx.GraphModule, dict[str, fx.Node], State]:
    gm = fx.symbolic_trace(Branches())
    nodes = {n.name: n for n in gm.graph.nodes}
    val = torch.empty(2, 3, device="meta")
    nodes["relu"].meta["val"] = val
    nodes["neg"].meta["qalgebra_note"] = "before"
    return gm, nodes, State.of(gm.graph, gm)


def _runs(gm: fx.GraphModule) -> None:
    gm.recompile()
    x = torch.randn(2, 3)
    r = torch.relu(x)
    out = gm(x)
    assert torch.equal(out[0], -r) and torch.equal(out[1], torch.sigmoid(r))
    assert torch.equal(out[2], r + r)


def _rewriter(gm: fx.GraphModule, anchor: fx.Node, replaced: dict[fx.Node, fx.Node]) -> Rewriter:
    return Rewriter(gm.graph, gm, anchor, replaced)


def test_every_operation_is_undone_exactly() -> None:
    gm, n, before = _setup()
    replaced: dict[fx.Node, fx.Node] = {}
    rw = _rewriter(gm, n["neg"], replaced)
    c = rw.constant("k", torch.ones(3))
    rw.anchor = n["sigmoid"]
    new = emit.aten.mul.Tensor(rw, self=n["x"], other=c)
    copy = rw.duplicate([n["relu"]])
    rw.redirect(n["neg"], n["relu"], copy)
    rw.replace(n["relu"], new, consumed=[n["relu"]])
    rw.set_meta(n["neg"], "qalgebra_note", "after")
    rw.set_meta(n["sigmoid"], "qalgebra_new", 1)
    rw.erase(n["add"])
    assert rw.operations == (
        "constant", "anchor", "call", "duplicate", "redirect", "replace", "set_meta", "set_meta",
        "erase",
    )  # fmt: skip
    assert replaced == {n["relu"]: new} and rw.node(n["relu"]) is new
    assert new.meta["val"] is n["relu"].meta["val"] and new.meta[SHAPE_KEY] == (2, 3)
    assert State.of(gm.graph, gm) != before
    rw.rollback()
    assert State.of(gm.graph, gm) == before
    assert replaced == {} and rw.consumed == () and rw.anchor is n["neg"]
    assert n["neg"].meta["qalgebra_note"] == "before" and "qalgebra_new" not in n["sigmoid"].meta
    _runs(gm)


@pytest.mark.parametrize("stop", range(1, 10))
def test_rollback_after_any_prefix_of_operations(stop: int) -> None:
    gm, n, before = _setup()
    rw = _rewriter(gm, n["neg"], {})
    steps: list[Any] = [
        lambda: rw.constant("k", torch.ones(3)),
        lambda: setattr(rw, "anchor", n["sigmoid"]),
        lambda: emit.aten.sigmoid.default(rw, self=n["x"]),
        lambda: rw.duplicate([n["relu"], n["neg"]]),
        lambda: rw.redirect(n["sigmoid"], n["relu"], emit.aten.relu.default(rw, self=n["x"])),
        lambda: rw.set_meta(n["relu"], "val", None),
        lambda: rw.replace(n["neg"], emit.aten.sigmoid.default(rw, self=n["x"])),
        lambda: rw.erase(n["add"]),
        lambda: rw.set_meta(n["add"], DTYPE_KEY, torch.int8),
    ]
    for step in steps[:stop]:
        step()
    rw.rollback()
    assert State.of(gm.graph, gm) == before
    _runs(gm)


def test_users_keep_their_order_after_a_rollback() -> None:
    gm, n, _ = _setup()
    order = list(n["relu"].users)
    rw = _rewriter(gm, n["neg"], {})
    rw.redirect(n["neg"], n["relu"], emit.aten.relu.default(rw, self=n["x"]))
    assert list(n["relu"].users) != order
    rw.rollback()
    assert list(n["relu"].users) == order  # promotion keeps the first user: order matters


def test_commit_erases_marked_nodes_and_ends_the_transaction() -> None:
    gm, n, _ = _setup()
    rw = _rewriter(gm, n["output"], {})
    new = emit.aten.add.Tensor(rw, self=n["relu"], other=n["relu"])
    rw.replace(n["add"], new, consumed=[n["add"]])
    rw.erase(n["add"])
    rw.commit()
    assert "add" not in {m.name for m in gm.graph.nodes}
    assert rw.consumed == ((n["add"],),)
    _runs(gm)
    with pytest.raises(RuntimeError, match="committed"):
        rw.rollback()
    with pytest.raises(RuntimeError, match="committed"):
        emit.aten.relu.default(rw, self=n["x"])


def test_commit_refuses_to_erase_a_node_still_read_and_erases_nothing() -> None:
    gm, n, before = _setup()
    rw = _rewriter(gm, n["output"], {})
    rw.erase(n["neg"])  # the output reads it
    with pytest.raises(RuntimeError, match="neg is still read by output"):
        rw.commit()
    rw.rollback()
    assert State.of(gm.graph, gm) == before


def test_edits_of_nodes_outside_the_graph_are_refused() -> None:
    gm, n, before = _setup()
    other = fx.symbolic_trace(Branches())
    stranger = next(iter(other.graph.nodes))
    rw = _rewriter(gm, n["neg"], {})
    with pytest.raises(RuntimeError, match="not in this graph"):
        rw.anchor = stranger
    with pytest.raises(RuntimeError, match="not in this graph"):
        rw.replace(stranger, n["neg"])
    rw.rollback()
    assert State.of(gm.graph, gm) == before


def test_a_replace_failing_midway_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    gm, n, before = _setup()
    rw = _rewriter(gm, n["neg"], {})
    new = emit.aten.relu.default(rw, self=n["x"])
    calls = 0
    original = fx.Node._replace_input_with

    def flaky(self: fx.Node, old: fx.Node, new: fx.Node) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("replace hook failed")
        original(self, old, new)

    monkeypatch.setattr(fx.Node, "_replace_input_with", flaky)
    with pytest.raises(RuntimeError, match="replace hook failed"):
        rw.replace(n["relu"], new)
    monkeypatch.undo()
    assert calls == 2  # one user was redirected before the failure
    rw.rollback()
    assert State.of(gm.graph, gm) == before
    _runs(gm)
