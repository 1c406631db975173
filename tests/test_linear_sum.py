"""A linear's float32 residual add is summed in place, and only where nobody could see it.

``qlinear_binary`` accumulates a float32 output into a contiguous clone of ``other`` (oneDNN's
``sum`` writes the result into ``other``); ``accum_clone_elision`` drops the clone when ``other``
is a contiguous tensor the graph made and nothing reads it after the linear. Each case checks
what the graph does (sum or add, clones kept) and the numbers against the un-lowered graph,
including what a later reader of ``other`` sees.

Every model is quantized with 7-bit activations (exact on every CPU), and each test runs with
``qalgebra.isa.int8_pairs_saturate`` forced both ways (the ``pairs_saturate`` fixture), so the
graphs and the verdicts do not depend on the CPU running them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qalgebra.lower import lower_with_report
from qalgebra.testing.models import ffn_stack
from qalgebra.testing.properties import check_dtypes
from qalgebra.testing.quantize import quantize_pt2e

aten = torch.ops.aten
onednn = torch.ops.onednn
_BINARY = (onednn.qlinear_pointwise.binary, onednn.qlinear_pointwise.binary_tensor)

pytestmark = pytest.mark.usefixtures("pairs_saturate")


def _binaries(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in _BINARY]


def _arg(node: fx.Node, name: str) -> object:
    assert isinstance(node.target, torch._ops.OpOverload)
    names = [a.name for a in node.target._schema.arguments]
    i = names.index(name)
    return node.args[i] if i < len(node.args) else node.kwargs[name]


def _post_op(node: fx.Node) -> object:
    return _arg(node, "binary_post_op")


def _accumulator_clones(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("qalgebra_accumulator")]


def _lowered(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, fx.GraphModule]:
    gm = quantize_pt2e(model, inputs, reduce_range=True)
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired.get("qlinear_binary"), report.summary()
    return gm, lowered


def _close(got: Tensor, want: Tensor) -> None:
    # same kernels, same float32 sums: one quantization step of slack at most
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max()) + 1e-5


def test_a_stack_sums_in_place_and_copies_only_the_callers_input() -> None:
    model, inputs = ffn_stack(4, three_d=True, batch=2, seq=8)()
    gm, lowered = _lowered(model, inputs)
    binaries = _binaries(lowered)
    assert len(binaries) == 4
    assert [_post_op(n) for n in binaries] == ["sum"] * 4
    # the first layer adds to the caller's input: its clone stays; the others sum into the
    # previous layer's output, which nothing reads afterwards
    clones = _accumulator_clones(lowered)
    assert len(clones) == 1
    source = clones[0].args[0]
    assert isinstance(source, fx.Node) and source.op == "placeholder"
    x = inputs[0].clone()
    out = lowered(x)
    assert torch.equal(x, inputs[0])  # the caller's tensor is left alone
    _close(out, gm(*inputs))
    check_dtypes(lowered, inputs, [gm(*inputs)])


class _ReadAfter(nn.Module):
    """``h + fc(h)``, and ``h`` read again afterwards: the sum must not land in ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.layer_norm(self.pre(x), [16])
        y: Tensor = h + self.fc(h)
        return y, h * 2.0


class _LastReader(nn.Module):
    """``h + fc(h)`` with ``h`` a layer norm's output read by nothing afterwards; the norm's
    weight is a parameter, so in grad mode ``h`` requires grad (oneDNN cannot sum into it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.pre(x))
        y: Tensor = h + self.fc(h)
        return y


class _Transposed(nn.Module):
    """``other`` is a transposed view: summing into it would be written in the wrong order."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(12, 12)
        self.fc = nn.Linear(12, 12)

    def forward(self, x: Tensor) -> Tensor:
        h = F.layer_norm(self.pre(x), [12])  # [12, 12]
        y: Tensor = h.t() + self.fc(h)
        return y


@pytest.mark.parametrize(
    ("factory", "elided"),
    [(_LastReader, True), (_ReadAfter, False), (_Transposed, False)],
    ids=["last-reader", "read-after", "transposed"],
)
def test_the_clone_goes_only_where_the_sum_could_not_be_seen(
    factory: type[nn.Module], elided: bool
) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    rows = 12 if factory is _Transposed else 6
    inputs = (torch.randn(rows, 12 if factory is _Transposed else 16),)
    gm, lowered = _lowered(model, inputs)
    (binary,) = _binaries(lowered)
    assert _post_op(binary) == "sum"
    kept = _accumulator_clones(lowered)
    assert (not kept) == elided
    want = gm(*inputs)
    with torch.enable_grad():
        got = lowered(*inputs)
    for g, w in zip(
        got if isinstance(got, tuple) else (got,),
        want if isinstance(want, tuple) else (want,),
        strict=True,
    ):
        _close(g, w)
    check_dtypes(lowered, inputs, list(want) if isinstance(want, tuple) else [want])


def test_an_int8_output_adds_out_of_place() -> None:
    """``x + fc(x)`` quantized for the next linear: the output is uint8, ``other`` float."""

    class Quantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(16, 16)
            self.fc = nn.Linear(16, 16)
            self.post = nn.Linear(16, 16)

        def forward(self, x: Tensor) -> Tensor:
            h = self.pre(x)
            y: Tensor = self.post(torch.relu(h + self.fc(h)))
            return y

    torch.manual_seed(1)
    inputs = (torch.randn(6, 16),)
    gm, lowered = _lowered(Quantized().eval(), inputs)
    (binary,) = _binaries(lowered)
    assert _arg(binary, "output_dtype") == torch.uint8
    assert _post_op(binary) == "add"
    assert not _accumulator_clones(lowered)
    _close(lowered(*inputs), gm(*inputs))


def test_a_3d_residual_that_requires_grad_is_summed_into_in_grad_mode() -> None:
    """The 3-D linear sums into a 2-D view of ``h``; oneDNN resizes that view, which autograd
    refuses for a tensor requiring grad: the accumulator is detached first."""
    torch.manual_seed(2)
    inputs = (torch.randn(2, 3, 16),)
    gm, lowered = _lowered(_LastReader().eval(), inputs)
    (binary,) = _binaries(lowered)
    assert _post_op(binary) == "sum"
    assert not _accumulator_clones(lowered)
    with torch.enable_grad():
        got = lowered(*inputs)
    _close(got, gm(*inputs))


class _OverConvRows(nn.Module):
    """``y + fc(y)`` over the rows of a conv's output: oneDNN's conv returns it channels last,
    though the float conv it replaces said contiguous, so the sum must go into a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # [2, 8, 6, 6]
        out: Tensor = y + self.fc(y)
        return out


def test_a_conv_output_is_summed_into_a_copy() -> None:
    torch.manual_seed(3)
    inputs = (torch.randn(2, 3, 6, 6),)
    gm, lowered = _lowered(_OverConvRows().eval(), inputs)
    assert any(n.target is onednn.qconv_pointwise.default for n in lowered.graph.nodes)
    (binary,) = _binaries(lowered)
    assert _post_op(binary) == "sum"
    assert len(_accumulator_clones(lowered)) == 1
    _close(lowered(*inputs), gm(*inputs))
