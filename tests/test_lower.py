"""The lowering on real torchao-quantized graphs, in every form the catalog accepts.

Expected fusion counts are derived from each model's structure (see qalgebra/testing/models.py):
e.g. ``ConvUnary`` is ``post(conv2(post(conv1(x))))``: conv1 with int8 output (conv2 reads it
quantized), conv2 with float output -- two ``qconv`` fusions carrying the post-op.

Every CPU checks the decisions of both kinds of x86 CPU: models are quantized with 7-bit
activations (``reduce_range=True``: what X86InductorQuantizer uses where int8 products saturate,
and what every CPU computes exactly) and 8-bit ones, and ``qalgebra.isa.int8_pairs_saturate`` is
forced either way (:data:`ACTIVATIONS`). On a saturating CPU 8-bit activations are refused (the
graph runs as the reference does); on a VNNI one they fuse, which only such a CPU computes
exactly: those cases check the decisions (what fires, post-ops, clamps, output dtypes) on every
CPU, and their numerics are those of the 7-bit models.

Numerics. oneDNN and the eager reference compute the same integer arithmetic, but float rounding
may move a value across a rounding boundary, so a quantized intermediate may differ by one step.
The bound used for float outputs is "one step on every input of the last layer":
``2 * max_activation_scale * max_row_l1(weights)`` -- and, to catch systematic errors (a scale
or zero point mixed up), at least 99% of the output elements must agree to 1e-4.
"""

from __future__ import annotations

import contextlib
import functools
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import fx

from qalgebra import emit, isa
from qalgebra.errors import LoweringError, RewriteError, UnsupportedGraphError
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion, Refusal, Rewriter
from qalgebra.lower import FailedRewrite, LoweringReport, lower, lower_with_report
from qalgebra.pattern import Match
from qalgebra.testing.forms import FORMS, decompose_compute, to_decomposed
from qalgebra.testing.models import MODELS
from qalgebra.testing.properties import check_decisions, check_dtypes, check_example
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.strategies import (
    ConvSpec,
    Example,
    GraphSpec,
    Layer,
    LinearSpec,
    QuantSpec,
    Residual,
    build_example,
    flat_tensors,
)

onednn = torch.ops.onednn
qd = torch.ops.quantized_decomposed


@functools.cache
def _quantized(
    name: str, reduce_range: bool = True
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The model quantized with 7-bit activations (``reduce_range``) or 8-bit ones."""
    model, inputs = MODELS[name]()
    return quantize_pt2e(model, inputs, reduce_range=reduce_range), inputs


@dataclass(frozen=True)
class Activations:
    """How a model is quantized, and which CPU's decisions the lowering is forced to make."""

    reduce_range: bool
    saturating: bool

    @property
    def fused(self) -> bool:
        """Whether conv/linear fuse: always with 7 bits, with 8 only where nothing saturates."""
        return self.reduce_range or not self.saturating

    @property
    def exact_everywhere(self) -> bool:
        """Whether every CPU computes the lowered module alike (nothing fused that saturates)."""
        return self.reduce_range or self.saturating

    def forced(self) -> contextlib.AbstractContextManager[None]:
        return isa.forced(int8_pairs_saturate=self.saturating)


#: 7-bit activations (fused by both kinds of CPU: as a saturating CPU decides), 8-bit ones as a
#: saturating CPU decides (refused) and as a VNNI/AMX one does (fused).
ACTIVATIONS = {
    "7bit": Activations(reduce_range=True, saturating=True),
    "8bit-saturating": Activations(reduce_range=False, saturating=True),
    "8bit-vnni": Activations(reduce_range=False, saturating=False),
}


def _in_form(form: str, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    if form == "compute":  # what Inductor sees: aten.convolution, permute + addmm, decomposed q/dq
        return decompose_compute(to_decomposed(gm), inputs)
    return FORMS[form](gm)


FORM_NAMES = (
    "op",
    "tensor_qparams",
    "decomposed",
    "decomposed_single_clamp",
    "decomposed_keep_zero_zp",
    "compute",
)

#: oneDNN post-op (name, scalars, algorithm) of each model post-op.
CONV_ATTRS = {
    "none": ("none", [], ""),
    "relu": ("relu", [], ""),
    "relu6": ("hardtanh", [0.0, 6.0], ""),
    "hardtanh": ("hardtanh", [-1.0, 1.0], ""),
    "hardswish": ("hardswish", [], ""),
    "silu": ("swish", [], ""),
}
LINEAR_ATTRS = {
    **CONV_ATTRS,
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "leaky_relu": ("leaky_relu", [0.1], ""),
    "tanh": ("tanh", [], ""),
}

EXPECTED: dict[str, dict[str, int]] = {
    **{f"conv2d_{p}": {"qconv": 2} for p in CONV_ATTRS},
    **{f"linear_{p}": {"qlinear": 2} for p in LINEAR_ATTRS},
    "linear3d_relu": {"qlinear": 2},
    "linear3d_gelu_tanh": {"qlinear": 2},
    "linear3d_nobias_relu": {"qlinear": 2},
    # conv(x) + dequant(y) -> relu -> quant -> head conv (float out)
    "conv_add_dequant_rhs_relu": {"qconv_binary": 1, "qconv": 1},
    "conv_add_dequant_lhs": {"qconv_binary": 1, "qconv": 1},
    # main conv + quantized other conv -> head: the other conv and the head stay plain qconv
    "conv_add_conv_lhs": {"qconv_binary": 1, "qconv": 2},
    "conv_add_conv_rhs_relu_float_out": {"qconv_binary": 1, "qconv": 1},
    # fc1(x) + y (float input) -> [relu] -> fc2: float-other binary, fc2 plain
    "linear_add_input_rhs_relu": {"qlinear_binary": 1, "qlinear": 1},
    "linear3d_add_input_lhs": {"qlinear_binary": 1, "qlinear": 1},
    "linear_add_linear_rhs_relu": {"qlinear_binary": 1, "qlinear": 2},
    "resnet_like_2": {"qconv_binary": 2, "qconv": 3, "qlinear": 1},
    "ffn_stack_2_3d": {"qlinear_binary": 2, "qlinear": 2},
}


def _max_activation_scale(gm: fx.GraphModule) -> float:
    scales = [
        float(n.args[1])
        for n in gm.graph.nodes
        if n.target is qd.quantize_per_tensor.default and isinstance(n.args[1], float)
    ]
    return max(scales)


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor:
    assert isinstance(node, fx.Node) and isinstance(node.target, str)
    value = functools.reduce(getattr, node.target.split("."), gm)
    assert isinstance(value, torch.Tensor)
    return value


def _max_row_l1(gm: fx.GraphModule) -> float:
    """The largest row L1 norm of a dequantized weight (per channel, or per tensor)."""
    best = 0.0
    for n in gm.graph.nodes:
        if n.target is qd.dequantize_per_channel.default:
            w, s = (_attr(gm, a) for a in n.args[:2])
            dq = w.float() * s.reshape(-1, *([1] * (w.dim() - 1)))
        elif n.target is qd.dequantize_per_tensor.default and n.args[0].op == "get_attr":
            dq = _attr(gm, n.args[0]).float() * float(n.args[1])
        else:
            continue
        best = max(best, float(dq.flatten(1).abs().sum(1).max()))
    return best


def assert_close_to_reference(
    reference: torch.Tensor, lowered: torch.Tensor, op_form: fx.GraphModule
) -> None:
    assert lowered.shape == reference.shape and lowered.dtype == reference.dtype
    diff = (lowered.float() - reference.float()).abs()
    bound = 2 * _max_activation_scale(op_form) * _max_row_l1(op_form) + 1e-5
    if reference.dtype == torch.bfloat16 or _has_bf16(op_form):
        # The bf16 reference rounds every conv/linear result to bf16 before quantizing it, so
        # many int8 intermediates differ by one step from oneDNN's (which does not round):
        # element-wise agreement says nothing there. Bound the max (one step per input, plus a
        # few bf16 steps of the largest output) and the mean (a scale or zero point mixed up
        # shifts every element).
        largest = float(reference.float().abs().max())
        assert float(diff.max()) <= bound + 4 * 2**-8 * largest
        assert float(diff.mean()) <= 1e-2 * largest, f"mean diff {float(diff.mean())}"
        return
    assert float(diff.max()) <= bound, f"max diff {float(diff.max())} > bound {bound}"
    agree = float((diff <= 1e-4).float().mean())
    assert agree >= 0.99, f"only {agree:.3f} of the elements agree to 1e-4"


def _has_bf16(gm: fx.GraphModule) -> bool:
    return any(n.kwargs.get("dtype") == torch.bfloat16 for n in gm.graph.nodes)


def _fused_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("onednn")
    ]


def _activation_ranges(gm: fx.GraphModule) -> set[tuple[int, int]]:
    return {
        (int(n.args[3]), int(n.args[4]))
        for n in gm.graph.nodes
        if n.target is qd.quantize_per_tensor.default
    }


@pytest.mark.parametrize("quantize", ["quantize_pt2e", "cli"])
def test_the_default_activation_range_follows_the_probe(
    quantize: str, pairs_saturate: bool
) -> None:
    # Where int8 products saturate, 7-bit activations (reduce_range), else 8-bit ones: the
    # quantizer's default, and the CLI's demo flow.
    from qalgebra.measure import no_steps, quantize_in_steps

    model, inputs = MODELS["conv2d_relu"]()
    if quantize == "cli":
        gm = quantize_in_steps(model, inputs, no_steps, "conv2d_relu")
    else:
        gm = quantize_pt2e(model, inputs)
    assert _activation_ranges(gm) == {(0, 127) if pairs_saturate else (0, 255)}


def _check_saturating_refusals(report: LoweringReport, expected: dict[str, int]) -> None:
    """8-bit activations on a saturating CPU: no conv/linear fuses, each refusal says why."""
    fired = {k: v for k, v in report.fired.items() if k in expected and v}
    assert fired == {}, report.summary()
    assert report.refused, report.summary()
    assert all("saturating int16 pairs" in r.reason for r in report.refused), report.summary()


@pytest.mark.parametrize("activations", sorted(ACTIVATIONS))
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_family_fires_in_every_form_with_reference_numerics(
    name: str, form: str, activations: str
) -> None:
    how = ACTIVATIONS[activations]
    op_form, inputs = _quantized(name, how.reduce_range)
    graph = _in_form(form, op_form, inputs)
    before = graph.code
    with how.forced():
        lowered, report = lower_with_report(graph, inputs)
    if how.fused:
        fired = {k: v for k, v in report.fired.items() if k in EXPECTED[name]}
        assert fired == EXPECTED[name], report.summary()
        assert not report.refused, report.summary()
    else:
        _check_saturating_refusals(report, EXPECTED[name])
    assert graph.code == before
    lowered.graph.lint()
    reference = graph(*inputs)
    check_dtypes(lowered, inputs, [reference])
    if how.exact_everywhere:
        assert_close_to_reference(reference, lowered(*inputs), op_form)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seven_bit_activations_lower_alike_on_both_kinds_of_cpu(name: str) -> None:
    gm, inputs = _quantized(name)
    lowered = []
    for saturating in (True, False):
        with isa.forced(int8_pairs_saturate=saturating):
            lowered.append(lower_with_report(gm, inputs))
    (first, first_report), (second, second_report) = lowered
    assert _calls_and_constants(first) == _calls_and_constants(second)
    assert first_report.fired == second_report.fired and not first_report.refused


def _calls_and_constants(gm: fx.GraphModule) -> list[tuple[object, ...]]:
    """Each call's target and its non-node arguments (node names carry a global counter)."""
    return [
        (n.target, *(a for a in n.args if not isinstance(a, fx.Node)))
        for n in gm.graph.nodes
        if n.op == "call_function"
    ]


BF16_EXPECTED: dict[str, dict[str, int]] = {
    "conv2d_relu": {"qconv": 2},
    "conv2d_silu": {"qconv": 2},
    "linear_gelu": {"qlinear": 2},
    "linear3d_relu": {"qlinear": 2},
    # bf16 conv + fp32 dequant promotes to fp32: the fused sum produces fp32, like eager
    "conv_add_dequant_rhs_relu": {"qconv_binary": 1, "qconv": 1},
    "conv_add_conv_rhs_relu_float_out": {"qconv_binary": 1, "qconv": 1},
    # bf16 + bf16: where oneDNN cannot emit bf16 from the binary qlinear, fp32 then convert
    "linear_add_linear_lhs": {"qlinear_binary": 1, "qlinear": 2},
    "linear3d_add_input_lhs_relu": {"qlinear_binary": 1, "qlinear": 1},
    "resnet_like_2": {"qconv_binary": 2, "qconv": 3, "qlinear": 1},
}


@functools.cache
def _quantized_bf16(name: str) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = MODELS[name]()
    return quantize_pt2e(model, inputs, bf16=True, reduce_range=True), inputs


_BINARY_OPS = (onednn.qconv2d_pointwise.binary, onednn.qlinear_pointwise.binary)


def _binary_float_outputs(gm: fx.GraphModule) -> list[tuple[torch.dtype, fx.Node]]:
    """(output dtype, the node after it) of each binary oneDNN op with a float output."""
    found = []
    for node in gm.graph.nodes:
        if node.target in _BINARY_OPS:
            dtype = node.args[14 if node.target is onednn.qconv2d_pointwise.binary else 10]
            if dtype in (torch.float32, torch.bfloat16):
                found.append((dtype, next(iter(node.users))))
    return found


@pytest.mark.parametrize("form", ["op", "decomposed"])
@pytest.mark.parametrize("name", sorted(BF16_EXPECTED))
def test_int8_mixed_bf16_fuses_and_runs(name: str, form: str, onednn_bf16: bool) -> None:
    op_form, inputs = _quantized_bf16(name)
    graph = _in_form(form, op_form, inputs)
    lowered, report = lower_with_report(graph, inputs)
    fired = {k: v for k, v in report.fired.items() if k in BF16_EXPECTED[name]}
    assert fired == BF16_EXPECTED[name], report.summary()
    assert not report.refused, report.summary()
    reference = graph(*inputs)
    check_dtypes(lowered, inputs, [reference])  # the dtype contract, on every CPU
    for dtype, after in _binary_float_outputs(lowered):
        if dtype == torch.float32 and after.target is torch.ops.aten._to_copy.default:
            # only where oneDNN cannot emit the bf16 sum: computed in fp32, converted back
            assert not onednn_bf16 and after.kwargs["dtype"] == torch.bfloat16
    if not onednn_bf16:  # every CPU runs the fp32 fallback; bf16 output only where oneDNN can
        assert_close_to_reference(reference, lowered(*inputs), op_form)


def _bf16_sum(kind: str) -> Example:
    """``conv|linear(x) + y`` in int8-mixed-bf16 with a bf16 ``y`` and a float output: the sum,
    and the graph's output, are bf16."""
    q = QuantSpec(0.02, 3, 0, 127, torch.uint8)
    layer = Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)) if kind == "conv" else LinearSpec(16, 8))
    shape = (1, 4, 5, 5) if kind == "conv" else (2, 3, 16)
    spec = GraphSpec(f"q{kind}_binary", shape, q, layer, residual=Residual("float"), dtype="bf16")
    return build_example(spec)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bf16_sums_come_back_bf16_whatever_onednn_can_emit(kind: str, onednn_bf16: bool) -> None:
    # Issue 9, item 3: where oneDNN cannot emit the bf16 sum, the lowering computes it in fp32
    # (the fallback) and must convert it back: the lowered module returns bf16 either way.
    ex = _bf16_sum(kind)
    (reference,) = flat_tensors(ex.gm(*ex.inputs))
    assert reference.dtype == torch.bfloat16
    outcome = check_example(ex) if not onednn_bf16 else check_decisions(ex)  # + dtypes
    (binary,) = [n for n in outcome.lowered.graph.nodes if n.target in _BINARY_OPS]
    out_dtype = binary.args[14 if kind == "conv" else 10]
    converts = [u for u in binary.users if u.target is torch.ops.aten._to_copy.default]
    if onednn_bf16:
        assert out_dtype == torch.bfloat16 and not converts
    else:
        assert out_dtype == torch.float32
        assert [c.kwargs["dtype"] for c in converts] == [torch.bfloat16]


def test_a_linear_model_exported_under_bf16_autocast_returns_bf16(onednn_bf16: bool) -> None:
    # The reproduction: fc1(x) + fc2(x) quantized, then exported under
    # torch.autocast("cpu", bfloat16): the reference returns bf16.
    gm, inputs = _quantized_bf16("linear_add_linear_lhs")
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qlinear_binary"] == 1, report.summary()
    reference = gm(*inputs)
    assert reference.dtype == torch.bfloat16
    check_dtypes(lowered, inputs, [reference])
    if not onednn_bf16:
        assert lowered(*inputs).dtype == torch.bfloat16


#: The float interval each clamping post-op keeps; with a narrow (7-bit) output quant range
#: qalgebra folds that range into the post-op as one hardtanh instead of clamping afterwards.
CLAMP_INTERVALS = {
    "none": (-math.inf, math.inf),
    "relu": (0.0, math.inf),
    "relu6": (0.0, 6.0),
    "hardtanh": (-1.0, 1.0),
}


def _int8_output_range(gm: fx.GraphModule) -> tuple[float, int, int, int, torch.dtype]:
    """(scale, zero point, quant_min, quant_max, dtype) of the first layer's int8 output: the
    first quantize after the input's."""
    quants = [n for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default]
    _, scale, zp, qmin, qmax, dtype = quants[1].args
    assert isinstance(scale, float) and isinstance(zp, int)
    assert isinstance(qmin, int) and isinstance(qmax, int) and isinstance(dtype, torch.dtype)
    return scale, zp, qmin, qmax, dtype


def _expected_int8_attr(
    post: str, attrs: dict[str, tuple[str, list[float], str]], gm: fx.GraphModule
) -> tuple[str, list[float], str]:
    """The post-op of the layer whose int8 output feeds the next one, given the quantize's
    range; it must keep that quant range."""
    scale, zp, qmin, qmax, dtype = _int8_output_range(gm)
    narrow = (qmin, qmax) != (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if not narrow or post not in CLAMP_INTERVALS:
        return attrs[post]
    low, high = CLAMP_INTERVALS[post]
    return "hardtanh", [max(low, (qmin - zp) * scale), min(high, (qmax - zp) * scale)], ""


def _rounded(attr: tuple[object, ...]) -> tuple[object, ...]:
    name, scalars, algorithm = attr
    assert isinstance(scalars, list)
    return name, [round(float(s), 6) for s in scalars], algorithm


def _check_range_clamps(lowered: fx.GraphModule, gm: fx.GraphModule, folded: bool) -> None:
    """A narrow int8 output range (7-bit) is enforced once: folded into the post-op (hardtanh)
    or by one in-place clamp to exactly ``quant_max`` on the tensor the layer just wrote."""
    _, _, qmin, qmax, dtype = _int8_output_range(gm)
    narrow = (qmin, qmax) != (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    first = _fused_nodes(lowered)[0]
    clamps = [n for n in lowered.graph.nodes if "clamp" in str(n.target)]
    assert len(clamps) == (1 if narrow and not folded else 0)
    for clamp in clamps:  # uint8 [0, 127]: only the upper bound is not the dtype's
        assert (qmin, dtype) == (0, torch.uint8)
        assert clamp.target is torch.ops.aten.clamp_max_.default
        assert clamp.args == (first, qmax) and list(first.users) == [clamp]


def _two_fused(
    model: str, activations: str, target: object
) -> tuple[fx.GraphModule, fx.GraphModule, list[fx.Node]]:
    """``model`` quantized and lowered as ``activations`` say, and its two fused layers."""
    how = ACTIVATIONS[activations]
    gm, inputs = _quantized(model, how.reduce_range)
    with how.forced():
        lowered = lower(gm, inputs)
    fused = _fused_nodes(lowered)
    assert [n.target for n in fused] == [target] * 2
    return gm, lowered, fused


@pytest.mark.parametrize("activations", ["7bit", "8bit-vnni"])
@pytest.mark.parametrize("post", sorted(CONV_ATTRS))
def test_conv_post_op_attributes_and_output_dtypes(post: str, activations: str) -> None:
    gm, lowered, convs = _two_fused(f"conv2d_{post}", activations, onednn.qconv_pointwise.default)
    expected_first = _expected_int8_attr(post, CONV_ATTRS, gm)
    assert _rounded(tuple(convs[0].args[14:17])) == _rounded(expected_first)
    assert tuple(convs[1].args[14:17]) == CONV_ATTRS[post]
    assert convs[0].args[13] == torch.uint8  # conv1 feeds conv2 quantized
    assert convs[1].args[13] == torch.float32 and convs[1].args[11:13] == (1.0, 0)
    _check_range_clamps(lowered, gm, post in CLAMP_INTERVALS)


@pytest.mark.parametrize("activations", ["7bit", "8bit-vnni"])
@pytest.mark.parametrize("post", sorted(LINEAR_ATTRS))
def test_linear_post_op_attributes(post: str, activations: str) -> None:
    target = onednn.qlinear_pointwise.default
    gm, lowered, linears = _two_fused(f"linear_{post}", activations, target)
    expected_first = _expected_int8_attr(post, LINEAR_ATTRS, gm)
    assert _rounded(tuple(linears[0].args[10:13])) == _rounded(expected_first)
    assert _rounded(tuple(linears[1].args[10:13])) == _rounded(LINEAR_ATTRS[post])
    assert linears[0].args[9] == torch.uint8 and linears[1].args[9] == torch.float32
    _check_range_clamps(lowered, gm, post in CLAMP_INTERVALS)


@pytest.mark.parametrize(
    "name", ["conv_add_conv_rhs_relu_float_out", "linear_add_input_rhs_relu", "resnet_like_2"]
)
def test_never_writes_caller_tensors_nor_returns_an_alias(name: str) -> None:
    gm, inputs = _quantized(name)
    lowered = lower(gm, inputs)
    mine = [t.clone() for t in inputs]
    out = lowered(*mine)
    for ours, original in zip(mine, inputs, strict=True):
        assert torch.equal(ours, original)
        assert out.untyped_storage().data_ptr() != ours.untyped_storage().data_ptr()
    assert torch.equal(lowered(*mine), out)  # running twice gives the same result


def test_conv_accumulates_into_a_tensor_the_graph_owns() -> None:
    gm, inputs = _quantized("conv_add_conv_rhs_relu_float_out")
    lowered = lower(gm, inputs)
    (binary,) = [n for n in lowered.graph.nodes if n.target is onednn.qconv2d_pointwise.binary]
    accum = binary.args[6]
    assert isinstance(accum, fx.Node)
    assert accum.target is torch.ops.aten.clone.default or str(accum.target).startswith("onednn")
    assert accum.op == "call_function" and len(accum.users) == 1


def test_dynamic_batch_stays_symbolic() -> None:
    model, inputs = MODELS["resnet_like_2"]()
    gm = quantize_pt2e(model, inputs, dynamic_batch=True, reduce_range=True)
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qconv_binary"] == 2
    bigger = (torch.randn(5, *inputs[0].shape[1:]),)
    assert_close_to_reference(gm(*bigger), lowered(*bigger), gm)


def test_graph_without_quantization_comes_back_equivalent() -> None:
    model, inputs = MODELS["float_conv1d_relu"]()
    gm = torch.export.export(model, inputs).module()
    assert isinstance(gm, fx.GraphModule)
    lowered, report = lower_with_report(gm, inputs)
    assert report.total_fired == 0 and not report.refused
    assert torch.equal(lowered(*inputs), gm(*inputs))


def test_lowering_is_idempotent() -> None:
    gm, inputs = _quantized("resnet_like_2")
    once = lower(gm, inputs)
    twice, report = lower_with_report(once, inputs)
    family_counts = {k: v for k, v in report.fired.items() if k in EXPECTED["resnet_like_2"]}
    assert family_counts == {}
    assert torch.equal(twice(*inputs), once(*inputs))


def test_not_a_graph_module_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedGraphError, match=r"expected a torch\.fx\.GraphModule"):
        lower(torch.nn.ReLU(), (torch.randn(2),))  # type: ignore[arg-type]  # the bad input


def _with_first_quant_args(gm: fx.GraphModule, scale: float, zp: int) -> fx.GraphModule:
    new = FORMS["op"](gm)
    for n in new.graph.nodes:
        if n.target in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            n.args = (n.args[0], scale, zp, *n.args[3:])
    new.recompile()
    return new


@pytest.mark.parametrize(
    ("scale", "zp", "reason"),
    [(-0.02, 0, "scale"), (math.nan, 0, "scale"), (0.02, 300, "zero point")],
)
def test_invalid_qparams_are_left_unlowered_with_a_reason(
    scale: float, zp: int, reason: str
) -> None:
    gm, inputs = _quantized("conv2d_relu")
    bad = _with_first_quant_args(gm, scale, zp)
    lowered, report = lower_with_report(bad, inputs)
    assert report.fired["qconv"] == 0
    assert report.refused and all(reason in r.reason for r in report.refused)
    assert not _fused_nodes(lowered)


@pytest.mark.parametrize("saturating", [False, True])
def test_signed_int8_activation_conv_is_shifted_or_refused_by_the_probe(saturating: bool) -> None:
    gm, inputs = _quantized("conv2d_relu")
    signed = FORMS["op"](gm)
    for n in signed.graph.nodes:
        if n.target in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            n.args = (*n.args[:2], 0, -128, 127, torch.int8)
    signed.recompile()
    with isa.forced(int8_pairs_saturate=saturating):
        lowered, report = lower_with_report(signed, inputs)
    if saturating:  # shifted to [0, 255]: full-range products would overflow int16 pairs
        assert report.fired["qconv"] == 0
        assert report.refused and all("saturating" in r.reason for r in report.refused)
        assert torch.equal(lowered(*inputs), signed(*inputs))
    else:  # numerics: tests/test_lower_configs.py, with weights no CPU saturates on
        assert report.fired["qconv"] == 2 and not report.refused


def test_saturating_cpu_refuses_full_range_activations(pairs_saturate: bool) -> None:
    full_range, inputs = _quantized("conv2d_relu", reduce_range=False)
    lowered, report = lower_with_report(full_range, inputs)
    if pairs_saturate:
        assert report.fired["qconv"] == 0
        (refusal, _) = report.refused  # both convs, each with the reason and the way out
        assert "saturating int16 pairs" in refusal.reason and "reduce_range=True" in refusal.reason
        assert_close_to_reference(full_range(*inputs), lowered(*inputs), full_range)
    else:  # only a VNNI/AMX CPU computes these exactly: the decision is checked everywhere
        assert report.fired["qconv"] == 2 and not report.refused


def _failing_fusion() -> Fusion:
    def explode(m: Match, rw: Rewriter) -> fx.Node:
        rw.constant("half_built", torch.zeros(1))
        emit.aten.relu.default(rw, self=m.root)
        raise RuntimeError("replacement bug")

    conv = DEFAULT_FUSIONS[[f.name for f in DEFAULT_FUSIONS].index("qconv")]
    return Fusion("exploding", "test", conv.pattern, explode)


def test_a_failing_rewrite_leaves_the_caller_module_untouched() -> None:
    gm, inputs = _quantized("conv2d_relu")
    before, expected = gm.code, gm(*inputs)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(RewriteError, match="replacement bug"):
        lower(gm, inputs, fusions=(_failing_fusion(),), strict=True)
    lower(gm, inputs, fusions=(_failing_fusion(),))
    assert gm.code == before
    assert gm.state_dict().keys() == state.keys()
    assert not any("half_built" in name for name in dir(gm))
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    assert torch.equal(gm(*inputs), expected)


def test_a_failing_rewrite_is_rolled_back_reported_and_the_rest_lowers() -> None:
    gm, inputs = _quantized("conv2d_relu")
    exploding = _failing_fusion()
    qconv = DEFAULT_FUSIONS[[f.name for f in DEFAULT_FUSIONS].index("qconv")]
    lowered, report = lower_with_report(gm, inputs, fusions=(exploding, qconv))
    # The exploding fusion fails on both convs and each is rolled back; qconv then lowers both.
    assert [(f.fusion, f.error) for f in report.failed] == [
        ("exploding", "RuntimeError: replacement bug")
    ] * 2
    roots = [f.root for f in report.failed]
    assert all(root in {n.name for n in gm.graph.nodes} for root in roots)
    assert report.fired == {"qconv": 2} and not report.refused
    assert f"failed exploding at {roots[0]} (rolled back): RuntimeError" in report.summary()
    assert not any("half_built" in str(n.target) for n in lowered.graph.nodes)
    alone = lower(gm, inputs, fusions=(qconv,))  # nothing of the failed rewrites is left
    assert len(lowered.graph.nodes) == len(alone.graph.nodes)
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


def test_strict_lowering_names_the_fusion_and_node_and_chains_the_cause() -> None:
    gm, inputs = _quantized("conv2d_relu")
    with pytest.raises(RewriteError) as caught:
        lower_with_report(gm, inputs, fusions=(_failing_fusion(),), strict=True)
    error = caught.value
    assert isinstance(error, LoweringError) and error.fusion == "exploding"
    assert error.node in {n.name for n in gm.graph.nodes}
    assert str(error) == f"exploding failed at {error.node}: RuntimeError: replacement bug"
    assert isinstance(error.__cause__, RuntimeError) and "replacement bug" in str(error.__cause__)
    assert pickle.loads(pickle.dumps(error)).node == error.node  # crosses fuzz worker processes


def test_a_check_raising_while_matching_fails_only_its_fusion() -> None:
    from qalgebra.checks import satisfies
    from qalgebra.pattern import where

    def broken(m: Match) -> bool:
        raise ValueError("check bug")

    qconv = DEFAULT_FUSIONS[[f.name for f in DEFAULT_FUSIONS].index("qconv")]
    bad = Fusion(
        "bad_check", "test", where(qconv.pattern, satisfies(broken, "never")), qconv.rewrite
    )
    gm, inputs = _quantized("conv2d_relu")
    lowered, report = lower_with_report(gm, inputs, fusions=(bad, qconv))
    assert report.failed == [FailedRewrite("bad_check", "(matching)", "ValueError: check bug")]
    assert report.fired == {"qconv": 2}
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)
    with pytest.raises(RewriteError, match=r"bad_check failed at \(matching\): ValueError"):
        lower(gm, inputs, fusions=(bad, qconv), strict=True)


def test_the_lowered_module_holds_what_its_graph_reads_and_no_packed_state() -> None:
    gm, inputs = _quantized("conv2d_relu")
    lowered = lower(gm, inputs)
    read = {n.target for n in lowered.graph.nodes if n.op == "get_attr"}
    # What only the replaced nodes read (int8 weights, qparams) went with them.
    assert all(n.users or n.is_impure() for n in lowered.graph.nodes if n.op != "output")
    held = {name for name, _ in lowered.named_buffers()} | {
        name for name, _ in lowered.named_parameters()
    }
    held |= {k for k, v in vars(lowered).items() if isinstance(v, torch.Tensor)}
    assert read and read <= held  # every attribute the graph reads is there ...
    assert held <= read  # ... and nothing the lowering replaced (the int8 weights) is kept
    # Packed weights are opaque oneDNN tensors: they stay out of state_dict, and .to() leaves
    # them alone (plain attributes, which the generated code also reads fastest).
    packed = {t for t in read if isinstance(t, str) and t.startswith("_qalgebra_")}
    assert packed and not packed & set(lowered.state_dict())
    assert packed <= set(vars(lowered))
    before = {name: getattr(lowered, name) for name in packed}
    lowered.to(torch.float64)
    assert all(getattr(lowered, name) is tensor for name, tensor in before.items())


def test_report_names_unfused_quant_nodes() -> None:
    gm, inputs = _quantized("conv2d_relu")
    _, report = lower_with_report(gm, inputs)
    # The model input's quantize has no producer to fuse into: it stays, and is reported.
    assert len(report.unfused_quant_nodes) == 1
    assert "quantize_per_tensor" in report.unfused_quant_nodes[0]


def test_user_fusions_replace_the_catalog() -> None:
    gm, inputs = _quantized("conv2d_relu")
    only_linear: Sequence[Fusion] = [f for f in DEFAULT_FUSIONS if f.name == "qlinear"]
    _, report = lower_with_report(gm, inputs, fusions=only_linear)
    assert report.total_fired == 0


class _PermutedLinear(torch.nn.Module):
    """A linear on a permuted (non-contiguous) 3-D input: export spells it expand -> bmm."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.permute(1, 0, 2))
        return out


@pytest.mark.parametrize("bias", [True, False])
def test_non_contiguous_3d_linear_in_bmm_spelling_fuses(bias: bool) -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(5, 2, 16),)
    gm = quantize_pt2e(_PermutedLinear(bias).eval(), inputs, reduce_range=True)
    graph = decompose_compute(gm, inputs)
    assert any(n.target is torch.ops.aten.bmm.default for n in graph.graph.nodes)
    lowered, report = lower_with_report(graph, inputs)
    assert report.fired["qlinear"] == 1 and not report.refused, report.summary()
    targets = {n.target for n in lowered.graph.nodes}
    assert torch.ops.aten.bmm.default not in targets
    (fused,) = _fused_nodes(lowered)
    assert (fused.args[6] is not None) == bias
    assert_close_to_reference(graph(*inputs), lowered(*inputs), gm)


@pytest.mark.parametrize(
    ("name", "attr"),
    [
        ("conv2d_hardswish", "hardswish"),
        ("conv2d_silu", "swish"),
        ("linear_hardswish", "hardswish"),
        ("linear_silu", "swish"),
    ],
)
def test_post_ops_decomposed_by_default_decompositions_still_fuse(name: str, attr: str) -> None:
    # ExportedProgram.run_decompositions() with its default table spells hardswish as
    # x * clamp(clamp(x + 3, 0), None, 6) / 6 and silu as x * sigmoid(x).
    gm, inputs = _quantized(name)
    decomposed = torch.export.export(gm, inputs).run_decompositions().module()
    assert isinstance(decomposed, fx.GraphModule)
    spelled = {n.target for n in decomposed.graph.nodes}
    assert torch.ops.aten.hardswish.default not in spelled
    assert torch.ops.aten.silu.default not in spelled
    lowered, report = lower_with_report(decomposed, inputs)
    assert {k: v for k, v in report.fired.items() if k in EXPECTED[name]} == EXPECTED[name]
    fused = _fused_nodes(lowered)
    assert [n.args[14 if "conv" in str(n.target) else 10] for n in fused] == [attr, attr]
    assert_close_to_reference(decomposed(*inputs), lowered(*inputs), gm)


def test_lowering_restores_the_callers_thread_count() -> None:
    gm, inputs = _quantized("conv2d_relu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lower(gm, inputs)
        assert torch.get_num_threads() == 2
        with pytest.raises(RewriteError, match="replacement bug"):
            lower(gm, inputs, fusions=(_failing_fusion(),), strict=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("enabled", [True, False])
def test_lowering_pauses_the_garbage_collector_and_restores_the_callers_state(
    enabled: bool,
) -> None:
    import gc

    gm, inputs = _quantized("conv2d_relu")
    seen: list[bool] = []

    def spy(m: Match, rw: Rewriter) -> fx.Node:
        seen.append(gc.isenabled())
        raise Refusal("only looking")

    conv = DEFAULT_FUSIONS[[f.name for f in DEFAULT_FUSIONS].index("qconv")]
    before = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        lower(gm, inputs, fusions=(Fusion("spy", "test", conv.pattern, spy),))
        assert seen and not any(seen)
        assert gc.isenabled() is enabled
        with pytest.raises(RewriteError, match="replacement bug"):
            lower(gm, inputs, fusions=(_failing_fusion(),), strict=True)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if before else gc.disable)()


def test_a_layer_reading_a_fused_int8_output_fuses_in_decomposed_form_without_meta() -> None:
    # Found by the lowering properties (docs/findings.md, bug 2): the next layer's decomposed
    # dequant must learn the dtype of a node the lowering inserted, which has no meta['val'].
    q = QuantSpec(0.03, 0, 0, 127, torch.uint8)
    spec = GraphSpec(
        "qconv_binary",
        (1, 1, 1, 1),
        q,
        Layer(ConvSpec(1, 1, (1, 1))),
        residual=Residual("dequant", quant=q),
        output_quant=q,
        returns="quantized",
        consumer=Layer(ConvSpec(1, 1, (1, 1))),
        meta="export",
    )
    # check_example raises when any lowering property (fires, numerics, ...) fails.
    outcome = check_example(build_example(spec, form="decomposed"))
    assert outcome.report.fired["qconv"] == 1 and outcome.report.fired["qconv_binary"] == 1


class _ResidualOfItsOwnInput(torch.nn.Module):
    """relu(conv1(y) + y): the binary conv reads y as its activation *and* as the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv0(x))
        out: torch.Tensor = self.head(torch.relu(self.conv1(y) + y))
        return out


def test_a_conv_never_accumulates_into_its_own_input() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(2, 8, 8, 8),)
    gm = quantize_pt2e(_ResidualOfItsOwnInput().eval(), inputs, reduce_range=True)
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qconv_binary"] == 1
    (binary,) = [n for n in lowered.graph.nodes if n.target is onednn.qconv2d_pointwise.binary]
    x, accum = binary.args[0], binary.args[6]
    assert isinstance(accum, fx.Node) and accum is not x  # the copy stays: no elision here
    assert accum.target is torch.ops.aten.clone.default and accum.args[0] is x
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


class _BatchNormConvBatchNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn2 = torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn2(self.conv(self.bn1(x)))
        return out


def test_qat_batchnorm_conv_batchnorm_lowers() -> None:
    # Issue 9: torchao's move_exported_model_to_eval swaps the batch norm in by subgraph
    # rewriting and leaves its pattern's example shape on it; qconv_prepack was given that shape
    # as the activation's and failed ("could not create a primitive descriptor").
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 8, 8),)
    gm = quantize_pt2e(_BatchNormConvBatchNorm(), inputs, is_qat=True, reduce_range=True)
    (bn,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    assert list(bn.meta["val"].shape) == [1, 1, 3, 3]  # the stale shape this test is about
    lowered, report = lower_with_report(gm, inputs, strict=True)
    assert report.fired == {"qconv": 1} and not report.refused, report.summary()
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


def test_an_edit_behind_the_rewriters_back_that_defeats_rollback_stops_the_lowering() -> None:
    def sneaky(m: Match, rw: Rewriter) -> fx.Node:
        built = emit.aten.relu.default(rw, self=m.root)
        rw.graph.call_function(torch.ops.aten.neg.default, (built,))  # not through rw
        raise RuntimeError("replacement bug")

    qconv = DEFAULT_FUSIONS[[f.name for f in DEFAULT_FUSIONS].index("qconv")]
    gm, inputs = _quantized("conv2d_relu")
    before = gm.code
    with pytest.raises(LoweringError, match=r"rolling back sneaky at .* failed") as caught:
        lower(gm, inputs, fusions=(Fusion("sneaky", "test", qconv.pattern, sneaky),))
    assert "the input module is untouched" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert gm.code == before
