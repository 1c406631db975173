"""Int8 squeeze-excitation and attention blocks, quantized by torchao and lowered.

Squeeze-excitation (``x * gate(fc2(act(fc1(avgpool(x)))))``, with x the output of a conv and its
activation): X86InductorQuantizer quantizes the pool int8 in, int8 out (its input quantize reads
the conv's activation, its output shares the input's qparams), so the graph holds ``dequant ->
adaptive_avg_pool2d -> quant``, which ``qmean`` lowers to a mean of the int8 levels. The gate's
``mul`` broadcasts a ``[N, C, 1, 1]`` gate over ``x``: the quantizer annotates ``mul`` only for
operands of one shape, so both operands stay float (the conv before it keeps a float output, read
by the mul, plus a quantize for the pool) and nothing lowers the mul (docs/onednn_ops.md, "Int8
squeeze-excitation": why not).

Attention (``softmax(q @ k^T) @ v`` spelled with ``torch.matmul``): the quantizer quantizes the
matmul inputs only when asked (``quantize_matmul=True``); no CPU kernel computes an int8
activation x activation product faster than the float path (docs/onednn_ops.md, "Int8
attention"), so the matmuls stay ``dequant -> matmul`` in float while the projections fuse.

Numerics: every lowered module is checked against the un-lowered quantized module run eagerly
(tests/test_lower.py's bound); the pooled tensor itself, returned, must be exact where no
rounding tie can occur (an odd number of pooled elements) and within one step otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, note
from test_lower import assert_close_to_reference
from torch import fx, nn

from qalgebra import isa
from qalgebra.fusions import DEFAULT_FUSIONS
from qalgebra.fusions.reduce import QMEAN
from qalgebra.lower import LoweringReport, lower, lower_with_report
from qalgebra.match import find_matches
from qalgebra.testing.forms import FORMS, decompose_compute, to_decomposed
from qalgebra.testing.properties import check_example
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.reduce_strategies import (
    MeanSpec,
    ReductionExample,
    build_example,
    reduction_examples,
)
from qalgebra.testing.strategies import QuantSpec

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
onednn = torch.ops.onednn

pytestmark = pytest.mark.usefixtures("one_thread")

ModuleFactory = Callable[[], nn.Module]


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))``, the two fully connected layers as 1x1 convs."""

    def __init__(self, channels: int, squeezed: int, act: ModuleFactory, gate: ModuleFactory):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return scale * x


class SEBlock(nn.Module):
    """depthwise conv -> act -> squeeze-excitation -> 1x1 conv, then a pooled linear head:
    two int8 global pools (the SE's and the head's)."""

    def __init__(self, act: ModuleFactory, gate: ModuleFactory, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.act = act()
        self.se = SqueezeExcitation(channels, channels // 4, nn.ReLU, gate)
        self.project = nn.Conv2d(channels, channels, 1)
        self.head_act = act()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head_act(self.project(self.se(self.act(self.conv(x)))))
        out: torch.Tensor = self.fc(self.pool(y).flatten(1))
        return out


class PooledFeatures(nn.Module):
    """conv -> relu -> adaptive_avg_pool2d(``size``): the pooled int8 tensor is the output."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pool(self.relu(self.conv(x)))
        return out


class Attention(nn.Module):
    """Multi-head self-attention written with ``torch.matmul`` (as many models write it)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        mixed = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, s, d)
        out: torch.Tensor = self.out(mixed)
        return out


#: Squeeze-excitation variants by (activation, gate): ResNet/RegNet, MobileNetV3, EfficientNet.
SE_VARIANTS: dict[str, tuple[ModuleFactory, ModuleFactory]] = {
    "relu_sigmoid": (nn.ReLU, nn.Sigmoid),
    "hardswish_hardsigmoid": (nn.Hardswish, nn.Hardsigmoid),
    "silu_sigmoid": (nn.SiLU, nn.Sigmoid),
}


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _image(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _se(variant: str) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    act, gate = SE_VARIANTS[variant]
    inputs = (_image((2, 8, 7, 7)),)
    return quantize_pt2e(_seeded(lambda: SEBlock(act, gate)), inputs), inputs


@functools.cache
def _in_form(variant: str, form: str) -> fx.GraphModule:
    gm, inputs = _se(variant)
    if form == "compute":  # re-exported with decompositions: the pool is a mean.dim
        return decompose_compute(to_decomposed(gm), inputs)
    return FORMS[form](gm)


def _calls(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _mean_input_dtypes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[torch.dtype]:
    """The dtype of the tensor each ``mean.dim`` of ``gm`` reads, running it on ``inputs``."""
    seen: list[torch.dtype] = []

    class Recorder(fx.Interpreter):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            if target is aten.mean.dim:
                seen.append(args[0].dtype)
            return super().call_function(target, args, kwargs)

    Recorder(gm).run(*inputs)
    return seen


def _refusals(report: LoweringReport, fusion: str) -> list[str]:
    return [r.reason for r in report.refused if r.fusion == fusion]


FLOAT_POOLS = (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.mean.dim)


@pytest.mark.parametrize(
    "form", ["op", "tensor_qparams", "decomposed", "decomposed_single_clamp", "shared_dequants"]
)
@pytest.mark.parametrize("variant", sorted(SE_VARIANTS))
def test_squeeze_excitation_pools_in_int8(variant: str, form: str) -> None:
    graph = _in_form(variant, form)
    gm, inputs = _se(variant)
    before = graph.code
    lowered, report = lower_with_report(graph, inputs)
    assert graph.code == before
    assert report.fired["qmean"] == 2, report.summary()  # the SE's pool and the head's
    assert report.fired["qconv"] == 4 and report.fired["qlinear"] == 1, report.summary()
    assert not report.refused, report.summary()
    lowered.graph.lint()
    # the pools read the int8 tensors: no float pool is left, nor a dequantize feeding one
    assert not _calls(lowered, *FLOAT_POOLS[:2])
    assert find_matches(QMEAN.pattern, lowered) == []
    assert _mean_input_dtypes(lowered, inputs) == [torch.uint8, torch.uint8]
    assert_close_to_reference(graph(*inputs), lowered(*inputs), gm)


@pytest.mark.parametrize("variant", sorted(SE_VARIANTS))
def test_squeeze_excitation_mul_stays_float_and_its_conv_keeps_a_float_output(
    variant: str,
) -> None:
    gm, inputs = _se(variant)
    lowered = lower(gm, inputs)
    (mul,) = _calls(lowered, aten.mul.Tensor)
    gate, x = mul.args
    assert isinstance(x, fx.Node) and isinstance(gate, fx.Node)
    # x is the first conv's activation in float, also quantized for the pool
    assert x.target is onednn.qconv_pointwise.default and x.args[13] == torch.float32
    assert any(u.target is qd.quantize_per_tensor.default for u in x.users)
    (quant,) = mul.users
    assert quant.target is qd.quantize_per_tensor.default


def test_squeeze_excitation_in_inductors_spelling_pools_with_mean_dim() -> None:
    graph = _in_form("hardswish_hardsigmoid", "compute")
    gm, inputs = _se("hardswish_hardsigmoid")
    assert not _calls(graph, aten.adaptive_avg_pool2d.default)
    assert len(_calls(graph, aten.mean.dim)) == 2  # what decompositions leave
    lowered, report = lower_with_report(graph, inputs)
    assert report.fired["qmean"] == 2 and not report.refused, report.summary()
    assert find_matches(QMEAN.pattern, lowered) == []
    assert _mean_input_dtypes(lowered, inputs) == [torch.uint8, torch.uint8]
    assert_close_to_reference(graph(*inputs), lowered(*inputs), gm)


@pytest.mark.parametrize("variant", ["dynamic_batch", "bf16"])
def test_squeeze_excitation_symbolic_batch_and_bf16(variant: str) -> None:
    act, gate = SE_VARIANTS["relu_sigmoid"]
    inputs = (_image((2, 8, 7, 7)),)
    model = _seeded(lambda: SEBlock(act, gate))
    if variant == "bf16":
        gm = quantize_pt2e(model, inputs, bf16=True)
    else:
        gm = quantize_pt2e(model, inputs, dynamic_batch=True)
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qmean"] == 2 and not report.refused, report.summary()
    runs = (inputs[0].repeat(2, 1, 1, 1),) if variant == "dynamic_batch" else inputs
    assert_close_to_reference(gm(*runs), lowered(*runs), gm)


@pytest.mark.parametrize("saturating", [False, True], ids=["vnni", "saturating"])
def test_squeeze_excitation_with_signed_activations(saturating: bool) -> None:
    # the pools average int8 levels whatever the CPU; the convs take the activations shifted
    # by +128 to uint8, which a CPU with saturating int8 pairs refuses
    act, gate = SE_VARIANTS["relu_sigmoid"]
    inputs = (_image((2, 8, 7, 7)),)
    model = _seeded(lambda: SEBlock(act, gate))
    gm = quantize_pt2e(model, inputs, act_dtype=torch.int8, reduce_range=False)
    with isa.forced(int8_pairs_saturate=saturating):
        lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qmean"] == 2, report.summary()
    assert _mean_input_dtypes(lowered, inputs) == [torch.int8, torch.int8]
    if saturating:
        assert report.refused and report.fired["qconv"] == 0, report.summary()
        assert {r.cause for r in report.refused} == {"probe:int8_pairs_saturate"}
    else:
        assert report.fired["qconv"] >= 1 and not report.refused, report.summary()
    if saturating or not isa.measured("int8_pairs_saturate"):  # this CPU computes it alike
        assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


def test_lowering_twice_fires_nothing_more() -> None:
    gm, inputs = _se("relu_sigmoid")
    once = lower(gm, inputs)
    twice, report = lower_with_report(once, inputs)
    assert report.total_fired == 0, report.summary()
    assert torch.equal(twice(*inputs), once(*inputs))


@pytest.mark.parametrize("form", ["op", "decomposed"])
@pytest.mark.parametrize("image", [9, 8])
def test_the_pooled_int8_tensor_is_exact_or_one_step_at_a_tie(image: int, form: str) -> None:
    # conv 3x3 on image x image: (image - 2)**2 pooled elements, 49 (odd: no mean of integer
    # levels is a tie, so every element must be exact) or 36 (ties possible: one step). Only
    # qmean is lowered: the pool then reads the very levels the reference pools (a fused conv
    # could round one of them differently).
    inputs = (_image((2, 3, image, image)),)
    gm = quantize_pt2e(_seeded(lambda: PooledFeatures(1)), inputs)
    graph = FORMS[form](gm)
    lowered, report = lower_with_report(graph, inputs, fusions=[QMEAN])
    assert report.fired["qmean"] == 1, report.summary()
    reference, ours = graph(*inputs), lowered(*inputs)
    assert ours.shape == reference.shape == (2, 8, 1, 1) and ours.dtype == torch.float32
    (pool,) = _calls(gm, aten.adaptive_avg_pool2d.default)
    (quant,) = pool.users
    scale = quant.args[1]
    assert isinstance(scale, float)
    steps = ((ours - reference) / scale).abs().round()
    if image % 2:
        assert torch.equal(ours, reference)
    else:
        assert float(steps.max()) <= 1 and float((steps == 0).float().mean()) >= 0.75


def test_a_windowed_adaptive_pool_is_refused_with_the_reason() -> None:
    inputs = (_image((2, 3, 9, 9)),)
    gm = quantize_pt2e(_seeded(lambda: PooledFeatures(2)), inputs)
    lowered, report = lower_with_report(gm, inputs)
    assert report.fired["qmean"] == 0
    (reason,) = _refusals(report, "qmean")
    assert "adaptive_avg_pool2d" in reason and "[2, 2]" in reason and "global" in reason
    assert len(_calls(lowered, aten.adaptive_avg_pool2d.default)) == 1
    assert torch.equal(lowered(*inputs), gm(*inputs))  # the pool runs as before


def test_without_qmean_the_pool_stays_a_float_island() -> None:
    gm, inputs = _se("relu_sigmoid")
    no_qmean = tuple(f for f in DEFAULT_FUSIONS if f is not QMEAN)
    lowered = lower(gm, inputs, fusions=no_qmean)
    assert len(find_matches(QMEAN.pattern, lowered)) == 2
    assert len(_calls(lowered, aten.adaptive_avg_pool2d.default)) == 2
    assert_close_to_reference(gm(*inputs), lowered(*inputs), gm)


@given(reduction_examples())
def test_random_reduction_graphs_keep_every_property(example: ReductionExample) -> None:
    note(example.code())
    check_example(example)


#: A fuzz campaign's shrunk example (AVX2 EPYC): the lowered mean a step below the reference
#: at -38.4, |diff| 0.224487 against a bound of one scale step plus 1e-5 of it (0.224486).
_ONE_STEP_AT_A_LARGE_VALUE = MeanSpec(
    shape=(2, 3, 4, 2),
    reduction="mean",
    output_size=(),
    dims=(3,),
    keepdim=False,
    x_quant=QuantSpec(0.22448396720575253, 80, -128, 127, torch.int8),
    out_quant=QuantSpec(0.22448396720575253, 80, -128, 127, torch.int8),
    dequant_also_read=True,
    returns="dequantized",
    seed=23436,
)


def test_a_one_step_bound_admits_the_float32_rounding_of_both_values() -> None:
    example = build_example(_ONE_STEP_AT_A_LARGE_VALUE)
    oq = _ONE_STEP_AT_A_LARGE_VALUE.out_quant
    # every two adjacent levels, dequantized in float32 as both graphs do, differ by at most
    # the bound -- whichever CPU computed which of the two
    values = (torch.arange(oq.quant_min, oq.quant_max + 1) - oq.zero_point).float() * oq.scale
    widest = float((values[1:] - values[:-1]).abs().max())
    bound = example.expected.outputs[0]
    assert bound.kind == "float" and widest <= bound.atol
    assert bound.atol < 1.001 * oq.scale  # still one step, not two
    check_example(example)


def test_a_reduction_example_s_code_is_a_script_that_checks_it() -> None:
    example = build_example(_ONE_STEP_AT_A_LARGE_VALUE)
    namespace: dict[str, object] = {"__name__": "__main__"}
    with mock.patch("qalgebra.testing.properties.check_example") as check:
        exec(compile(example.code(), "<example>", "exec"), namespace)
    rebuilt = namespace["example"]
    assert isinstance(rebuilt, ReductionExample) and rebuilt.gm.code == example.gm.code
    check.assert_called_once_with(rebuilt)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@functools.cache
def _attention() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    inputs = (_image((2, 8, 32)),)
    return quantize_pt2e(_seeded(Attention), inputs, quantize_matmul=True), inputs


def _dequantized_operands(gm: fx.GraphModule) -> list[fx.Node]:
    """The matmul operands that are dequantizes (op form) or decomposed ones (a ``mul``)."""
    dequants = (qd.dequantize_per_tensor.default, aten.mul.Tensor)
    operands = [a for mm in _calls(gm, aten.matmul.default) for a in mm.args]
    assert len(operands) == 4
    return [a for a in operands if isinstance(a, fx.Node) and a.target in dequants]


def test_the_quantizer_quantizes_matmul_inputs_only_when_asked() -> None:
    inputs = (_image((2, 8, 32)),)
    plain = quantize_pt2e(_seeded(Attention), inputs)
    assert _dequantized_operands(plain) == []
    assert len(_dequantized_operands(_attention()[0])) == 4


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_attention_projections_fuse_and_the_matmuls_stay_float(form: str) -> None:
    gm, inputs = _attention()
    graph = FORMS[form](gm)
    lowered, report = lower_with_report(graph, inputs)
    assert report.fired["qlinear"] == 2, report.summary()
    assert not report.refused, report.summary()
    # no fusion claims an activation x activation product: both read dequantized values
    assert len(_calls(lowered, aten.matmul.default)) == 2
    assert len(_dequantized_operands(lowered)) == 4
    assert_close_to_reference(graph(*inputs), lowered(*inputs), gm)
