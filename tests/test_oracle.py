"""The numerics oracle: one step is accepted, two are not; float tolerances behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

from qalgebra.testing import forms
from qalgebra.testing.oracle import (
    BF16_RTOL,
    BF16_UNIT_ROUNDOFF,
    FLOAT_ATOL,
    FP32_COMPUTE_REL,
    FP32_RTOL,
    assert_outputs_close,
    compare_outputs,
    compute_error,
    level_interval,
    output_quant_steps,
    quantize_levels,
    rounding,
    unary_error,
)

qd = torch.ops.quantized_decomposed


def _levels(dtype: torch.dtype, shape: tuple[int, ...] = (4, 5)) -> torch.Tensor:
    """Random integer levels, one away from both ends so +-1 stays in range."""
    lo, hi = (1, 254) if dtype == torch.uint8 else (-127, 126)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(lo, hi + 1, shape, dtype=dtype, generator=gen)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_quantized_output_accepts_one_step_and_rejects_two(dtype: torch.dtype) -> None:
    ref = _levels(dtype)
    one = ref.clone()
    one[1, 2] += 1
    one[3, 0] -= 1
    two = ref.clone()
    two[2, 4] += 2

    accepted = compare_outputs(ref, one, quant_step=None)
    rejected = compare_outputs(ref, two, quant_step=None)

    assert accepted.ok and accepted.kind == "quantized" and accepted.max_steps == 1
    assert not rejected.ok and rejected.max_steps == 2 and rejected.worst_index == (2, 4)
    assert rejected.message.startswith("MISMATCH: quantized")
    assert f"reference {int(ref[2, 4])}, candidate {int(two[2, 4])}" in rejected.message
    assert compare_outputs(ref, ref, quant_step=None).max_abs_diff == 0


def test_quantized_comparison_ignores_quant_step_and_honours_max_steps() -> None:
    ref = _levels(torch.uint8)
    two = ref.clone()
    two[0, 0] += 2
    assert not compare_outputs(ref, two, quant_step=0.5).ok
    assert compare_outputs(ref, two, quant_step=None, max_steps=2).ok
    exact = compare_outputs(ref, ref + 0, quant_step=None, max_steps=0)
    assert exact.ok and exact.tolerance == 0


@given(
    st.lists(st.integers(-1, 1), min_size=12, max_size=12),
    st.integers(0, 11),
    st.sampled_from([2, -2, 3, -5]),
)
def test_property_any_pattern_of_unit_steps_passes_and_one_bigger_step_fails(
    steps: list[int], where: int, big: int
) -> None:
    ref = torch.full((3, 4), 100, dtype=torch.uint8)
    delta = torch.tensor(steps, dtype=torch.int16).reshape(3, 4)
    within = (ref.to(torch.int16) + delta).to(torch.uint8)
    assert compare_outputs(ref, within, quant_step=None).ok
    delta.view(-1)[where] = big
    beyond = (ref.to(torch.int16) + delta).to(torch.uint8)
    result = compare_outputs(ref, beyond, quant_step=None)
    assert not result.ok and result.max_steps == abs(big)


def test_dequantized_float_output_allows_one_step_times_scale() -> None:
    scale = 0.05
    levels = _levels(torch.uint8).to(torch.int32)
    ref = (levels - 128).float() * scale
    one = ((levels + 1) - 128).float() * scale
    two = ((levels + 2) - 128).float() * scale

    accepted = compare_outputs(ref, one, quant_step=scale)
    rejected = compare_outputs(ref, two, quant_step=scale)

    assert accepted.ok and accepted.kind == "dequantized"
    assert math.isclose(accepted.max_steps, 1.0, rel_tol=1e-4)
    assert not rejected.ok and math.isclose(rejected.max_steps, 2.0, rel_tol=1e-4)
    assert "2 step(s)" in rejected.message
    # without the step, the same one-step difference is far beyond float rounding
    assert not compare_outputs(ref, one, quant_step=None).ok


def test_float_output_tolerance_is_relative_to_the_largest_magnitude() -> None:
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(64, 32, generator=gen) * 10
    magnitude = float(ref.abs().max())
    rounding = ref * (1 + 2e-7)  # what oneDNN vs eager measured: <= 3.7e-7 of max|ref|
    step_like = ref + magnitude / 255  # one 8-bit quantization step of the range

    ok = compare_outputs(ref, rounding, quant_step=None)
    bad = compare_outputs(ref, step_like, quant_step=None)

    assert ok.ok and ok.kind == "float" and math.isnan(ok.max_steps)
    assert math.isclose(ok.tolerance, FLOAT_ATOL + FP32_RTOL * magnitude)
    assert not bad.ok
    # an element near zero may carry the absolute error of a long sum: still accepted
    near_zero = ref.clone()
    near_zero[0, 0] = 1e-9
    nudged = near_zero.clone()
    nudged[0, 0] = 5e-6
    assert compare_outputs(near_zero, nudged, quant_step=None).ok


def test_float_tolerance_defaults_by_dtype_and_can_be_overridden() -> None:
    ref = torch.linspace(-4, 4, 100)
    off = ref + 0.01  # 0.25% of max|ref|: a bf16 ulp, far beyond fp32 rounding
    assert not compare_outputs(ref, off, quant_step=None).ok
    assert compare_outputs(ref, off, quant_step=None, rtol=BF16_RTOL).ok
    ref16, off16 = ref.bfloat16(), off.bfloat16()
    assert compare_outputs(ref16, off16, quant_step=None).ok
    zeros = torch.zeros(5)
    assert compare_outputs(zeros, zeros + FLOAT_ATOL / 2, quant_step=None).ok
    assert not compare_outputs(zeros, zeros + 1e-3, quant_step=None).ok


def test_nan_and_inf_agree_only_when_both_sides_agree() -> None:
    ref = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert compare_outputs(ref, ref.clone(), quant_step=None).ok
    cand = ref.clone()
    cand[1] = 0.0
    result = compare_outputs(ref, cand, quant_step=None)
    assert not result.ok and result.worst_index == (1,)
    cand = ref.clone()
    cand[2] = float("-inf")
    assert not compare_outputs(ref, cand, quant_step=None).ok


def test_dtype_and_shape_mismatches_are_reported_not_compared() -> None:
    ref = _levels(torch.uint8)
    dtype = compare_outputs(ref, ref.float(), quant_step=None)
    shape = compare_outputs(ref, ref[:2], quant_step=None)
    assert not dtype.ok and dtype.kind == "mismatch" and "dtype" in dtype.message
    assert not shape.ok and "shape [2, 5] != reference [4, 5]" in shape.message


def test_several_outputs_report_the_failing_one_with_its_index() -> None:
    q = _levels(torch.uint8)
    f = torch.randn(3, 3)
    q_two = q.clone()
    q_two[0, 1] += 2
    result = compare_outputs((f, q), (f.clone(), q_two), quant_step=[None, None])
    assert not result.ok and result.output_index == 1
    assert result.message.startswith("MISMATCH: output 1: quantized")
    fine = compare_outputs([f, q], [f + 1e-7, q], quant_step=None)
    assert fine.ok and fine.output_index == 0  # the float one is the closest to its bound
    with pytest.raises(ValueError, match="2 quant_steps for 1 outputs"):
        compare_outputs([f], [f], quant_step=[None, 0.1])
    with pytest.raises(ValueError, match="quant_step must be a positive"):
        compare_outputs(f, f, quant_step=0.0)
    with pytest.raises(TypeError, match="both be tensors or both sequences"):
        compare_outputs(f, [f], quant_step=None)


def test_a_comparison_is_not_a_bool_and_assert_helper_raises_with_the_message() -> None:
    q = _levels(torch.int8)
    result = compare_outputs(q, q, quant_step=None)
    with pytest.raises(TypeError, match=r"use `\.ok`"):
        bool(result)
    q_two = q.clone()
    q_two[1, 1] += 2
    with pytest.raises(AssertionError, match=r"MISMATCH: quantized int8\[4, 5\]"):
        assert_outputs_close(q, q_two, quant_step=None)
    assert assert_outputs_close(q, q, quant_step=None).ok


class _QuantDequant(torch.nn.Module):
    """x -> quantize -> dequantize (scale 0.1, zp 3) and a second, plain float output."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = qd.quantize_per_tensor.default(x, 0.1, 3, 0, 255, torch.uint8)
        y = qd.dequantize_per_tensor.default(q, 0.1, 3, 0, 255, torch.uint8)
        return y.to(torch.float32), x * 2


def test_output_quant_steps_finds_the_dequantize_scale_in_every_form() -> None:
    gm = fx.symbolic_trace(_QuantDequant())
    assert output_quant_steps(gm) == (0.1, None)
    assert output_quant_steps(forms.to_decomposed(gm)) == (0.1, None)
    assert output_quant_steps(forms.to_decomposed(gm, drop_zero_zp=False)) == (0.1, None)
    tensor_form = output_quant_steps(forms.to_tensor_qparams(gm))
    assert tensor_form[1] is None and tensor_form[0] is not None
    assert math.isclose(tensor_form[0], 0.1)
    x = torch.randn(4, 4)
    ref, cand = gm(x), forms.to_decomposed(gm)(x)
    assert compare_outputs(ref, cand, quant_step=output_quant_steps(gm)).max_abs_diff == 0


# ---------------------------------------------------------------------------------------------
# Per-element error bounds


def _layer_terms(
    x_levels: torch.Tensor, w_levels: torch.Tensor, x_scale: float, w_scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x_levels.double() * x_scale
    w = w_levels.double() * w_scales.double().reshape(-1, 1)
    return x, w


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 64),
    x_scale=st.floats(1e-3, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_compute_error_bounds_the_reference_against_exact_int8_products(
    seed: int, k: int, x_scale: float, dtype: torch.dtype
) -> None:
    # The reference dequantizes, rounds to the compute dtype, multiplies and rounds the result;
    # the kernel multiplies exact levels. The bound must hold on every element.
    gen = torch.Generator().manual_seed(seed)
    x_levels = torch.randint(0, 128, (5, k), generator=gen)
    w_levels = torch.randint(-127, 128, (7, k), generator=gen)
    w_scales = torch.rand(7, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(7, generator=gen)
    x, w = _layer_terms(x_levels, w_levels, x_scale, w_scales)
    reference = torch.nn.functional.linear(x.to(dtype), w.float().to(dtype), bias.to(dtype))
    exact = torch.nn.functional.linear(x, w, bias.double())
    x_err = rounding(x.to(dtype).double(), dtype)  # the reference's rounded input
    bound = compute_error(
        torch.nn.functional.linear, x, x_err, w.float(), bias.expand(5, 7), reference, dtype
    )
    assert bool(((reference.double() - exact).abs() <= bound).all())


def test_compute_error_grows_with_each_elements_own_magnitudes() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    w = torch.tensor([[1.0, 1.0]])
    y = x @ w.T
    bound = compute_error(
        torch.nn.functional.linear, x, torch.zeros(2, 2), w, torch.zeros(2, 1), y, torch.bfloat16
    )
    # per element: (u + 1e-5) sum|x||w| + u |y|, with u = 2**-8
    per_unit = 2 * BF16_UNIT_ROUNDOFF + FP32_COMPUTE_REL
    assert torch.allclose(bound, torch.tensor([[per_unit], [100 * per_unit]], dtype=torch.float64))


def test_unary_error_maps_an_interval_through_the_post_op() -> None:
    pre = torch.tensor([-5.0, 0.05, 5.0])
    err = torch.full((3,), 0.1, dtype=torch.float64)
    relu = unary_error(pre, err, torch.relu(pre), torch.float32, lambda t: t.clamp_min(0.0))
    # far from 0 on the negative side, relu hides the error; near 0 or positive it passes
    assert float(relu[0]) < 1e-3 and 0.1 <= float(relu[1]) < 0.101 and float(relu[2]) >= 0.1
    # hardswish: flat (0) below -3, its minimum -0.375 at -1.5
    pre = torch.tensor([-50.0, -1.45, 2.0])
    swish = torch.nn.functional.hardswish
    bound = unary_error(pre, err, swish(pre), torch.float32, swish, valley=-1.5)
    assert float(bound[0]) < 1e-3  # both sides 0, whatever moved
    assert float(bound[1]) < 0.01  # around the minimum hardswish barely moves
    assert float(bound[2]) >= swish(torch.tensor(2.1)) - swish(torch.tensor(2.0))
    every = torch.linspace(-1.55, -1.35, 41)
    assert float(bound[1]) >= float((swish(every) - swish(pre[1])).abs().max())


def test_level_interval_holds_the_levels_of_value_plus_minus_err() -> None:
    scale, zp = 0.1, 10
    value = torch.tensor([0.0, 0.149, 0.26, 100.0])  # levels 10, 11, 13, clamped 127
    levels = quantize_levels(value.double(), scale, zp, 0, 127)
    assert levels.tolist() == [10, 11, 13, 127]
    err = torch.tensor([0.001, 0.002, 0.1, 1.0], dtype=torch.float64)
    lo, hi = level_interval(value, err, levels, scale, zp, 0, 127)
    assert lo.tolist() == [10, 11, 12, 127] and hi.tolist() == [10, 12, 14, 127]
