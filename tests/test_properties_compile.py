"""The compile-path property (qalgebra.testing.properties.check_compiled): an example compiled
with the qalgebra backend computes what its graph computes, and the check fails when it does
not.

A compile takes about two seconds an example on a 2-core machine, so CI draws a few; the eager
lowering's property tests and ``qalgebra fuzz`` draw thousands. Drawing the catalog's examples
through the compile path found six problems, all fixed and pinned below (docs/findings.md,
"The catalog's examples through torch.compile").
"""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_selfcheck import OUT_Q, Q, _with_wrong_scale

from qalgebra.combinators import Unary
from qalgebra.fusions.conv import QCONV
from qalgebra.selfcheck import SelfCheck
from qalgebra.testing.oracle import bound_failure
from qalgebra.testing.pointwise_strategies import MaxPoolSpec
from qalgebra.testing.pointwise_strategies import build_example as build_pointwise_example
from qalgebra.testing.properties import (
    PropertyFailure,
    check_compiled,
    check_example,
    compiled_bounds,
)
from qalgebra.testing.strategies import (
    CaseExample,
    ConvSpec,
    ExampleLike,
    GraphSpec,
    Layer,
    LinearSpec,
    OutputBound,
    QuantSpec,
    Residual,
    UncoveredSpec,
    build_example,
    examples,
)
from qalgebra.testing.woq_strategies import int_mm_case, woq_case

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(example=examples())
def test_a_compiled_example_computes_what_its_graph_computes(example: ExampleLike) -> None:
    check_compiled(example)


def test_a_max_pool_index_of_a_window_of_padding_only_may_be_anything() -> None:
    # a dilated window (rows -1 and 1 of a 1-row input) reads padding only: eager writes index
    # 1 there, Inductor -1 (found by qalgebra fuzz --compiled); the value itself agrees
    q = QuantSpec(scale=0.25, zero_point=0, quant_min=0, quant_max=255, dtype=torch.uint8)
    spec = MaxPoolSpec(
        shape=(1, 1, 1, 2), kernel=(2, 1), stride=(), padding=(1, 0), dilation=(2, 1),
        ceil_mode=False, spelling="with_indices", source="dequant", x_quant=q, out_quant=q,
        indices_read=True, also_read=True, returns="quantized", seed=0,
    )  # fmt: skip
    example = build_pointwise_example(spec)
    bound = example.expected.outputs[1]
    assert bound.kind == "quantized" and bound.interval is not None
    check_example(example)
    check_compiled(example)


def test_under_compile_an_exact_float_output_may_move_by_rounding_an_integer_one_may_not() -> None:
    exact = OutputBound("exact", why="not lowered")
    ref = torch.tensor([4.0, -2.0, 0.5])
    ulp = torch.finfo(torch.float32).eps * 4.0  # of the largest magnitude
    levels = torch.tensor([3, 7], dtype=torch.uint8)
    float_bound, int_bound = compiled_bounds([exact, exact], [ref, levels])
    assert int_bound is exact and float_bound.kind == "float"
    assert bound_failure(float_bound, ref, ref + 2 * ulp) is None
    assert bound_failure(float_bound, ref, ref + 100 * ulp) is not None
    assert bound_failure(exact, ref, ref + 2 * ulp) is not None  # eagerly: bit-identical
    # a dequantized output (step 0.25): one level off is float rounding before its quantize
    (dequantized,) = compiled_bounds([exact], [ref], [0.25])
    assert bound_failure(dequantized, ref, ref + 0.25) is None
    assert bound_failure(dequantized, ref, ref + 0.5) is not None


def test_a_conv_transpose_outside_the_catalog_may_land_one_level_off_compiled() -> None:
    # Inductor's freezing runs it through oneDNN, whose float rounding moved a value across a
    # rounding boundary of the quantize after it (found by qalgebra fuzz --compiled)
    q = QuantSpec(scale=0.0316, zero_point=108, quant_min=0, quant_max=127, dtype=torch.uint8)
    spec = UncoveredSpec(kind="conv_transpose", input_shape=(1, 1, 2, 2), quant=q, channels=2)
    check_compiled(build_example(spec))


@pytest.mark.parametrize(("width", "padding"), [(2, 0), (1, 2)], ids=["plain", "padded"])
def test_a_uint8_conv_quantized_to_int8_reads_back_as_int8(width: int, padding: int) -> None:
    # Two convs read one uint8 input: one left float, one quantized to int8 (zero point -73),
    # then subtracted. Inductor typed the int8 conv's output uint8 (its input's dtype), and the
    # C++ kernel reading it loaded the bytes as uint8: 5 output steps off. Shrunk from a drawn
    # example. "padded": windows of padding only, so the conv reads its input padded
    # explicitly by a node of no recorded dtype, and the fix did not see the dtypes differ.
    conv = ConvSpec(3, 7, (3, 2), stride=(2, 1), padding=(0, padding), dilation=(2, 1))
    int8 = QuantSpec(scale=0.0122, zero_point=-73, quant_min=-128, quant_max=127, dtype=torch.int8)
    spec = GraphSpec(
        "qconv_binary",
        (4, 3, 8, width),
        QuantSpec(scale=0.00156, zero_point=0, quant_min=0, quant_max=127, dtype=torch.uint8),
        Layer(conv, weight_scale=0.0527, bias_scale=4.69, seed=178),
        residual=Residual(
            "layer",
            "sub",
            quant=int8,
            layer=Layer(conv, bias_scale=0.89, seed=10838),
            float_scale=4.69,
        ),
        output_quant=QuantSpec(
            scale=0.65, zero_point=35, quant_min=0, quant_max=127, dtype=torch.uint8
        ),
        returns="dequantized",
    )
    report = check_compiled(build_example(spec))
    assert report.lowering.fired["qconv"] == 2


def test_a_linear_fused_with_a_post_op_then_added_to_compiles_as_the_catalog_fused_it() -> None:
    # The catalog fuses relu into the kernel (float output) and leaves the add that follows;
    # Inductor's freezing patterns then matched kernel + add + relu and asserted the kernel had
    # no post-op yet: the compile failed with an empty AssertionError (found on a drawn
    # dequant_promotion example). A conv's twin patterns need the added tensor to be a
    # dequantize op, which the pass respells: tests/test_compile.py checks its guard.
    spec = GraphSpec(
        "qlinear_binary",
        (4, 16),
        QuantSpec(scale=0.02, zero_point=3, quant_min=0, quant_max=127, dtype=torch.uint8),
        Layer(LinearSpec(16, 8), post_op=Unary.RELU, seed=5),
        residual=Residual("float", "add", relu=True),
        returns="float",
    )
    report = check_compiled(build_example(spec))
    assert report.lowering.fired["qlinear"] == 1


@pytest.mark.parametrize("static_x_scale", [False, True], ids=["per-token", "static"])
def test_a_one_row_int_mm_example_holds_compiled(static_x_scale: bool) -> None:
    # one row: the per-token scale has one element, so the op takes it with a 0-d zero point;
    # Inductor's qlinear lowering refused that constant ("x_zp type is Constant, not int")
    case = int_mm_case(seed=3, k=16, n=8, rows=1, static_x_scale=static_x_scale)
    report = check_compiled(CaseExample("int_mm", "op", case))
    assert report.lowering.fired["int_mm_linear"] == 1


@pytest.mark.parametrize("out_features", [(8,), (3, 5)], ids=["woq_int8", "concat"])
def test_a_weight_only_linear_of_few_output_features_compiles_fused(
    out_features: tuple[int, ...],
) -> None:
    # At most 8 outputs: Inductor inlined the 1-d scales as computed values and handed them to
    # the extern kernel unrealized (LoweringException: AssertionError: Pointwise)
    case = woq_case(seed=7, dtype=torch.bfloat16, k=32, out_features=out_features, bias=True)
    report = check_compiled(CaseExample("woq", "op", case))
    name = "woq_int8" if len(out_features) == 1 else "woq_int8_concat_linear"
    assert report.lowering.fired[name] == 1


def _conv() -> ExampleLike:
    conv = ConvSpec(8, 8, (3, 3), padding=(1, 1))
    layer = Layer(conv, seed=4)
    spec = GraphSpec("qconv", (2, 8, 6, 6), Q, layer, output_quant=OUT_Q, returns="dequantized")
    return build_example(spec)


def test_a_right_kernel_holds_and_a_wrong_one_fails_numerics() -> None:
    report = check_compiled(_conv())
    assert report.lowering.fired["qconv"] == 1
    torch._dynamo.reset()
    # the self-check would refuse the wrong kernel: with it off, only the property stands guard
    with (
        mock.patch.object(SelfCheck, "check", lambda *args, **kwargs: None),
        pytest.raises(PropertyFailure, match=r"\[numerics\]"),
    ):
        check_compiled(_conv(), fusions=(_with_wrong_scale(QCONV, 2.0),))


def test_an_inductor_quantization_fusion_fails_the_inductor_property() -> None:
    from qalgebra import compile as qalgebra_compile

    calls = iter(range(2))

    def counted() -> Counter[str]:  # none before the compile, one after
        return Counter({"qconv_unary_matcher_count": next(calls)})

    with (
        mock.patch.object(qalgebra_compile, "inductor_quant_fusions", counted),
        pytest.raises(PropertyFailure, match=r"\[inductor\]"),
    ):
        check_compiled(_conv())
