"""Weight-only int8 (WOQ) and concat-linear lowering, on real exported graphs.

Graphs come from two flows: a hand-written module computing ``F.linear(x, w.to(x.dtype)) *
scales`` (qalgebra.testing.woq_strategies.WoqLinears) exported with ``torch.export``, and
torchao's ``quantize_(model, Int8WeightOnlyConfig())`` exported with and without
``unwrap_tensor_subclass`` (torchao's own int8 weight-only flow: ``mm(reshape(x), to(t(w))) *
flatten(to(scale))`` then ``reshape``). Each is tested in export's op form and in the form
Inductor sees (``decompose_compute``: ``permute + mm`` with views, ``expand + bmm`` for a
transposed 3-D input).

Numerics. Reference = the un-lowered graph run eagerly. Both compute the same products; they
differ only in the order of the float accumulation and in the roundings after it: the bf16
reference rounds the linear's result to bf16 and again after the scale (and the bias), the kernel
accumulates in fp32 and rounds once. ``FamilyCase.check`` bounds each element by
``rel_bound * (|x| @ |w|.T * |s| + |b|)`` with ``rel_bound = (2K + 6) u32 + 6 u`` (u the unit
roundoff of the dtype: 2^-8 for bf16). Measured: fp32 within 1e-7 of that magnitude, bf16 within
~4e-3 (one bf16 rounding).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from qalgebra import isa
from qalgebra.combinators import LinearForm
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion
from qalgebra.fusions.woq import (
    LV,
    WOQ_PATTERN,
    X,
    bf16_k_multiple,
    make_woq,
    plan_woq,
)
from qalgebra.lower import LoweringReport, lower, lower_with_report
from qalgebra.match import explain, find_matches
from qalgebra.testing.forms import decompose_compute
from qalgebra.testing.woq_strategies import (
    FamilyCase,
    WoqLinears,
    woq_case,
    woq_cases,
    woq_concat_cases,
    woq_refusal_cases,
)

aten = torch.ops.aten
BF16, FP32 = torch.bfloat16, torch.float32
WOQ_MM = aten._weight_int8pack_mm.default
#: The compute ops a lowered WOQ graph must no longer contain.
MATMULS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.linear.default})
#: The catalog with fp32 WOQ lowering switched on (the default lowers bf16 only).
_FP32_WOQ = {f.name: f for f in make_woq((FP32, BF16))}
WITH_FP32: tuple[Fusion, ...] = tuple(_FP32_WOQ.get(f.name, f) for f in DEFAULT_FUSIONS)


def _calls(gm: fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _family(report: LoweringReport) -> dict[str, int]:
    return {k: v for k, v in report.fired.items() if k.startswith("woq") and v}


def _lower_and_check(
    case: FamilyCase, fusions: Sequence[Fusion] = DEFAULT_FUSIONS
) -> tuple[fx.GraphModule, LoweringReport]:
    before = case.graph.code
    lowered, report = lower_with_report(case.graph, case.inputs, fusions=fusions)
    assert case.graph.code == before, "the input module was modified"
    lowered.graph.lint()
    reference = case.graph(*case.inputs)
    why = case.check(reference, lowered(*case.inputs))
    assert why is None, f"{case.description}: {why}"
    return lowered, report


# --------------------------------------------------------------------------------------------
# One WOQ linear: every shape, both dtypes, both forms
# --------------------------------------------------------------------------------------------

SHAPES = {  # (rank, transpose_input) -> the graph shape the compute form takes
    "2d": (2, False),  # mm(x, permute(convert(w)))                       Inductor pattern 2
    "3d": (3, False),  # view -> mm -> view                               Inductor pattern 1
    "3d_transposed": (3, True),  # expand -> bmm (non-contiguous x)       Inductor pattern 3
}


@pytest.mark.parametrize(
    ("dtype", "bias"),
    [(BF16, False), (BF16, True), (FP32, True)],
    ids=["bf16", "bf16-bias", "fp32-bias"],
)
@pytest.mark.parametrize("form", ["op", "compute"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_woq_lowers_to_weight_int8pack_mm(
    dtype: torch.dtype, shape: str, form: str, bias: bool
) -> None:
    rank, transpose = SHAPES[shape]
    case = woq_case(
        seed=1, dtype=dtype, k=32, out_features=(24,), rows=5, rank=rank,
        transpose_input=transpose, bias=bias, form=form,
    )  # fmt: skip
    fusions = DEFAULT_FUSIONS if dtype == BF16 else WITH_FP32
    lowered, report = _lower_and_check(case, fusions)
    assert _family(report) == {"woq_int8": 1}, report.summary()
    assert not report.refused, report.summary()
    calls = _calls(lowered)
    assert calls.count(WOQ_MM) == 1
    assert not MATMULS.intersection(calls)
    (node,) = [n for n in lowered.graph.nodes if n.target is WOQ_MM]
    x, w, s = node.args
    assert w.op == "get_attr" and s.op == "get_attr"  # weight and scales are module constants
    weight, scales = getattr(lowered, w.target), getattr(lowered, s.target)
    assert weight.dtype == torch.int8 and list(weight.shape) == [24, 32]
    assert weight.is_contiguous() and scales.dtype == dtype and list(scales.shape) == [24]
    # bf16: x goes through a fresh allocation (the kernel's aligned loads); fp32: contiguous.
    expected_copy = aten.clone.default if dtype == BF16 else aten.contiguous.default
    assert x.target is expected_copy


def test_the_one_definition_covers_inductors_four_shapes() -> None:
    """Inductor registers _register_woq_mm_int8_pattern1..4; one pattern matches all of them."""
    seen: set[tuple[LinearForm, bool, bool]] = set()
    for shape in sorted(SHAPES):
        rank, transpose = SHAPES[shape]
        case = woq_case(seed=0, dtype=BF16, rank=rank, transpose_input=transpose, form="compute")
        (m,) = find_matches(WOQ_PATTERN, case.graph)
        reshaped_x = any(n.target is aten.view.default and n.args[0] is m[X] for n in m.nodes)
        seen.add((m[LV.form], reshaped_x, _converted_after_transpose(m.nodes)))
    graph, _ = _torchao_woq(BF16, (4, 32), unwrap=True)
    matches = find_matches(WOQ_PATTERN, graph)
    assert matches
    seen.update((m[LV.form], True, _converted_after_transpose(m.nodes)) for m in matches)
    assert seen == {
        (LinearForm.MM, False, False),  # pattern 2: mm(x, permute(convert(w)))
        (LinearForm.MM, True, False),  # pattern 1: mm(view(x), permute(convert(w))) + view
        (LinearForm.BMM, False, False),  # pattern 3: bmm(expand(x), expand(permute(convert(w))))
        (LinearForm.MM, True, True),  # pattern 4: mm(.., convert(t(w))), torchao's spelling
    }


def _converted_after_transpose(nodes: Sequence[fx.Node]) -> bool:
    transposes = {aten.permute.default, aten.t.default}
    converts = {aten.to.dtype, aten._to_copy.default, torch.ops.prims.convert_element_type.default}
    return any(
        n.target in converts and isinstance(n.args[0], fx.Node) and n.args[0].target in transposes
        for n in nodes
    )


# --------------------------------------------------------------------------------------------
# torchao's int8 weight-only flow
# --------------------------------------------------------------------------------------------


class _Heads(nn.Module):
    """q, k, v projections of one x (concat-linear) and an output projection of another."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q = nn.Linear(32, 16, bias=bias)
        self.k = nn.Linear(32, 16, bias=bias)
        self.v = nn.Linear(32, 24, bias=bias)
        self.o = nn.Linear(16, 8, bias=bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q(x), self.k(x), self.v(x), self.o(h)


def _torchao_woq(
    dtype: torch.dtype, x_shape: tuple[int, ...], *, unwrap: bool, bias: bool = False
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.utils import unwrap_tensor_subclass

    torch.manual_seed(0)
    model = _Heads(bias).to(dtype).eval()
    quantize_(model, Int8WeightOnlyConfig())
    if unwrap:
        unwrap_tensor_subclass(model)
    inputs = (torch.randn(x_shape, dtype=dtype), torch.randn((*x_shape[:-1], 16), dtype=dtype))
    gm = torch.export.export(model, inputs).module()
    assert isinstance(gm, fx.GraphModule)
    return gm, inputs


def _torchao_magnitude(
    graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """|x| @ |w_int8 * scale|.T + |b| per output, from the constants the graph multiplies."""
    out = []
    for m in find_matches(WOQ_PATTERN, graph):
        plan = plan_woq(m, (FP32, BF16))
        x = inputs[0] if plan.weight.shape[1] == 32 else inputs[1]
        w = plan.weight.float().abs() * plan.scales.float().abs()[:, None]
        out.append(F.linear(x.float().abs(), w) + 1.0)  # + |b| <= 1 (nn.Linear's init)
    return tuple(out)


@pytest.mark.parametrize(
    ("x_shape", "unwrap", "form"),
    [
        ((4, 32), True, "op"),
        ((2, 3, 32), True, "compute"),
        ((2, 3, 32), False, "op"),
        ((4, 32), False, "compute"),
    ],
    ids=["2d-unwrapped-op", "3d-unwrapped-compute", "3d-subclass-op", "2d-subclass-compute"],
)
def test_torchao_int8_weight_only_flow(x_shape: tuple[int, ...], unwrap: bool, form: str) -> None:
    graph, inputs = _torchao_woq(BF16, x_shape, unwrap=unwrap, bias=True)
    if form == "compute":
        graph = decompose_compute(graph, inputs)
    magnitude = _torchao_magnitude(graph, inputs)
    lowered, report = lower_with_report(graph, inputs)
    assert _family(report) == {"woq_int8_concat_linear": 1, "woq_int8": 1}, report.summary()
    assert not report.refused, report.summary()
    calls = _calls(lowered)
    assert calls.count(WOQ_MM) == 2 and calls.count(aten.split_with_sizes.default) == 1
    assert not MATMULS.intersection(calls)
    # The metadata asserts on the removed int8 transposes went with them.
    asserted = [
        n.args[0] for n in lowered.graph.nodes if n.target is aten._assert_tensor_metadata.default
    ]
    assert all(a.op != "call_function" or a.target is not aten.t.default for a in asserted)
    case = FamilyCase("torchao", graph, inputs, {}, magnitude, rel_bound=64 * 2**-24 + 6 * 2**-8)
    why = case.check(graph(*inputs), lowered(*inputs))
    assert why is None, why


def test_torchao_fp32_flow_is_refused_by_default_and_lowered_on_request() -> None:
    graph, inputs = _torchao_woq(FP32, (4, 32), unwrap=True)
    lowered, report = lower_with_report(graph, inputs)
    assert _family(report) == {}
    reasons = [r.reason for r in report.refused if r.fusion == "woq_int8"]
    assert len(reasons) == 4 and all("scalar loop" in r for r in reasons)
    assert torch.equal(torch.stack([t.sum() for t in lowered(*inputs)]),
                       torch.stack([t.sum() for t in graph(*inputs)]))  # fmt: skip
    on_request, report = lower_with_report(graph, inputs, fusions=WITH_FP32)
    assert _family(report) == {"woq_int8_concat_linear": 1, "woq_int8": 1}
    for ours, ref in zip(on_request(*inputs), graph(*inputs), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Concat-linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "out_features", "form"),
    [
        ("2d", (8, 16, 24), "compute"),  # Inductor's concat shape: three mm of a 2-D x
        ("2d", (8, 5), "op"),
        ("3d", (8, 16, 24), "op"),
        ("3d", (8, 5), "compute"),
        ("3d_transposed", (8, 16, 24), "compute"),
        ("3d_transposed", (8, 5), "op"),
    ],
)
def test_concat_linear_one_kernel_then_split(
    shape: str, out_features: tuple[int, ...], form: str
) -> None:
    rank, transpose = SHAPES[shape]
    case = woq_case(
        seed=3, dtype=BF16, k=16, out_features=out_features, rows=4, rank=rank,
        transpose_input=transpose, form=form,
    )  # fmt: skip
    lowered, report = _lower_and_check(case)
    assert _family(report) == {"woq_int8_concat_linear": 1}, report.summary()
    calls = _calls(lowered)
    assert calls.count(WOQ_MM) == 1 and not MATMULS.intersection(calls)
    (split,) = [n for n in lowered.graph.nodes if n.target is aten.split_with_sizes.default]
    assert split.args[1] == list(out_features)
    (node,) = [n for n in lowered.graph.nodes if n.target is WOQ_MM]
    weight = getattr(lowered, node.args[1].target)
    assert list(weight.shape) == [sum(out_features), 16]
    outputs = lowered(*case.inputs)
    assert all(o.is_contiguous() for o in outputs)  # like the eager results


def test_concat_linear_skips_a_member_that_is_refused() -> None:
    """Three linears of one x, one with per-tensor scales: two concat, the third is refused."""
    gen = torch.Generator().manual_seed(0)
    weights = [
        torch.randint(-128, 128, (n, 16), generator=gen, dtype=torch.int8) for n in (8, 8, 4)
    ]
    scales = [torch.rand(8).to(BF16), torch.rand(1).to(BF16), torch.rand(4).to(BF16)]
    model = WoqLinears(weights, scales, [None, None, None]).eval()
    x = torch.randn(4, 16).to(BF16)
    graph = torch.export.export(model, (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    lowered, report = lower_with_report(graph, (x,))
    assert _family(report) == {"woq_int8_concat_linear": 1}, report.summary()
    (refusal,) = report.refused
    assert refusal.fusion == "woq_int8" and "per tensor" in refusal.reason
    for ours, ref in zip(lowered(x), graph(x), strict=True):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_linears_of_different_inputs_are_not_concatenated() -> None:
    graph, inputs = _torchao_woq(BF16, (4, 32), unwrap=True)
    _, report = lower_with_report(graph, inputs)
    # q, k, v read x: one group; o reads h alone: a single WOQ linear, not a group of one.
    assert _family(report) == {"woq_int8_concat_linear": 1, "woq_int8": 1}


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


class _Woq(nn.Module):
    """``F.linear(x, w.to(x.dtype)) * s``, any weight dtype and scale shape."""

    w: torch.Tensor
    s: torch.Tensor

    def __init__(self, w: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype)) * self.s


class _WoqScaledBy(nn.Module):
    """``F.linear(x, w.to(x.dtype)) * s`` with ``s`` an input (not a constant)."""

    w: torch.Tensor

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype)) * s


def _refusal(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    graph = torch.export.export(model, inputs).module()
    assert isinstance(graph, fx.GraphModule)
    before = graph.code
    lowered, report = lower_with_report(graph, inputs, fusions=WITH_FP32)
    assert _family(report) == {}, report.summary()
    assert graph.code == before
    assert WOQ_MM not in _calls(lowered)
    reasons = [r.reason for r in report.refused if r.fusion.startswith("woq")]
    assert len(reasons) == 1, report.summary()
    if all(t.device.type == "cpu" for t in (*inputs, *model.buffers())):
        torch.testing.assert_close(lowered(*inputs), graph(*inputs), rtol=0, atol=0)
    return reasons[0]


W8 = torch.randint(-128, 128, (8, 16), dtype=torch.int8)


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        (W8.to(torch.uint8), "weight dtype torch.uint8 is not int8"),
        (W8.to(torch.int16), "weight dtype torch.int16 is not int8"),
        (W8.to(torch.int32), "weight dtype torch.int32 is not int8"),
    ],
    ids=["uint8", "int16", "int32"],
)
def test_non_int8_weights_are_refused(weight: torch.Tensor, expected: str) -> None:
    reason = _refusal(_Woq(weight, torch.rand(8).to(BF16)), (torch.randn(4, 16).to(BF16),))
    assert expected in reason


@pytest.mark.parametrize(
    ("scales", "x_shape", "expected"),
    [
        (torch.rand(1), (4, 16), "per tensor, not one per output channel"),
        (torch.rand(()), (4, 16), "per tensor, not one per output channel"),
        (torch.rand(4, 1), (4, 16), "not one per output channel"),  # one per row
        (torch.rand(8, 1), (8, 16), "not one per output channel"),  # M == N: per row, not column
        (torch.rand(1, 1, 8), (4, 16), "broadcast the result to more dimensions"),
    ],
    ids=["one_element", "scalar", "per_row", "per_row_square", "extra_dims"],
)
def test_scales_not_per_output_channel_are_refused(
    scales: torch.Tensor, x_shape: tuple[int, ...], expected: str
) -> None:
    reason = _refusal(_Woq(W8, scales.to(BF16)), (torch.randn(x_shape).to(BF16),))
    assert expected in reason


def test_mismatched_devices_are_refused() -> None:
    """The weight lives on another device than x (here ``meta``): refused, nothing is run."""
    model = _Woq(W8, torch.rand(8).to(BF16))
    x = torch.randn(4, 16).to(BF16)
    graph = torch.export.export(model, (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    graph.w = torch.empty_like(W8, device="meta")
    _, report = lower_with_report(graph, (x,))
    assert _family(report) == {}
    (refusal,) = [r for r in report.refused if r.fusion == "woq_int8"]
    assert "devices differ: x on cpu, weight on meta, scales on cpu" in refusal.reason


def test_scales_of_another_dtype_are_refused() -> None:
    reason = _refusal(_Woq(W8, torch.rand(8)), (torch.randn(4, 16).to(BF16),))
    assert "scales are torch.float32, x is torch.bfloat16" in reason


def test_non_constant_scales_are_refused() -> None:
    inputs = (torch.randn(4, 16).to(BF16), torch.rand(8).to(BF16))
    reason = _refusal(_WoqScaledBy(W8), inputs)
    assert "not a constant" in reason


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "avx512"])
def test_bf16_with_a_k_the_kernel_cannot_take_is_refused_not_crashing(avx2: bool) -> None:
    with isa.forced(aten_vectors_are_avx2=avx2):
        width = bf16_k_multiple()
        k = width + 5
        weight = torch.randint(-128, 128, (8, k), dtype=torch.int8)
        reason = _refusal(_Woq(weight, torch.rand(8).to(BF16)), (torch.randn(4, k).to(BF16),))
    assert width == (8 if avx2 else 16)
    assert f"K = {k} is not a multiple of {width}" in reason


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "avx512"])
def test_a_k_only_avx2_vectors_take_is_lowered_only_there(avx2: bool) -> None:
    # K = 24 is 3 AVX2 vectors and 1.5 AVX512 ones. Where the probe is forced to AVX2 on an
    # AVX512 CPU the kernel would read past the rows: the lowered module is not run then
    # (decisions only); refused, it runs the reference's way.
    weight = torch.randint(-128, 128, (8, 24), dtype=torch.int8)
    model, inputs = _Woq(weight, torch.rand(8).to(BF16)), (torch.randn(4, 24).to(BF16),)
    graph = torch.export.export(model, inputs).module()
    assert isinstance(graph, fx.GraphModule)
    with isa.forced(aten_vectors_are_avx2=avx2):
        lowered, report = lower_with_report(graph, inputs)
    if avx2:
        assert _family(report) == {"woq_int8": 1} and not report.refused, report.summary()
        assert WOQ_MM in _calls(lowered)
    else:
        assert _family(report) == {}
        (refusal,) = report.refused
        assert "K = 24 is not a multiple of 16" in refusal.reason
        assert torch.equal(lowered(*inputs), graph(*inputs))


def test_fp32_is_refused_by_the_default_catalog_with_the_reason() -> None:
    model = _Woq(W8, torch.rand(8))
    x = torch.randn(4, 16)
    graph = torch.export.export(model, (x,)).module()
    assert isinstance(graph, fx.GraphModule)
    _, report = lower_with_report(graph, (x,))
    (refusal,) = report.refused
    assert "torch.float32 is not lowered" in refusal.reason and "scalar loop" in refusal.reason


# --------------------------------------------------------------------------------------------
# Contract: input untouched, no aliasing, idempotent
# --------------------------------------------------------------------------------------------


def test_input_untouched_no_alias_idempotent() -> None:
    case = woq_case(seed=5, dtype=BF16, k=16, out_features=(8, 8), rank=3)
    state = {k: v.clone() for k, v in case.graph.state_dict().items()}
    lowered = lower(case.graph, case.inputs)
    mine = tuple(t.clone() for t in case.inputs)
    outs = lowered(*mine)
    assert all(torch.equal(a, b) for a, b in zip(mine, case.inputs, strict=True))
    assert all(torch.equal(v, case.graph.state_dict()[k]) for k, v in state.items())
    pointers = {t.untyped_storage().data_ptr() for t in mine}
    assert not any(o.untyped_storage().data_ptr() in pointers for o in outs)
    twice, report = lower_with_report(copy.deepcopy(lowered), case.inputs)
    assert _family(report) == {} and not report.refused
    for a, b in zip(twice(*case.inputs), outs, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# The strategies other campaigns import
# --------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(st.one_of(woq_cases(), woq_concat_cases(), woq_refusal_cases()))
def test_drawn_woq_graphs_fire_as_expected_with_reference_numerics(case: FamilyCase) -> None:
    _, report = _lower_and_check(case)
    why = case.check_report(report.fired, [r.fusion for r in report.refused])
    assert why is None, f"{case.description}: {why}\n{report.summary()}"
    assert Counter(r.fusion for r in report.refused) == Counter(dict(case.refused))


# --------------------------------------------------------------------------------------------
# Pattern values: reprs rebuild them, explain says why a graph does not match
# --------------------------------------------------------------------------------------------


def _namespace() -> dict[str, object]:
    import qalgebra
    import qalgebra.checks
    import qalgebra.fusions.woq as woq
    import qalgebra.pattern

    return {
        **vars(qalgebra.pattern),
        **vars(qalgebra.checks),
        "torch": torch,
        "LinearForm": LinearForm,
        "qalgebra": qalgebra,
        **{name: getattr(woq, name) for name in woq.__all__},
    }


def test_woq_patterns_rebuild_from_their_repr() -> None:
    for fusion in make_woq((FP32, BF16)):
        assert eval(repr(fusion.pattern), _namespace()) == fusion.pattern


class _WeightFromInput(nn.Module):
    s: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.rand(8).to(BF16))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w.to(x.dtype)) * self.s


def test_explain_names_a_weight_that_is_not_a_constant() -> None:
    inputs = (torch.randn(4, 16).to(BF16), W8)
    graph = torch.export.export(_WeightFromInput(), inputs).module()
    assert isinstance(graph, fx.GraphModule)
    (mul,) = [n for n in graph.graph.nodes if n.target is aten.mul.Tensor]
    why = explain(WOQ_PATTERN, mul)
    assert why is not None
    assert "woq_w (w) is not computed from get_attr tensors only" in why.reason
    _, report = lower_with_report(graph, inputs)
    assert _family(report) == {} and not report.refused
