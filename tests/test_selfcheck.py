"""The lowering-time self-check (qalgebra.selfcheck): wrong kernels are refused, right ones fuse.

A deliberately wrong kernel is a test-only fusion: the catalog's qconv/qlinear rewrite, whose
kernel call then gets a wrong argument (an output scale doubled, a float output's scale that
oneDNN rejects). Verdicts are cached per process: every test starts from an empty cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from typer.testing import CliRunner

from qalgebra import isa, selfcheck
from qalgebra.cli import app
from qalgebra.errors import LoweringError
from qalgebra.fusions import Fusion, Rewriter
from qalgebra.fusions.conv import QCONV
from qalgebra.fusions.linear import QLINEAR
from qalgebra.lower import lower_with_report
from qalgebra.pattern import Match
from qalgebra.selfcheck import MIN_AGREEMENT, agreement, emits_kernel
from qalgebra.testing.models import build
from qalgebra.testing.oracle import BF16_RTOL, FLOAT_ATOL, FP32_RTOL
from qalgebra.testing.properties import check_example, check_numerics, flat_outputs
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.strategies import (
    ConvSpec,
    GraphSpec,
    Layer,
    QuantSpec,
    Returns,
    build_example,
)
from qalgebra.trial import promoted

onednn = torch.ops.onednn
Q = QuantSpec(scale=0.03, zero_point=2, quant_min=0, quant_max=127, dtype=torch.uint8)
OUT_Q = QuantSpec(scale=0.05, zero_point=5, quant_min=0, quant_max=255, dtype=torch.uint8)
#: The catalog's fusions whose replacement calls a kernel (the ones the self-check runs).
KERNEL_FUSIONS = (
    "qconv",
    "qconv_binary",
    "qlinear",
    "qlinear_binary",
    "qmaxpool2d",
    "quant_lift_up_max_pool",  # lifts a quantize above max_pool2d: quantized.max_pool2d
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    selfcheck.clear_cache()
    yield
    selfcheck.clear_cache()


def _with_wrong_scale(fusion: Fusion, factor: float) -> Fusion:
    """``fusion`` whose kernel call gets its output scale multiplied by ``factor``."""

    def rewrite(m: Match, rw: Rewriter) -> fx.Node:
        new = fusion.rewrite(m, rw)
        kernel = next(n for n in rw.created if emits_kernel([n]))
        index = 11 if fusion is QCONV else 7  # output_scale in qconv / qlinear_pointwise
        scale = kernel.args[index]
        assert isinstance(scale, float)
        kernel.update_arg(index, scale * factor)
        return new

    return Fusion(f"wrong_{fusion.name}", fusion.family, fusion.pattern, rewrite)


def _conv_example(
    returns: Returns = "quantized", batch: int = 2
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    conv = ConvSpec(8, 8, (3, 3), padding=(1, 1))
    out_q = OUT_Q if returns == "quantized" else None
    spec = GraphSpec(
        "qconv", (batch, 8, 6, 6), Q, Layer(conv, seed=4), output_quant=out_q, returns=returns
    )
    example = build_example(spec)
    return example.gm, example.inputs


def test_kernels_are_not_run_while_probes_decide_for_another_cpu() -> None:
    # the lowering then emits another CPU's kernels (on an AVX2 CPU, 8-bit activations that
    # saturate; on AVX512, a bf16 WOQ K read past its rows): this CPU must not judge or run them
    gm, inputs = _conv_example()
    other = not isa.measured("int8_pairs_saturate")
    with isa.forced(int8_pairs_saturate=other):
        _, report = lower_with_report(gm, inputs)
    assert report.selfcheck.ran == 0 and report.selfcheck.cached == 0, report.summary()
    (reason,) = report.selfcheck.skipped
    assert "another CPU's answers (int8_pairs_saturate)" in reason
    with isa.forced(int8_pairs_saturate=not other):  # this CPU's own answer: checked
        _, report = lower_with_report(gm, inputs)
    assert not report.selfcheck.skipped and report.selfcheck.ran + report.selfcheck.cached >= 1


def test_a_wrong_kernel_is_refused_and_the_model_still_runs_right() -> None:
    gm, inputs = _conv_example()
    reference = gm(*inputs)
    wrong = _with_wrong_scale(QCONV, 2.0)
    lowered, report = lower_with_report(gm, inputs, fusions=(wrong,))
    (refusal,) = report.refused
    assert refusal.fusion == "wrong_qconv" and refusal.cause == "selfcheck"
    assert refusal.reason.startswith("self-check: MISMATCH") and "quantized uint8" in refusal.reason
    assert report.fired["wrong_qconv"] == 0
    assert (report.selfcheck.ran, report.selfcheck.refused) == (1, 1)
    assert torch.equal(lowered(*inputs), reference)  # left unfused: the same eager ops
    # The same fusion trusted blindly computes something else: the check is what caught it.
    blind, report = lower_with_report(gm, inputs, fusions=(wrong,), selfcheck="off")
    assert report.fired["wrong_qconv"] == 1
    assert (blind(*inputs).int() - reference.int()).abs().max() > 1


def _wrong_in_row(fusion: Fusion, row: int, batch: int) -> Fusion:
    """``fusion`` whose quantized output is 7 levels off in one row of the batch."""

    def rewrite(m: Match, rw: Rewriter) -> fx.Node:
        new = fusion.rewrite(m, rw)
        delta = torch.zeros(batch, 1, 1, 1, dtype=torch.uint8)
        delta[row] = 7
        return rw.call(torch.ops.aten.add.Tensor, self=new, other=rw.constant("delta", delta))

    return Fusion(f"wrong_row{row}_{fusion.name}", fusion.family, fusion.pattern, rewrite)


def test_at_batch_8_the_reference_runs_on_sampled_rows_and_still_refuses_a_wrong_kernel() -> None:
    gm, inputs = _conv_example(batch=8)
    lowered, report = lower_with_report(gm, inputs, fusions=(_with_wrong_scale(QCONV, 2.0),))
    (refusal,) = report.refused
    assert refusal.cause == "selfcheck" and refusal.reason.endswith("(rows [0, 7] of 8)")
    assert (report.selfcheck.ran, report.selfcheck.sampled) == (1, 1)
    assert torch.equal(lowered(*inputs), gm(*inputs))
    _, report = lower_with_report(gm, inputs)  # the right kernel passes on the same rows
    assert report.fired["qconv"] == 1 and report.selfcheck.sampled == 1


@pytest.mark.parametrize("row", [0, 7])
def test_a_kernel_wrong_in_the_first_or_last_row_is_refused(row: int) -> None:
    gm, inputs = _conv_example(batch=8)
    _, report = lower_with_report(gm, inputs, fusions=(_wrong_in_row(QCONV, row, 8),))
    assert report.selfcheck.refused == 1 and report.selfcheck.sampled == 1, report.summary()


def test_full_mode_checks_every_row_and_on_mode_only_the_sampled_ones() -> None:
    # the documented limit of sampling: row 3 of 8 is not among the rows checked
    gm, inputs = _conv_example(batch=8)
    wrong = (_wrong_in_row(QCONV, 3, 8),)
    _, report = lower_with_report(gm, inputs, fusions=wrong, selfcheck="full")
    assert report.selfcheck.refused == 1 and report.selfcheck.sampled == 0
    assert "MISMATCH" in report.refused[0].reason
    _, report = lower_with_report(gm, inputs, fusions=wrong, selfcheck="on")
    assert report.selfcheck.refused == 0 and report.selfcheck.sampled == 1
    assert report.fired["wrong_row3_qconv"] == 1


def test_a_kernel_that_rejects_its_arguments_is_refused() -> None:
    gm, inputs = _conv_example(returns="float")  # float output: oneDNN wants output_scale 1.0
    lowered, report = lower_with_report(gm, inputs, fusions=(_with_wrong_scale(QCONV, 2.0),))
    (refusal,) = report.refused
    assert refusal.cause == "selfcheck" and "the fused op raised RuntimeError" in refusal.reason
    assert torch.equal(lowered(*inputs), gm(*inputs))


def test_a_wrong_linear_kernel_is_refused() -> None:
    model, inputs = build("linear_relu")  # int8 output, then float output
    gm = quantize_pt2e(model, inputs)
    lowered, report = lower_with_report(gm, inputs, fusions=(_with_wrong_scale(QLINEAR, 0.5),))
    assert report.fired["wrong_qlinear"] == 0 and report.selfcheck.refused == 2
    assert [r.cause for r in report.refused] == ["selfcheck", "selfcheck"]
    assert any("MISMATCH: output 0: quantized" in r.reason for r in report.refused)
    assert any("raised RuntimeError" in r.reason for r in report.refused)
    assert torch.equal(lowered(*inputs), gm(*inputs))


def test_right_kernels_pass_and_are_counted() -> None:
    gm, inputs = _conv_example()
    _, report = lower_with_report(gm, inputs)
    assert report.fired["qconv"] == 1 and not report.refused
    assert (report.selfcheck.ran, report.selfcheck.cached, report.selfcheck.refused) == (1, 0, 0)
    assert "self-check (on): 1 signature(s) run" in report.summary()


def test_a_repeated_signature_is_served_from_the_cache() -> None:
    model, inputs = build("resnet_like_2")
    gm = quantize_pt2e(model, inputs)
    _, first = lower_with_report(gm, inputs)
    checked = first.selfcheck.ran + first.selfcheck.cached
    assert first.selfcheck.ran >= 1 and first.selfcheck.cached >= 1  # its blocks repeat shapes
    assert checked == sum(first.fired[name] for name in KERNEL_FUSIONS)  # every kernel call
    _, second = lower_with_report(gm, inputs)
    assert (second.selfcheck.ran, second.selfcheck.cached) == (0, checked)


def test_kernels_run_at_the_callers_thread_count_and_verdicts_are_kept_per_count() -> None:
    # the lowering prepacks on one thread; the check runs the kernel as the model will run it
    gm, inputs = _conv_example(batch=8)
    seen: list[int] = []
    real = selfcheck._run_check

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    with mock.patch.object(selfcheck, "_run_check", spy):
        torch.set_num_threads(2)
        _, two = lower_with_report(gm, inputs)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        _, one = lower_with_report(gm, inputs)
        _, again = lower_with_report(gm, inputs)
    assert seen == [2, 1]  # one run per thread count; the third lowering was served cached
    assert (two.selfcheck.ran, one.selfcheck.ran, again.selfcheck.cached) == (1, 1, 1)
    assert two.fired["qconv"] == one.fired["qconv"] == 1


def test_weights_and_scales_are_not_part_of_the_signature() -> None:
    # Two convs of one geometry whose weights, scales and zero points differ: one run.
    def example(seed: int, zero_point: int) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
        q = QuantSpec(0.02 + seed / 100, zero_point, 0, 127, torch.uint8)
        ex = build_example(
            GraphSpec("qconv", (1, 4, 5, 5), q, Layer(ConvSpec(4, 4, (3, 3)), seed=seed))
        )
        return ex.gm, ex.inputs

    _, first = lower_with_report(*example(1, 3))
    _, second = lower_with_report(*example(2, 9))
    _, third = lower_with_report(*example(3, 0))  # zero point 0: another kernel path
    assert (first.selfcheck.ran, second.selfcheck.cached, third.selfcheck.ran) == (1, 1, 1)


def test_a_graph_without_shapes_is_fused_unchecked_and_counted() -> None:
    conv = ConvSpec(4, 4, (3, 3), padding=(1, 1))
    example = build_example(GraphSpec("qconv", (1, 4, 5, 5), Q, Layer(conv), meta="none"))
    outcome = check_example(example)
    assert outcome.report.fired["qconv"] == 1
    assert outcome.report.selfcheck.skipped == {"an input's shape is unknown": 1}


def test_bf16_graphs_pass_against_the_float32_reference() -> None:
    conv = ConvSpec(8, 8, (3, 3), padding=(1, 1))
    spec = GraphSpec(
        "qconv", (2, 8, 6, 6), Q, Layer(conv, seed=2), output_quant=OUT_Q, dtype="bf16"
    )
    outcome = check_example(build_example(spec))
    assert outcome.report.selfcheck.ran == 1 and not outcome.report.refused


@pytest.mark.parametrize("batch", [1, 8])  # 8: the reference on sampled rows
def test_the_check_alone_catches_the_one_column_conv_where_this_cpu_has_it(batch: int) -> None:
    conv = ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2)  # the conv
    example = build_example(GraphSpec("qconv", (batch, 8, 6, 2), Q, Layer(conv, seed=5)))
    # with a trusted static shape the lowering cuts the one column out (exact, no kernel at
    # fault); a result shape that contradicts the conv makes the shapes untrusted, so the conv
    # is emitted strided as written, the kernel this CPU may get wrong
    (root,) = next(n for n in example.gm.graph.nodes if n.op == "output").all_input_nodes
    root.meta["val"] = torch.empty(batch, 2, 6, 7, device="meta")
    with isa.forced():
        wrong_here = isa.qconv_single_column_stride_wrong()
    with isa.forced(qconv_single_column_stride_wrong=False):  # no probe refusal
        lowered, report = lower_with_report(example.gm, example.inputs)
    assert report.selfcheck.refused == int(wrong_here), report.summary()
    assert report.selfcheck.sampled == int(batch > 2)
    assert report.fired["qconv"] == int(not wrong_here)
    reference = flat_outputs(example.gm(*example.inputs))
    check_numerics(example.expected.outputs, reference, flat_outputs(lowered(*example.inputs)))


def test_an_unknown_mode_is_a_lowering_error() -> None:
    gm, inputs = _conv_example()
    with pytest.raises(LoweringError, match="selfcheck must be one of"):
        lower_with_report(gm, inputs, selfcheck="sometimes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The bound


def _u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_agreement_allows_one_step_on_few_elements() -> None:
    ref = _u8(list(range(20)))
    one_off = ref.clone()
    one_off[0] += 1
    assert agreement(ref, one_off).ok
    two_off = ref.clone()
    two_off[0] += 2
    verdict = agreement(ref, two_off)
    assert not verdict.ok and "2 step(s)" in verdict.message


def test_agreement_needs_most_quantized_elements_equal() -> None:
    ref = _u8([10] * 10)
    shifted = ref.clone()
    moved = 10 - int(MIN_AGREEMENT * 10) + 1  # one more than allowed
    shifted[:moved] += 1
    verdict = agreement(ref, shifted)
    assert not verdict.ok and "of the quantized elements equal" in verdict.message
    shifted[0] -= 1
    assert agreement(ref, shifted).ok


def test_agreement_on_float_outputs_is_relative_to_the_magnitude() -> None:
    ref = torch.tensor([1000.0, -3.0, 0.5])
    assert agreement(ref, ref + torch.tensor([0.005, 0.0, 0.0])).ok  # 5e-6 of 1000
    assert not agreement(ref, ref + torch.tensor([0.0, 0.0, 0.1])).ok  # 1e-4 of 1000
    bf16 = ref.to(torch.bfloat16)
    near = torch.tensor([1000.0, -3.0, 4.0]).to(torch.bfloat16)  # 3.5 of 1000: 0.35 %
    assert agreement(ref, near, bf16=True).ok and not agreement(bf16.float(), near.float()).ok


def test_agreement_on_float_outputs_counts_the_subgraphs_larger_values() -> None:
    # found by `qalgebra fuzz --max-examples 5000 --seed 20261205`: a dynamic qlinear + tanh
    # refused by a cached verdict, 1.77e-5 off where 1.1e-5 of the outputs was allowed. tanh
    # squashes a pre-activation of about 3 to outputs below 1; the sum's rounding error stays
    # that of the pre-activation
    ref = torch.tensor([0.0257716, 0.99, -0.5])
    off = ref + torch.tensor([1.77e-5, 0.0, 0.0])
    assert not agreement(ref, off).ok
    assert agreement(ref, off, magnitude=3.0).ok
    assert not agreement(ref, ref + torch.tensor([1e-3, 0.0, 0.0]), magnitude=3.0).ok


def test_agreement_rejects_other_dtypes_and_shapes() -> None:
    ref = torch.zeros(2, 3)
    assert not agreement(ref, torch.zeros(3, 2)).ok
    assert not agreement(ref, torch.zeros(2, 3), dtype=torch.bfloat16).ok
    assert not agreement(ref, torch.zeros(2, 3, dtype=torch.uint8)).ok
    assert not agreement(ref, (ref, ref)).ok


@st.composite
def _output_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
    """A reference output and a kernel's output near it: steps, noise around the float bound,
    NaN or inf, in channels-last or transposed layouts; plus ``bf16`` and ``magnitude``."""
    dims = draw(st.tuples(*[st.integers(1, 4)] * 2, *[st.integers(2, 5)] * 2))
    dtype = draw(st.sampled_from([torch.uint8, torch.int8, torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if dtype.is_floating_point:
        ref = torch.randn(dims, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e4]))
        ref = ref.to(dtype)
    else:
        ref = torch.randint(-128 if dtype == torch.int8 else 0, 128, dims, generator=gen)
        ref = ref.to(dtype)
    out = ref.clone()
    flat = out.view(-1)
    bf16, magnitude = dtype == torch.bfloat16, draw(st.sampled_from([0.0, 0.0, 3.0]))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, flat.numel() - 1))
        if dtype.is_floating_point:
            rtol = BF16_RTOL if bf16 else FP32_RTOL
            bound = FLOAT_ATOL + rtol * (magnitude + float(ref.float().abs().max()))
            kind = draw(st.sampled_from(["near", "near", "nan", "inf", "inf in ref", "both"]))
            nudge = draw(st.sampled_from([0.5, 0.999999, 1.0, 1.000001, 2.0])) * bound
            if kind != "inf in ref":
                flat[at] = {"near": float(flat[at]) + nudge, "nan": math.nan}.get(kind, math.inf)
            if kind in ("inf in ref", "both"):
                ref.view(-1)[at] = math.inf
        else:
            info = torch.iinfo(dtype)
            stepped = int(flat[at]) + draw(st.sampled_from([-2, -1, 1, 2]))
            flat[at] = min(max(stepped, info.min), info.max)
    layout = draw(st.sampled_from(["same", "out channels last", "ref transposed"]))
    if layout == "out channels last":
        out = out.contiguous(memory_format=torch.channels_last)
    elif layout == "ref transposed":
        ref = ref.transpose(1, 2).contiguous().transpose(1, 2)
    return ref, out, bf16, magnitude


@settings(max_examples=300, deadline=None)
@given(case=_output_pairs())
def test_the_quick_check_never_changes_a_verdict(
    case: tuple[torch.Tensor, torch.Tensor, bool, float],
) -> None:
    # it only skips the full comparison where that would pass: the same verdict without it
    ref, out, bf16, magnitude = case
    quick = agreement(ref, out, bf16=bf16, magnitude=magnitude)
    with mock.patch.object(selfcheck, "_surely_within", lambda *_: False):
        full = agreement(ref, out, bf16=bf16, magnitude=magnitude)
    assert quick.ok == full.ok, (quick.message, full.message)


def test_the_quick_check_pairs_elements_across_layouts() -> None:
    ref = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    same_values = ref.contiguous(memory_format=torch.channels_last)
    assert agreement(ref, same_values).ok
    # the same memory read with channels-last strides: other values at each index
    scrambled = ref.clone().as_strided(ref.shape, same_values.stride())
    assert not agreement(ref, scrambled).ok
    q = torch.randint(0, 255, (2, 3, 4, 5), dtype=torch.uint8)
    assert not agreement(q, q.clone().as_strided(q.shape, same_values.stride())).ok


def test_the_quick_check_leaves_nan_and_near_misses_to_the_full_comparison() -> None:
    ref = torch.ones(4, 4)
    assert not selfcheck._surely_within(ref, ref.clone().fill_(math.nan), FP32_RTOL, 0.0)
    assert not selfcheck._surely_within(ref, ref + 2e-5, FP32_RTOL, 0.0)  # beyond: look closer
    assert selfcheck._surely_within(ref, ref + 5e-6, FP32_RTOL, 0.0)
    q = _u8([3, 4, 5])
    assert selfcheck._surely_within(q, _u8([4, 4, 5]), FP32_RTOL, 0.0)
    assert not selfcheck._surely_within(q, _u8([5, 4, 5]), FP32_RTOL, 0.0)


def test_the_cli_takes_the_mode(tmp_path: Path) -> None:
    model, inputs = build("conv2d_relu")
    path = tmp_path / "conv2d_relu.pt2"
    torch.export.save(torch.export.export(quantize_pt2e(model, inputs), inputs), str(path))
    env = {"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"}
    on = CliRunner().invoke(app, ["lower", str(path)], env=env)
    assert on.exit_code == 0 and "self-check (on): 2 signature(s) run" in on.output, on.output
    off = CliRunner().invoke(app, ["lower", str(path), "--selfcheck", "off"], env=env)
    assert off.exit_code == 0 and "qconv: fired 2x" in off.output, off.output
    assert "self-check" not in off.output
    bad = CliRunner().invoke(app, ["lower", str(path), "--selfcheck", "maybe"], env=env)
    assert bad.exit_code == 2 and "--selfcheck must be one of off, on" in bad.output


def test_the_reference_widens_bf16_and_only_bf16() -> None:
    bf16 = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    widened = promoted(bf16)
    assert isinstance(widened, torch.Tensor) and widened.dtype == torch.float32
    assert torch.equal(widened, bf16.float())
    for kept in (torch.tensor([1, 2], dtype=torch.uint8), torch.zeros(2, dtype=torch.float16)):
        assert promoted(kept) is kept
    assert promoted(torch.bfloat16) is torch.float32
    assert promoted(torch.float16) is torch.float16
    assert promoted(3) == 3
