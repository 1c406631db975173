"""In-place ops and eval dropouts, as ``torch.export`` leaves them, before the catalog runs.

Each graph is exported from a small module written the way model libraries write it, then
lowered (unquantized: only the functionalize family can fire). The lowered module must compute
what the exported one computes -- including what it writes into its inputs -- and where a write
is observable the op must stay in place with the reason in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qalgebra.aliasing import observable_write, runs_after
from qalgebra.errors import UnsupportedGraphError
from qalgebra.fusions.inplace import FUNCTIONAL
from qalgebra.lower import LoweringReport, lower_with_report
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.zoo import build

aten = torch.ops.aten


def _export(model: nn.Module, *inputs: Tensor) -> fx.GraphModule:
    gm = torch.export.export(model.eval(), inputs).module()
    assert isinstance(gm, fx.GraphModule)
    return gm


def _targets(gm: fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _lower_and_compare(
    gm: fx.GraphModule, inputs: Sequence[Tensor]
) -> tuple[fx.GraphModule, LoweringReport]:
    """Lower ``gm``; outputs and writes into the inputs must equal the exported module's."""
    lowered, report = lower_with_report(gm, inputs)
    ref_in, low_in = [x.clone() for x in inputs], [x.clone() for x in inputs]
    with torch.no_grad():
        expected, got = gm(*ref_in), lowered(*low_in)
    for e, g in zip(
        torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got), strict=True
    ):
        assert torch.equal(e, g)
    for e, g in zip(ref_in, low_in, strict=True):
        assert torch.equal(e, g)  # the same writes into the caller's tensors, if any
    return lowered, report


class _Activations(nn.Module):
    """conv -> relu_ ; conv -> hardswish_ -> ReLU6(inplace) ; += ; silu_ ; dropouts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.hardswish = nn.Hardswish(inplace=True)
        self.relu6 = nn.ReLU6(inplace=True)
        self.silu = nn.SiLU(inplace=True)
        self.dropout = nn.Dropout(0.5, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.conv1(x))
        z = self.relu6(self.hardswish(self.conv2(y)))
        z += y
        z = self.silu(z)
        z = self.dropout(z)
        out: Tensor = F.dropout(z, 0.3, training=False)
        return out


def test_unobservable_writes_become_functional_and_eval_dropouts_disappear() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = _export(_Activations(), x)
    inplace = [t for t in _targets(gm) if t in FUNCTIONAL]
    assert len(inplace) == 5  # relu_, hardswish_, hardtanh_ (ReLU6), add_, silu_
    lowered, report = _lower_and_compare(gm, [x])
    assert report.fired["functionalize"] == 5 and report.fired["eval_dropout"] == 2
    assert report.refused == []
    left = _targets(lowered)
    assert not [t for t in left if t in FUNCTIONAL or "dropout" in str(t)]
    for functional in (aten.relu.default, aten.hardswish.default, aten.hardtanh.default):
        assert functional in left
    assert aten.add.Tensor in left and aten.silu.default in left


class _WriteThroughView(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        y = x * 2
        v = y.view(-1)
        F.relu(v, inplace=True)  # writes y's storage: y + 1 must see it
        return y + 1


class _WriteIntoInput(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        y = x * 2
        F.relu(x, inplace=True)  # the caller sees x change
        return y + x


class _PromotingAdd(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        y = (x * 2).to(torch.bfloat16)
        y += x  # add_ keeps bfloat16; add would return float32
        return y


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (_WriteThroughView(), "reads mul after relu_ wrote it"),
        (_WriteIntoInput(), "it writes into graph input x"),
        (_PromotingAdd(), "its functional twin would return torch.float32"),
    ],
    ids=["view", "graph_input", "dtype"],
)
def test_observable_writes_stay_in_place_and_are_reported(model: nn.Module, reason: str) -> None:
    x = torch.randn(2, 3)
    gm = _export(model, x)
    lowered, report = _lower_and_compare(gm, [x])
    assert report.fired["functionalize"] == 0
    assert len(report.refused) == 1 and report.refused[0].fusion == "functionalize"
    assert reason in report.refused[0].reason and "kept in place" in report.refused[0].reason
    assert [t for t in _targets(lowered) if t in FUNCTIONAL] == [
        t for t in _targets(gm) if t in FUNCTIONAL
    ]


def test_a_training_dropout_is_refused_not_removed() -> None:
    class M(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x * 2, 0.5, training=True)

    gm = _export(M(), torch.randn(4, 4))
    assert aten.dropout.default in _targets(gm)
    with pytest.raises(UnsupportedGraphError, match="training mode"):
        lower_with_report(gm, (torch.randn(4, 4),))


def _graph(*, reader_after: bool, through: str = "self") -> tuple[fx.Graph, fx.Node]:
    """``w = buf * 2; [v = view(w)]; relu_(w or v); [reader of w after]`` by hand."""
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.call_function(aten.mul.Tensor, (x, 2.0))
    target = w if through == "self" else g.call_function(aten.view.default, (w, [-1]))
    write = g.call_function(aten.relu_.default, (target,))
    readers: list[fx.Node] = [write]
    if reader_after:
        readers.append(g.call_function(aten.add.Tensor, (w, 1.0)))
    g.output(tuple(readers))
    return g, write


def test_observable_write_follows_views_and_order() -> None:
    _, write = _graph(reader_after=False)
    assert observable_write(write) is None
    _, write = _graph(reader_after=True)
    assert observable_write(write) == "add_tensor reads mul_tensor after relu__default wrote it"
    _, write = _graph(reader_after=False, through="view")
    assert observable_write(write) is None  # only the relu's result is read afterwards
    _, write = _graph(reader_after=True, through="view")
    assert observable_write(write) is not None
    g = fx.Graph()
    attr = g.get_attr("buffer")
    write = g.call_function(aten.relu_.default, (attr,))
    g.output((write,))
    assert observable_write(write) == "it writes into module attribute buffer"


def test_runs_after_walks_both_ways() -> None:
    g = fx.Graph()
    nodes = [g.placeholder("x")]
    for _ in range(5):
        nodes.append(g.call_function(aten.neg.default, (nodes[-1],)))
    assert runs_after(nodes[4], nodes[1]) and not runs_after(nodes[1], nodes[4])
    assert runs_after(nodes[5], nodes[0]) and not runs_after(nodes[0], nodes[5])


def test_a_symbolic_batch_is_kept_and_every_conv_fuses() -> None:
    """mobilenet_v3_large (hardswish_, relu_, SE, ``+=``) exported with a symbolic batch."""
    model, (x,) = build("mobilenet_v3_large", size="ci", batch=2)
    gm = quantize_pt2e(model, (x,), dynamic_batch=True, reduce_range=True)
    assert any(
        isinstance(n.meta.get("val"), Tensor) and not isinstance(n.meta["val"].shape[0], int)
        for n in gm.graph.nodes
    )
    lowered, report = lower_with_report(gm, (x,))
    assert report.fired["functionalize"] > 0
    assert not [r for r in report.refused if r.fusion == "functionalize"]
    convs = [t for t in _targets(gm) if t is aten.conv2d.default]
    fused = [t for t in _targets(lowered) if "qconv" in str(t)]
    assert len(fused) == len(convs) and aten.conv2d.default not in _targets(lowered)
    other = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (lowered(other) - gm(other)).abs().max().item()
        assert diff <= 1e-3 * max(1.0, gm(other).abs().max().item())
