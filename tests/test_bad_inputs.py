"""The bad-input corpus: every case gives a clear error, or a runnable module that is right.

Each case of :data:`CASES` builds an input (module, example inputs, optionally fusions) and says
what ``lower`` must do with it:

- ``Error``: raise the given ``QAlgebraError`` subclass, its message naming the node or the
  argument (``needle``);
- ``Unchanged``: nothing fires; the result runs and gives exactly the input module's outputs
  (NaN where it gives NaN), any refusal naming why (``needle``);
- ``Lowered``: some fusion fires; the result runs and is close to the input module's outputs.

Neither of the last two may report a failed rewrite (``strict=True`` gives the same result).
docs/bad-inputs.md lists the same cases, one row each: a test checks the two agree.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_lower import assert_close_to_reference
from test_rollback import normalized
from torch import fx, nn

from qalgebra.errors import QAlgebraError, UnsupportedGraphError
from qalgebra.fusions import DEFAULT_FUSIONS
from qalgebra.lower import lower, lower_with_report
from qalgebra.ops import quantized_decomposed as qd
from qalgebra.testing.forms import FORMS
from qalgebra.testing.models import MODELS
from qalgebra.testing.properties import flat_outputs
from qalgebra.testing.quantize import quantize_pt2e

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
QUANT_PER_TENSOR = (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)


@dataclass(frozen=True)
class Error:
    kind: type[QAlgebraError]
    needle: str


@dataclass(frozen=True)
class Unchanged:
    needle: str = ""


@dataclass(frozen=True)
class Lowered:
    needle: str = ""


Expected = Error | Unchanged | Lowered


@dataclass(frozen=True)
class Input:
    """What ``lower`` is given; ``reference`` is what numerics are judged against (op form)."""

    gm: Any
    inputs: Any
    fusions: Any = DEFAULT_FUSIONS
    reference: fx.GraphModule | None = None


# --------------------------------------------------------------------------------------------
# Building the inputs
# --------------------------------------------------------------------------------------------


@functools.cache
def _conv() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """conv2d_relu quantized with 7-bit activations (lowered on every CPU)."""
    model, inputs = MODELS["conv2d_relu"]()
    return quantize_pt2e(model, inputs, reduce_range=True), inputs


def _conv_input(gm: Any = None, inputs: Any = None, **kw: Any) -> Input:
    """The quantized conv model (or an edit of it), judged with the unedited model's bound."""
    base, base_inputs = _conv()
    given = base if gm is None else gm
    return Input(given, base_inputs if inputs is None else inputs, reference=base, **kw)


def _edited(edit: Callable[[fx.GraphModule], None]) -> Input:
    """A copy of the quantized conv model, edited."""
    gm = FORMS["op"](_conv()[0])
    edit(gm)
    gm.recompile()
    return _conv_input(gm)


def _per_tensor_args(**changes: Any) -> Input:
    """Every per-tensor (de)quantize with some of (scale, zero_point, quant_min, quant_max,
    dtype) changed."""
    names = ("scale", "zero_point", "quant_min", "quant_max", "dtype")

    def edit(gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            if n.target in QUANT_PER_TENSOR:
                values = dict(zip(names, n.args[1:], strict=True)) | changes
                n.args = (n.args[0], *(values[k] for k in names))

    return _edited(edit)


def _weight_qparam(index: int, make: Callable[[torch.Tensor], torch.Tensor]) -> Input:
    """The first conv's weight scales (index 1) or zero points (2) replaced."""

    def edit(gm: fx.GraphModule) -> None:
        dq = next(n for n in gm.graph.nodes if n.target is qd.dequantize_per_channel.default)
        target = str(dq.args[index].target)
        setattr(gm, target, make(getattr(gm, target)))

    return _edited(edit)


def _float_weight() -> Input:
    def edit(gm: fx.GraphModule) -> None:
        dq = next(n for n in gm.graph.nodes if n.target is qd.dequantize_per_channel.default)
        target = str(dq.args[0].target)
        setattr(gm, target, getattr(gm, target).float())

    return _edited(edit)


def _malformed() -> Input:
    def edit(gm: fx.GraphModule) -> None:
        first_conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        placeholder.append(first_conv)  # now read before its inputs are computed

    gm = FORMS["op"](_conv()[0])
    edit(gm)
    return _conv_input(gm)


def _without_meta() -> Input:
    def edit(gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            n.meta.clear()

    return _edited(edit)


def _stale_meta() -> Input:
    """The first conv's activation records a shape that contradicts the weight (as torchao's
    QAT eval swap leaves on a batch norm); the lowering must not trust it."""

    def edit(gm: fx.GraphModule) -> None:
        quant = next(n for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default)
        quant.meta["val"] = torch.empty(1, 1, 3, 3, device="meta", dtype=torch.uint8)

    return _edited(edit)


def _exported_program() -> Input:
    model, inputs = MODELS["conv2d_relu"]()
    return Input(torch.export.export(model, inputs), inputs)


def _exported(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Input:
    gm = torch.export.export(model, inputs).module()
    assert isinstance(gm, fx.GraphModule)
    return Input(gm, inputs)


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out


class BatchNormConvBatchNorm(nn.Module):
    """The model of issue 9: QAT leaves a stale shape on the first batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn2(self.conv(self.bn1(x)))
        return out


def _seeded(make: Callable[[], nn.Module], *shape: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        return make(), (torch.randn(*shape),)


def _qat() -> Input:
    model, inputs = _seeded(BatchNormConvBatchNorm, 2, 3, 8, 8)
    return Input(quantize_pt2e(model, inputs, is_qat=True, reduce_range=True), inputs)


class HandQuantizedConv(nn.Module):
    """dequant(quant(x)) -> conv with a dequantized int8 weight, written with the ops
    themselves (7-bit activations); the weight is an input or a buffer."""

    def __init__(self, *, weight_as_input: bool) -> None:
        super().__init__()
        self.weight_as_input = weight_as_input
        # A parameter, so symbolic tracing reads it (a buffer's dequantize would be constant-folded)
        w = torch.randint(-64, 65, (4, 3, 3, 3), dtype=torch.int8)
        self.w = nn.Parameter(w, requires_grad=False)
        self.scales: torch.Tensor
        self.zps: torch.Tensor
        self.register_buffer("scales", torch.full((4,), 0.01))
        self.register_buffer("zps", torch.zeros(4, dtype=torch.int64))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = weight if self.weight_as_input and weight is not None else self.w
        q = qd.quantize_per_tensor.default(x, 0.05, 64, 0, 127, torch.uint8)
        dq = qd.dequantize_per_tensor.default(q, 0.05, 64, 0, 127, torch.uint8)
        wf = qd.dequantize_per_channel.default(w, self.scales, self.zps, 0, -128, 127, torch.int8)
        out: torch.Tensor = torch.ops.aten.conv2d.default(dq, wf)
        return out


def _hand_quantized(*, weight_as_input: bool, traced: bool, x_dtype: torch.dtype) -> Input:
    model, (x,) = _seeded(lambda: HandQuantizedConv(weight_as_input=weight_as_input), 2, 3, 8, 8)
    w = model.get_parameter("w")
    inputs = (x.to(x_dtype), w) if weight_as_input else (x.to(x_dtype),)
    if traced:
        gm = fx.symbolic_trace(model)
        return Input(gm, inputs, reference=gm)
    return _exported(model, inputs)


class DequantOfInput(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = qd.dequantize_per_tensor.default(q, 0.1, 0, 0, 255, torch.uint8)
        return out


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c: torch.Tensor
        self.register_buffer("c", torch.arange(4.0))

    def forward(self) -> torch.Tensor:
        return self.c * 2


def _empty_graph() -> Input:
    g = fx.Graph()
    g.output(g.placeholder("x"))
    return Input(fx.GraphModule(nn.Module(), g), (torch.randn(3),))


def _already_lowered() -> Input:
    gm, inputs = _conv()
    return Input(lower(gm, inputs), inputs, reference=gm)


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

U = UnsupportedGraphError

CASES: dict[str, tuple[Callable[[], Input], Expected]] = {
    # the arguments
    "exported_program": (_exported_program, Error(U, "got ExportedProgram: lower its module")),
    "plain_module": (
        lambda: Input(MODELS["conv2d_relu"]()[0], _conv()[1]),
        Error(U, "got ConvUnary: export and quantize it first"),
    ),
    "not_a_module": (lambda: Input(torch.randn(2), _conv()[1]), Error(U, "got Tensor")),
    "inputs_not_a_sequence": (
        lambda: _conv_input(inputs=_conv()[1][0]),
        Error(U, "example_inputs as a tuple or list, got Tensor"),
    ),
    "inputs_a_dict": (
        lambda: _conv_input(inputs={"x": _conv()[1][0]}),
        Error(U, "example_inputs as a tuple or list, got dict"),
    ),
    "too_many_inputs": (
        lambda: _conv_input(inputs=_conv()[1] * 2),
        Error(U, "example_inputs has 2 inputs, the graph takes 1 (x)"),
    ),
    "non_tensor_input": (
        lambda: _conv_input(inputs=("image.png",)),
        Error(U, "example_inputs[0] is a str, expected a tensor"),
    ),
    "int32_input": (
        lambda: _conv_input(inputs=(_conv()[1][0].to(torch.int32),)),
        Error(U, "example input 0 (placeholder x) is torch.int32, the graph expects torch.float32"),
    ),
    "wrong_shape_input": (
        lambda: _conv_input(inputs=(torch.randn(2, 5, 8, 8),)),
        Error(U, "(placeholder x) has shape [2, 5, 8, 8], the graph expects [2, 3, 8, 8]"),
    ),
    "wrong_rank_input": (
        lambda: _conv_input(inputs=(torch.randn(3, 8, 8),)),
        Error(U, "(placeholder x) has shape [3, 8, 8], the graph expects [2, 3, 8, 8]"),
    ),
    "fusions_not_fusions": (
        lambda: _conv_input(fusions=("qconv",)),
        Error(U, "fusions[0] is a str, expected a Fusion"),
    ),
    # graphs no lowering can run
    "training_batch_norm": (
        lambda: _exported(*_seeded(lambda: ConvBn().train(), 2, 3, 8, 8)),
        Error(U, "runs in training mode"),
    ),
    "training_dropout": (
        lambda: _exported(*_seeded(lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout()), 2, 4)),
        Error(U, "dropout (aten.dropout.default) runs in training mode"),
    ),
    "training_module": (
        lambda: Input(fx.symbolic_trace(ConvBn().train()), (torch.randn(2, 3, 8, 8),)),
        Error(U, "bn calls BatchNorm2d 'bn' in training mode"),
    ),
    "float_weight_dequant": (
        _float_weight,
        Error(U, "(attribute _frozen_param0) as torch.int8, but it holds torch.float32"),
    ),
    "int32_activation_quantized": (
        lambda: _hand_quantized(weight_as_input=False, traced=True, x_dtype=torch.int32),
        Error(U, "quantize_per_tensor_default quantizes x, a torch.int32 tensor"),
    ),
    "int8_tensor_dequantized_as_uint8": (
        lambda: Input(fx.symbolic_trace(DequantOfInput()), (torch.zeros(4, dtype=torch.int8),)),
        Error(U, "dequantizes q as torch.uint8, but it holds torch.int8"),
    ),
    "quant_min_below_dtype": (
        lambda: _per_tensor_args(quant_min=-1),
        Error(U, "has quant_min -1, outside the range of torch.uint8"),
    ),
    "quant_max_above_dtype": (
        lambda: _per_tensor_args(quant_max=300),
        Error(U, "has quant_max 300, outside the range of torch.uint8"),
    ),
    "malformed_graph": (_malformed, Error(U, "the graph is malformed")),
    # left as they are, with a reason
    "nan_scale": (lambda: _per_tensor_args(scale=math.nan), Unchanged("scale nan")),
    "inf_scale": (lambda: _per_tensor_args(scale=math.inf), Unchanged("scale inf")),
    "zero_scale": (
        lambda: _per_tensor_args(scale=0.0),
        Error(U, "quantize_per_tensor_default quantizes with scale 0.0 and divides by it"),
    ),
    "negative_scale": (lambda: _per_tensor_args(scale=-0.02), Unchanged("scale -0.02")),
    "zero_point_outside_dtype": (
        lambda: _per_tensor_args(zero_point=300),
        Unchanged("zero point 300 is outside the range of torch.uint8"),
    ),
    "zero_point_outside_quant_range": (
        lambda: _per_tensor_args(zero_point=200),
        Unchanged("zero point 200 is outside [0, 127]"),
    ),
    "quant_range_inverted": (
        lambda: _per_tensor_args(quant_min=100, quant_max=50, zero_point=60),
        Unchanged("zero point 60 is outside [100, 50]"),
    ),
    "int32_quantized_activation": (
        lambda: _per_tensor_args(quant_min=-(2**31), quant_max=2**31 - 1, dtype=torch.int32),
        Unchanged("dtype torch.int32"),
    ),
    "weights_as_placeholders": (
        lambda: _hand_quantized(weight_as_input=True, traced=False, x_dtype=torch.float32),
        Unchanged(),
    ),
    "float_model": (lambda: _exported(*MODELS["float_conv1d_relu"]()), Unchanged()),
    "empty_graph": (_empty_graph, Unchanged()),
    "no_inputs": (lambda: Input(fx.symbolic_trace(Constant()), ()), Unchanged()),
    "call_module_nodes": (
        lambda: Input(fx.symbolic_trace(ConvBn().eval()), (torch.randn(2, 3, 8, 8),)),
        Unchanged(),
    ),
    "already_lowered": (_already_lowered, Unchanged()),
    # lowered where exact, the rest left with a reason
    "nan_weight_scale": (
        lambda: _weight_qparam(1, lambda s: torch.full_like(s, math.nan)),
        Lowered("weight scales are not all finite positive numbers"),
    ),
    "zero_weight_scale": (
        lambda: _weight_qparam(1, torch.zeros_like),
        Lowered("weight scales are not all finite positive numbers"),
    ),
    "nonzero_weight_zero_point": (
        lambda: _weight_qparam(2, torch.ones_like),
        Lowered("weight zero points are not all 0"),
    ),
    "missing_meta": (_without_meta, Lowered()),
    "stale_meta": (_stale_meta, Lowered()),
    "symbolic_traced": (
        lambda: _hand_quantized(weight_as_input=False, traced=True, x_dtype=torch.float32),
        Lowered(),
    ),
    "qat_batchnorm_conv_batchnorm": (_qat, Lowered()),
}


def _run(gm: Any, inputs: Sequence[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.clone() for t in flat_outputs(gm(*inputs))]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str) -> None:
    make, expected = CASES[case]
    given = make()
    if isinstance(expected, Error):
        with pytest.raises(expected.kind) as caught:
            lower_with_report(given.gm, given.inputs, fusions=given.fusions)
        assert expected.needle in str(caught.value)
        return
    reference = _run(given.gm, given.inputs)
    lowered, report = lower_with_report(given.gm, given.inputs, fusions=given.fusions)
    assert not report.failed, report.summary()
    strict = lower(given.gm, given.inputs, fusions=given.fusions, strict=True)
    assert normalized(strict.code) == normalized(lowered.code)
    lowered.graph.lint()
    got = _run(lowered, given.inputs)
    reasons = " | ".join(r.reason for r in report.refused)
    assert expected.needle in reasons, report.summary()
    if isinstance(expected, Unchanged):
        assert report.total_fired == 0, report.summary()
        for r, g in zip(reference, got, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)
        return
    assert report.total_fired > 0, report.summary()
    op_form = given.reference if given.reference is not None else given.gm
    for r, g in zip(reference, got, strict=True):
        assert_close_to_reference(r, g, op_form)


def _documented() -> dict[str, str]:
    """The doc table's case ids and the first word of what it says qalgebra does."""
    rows = re.findall(r"^\| `(\w+)` \| .+? \| \*\*(\w+)\*\*", DOC.read_text(), flags=re.M)
    return dict(rows)


def test_the_doc_lists_every_case_with_its_outcome() -> None:
    kinds = {Error: "error", Unchanged: "unchanged", Lowered: "lowered"}
    assert _documented() == {case: kinds[type(e)] for case, (_, e) in CASES.items()}
    assert len(CASES) >= 30
