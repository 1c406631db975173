"""Lowering the graphs other quantization configs give, on real torchao graphs.

- **Dynamic activation quantization** (``get_default_x86_inductor_quantization_config(
  is_dynamic=True)``, PTQ and QAT): ``choose_qparams`` computes each activation's scale and zero
  point while the graph runs; quantize/dequantize are the ``.tensor`` overloads reading them.
  Linears (2-D, 3-D, with post-ops, added + relu, a dequant shared by two linears) lower to
  ``onednn.qlinear_pointwise.tensor`` / ``.binary_tensor`` reading the same runtime nodes; convs
  to ``onednn.qconv_pointwise.tensor``.
- **Per-tensor weights** (a per-tensor symmetric int8 weight observer): conv and linear lower
  with the one scale expanded per output channel.
- **Signed int8 activations**: linear takes them as they are; conv (uint8 only) takes them
  shifted by +128 with their zero point, folded into the quantize producing them when nothing
  else reads it, else an explicit shift.

Numerics are checked against the un-lowered graph run eagerly, on any CPU: activations are
7-bit (``reduce_range``) or the int8 weights are halved (every product pair then fits int16 even
where oneDNN saturates). The saturation refusals are checked with the probe forced both ways.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_lower import EXPECTED, _max_row_l1, assert_close_to_reference
from torch import fx, nn

from qalgebra import isa
from qalgebra.combinators import Unary
from qalgebra.fusions.promotion import DEQUANT_PROMOTION
from qalgebra.lower import LoweringReport, lower_with_report
from qalgebra.testing.config_strategies import (
    OTHER_CPU,
    DynamicLinearSpec,
    StaticLayerSpec,
    build_example,
)
from qalgebra.testing.models import MODELS
from qalgebra.testing.properties import check_example
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.strategies import QuantSpec

aten = torch.ops.aten
onednn = torch.ops.onednn
qd = torch.ops.quantized_decomposed

pytestmark = pytest.mark.usefixtures("one_thread")


class Promotion(nn.Module):
    """``linear2(y) + linear3(y)`` with ``y = linear1(x)``: the dequant of ``y`` is shared."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 4)
        self.linear2 = nn.Linear(4, 4)
        self.linear3 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear1(x)
        out: torch.Tensor = self.linear2(y) + self.linear3(y)
        return out


def _model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name.startswith("promotion"):
        torch.manual_seed(3)
        shape = (2, 3, 4) if name.endswith("3d") else (2, 4)
        return Promotion().eval(), (torch.randn(shape),)
    return MODELS[name]()


def _lowered(
    name: str, **config: Any
) -> tuple[fx.GraphModule, fx.GraphModule, LoweringReport, tuple[torch.Tensor, ...]]:
    model, inputs = _model(name)
    gm = quantize_pt2e(model, inputs, **{"reduce_range": True, **config})
    lowered, report = lower_with_report(gm, inputs)
    return gm, lowered, report, inputs


def _calls(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _arg(node: fx.Node, i: int) -> fx.Node:
    """Argument ``i`` of ``node``, which must be a node."""
    arg = node.args[i]
    assert isinstance(arg, fx.Node), f"{node.name} argument {i} is {arg!r}, not a node"
    return arg


def _runtime_scales(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[float]:
    """The scales ``choose_qparams`` computes when ``gm`` runs on ``inputs``."""
    scales: list[float] = []

    class Recorder(fx.Interpreter):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_function(target, args, kwargs)
            if target is qd.choose_qparams.tensor:
                scales.append(float(out[0]))
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return scales


def assert_close_to_dynamic_reference(
    gm: fx.GraphModule, lowered: fx.GraphModule, inputs: Sequence[torch.Tensor]
) -> None:
    """One step of the largest runtime scale on every input of the last layer (a layer's
    float rounding can move the next layer's runtime qparams and levels), and 99% of the
    elements within 1e-4 (a wrong scale or zero point moves them all)."""
    with torch.no_grad():
        reference, got = gm(*inputs), lowered(*inputs)
    assert got.shape == reference.shape and got.dtype == reference.dtype
    diff = (got - reference).abs()
    bound = 2 * max(_runtime_scales(gm, inputs)) * _max_row_l1(gm) + 1e-5
    assert float(diff.max()) <= bound, f"max diff {float(diff.max())} > {bound}"
    assert float((diff <= 1e-4).float().mean()) >= 0.99


# --------------------------------------------------------------------------------------------
# Dynamic activation quantization
# --------------------------------------------------------------------------------------------

#: What each model's dynamic graph must fuse (every linear, the dequant shared by two of them
#: promoted, an add of two linears into the binary qlinear); derived from the model structure.
DYNAMIC_EXPECTED = {
    "linear_relu": {"qlinear": 2},
    "linear3d_relu": {"qlinear": 2},
    "linear3d_gelu_tanh": {"qlinear": 2},
    "linear_nobias": {"qlinear": 2},
    # fc1(x) + other(x) -> relu -> fc2: x's dequant shared, the add fused with one of them
    "linear_add_linear_rhs_relu": {"qlinear_binary": 1, "qlinear": 2, "dequant_promotion": 1},
    "linear3d_add_linear_lhs": {"qlinear_binary": 1, "qlinear": 2, "dequant_promotion": 1},
    # PyTorch's dequant-promotion test: linear1, then linear2(y) + linear3(y)
    "promotion_2d": {"qlinear_binary": 1, "qlinear": 2, "dequant_promotion": 1},
    "promotion_3d": {"qlinear_binary": 1, "qlinear": 2, "dequant_promotion": 1},
    "conv2d_relu": {"qconv": 2},
}
_TRACKED = ("qconv", "qlinear", "qconv_binary", "qlinear_binary", "dequant_promotion")


def _fired(report: LoweringReport) -> dict[str, int]:
    return {k: report.fired[k] for k in _TRACKED if report.fired[k]}


@pytest.mark.parametrize("is_qat", [False, True], ids=["ptq", "qat"])
@pytest.mark.parametrize("name", sorted(DYNAMIC_EXPECTED))
def test_dynamic_quantization_fuses_with_runtime_qparams(name: str, is_qat: bool) -> None:
    gm, lowered, report, inputs = _lowered(name, dynamic=True, is_qat=is_qat)
    assert _calls(gm, qd.choose_qparams.tensor), "not a dynamically quantized graph"
    assert _fired(report) == DYNAMIC_EXPECTED[name], report.summary()
    assert not report.refused, report.summary()
    assert not _calls(lowered, qd.dequantize_per_tensor.tensor, qd.dequantize_per_tensor.default)
    fused = _calls(
        lowered,
        onednn.qlinear_pointwise.tensor,
        onednn.qlinear_pointwise.binary_tensor,
        onednn.qconv_pointwise.tensor,
    )
    assert len(fused) == sum(v for k, v in DYNAMIC_EXPECTED[name].items() if k.startswith("q"))
    for node in fused:  # the scale and zero point choose_qparams computes, read as they are
        scale, zero_point = node.args[1:3]
        assert isinstance(scale, fx.Node) and isinstance(zero_point, fx.Node)
        assert [a.args[1] for a in (scale, zero_point)] == [0, 1]
        assert scale.args[0] is zero_point.args[0]
        assert _arg(scale, 0).target is qd.choose_qparams.tensor
    assert_close_to_dynamic_reference(gm, lowered, inputs)


def test_dynamic_add_relu_is_one_binary_tensor_op() -> None:
    _, lowered, _, _ = _lowered("linear_add_linear_rhs_relu", dynamic=True)
    (binary,) = _calls(lowered, onednn.qlinear_pointwise.binary_tensor)
    # the dynamic graph's add is float32: summed into (a clone of) the residual
    assert binary.args[13:16] == ("sum", 1.0, "relu")
    assert binary.args[10] == torch.float32
    assert not _calls(lowered, aten.add.Tensor, aten.relu.default)


def test_dynamic_promotion_copies_the_dequant_reading_the_same_runtime_qparams() -> None:
    model, inputs = _model("promotion_2d")
    gm = quantize_pt2e(model, inputs, dynamic=True, reduce_range=True)
    promoted, report = lower_with_report(gm, inputs, fusions=(DEQUANT_PROMOTION,))
    assert report.fired["dequant_promotion"] == 1
    dequants = _calls(promoted, qd.dequantize_per_tensor.tensor)
    by_input = Counter(d.args[0] for d in dequants)
    (shared_input, copies) = max(by_input.items(), key=lambda kv: kv[1])
    assert copies == 2 and all(len(d.users) == 1 for d in dequants)
    twins = [d for d in dequants if d.args[0] is shared_input]
    assert twins[0].args[1:] == twins[1].args[1:]  # the same scale and zero point nodes
    assert torch.equal(promoted(*inputs), gm(*inputs))


def _runtime_qparams_graph() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """``linear(dequant(quant(x, s, zp)), w)`` with ``s`` and ``zp`` graph inputs."""
    g = fx.Graph()
    x, scale, zero_point = (g.placeholder(n) for n in ("x", "scale", "zero_point"))
    qparams = (scale, zero_point, 0, 127, torch.uint8)
    q = g.call_function(qd.quantize_per_tensor.tensor, (x, *qparams))
    d = g.call_function(qd.dequantize_per_tensor.tensor, (q, *qparams))
    module = nn.Module()
    w = torch.randint(-127, 128, (5, 8), generator=torch.Generator().manual_seed(1))
    module.register_buffer("w", w.to(torch.int8))
    module.register_buffer("w_scales", torch.full((5,), 0.01))
    module.register_buffer("w_zps", torch.zeros(5, dtype=torch.int64))
    wd = g.call_function(
        qd.dequantize_per_channel.default,
        (g.get_attr("w"), g.get_attr("w_scales"), g.get_attr("w_zps"), 0, -128, 127, torch.int8),
    )
    g.output(g.call_function(aten.linear.default, (d, wd)))
    inputs = (
        torch.randn(3, 8, generator=torch.Generator().manual_seed(2)),
        torch.tensor([0.03], dtype=torch.float64),
        torch.tensor([40]),
    )
    return fx.GraphModule(module, g), inputs


def test_runtime_qparams_from_graph_inputs() -> None:
    gm, inputs = _runtime_qparams_graph()
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qlinear"] == 1
    (fused,) = _calls(lowered, onednn.qlinear_pointwise.tensor)
    assert [_arg(fused, i).op for i in (1, 2)] == ["placeholder", "placeholder"]
    torch.testing.assert_close(lowered(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)
    # Other qparams at run time: the lowered module reads them, it did not bake them in.
    other = (inputs[0], torch.tensor([0.05], dtype=torch.float64), torch.tensor([7]))
    torch.testing.assert_close(lowered(*other), gm(*other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("saturating", [False, True])
def test_full_range_dynamic_activations_follow_the_saturation_probe(saturating: bool) -> None:
    model, inputs = _model("linear_relu")
    full = quantize_pt2e(model, inputs, dynamic=True, reduce_range=False)
    with isa.forced(int8_pairs_saturate=saturating):
        lowered, report = lower_with_report(full, inputs)
    if saturating:  # activations up to 255 times weights up to 127 overflow int16 pairs
        assert report.fired["qlinear"] == 0
        assert report.refused and all("saturating" in r.reason for r in report.refused)
        assert torch.equal(lowered(*inputs), full(*inputs))
    else:
        assert report.fired["qlinear"] == 2 and not report.refused


# --------------------------------------------------------------------------------------------
# Per-tensor weights
# --------------------------------------------------------------------------------------------

PER_TENSOR_MODELS = (
    "conv2d_relu",
    "conv2d_hardswish",
    "linear_relu",
    "linear3d_gelu_tanh",
    "conv_add_conv_lhs",
    "linear_add_linear_rhs_relu",
)


@pytest.mark.parametrize("is_qat", [False, True], ids=["ptq", "qat"])
@pytest.mark.parametrize("name", PER_TENSOR_MODELS)
def test_per_tensor_weights_fuse_as_per_channel_ones(name: str, is_qat: bool) -> None:
    gm, lowered, report, inputs = _lowered(name, weight_per_tensor=True, is_qat=is_qat)
    weight_dequants = [
        n for n in _calls(gm, qd.dequantize_per_tensor.default) if _arg(n, 0).op == "get_attr"
    ]
    assert weight_dequants and not _calls(gm, qd.dequantize_per_channel.default)
    assert _fired(report) == EXPECTED[name], report.summary()
    assert not report.refused, report.summary()
    left = _calls(lowered, qd.dequantize_per_tensor.default)
    assert not [n for n in left if _arg(n, 0).op == "get_attr"], "a weight dequant is left"
    scales = sorted(n.args[1] for n in weight_dequants if isinstance(n.args[1], float))
    assert len(scales) == len(weight_dequants)
    fused = [n for n in lowered.graph.nodes if str(n.target).startswith("onednn.q")]
    expanded = sorted(float(getattr(lowered, n.args[4].target)[0]) for n in fused)
    for node in fused:  # one scale per output channel, all the per-tensor one
        w_scales = getattr(lowered, node.args[4].target)
        assert w_scales.dtype == torch.float32 and w_scales.dim() == 1
        assert torch.equal(w_scales, torch.full_like(w_scales, float(w_scales[0])))
    assert expanded == pytest.approx(scales, rel=1e-7)
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


def test_per_tensor_weight_with_a_zero_point_is_refused() -> None:
    gm, _, _, inputs = _lowered("linear_relu", weight_per_tensor=True)
    asymmetric = copy.deepcopy(gm)
    for n in _calls(asymmetric, qd.dequantize_per_tensor.default):
        if _arg(n, 0).op == "get_attr":
            n.args = (n.args[0], n.args[1], 3, *n.args[3:])
    asymmetric.recompile()
    lowered, report = lower_with_report(asymmetric, inputs)
    assert report.fired["qlinear"] == 0
    assert report.refused and all("weight zero points" in r.reason for r in report.refused)
    assert torch.equal(lowered(*inputs), asymmetric(*inputs))


# --------------------------------------------------------------------------------------------
# Signed int8 activations
# --------------------------------------------------------------------------------------------


def _halved_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose int8 weights are halved (|w| <= 64): ``2 * 255 * 64`` fits int16, so even
    a saturating CPU computes the shifted activations' products right."""
    new = copy.deepcopy(gm)
    for node in new.graph.nodes:
        is_weight_dequant = node.target in (
            qd.dequantize_per_channel.default,
            qd.dequantize_per_tensor.default,
        )
        if is_weight_dequant and node.args[0].op == "get_attr":
            w = getattr(new, node.args[0].target)
            setattr(new, node.args[0].target, torch.div(w, 2, rounding_mode="trunc"))
    return new


def _signed(name: str, **config: Any) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = _model(name)
    gm = quantize_pt2e(model, inputs, act_dtype=torch.int8, reduce_range=False, **config)
    return _halved_weights(gm), inputs


SIGNED_CONV_MODELS = ("conv2d_relu", "conv2d_none", "conv_add_conv_lhs", "resnet_like_2")


@pytest.mark.parametrize("saturating", [False, True])
@pytest.mark.parametrize("name", SIGNED_CONV_MODELS)
def test_int8_activations_into_conv_are_shifted_exactly(name: str, saturating: bool) -> None:
    gm, inputs = _signed(name)
    with isa.forced(int8_pairs_saturate=saturating):  # the halved weights fit either way
        lowered, report = lower_with_report(gm, inputs)
    assert _fired(report) == EXPECTED[name], report.summary()
    # quantized.max_pool2d takes uint8 only: the ResNet stem's pool stays in float.
    assert all(r.fusion == "quant_lift_up_max_pool" for r in report.refused), report.summary()
    convs = _calls(lowered, onednn.qconv_pointwise.default, onednn.qconv2d_pointwise.binary)
    for conv in convs:  # a folded (uint8) quantize, maybe fused as a conv's output, or a shift
        x = _arg(conv, 0)
        if x.target is aten.bitwise_xor.Scalar:
            assert x.args[1] == 128
            assert _arg(x, 0).target is aten.view.dtype and _arg(x, 0).args[1] == torch.uint8
        else:
            assert x.target is qd.quantize_per_tensor.default or x in convs
    assert set(_conv_input_dtypes(lowered, inputs)) == {torch.uint8}
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


def _conv_input_dtypes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.dtype]:
    """The dtype of the activation each fused conv reads when ``gm`` runs."""
    seen: list[torch.dtype] = []

    class Recorder(fx.Interpreter):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            if str(target).startswith("onednn.qconv"):
                seen.append(args[0].dtype)
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def test_the_shift_is_folded_into_the_quantize_read_only_by_the_conv() -> None:
    gm, inputs = _signed("conv2d_relu")
    (first_quant, *_) = _calls(gm, qd.quantize_per_tensor.default)
    _, scale, zero_point, low, high, dtype = first_quant.args
    assert (low, high, dtype) == (-128, 127, torch.int8)
    lowered = lower_with_report(gm, inputs)[0]
    first_conv = _calls(lowered, onednn.qconv_pointwise.default)[0]
    folded = _arg(first_conv, 0)
    assert folded.target is qd.quantize_per_tensor.default
    assert _arg(folded, 0).op == "placeholder"  # reads the float input itself
    assert isinstance(zero_point, int)
    assert folded.args[1:] == (scale, zero_point + 128, 0, 255, torch.uint8)
    assert first_conv.args[1:3] == (scale, zero_point + 128)
    # The int8 quantize is gone: nothing computes the activation twice.
    assert not [
        n for n in _calls(lowered, qd.quantize_per_tensor.default) if n.args[5] == torch.int8
    ]


def test_int8_levels_read_elsewhere_are_shifted_by_a_sign_bit_flip() -> None:
    # The int8 tensor is also a graph output: its quantize stays, the conv reads a shifted copy.
    spec = StaticLayerSpec(
        "signed_conv",
        "conv",
        (2, 3, 5, 5),
        4,
        QuantSpec(0.05, -7, -128, 127, torch.int8),
        producer="shared",
        weight_max=64,
    )
    ex = build_example(spec)
    outcome = check_example(ex)  # fires, runs, numerics, inputs untouched, idempotent
    assert outcome.report.fired["qconv"] == 1
    (conv,) = _calls(outcome.lowered, onednn.qconv_pointwise.default)
    assert _arg(conv, 0).target is aten.bitwise_xor.Scalar
    assert conv.args[2] == -7 + 128
    int8_out = outcome.lowered(*ex.inputs)[1]
    assert int8_out.dtype == torch.int8 and torch.equal(int8_out, ex.gm(*ex.inputs)[1])


@pytest.mark.parametrize("is_qat", [False, True], ids=["ptq", "qat"])
def test_dynamic_int8_activations_into_conv_shift_the_runtime_zero_point(is_qat: bool) -> None:
    gm, inputs = _signed("conv2d_relu", dynamic=True, is_qat=is_qat)
    lowered, report = lower_with_report(gm, inputs)
    assert _fired(report) == {"qconv": 2} and not report.refused
    for conv in _calls(lowered, onednn.qconv_pointwise.tensor):
        x, zero_point = _arg(conv, 0), _arg(conv, 2)
        assert zero_point.target is aten.add.Scalar and zero_point.args[1] == 128
        assert x.target is qd.quantize_per_tensor.tensor  # folded: a uint8 runtime quantize
        assert x.args[2] is zero_point and x.args[3:] == (0, 255, torch.uint8)
    assert_close_to_dynamic_reference(gm, lowered, inputs)


@pytest.mark.parametrize("saturating", [False, True])
def test_full_range_int8_activations_follow_the_saturation_probe(saturating: bool) -> None:
    model, inputs = _model("conv2d_relu")
    gm = quantize_pt2e(model, inputs, act_dtype=torch.int8, reduce_range=False)
    with isa.forced(int8_pairs_saturate=saturating):
        lowered, report = lower_with_report(gm, inputs)
    if saturating:  # shifted to [0, 255], times weights up to 127: refused
        assert report.fired["qconv"] == 0
        assert report.refused and all("saturating" in r.reason for r in report.refused)
        assert torch.equal(lowered(*inputs), gm(*inputs))
    else:
        assert report.fired["qconv"] == 2 and not report.refused


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_a_graph_input_s_range_is_known_only_where_its_dequantize_states_it(
    form: str, pairs_saturate: bool
) -> None:
    # Found by a fuzz campaign on an AVX2 EPYC: int8 levels in [-64, 63] from a graph input,
    # weights up to 67. Shifted to [64, 191] the pair sums fit int16 (2 * 191 * 67 < 32767); a
    # decomposed dequantize (convert, mul) states no range, so there the input may hold all of
    # int8 -- [0, 255] shifted, which can overflow -- and a saturating CPU must refuse.
    spec = StaticLayerSpec(
        "signed_conv",
        "conv",
        (1, 1, 3, 3),
        1,
        QuantSpec(0.25, 0, -64, 63, torch.int8),
        producer="input",
        kernel=1,
        weight_max=127,
        weight_scale=0.03125,
        seed=6,
    )
    ex = build_example(spec, form)
    weight: object = ex.gm.w
    assert isinstance(weight, torch.Tensor)
    weight_max = int(weight.abs().max())
    assert 2 * 191 * weight_max <= 32767 < 2 * 255 * weight_max
    refused = pairs_saturate and form == "decomposed"
    assert ex.expected.fired["qconv"] == int(not refused)
    outcome = check_example(ex)  # the lowering agrees with the expectation, numerics hold
    assert outcome.report.fired["qconv"] == int(not refused)
    assert [r.cause for r in outcome.report.refused] == (
        ["probe:int8_pairs_saturate"] if refused else []
    )


def test_int8_activations_into_linear_are_taken_as_they_are() -> None:
    gm, inputs = _signed("linear_relu")
    lowered, report = lower_with_report(gm, inputs)
    assert _fired(report) == {"qlinear": 2}
    for fused in _calls(lowered, onednn.qlinear_pointwise.default):
        assert _arg(fused, 0).target is not aten.bitwise_xor.Scalar
    assert not _calls(lowered, aten.bitwise_xor.Scalar)
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


@pytest.mark.parametrize("machine_saturates", [False, True])
def test_fused_layers_are_checked_by_decisions_only_where_this_cpu_would_saturate(
    machine_saturates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the probe forced to "does not saturate": the layers fuse; on a CPU whose pairs do
    # saturate (the measured answer, pretended here) their numbers cannot be checked
    monkeypatch.setitem(isa._measured, "int8_pairs_saturate", lambda: machine_saturates)
    spec = DynamicLinearSpec(
        input_shape=(4, 11), out_features=(1,), post_ops=(Unary.NONE,), bias=False,
        combine="apart", share_dequant=False, weight_max=127, seed=0,
    )  # fmt: skip
    static = StaticLayerSpec(
        family="per_tensor_weight", kind="conv", input_shape=(1, 2, 3, 3), out_channels=2,
        act=QuantSpec(0.25, 0, 0, 255, torch.uint8), producer="quantize", kernel=3, bias=False,
        relu=False, weight_per_tensor=True, weight_max=127, weight_scale=0.03125,
    )  # fmt: skip
    for layer in (spec, static):
        with isa.forced(int8_pairs_saturate=False):
            example = build_example(layer)
        (bound,) = example.expected.outputs[:1]
        assert sum(example.expected.fired.values()) == 1
        assert (bound.why == OTHER_CPU) is machine_saturates, bound
