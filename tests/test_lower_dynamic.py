"""Dynamic fp16 linear and smooth-quant ``_int_mm`` lowering, on real exported graphs.

Dynamic fp16: two flows give the graph. (1) torchao's ``X86InductorQuantizer`` with
``get_x86_inductor_linear_dynamic_fp16_config()`` on ``nn.Linear`` (+ relu), i.e. the graph
Inductor's ``_register_linear_dynamic_fp16_weight_prepack`` is written for: the weight goes
through ``quantized_decomposed.convert_element_type.no_fuse`` to fp16 and back to fp32. (2) A
module storing its weight in fp16, ``F.linear(x, w16.float(), b)``. Numerics: the fp16 rounding
of the weight is already in the reference (the un-lowered graph run eagerly), so the lowered op
differs only by the order of the fp32 accumulation: bound ``(2K + 6) u32`` times
``|x| @ |w|.T + |b|`` elementwise; measured within ~1e-7 of that magnitude.

``_int_mm``: a hand-written smooth-quant module (per-token dynamic or static per-tensor int8
quantization of x, ``torch._int_mm`` with an int8 ``[K, N]`` weight, ``* x_scale * w_scale [+
bias]``), and torchao's ``Int8DynamicActivationInt8WeightConfig`` exported after
``unwrap_tensor_subclass``. The int32 accumulation is exact on both sides; the float steps
round differently (the reference rounds after each multiplication, in bf16 for a bf16 output):
bound ``8 u`` of the output dtype times ``|acc| |x_scale| |w_scale| + |b|``. On a CPU without
VNNI the signed-activation kernel saturates unless the weights are within [-64, 64]: full-range
weights are refused there, lowered elsewhere (both decisions asserted on every CPU, with
``qalgebra.isa.int8_pairs_saturate`` forced), 7-bit weights are lowered and checked everywhere.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from qalgebra import isa
from qalgebra.lower import LoweringReport, lower_with_report
from qalgebra.testing.woq_strategies import (
    FamilyCase,
    dynamic_fp16_case,
    dynamic_fp16_cases,
    int_mm_case,
    int_mm_cases,
)

aten = torch.ops.aten
onednn = torch.ops.onednn
BF16, FP32 = torch.bfloat16, torch.float32
MATMULS = frozenset(
    {
        aten.mm.default,
        aten.bmm.default,
        aten.addmm.default,
        aten.linear.default,
        aten._int_mm.default,
    }
)
FAMILIES = ("linear_dynamic_fp16", "int_mm_linear")


def _calls(gm: fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _family(report: LoweringReport) -> dict[str, int]:
    return {k: v for k, v in report.fired.items() if k in FAMILIES and v}


def _lower_and_check(case: FamilyCase) -> tuple[fx.GraphModule, LoweringReport]:
    before = case.graph.code
    lowered, report = lower_with_report(case.graph, case.inputs)
    assert case.graph.code == before, "the input module was modified"
    lowered.graph.lint()
    why = case.check(case.graph(*case.inputs), lowered(*case.inputs))
    assert why is None, f"{case.description}: {why}"
    return lowered, report


SHAPES = {"2d": (2, False), "3d": (3, False), "3d_transposed": (3, True)}

# --------------------------------------------------------------------------------------------
# Dynamic fp16
# --------------------------------------------------------------------------------------------


#: (shape, bias, relu, form): every value of each, every pair of shape x form.
FP16_CASES = [
    ("2d", True, False, "op"),
    ("2d", False, True, "compute"),
    ("3d", False, False, "op"),
    ("3d", True, True, "compute"),
    ("3d_transposed", True, True, "op"),
    ("3d_transposed", False, False, "compute"),
    ("3d_transposed", True, False, "compute"),
]


@pytest.mark.parametrize(("shape", "bias", "relu", "form"), FP16_CASES)
def test_fp16_weight_linear_lowers_to_linear_dynamic_fp16(
    shape: str, bias: bool, relu: bool, form: str
) -> None:
    rank, transpose = SHAPES[shape]
    case = dynamic_fp16_case(
        seed=2, k=24, n=12, rows=5, rank=rank, transpose_input=transpose, bias=bias,
        relu=relu, flow="fp16_weight", form=form,
    )  # fmt: skip
    lowered, report = _lower_and_check(case)
    assert _family(report) == {"linear_dynamic_fp16": 1}, report.summary()
    assert not report.refused
    calls = _calls(lowered)
    op = onednn.linear_relu_dynamic_fp16.default if relu else onednn.linear_dynamic_fp16.default
    assert calls.count(op) == 1 and len([c for c in calls if str(c).startswith("onednn")]) == 1
    assert not MATMULS.intersection(calls) and aten.relu.default not in calls
    (node,) = [n for n in lowered.graph.nodes if n.target is op]
    packed = getattr(lowered, node.args[1].target)  # prepacked at lowering time, a constant
    assert packed.dtype == torch.float16 and list(packed.shape) == [24, 12]
    assert (node.args[2] is not None) == bias


@pytest.mark.parametrize("form", ["op", "compute"])
@pytest.mark.parametrize("x_shape", [(4, 16), (2, 3, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_x86_quantizer_dynamic_fp16_flow(bias: bool, x_shape: tuple[int, ...], form: str) -> None:
    """nn.Linear -> relu -> nn.Linear quantized with the dynamic fp16 config: one relu variant,
    one plain, as Inductor's pass gives (linear_relu_dynamic_fp16, linear_dynamic_fp16)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from qalgebra.testing.forms import decompose_compute

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=bias), nn.ReLU(), nn.Linear(8, 4, bias=bias))
    x = torch.randn(x_shape)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_x86_inductor_linear_dynamic_fp16_config())
    exported = torch.export.export(model.eval(), (x,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    prepared(x)
    graph = convert_pt2e(prepared)
    assert isinstance(graph, fx.GraphModule)
    no_fuse = torch.ops.quantized_decomposed.convert_element_type.no_fuse
    assert no_fuse in _calls(graph)
    if form == "compute":
        graph = decompose_compute(graph, (x,))
    lowered, report = lower_with_report(graph, (x,))
    assert _family(report) == {"linear_dynamic_fp16": 2}, report.summary()
    calls = _calls(lowered)
    assert calls.count(onednn.linear_relu_dynamic_fp16.default) == 1
    assert calls.count(onednn.linear_dynamic_fp16.default) == 1
    assert not MATMULS.intersection(calls) and no_fuse not in calls
    torch.testing.assert_close(lowered(x), graph(x), rtol=0, atol=1e-5)


class _Bf16WeightLinear(nn.Module):
    w: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 16).to(BF16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.w.float())


class _Fp16WeightOddBias(nn.Module):
    w: torch.Tensor
    b: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 16).half())
        self.register_buffer("b", torch.randn(1))  # broadcast, not one per output feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.w.float(), self.b)


def test_weights_not_rounded_through_fp16_are_left_alone() -> None:
    x = torch.randn(4, 16)
    graph = torch.export.export(_Bf16WeightLinear(), (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    lowered, report = lower_with_report(graph, (x,))
    assert report.total_fired == 0 and not report.refused
    assert torch.equal(lowered(x), graph(x))


def test_a_bias_that_is_not_one_per_output_feature_is_refused() -> None:
    x = torch.randn(4, 16)
    graph = torch.export.export(_Fp16WeightOddBias(), (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    lowered, report = lower_with_report(graph, (x,))
    assert _family(report) == {}
    (refusal,) = report.refused
    assert refusal.fusion == "linear_dynamic_fp16" and "is not an fp32 [8] tensor" in refusal.reason
    assert torch.equal(lowered(x), graph(x))


# --------------------------------------------------------------------------------------------
# Smooth-quant _int_mm
# --------------------------------------------------------------------------------------------


#: (static x scale, rank, bias, output dtype, form): every pair of values appears.
INT_MM_CASES = [
    (False, 2, False, FP32, "op"),
    (False, 3, True, BF16, "compute"),
    (False, 3, True, FP32, "op"),
    (False, 2, True, BF16, "op"),
    (True, 2, True, FP32, "compute"),
    (True, 3, False, BF16, "op"),
    (True, 3, True, FP32, "op"),
    (True, 2, True, BF16, "op"),
    (False, 2, False, BF16, "compute"),
    (True, 3, False, FP32, "compute"),
]


@pytest.mark.parametrize(("static", "rank", "bias", "out_dtype", "form"), INT_MM_CASES)
def test_int_mm_lowers_to_qlinear_pointwise(
    static: bool, rank: int, bias: bool, out_dtype: torch.dtype, form: str
) -> None:
    case = int_mm_case(
        seed=4, k=48, n=16, rows=6, rank=rank, bias=bias, out_dtype=out_dtype,
        static_x_scale=static, form=form,
    )  # fmt: skip
    lowered, report = _lower_and_check(case)
    assert _family(report) == {"int_mm_linear": 1}, report.summary()
    assert not report.refused
    calls = _calls(lowered)
    assert not MATMULS.intersection(calls)
    if static:  # one activation scale: it goes into the op, as does the bias (as Inductor)
        (node,) = [n for n in lowered.graph.nodes if n.target is onednn.qlinear_pointwise.tensor]
        assert onednn.qlinear_pointwise.default not in calls
        assert (node.args[6] is not None) == bias  # the bias is in the output dtype
    else:  # per token: x_scale = 1.0 in the op, the [M, 1] scale multiplied after it
        (node,) = [n for n in lowered.graph.nodes if n.target is onednn.qlinear_pointwise.default]
        assert node.args[1:3] == (1.0, 0) and node.args[6] is None
        (scaled,) = list(node.users)
        assert scaled.target is aten.mul.Tensor
    assert node.args[9] in (FP32, BF16)
    packed = getattr(lowered, node.args[3].target)  # prepacked at lowering time
    assert packed.dtype == torch.int8 and list(packed.shape) == [48, 16]
    w_scale = getattr(lowered, node.args[4].target)
    assert w_scale.dtype == FP32 and list(w_scale.shape) == [16]


def test_full_range_weights_are_refused_on_a_saturating_cpu(pairs_saturate: bool) -> None:
    case = int_mm_case(seed=5, k=64, n=16, weight_max=127)
    lowered, report = lower_with_report(case.graph, case.inputs)
    if pairs_saturate:
        assert _family(report) == {}
        (refusal,) = report.refused
        assert refusal.fusion == "int_mm_linear" and "saturating int16" in refusal.reason
        assert torch.ops.aten._int_mm.default in _calls(lowered)
        why = case.check(case.graph(*case.inputs), lowered(*case.inputs))
        assert why is None, why
    else:  # only a VNNI/AMX CPU computes full-range signed products exactly: decisions only
        assert _family(report) == {"int_mm_linear": 1} and not report.refused
        assert torch.ops.aten._int_mm.default not in _calls(lowered)


def _torchao_int8_dynamic(
    dtype: torch.dtype, x_shape: tuple[int, ...], *, weight_max: int
) -> tuple[fx.GraphModule, torch.Tensor]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.utils import unwrap_tensor_subclass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).to(dtype).eval()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    unwrap_tensor_subclass(model)
    linear: Any = model[0]
    qdata = linear.parametrizations.weight.original0
    qdata.data = qdata.data.clamp(-weight_max, weight_max)  # 7-bit weights where asked
    x = torch.randn(x_shape, dtype=dtype)
    graph = torch.export.export(model, (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    return graph, x


@pytest.mark.parametrize("x_shape", [(20, 32), (2, 10, 32)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_torchao_int8_dynamic_activation_flow(dtype: torch.dtype, x_shape: tuple[int, ...]) -> None:
    full, x = _torchao_int8_dynamic(dtype, x_shape, weight_max=127)
    assert aten._int_mm.default in _calls(full)
    for saturating in (True, False):  # torchao's symmetric weights span [-127, 127]
        with isa.forced(int8_pairs_saturate=saturating):
            _, report = lower_with_report(full, (x,))
        refused = [r.fusion for r in report.refused if "saturating int16" in r.reason]
        assert refused == (["int_mm_linear"] if saturating else [])
        assert _family(report) == ({} if saturating else {"int_mm_linear": 1})
    seven_bit, x = _torchao_int8_dynamic(dtype, x_shape, weight_max=64)
    lowered, report = lower_with_report(seven_bit, (x,))
    assert _family(report) == {"int_mm_linear": 1}, report.summary()
    calls = _calls(lowered)
    assert onednn.qlinear_pointwise.default in calls and aten._int_mm.default not in calls
    reference, ours = seven_bit(x), lowered(x)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    # Reference rounds to the model dtype between the two scales; ours does not.
    tolerance = 1e-5 if dtype == FP32 else 2**-7
    torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)


class _ScaledElementwise(nn.Module):
    """``_int_mm`` scaled by a full ``[M, N]`` tensor and a weight scale: no per-token scale."""

    w: torch.Tensor
    w_scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randint(-64, 65, (16, 8), dtype=torch.int8))
        self.register_buffer("w_scale", torch.rand(8))

    def forward(self, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(a, self.w).to(torch.float32) * scale * self.w_scale


def test_scales_whose_roles_cannot_be_told_apart_are_refused() -> None:
    inputs = (torch.randint(-128, 128, (4, 16), dtype=torch.int8), torch.rand(4, 8))
    graph = torch.export.export(_ScaledElementwise(), inputs).module()
    assert isinstance(graph, fx.GraphModule)
    lowered, report = lower_with_report(graph, inputs)
    assert _family(report) == {}
    (refusal,) = report.refused
    assert "cannot tell the weight scale" in refusal.reason
    assert torch.equal(lowered(*inputs), graph(*inputs))


# --------------------------------------------------------------------------------------------
# The strategies other campaigns import
# --------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(st.one_of(dynamic_fp16_cases(), int_mm_cases()))
def test_drawn_dynamic_graphs_fire_as_expected_with_reference_numerics(case: FamilyCase) -> None:
    _, report = _lower_and_check(case)
    why = case.check_report(report.fired, [r.fusion for r in report.refused])
    assert why is None, f"{case.description}: {why}\n{report.summary()}"
    assert Counter(r.fusion for r in report.refused) == Counter(dict(case.refused))


def test_dynamic_patterns_rebuild_from_their_repr() -> None:
    import qalgebra
    import qalgebra.checks
    import qalgebra.combinators
    import qalgebra.fusions.woq as woq
    import qalgebra.pattern
    from qalgebra.fusions.dynamic_fp16 import LINEAR_DYNAMIC_FP16
    from qalgebra.fusions.int_mm import INT_MM

    namespace = {
        **vars(qalgebra.pattern),
        **vars(qalgebra.checks),
        "torch": torch,
        "qalgebra": qalgebra,
        "Unary": qalgebra.combinators.Unary,
        "LinearForm": qalgebra.combinators.LinearForm,
        **{name: getattr(woq, name) for name in woq.__all__},
    }
    for fusion in (LINEAR_DYNAMIC_FP16, INT_MM):
        assert eval(repr(fusion.pattern), namespace) == fusion.pattern
