"""Conv geometries oneDNN computes wrongly are refused, and only those (fusions.conv_guard).

Two classes (docs/onednn_ops.md, "Conv geometries oneDNN gets wrong"): a one-column output
from a kernel and a stride wider than 1 (wrong with AVX512/AMX; refused when the probe
``qconv_single_column_stride_wrong`` says so), and outputs reading only padding (refused on
every CPU). Both are judged on the conv as the lowering emits it: with a static shape a
single column is cut out of the activation and padding as wide as a window written into it
(exact on every CPU, fused), so the guard refuses what those rewrites cannot mend. The probe is
forced both ways; numerics of a fused class-A conv are only checked where this CPU's kernel
computes it right.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.source import LocalSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from qalgebra import isa
from qalgebra.fusions.conv_guard import padding_only_axis, single_strided_column
from qalgebra.lower import lower_with_report
from qalgebra.testing.properties import check_example, check_numerics, flat_outputs
from qalgebra.testing.strategies import (
    ConvSpec,
    GraphSpec,
    Layer,
    MetaMode,
    QuantSpec,
    Residual,
    build_example,
)

PROBE = "qconv_single_column_stride_wrong"
Q = QuantSpec(scale=0.03, zero_point=2, quant_min=0, quant_max=127, dtype=torch.uint8)

pytestmark = pytest.mark.usefixtures("one_thread")


def _machine_probe() -> bool:
    """This CPU's own answer (whatever a test forces around it)."""
    with isa.forced():
        return isa.PROBES[PROBE]()


@pytest.mark.parametrize(
    ("input_shape", "weight_shape", "stride", "padding", "expected"),
    [
        ((1, 8, 6, 2), (2, 4, 2, 2), [1, 2], [0, 0], True),  # the conv
        ((1, 8, 6, 3), (2, 4, 2, 3), [1, 3], [0, 0], True),
        ((1, 8, 6, 1), (2, 4, 2, 2), [1, 2], [0, 1], True),  # one column, with padding
        ((1, 8, 6, 2), (2, 4, 2, 2), [1, 1], [0, 0], False),  # width stride 1
        ((1, 8, 6, 4), (2, 4, 2, 2), [1, 2], [0, 0], False),  # two columns
        ((1, 8, 6, 2), (2, 8, 2, 1), [1, 2], [0, 0], False),  # kernel width 1
        ((1, 8, 2, 6), (2, 8, 2, 2), [2, 1], [0, 0], False),  # one row is fine
        ((1, 8, 3, 6, 2), (2, 8, 2, 2, 2), [1, 1, 2], [0, 0, 0], True),  # 3-D
        ((1, 8, 2), (2, 8, 2), [2], [0], False),  # 1-D: measured right everywhere
        (None, (2, 8, 2, 2), [1, 2], [0, 0], True),  # unknown: the smallest input, width 2
        (None, (2, 8, 2, 2), [1, 2], [0, 2], False),  # ... which is 1, padded to 5: 2 columns
    ],
)
def test_single_strided_column(
    input_shape: tuple[int, ...] | None,
    weight_shape: tuple[int, ...],
    stride: list[int],
    padding: list[int],
    expected: bool,
) -> None:
    dilation = [1] * len(stride)
    assert single_strided_column(input_shape, weight_shape, stride, padding, dilation) is expected


@pytest.mark.parametrize(
    ("input_shape", "kernel", "stride", "padding", "dilation", "expected"),
    [
        ((1, 4, 1, 5), (1, 1), [2, 1], [1, 0], [1, 1], 0),  # rows -1 and 1 of a 1-row input
        ((1, 4, 5, 1), (2, 2), [1, 2], [0, 1], [1, 1], None),  # the column reads the input
        ((1, 4, 5, 1), (2, 2), [1, 1], [0, 1], [1, 2], 1),  # taps -1 and 1 of one column
        ((1, 4, 5, 5), (1, 1), [1, 1], [1, 1], [1, 1], 0),  # a 1x1 kernel's padded border
        ((1, 4, 12, 6), (2, 2), [3, 1], [2, 1], [1, 1], 0),  # row 0: taps -2, -1 (measured)
        ((1, 4, 12, 6), (3, 3), [1, 1], [1, 1], [1, 1], None),  # "same" padding reads input
        ((1, 4, 12, 6), (3, 3), [1, 1], [3, 1], [1, 1], 0),  # more than the kernel reaches
        ((1, 4, 1, 6), (2, 2), [1, 1], [2, 1], [3, 2], 0),  # rows -2, 1 and -1, 2 of 1 row
        (None, (1, 1), [2, 1], [1, 0], [1, 1], 0),  # unknown: judged at height 1
    ],
)
def test_padding_only_axis(
    input_shape: tuple[int, ...] | None,
    kernel: tuple[int, int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    expected: int | None,
) -> None:
    weight_shape = (4, 4, *kernel)
    assert padding_only_axis(input_shape, weight_shape, stride, padding, dilation) == expected


@pytest.mark.parametrize(("least_width", "expected"), [(2, True), (3, True), (4, False)])
def test_a_symbolic_width_counts_as_its_lower_bound(least_width: int, expected: bool) -> None:
    env = ShapeEnv()
    symbol = env.create_symbol(8, source=LocalSource("w"), dynamic_dim=DimDynamic.DYNAMIC)
    env.constrain_symbol_range(symbol, compiler_min=least_width, compiler_max=64)
    width = env.create_symintnode(symbol, hint=8)
    shape = (1, 8, 6, width)
    assert single_strided_column(shape, (2, 4, 2, 2), [1, 2], [0, 0], [1, 1]) is expected


def test_an_exported_dynamic_width_is_read_from_its_range() -> None:
    # export itself refuses a dynamic width that could give one column (w // 2 != 1 guard)
    conv = nn.Conv2d(8, 2, (2, 2), stride=(1, 2), groups=2)
    dynamic = {"input": {3: torch.export.Dim("w", min=4, max=64)}}
    ep = torch.export.export(conv, (torch.randn(1, 8, 6, 8),), dynamic_shapes=dynamic)
    x = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input")
    shape = tuple(x.meta["val"].shape)
    assert isinstance(shape[3], torch.SymInt)
    assert not single_strided_column(shape, (2, 4, 2, 2), [1, 2], [0, 0], [1, 1])
    assert single_strided_column(shape, (2, 4, 2, 3), [1, 2], [0, 0], [1, 1])  # kernel 3 on 4


def _conv_spec(
    conv: ConvSpec,
    width: int,
    *,
    family: str = "qconv",
    meta: MetaMode = "export",
    residual: Residual | None = None,
) -> GraphSpec:
    return GraphSpec(
        family,
        (1, conv.in_channels, 6, width),
        Q,
        Layer(conv, weight_scale=0.02, seed=3),
        residual=residual,
        meta=meta,
    )


#: (conv, input width, in the class): the issue's geometry and its neighbours.
GEOMETRIES = [
    (ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2), 2, True),
    (ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2), 3, True),
    (ConvSpec(16, 16, (2, 3), stride=(1, 3), groups=1), 3, True),
    (ConvSpec(2, 16, (2, 2), stride=(1, 2), groups=2), 2, True),  # wrong with AVX512 too
    (ConvSpec(8, 2, (2, 2), stride=(1, 1), groups=2), 2, False),
    (ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2), 4, False),
    (ConvSpec(8, 2, (2, 1), stride=(1, 2), groups=2), 1, False),
    (ConvSpec(16, 16, (2, 3), stride=(2, 1), groups=1), 3, False),
]


@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize(("conv", "width", "in_class"), GEOMETRIES)
def test_a_known_single_column_is_cut_out_and_fused(
    conv: ConvSpec, width: int, in_class: bool, probe: bool
) -> None:
    # with a static shape the lowering cuts the column's one window out of the activation and
    # calls the conv unstrided (qalgebra.fusions.conv.conv_geometry): exact on every CPU, so
    # nothing is refused whatever the probe says; check_example checks the numbers
    with isa.forced(**{PROBE: probe}):
        outcome = check_example(build_example(_conv_spec(conv, width)))
    report = outcome.report
    assert report.fired["qconv"] == 1 and not report.refused, report.summary()


@pytest.mark.parametrize(("conv", "width", "in_class"), GEOMETRIES)
def test_forced_probe_refuses_exactly_the_class_of_unknown_shape(
    conv: ConvSpec, width: int, in_class: bool
) -> None:
    # a stale shape is an unknown one: the guard judges the width the conv really gets as it
    # would judge any unknown shape (the smallest input the conv accepts), so the refusal is
    # a property of the kernel and stride alone
    example = build_example(_conv_spec(conv, width))
    q = next(n for n in example.gm.graph.nodes if "quantize_per_tensor" in n.name)
    q.meta["val"] = torch.empty(1, conv.in_channels, 6, 50, dtype=torch.uint8, device="meta")
    with isa.forced(**{PROBE: True}):
        _, report = lower_with_report(example.gm, example.inputs)
    can_be_one_column = conv.kernel[1] > 1 and conv.stride[1] > 1
    assert report.fired["qconv"] == (0 if can_be_one_column else 1), report.summary()
    if can_be_one_column:
        (refusal,) = report.refused
        assert "one column wide" in refusal.reason and PROBE in refusal.reason
        assert refusal.cause == f"probe:{PROBE}" and report.probe_refusals == [refusal]
    else:
        assert not report.refused, report.summary()


@pytest.mark.parametrize(("conv", "width", "in_class"), GEOMETRIES)
def test_probe_forced_false_fuses_the_class(conv: ConvSpec, width: int, in_class: bool) -> None:
    example = build_example(_conv_spec(conv, width, meta="none"))
    reference = flat_outputs(example.gm(*example.inputs))
    with isa.forced(**{PROBE: False}):
        lowered, report = lower_with_report(example.gm, example.inputs, selfcheck="off")
    assert report.fired["qconv"] == 1 and not report.refused, report.summary()
    got = flat_outputs(lowered(*example.inputs))
    if not (in_class and _machine_probe()):  # this CPU computes it right: check the numbers
        check_numerics(example.expected.outputs, reference, got)


def test_the_binary_conv_is_refused_in_the_class_too() -> None:
    conv = ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2)
    spec = _conv_spec(conv, 2, family="qconv_binary", residual=Residual("float"))
    example = build_example(spec)
    for node in example.gm.graph.nodes:  # a stale activation shape: the guard cannot see it
        if "quantize_per_tensor" in node.name and node.args[0].name == "x":
            node.meta["val"] = torch.empty(1, 8, 6, 50, dtype=torch.uint8, device="meta")
    with isa.forced(**{PROBE: True}):
        _, report = lower_with_report(example.gm, example.inputs)
    fusions = {r.fusion for r in report.probe_refusals}
    assert fusions == {"qconv_binary", "qconv"}, report.summary()
    with isa.forced(**{PROBE: False}):
        _, report = lower_with_report(example.gm, example.inputs, selfcheck="off")
    assert report.fired["qconv_binary"] == 1 and not report.refused, report.summary()
    with isa.forced(**{PROBE: True}):  # with its shape, the column is cut out and fused
        outcome = check_example(build_example(spec))
    assert outcome.report.fired["qconv_binary"] == 1 and not outcome.report.refused


@pytest.mark.parametrize("probe", [True, False])
def test_outputs_reading_only_padding_are_refused_on_every_cpu(probe: bool) -> None:
    # one input column, a kernel two taps wide dilated by 3, padding 2: output column 0 reads
    # columns -2 and 1, column 1 reads -1 and 2: only padding, though no padding is as wide as
    # a window (which the lowering would write into the activation instead)
    conv = ConvSpec(2, 16, (2, 2), padding=(0, 2), dilation=(1, 3), groups=2)
    spec = GraphSpec("qconv", (2, 2, 12, 1), Q, Layer(conv, seed=1))
    with isa.forced(**{PROBE: probe}):
        outcome = check_example(build_example(spec))  # the unfused conv runs, in fp32
    (refusal,) = outcome.report.refused
    assert "read only padding" in refusal.reason and refusal.cause == "rule"


@pytest.mark.parametrize("probe", [True, False])
def test_padding_as_wide_as_a_window_is_written_into_the_activation(probe: bool) -> None:
    # output row 0 reads input rows -2 and -1 (garbage with AVX512 and AMX as a padded call):
    # the padding goes into the activation (its zero point), the conv runs unpadded and fuses
    conv = ConvSpec(2, 16, (2, 2), stride=(3, 1), padding=(2, 1), groups=2)
    spec = GraphSpec("qconv", (2, 2, 12, 6), Q, Layer(conv, seed=1))
    with isa.forced(**{PROBE: probe}):
        outcome = check_example(build_example(spec))  # numbers against the reference
    assert outcome.report.fired["qconv"] == 1 and not outcome.report.refused


@pytest.mark.parametrize("probe", [True, False])
def test_an_unknown_input_shape_is_judged_at_the_smallest_input(probe: bool) -> None:
    # 8 columns (4 outputs) in fact, but without meta['val'] the lowering cannot know it
    conv = ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2)
    with isa.forced(**{PROBE: probe}):
        outcome = check_example(build_example(_conv_spec(conv, 8, meta="none")))
    assert outcome.report.fired["qconv"] == (0 if probe else 1), outcome.report.summary()
    if probe:
        assert "unknown shape" in outcome.report.refused[0].reason


@pytest.mark.parametrize("stale", [False, True])
def test_a_stale_input_shape_is_not_trusted(stale: bool) -> None:
    # 2 columns in, one out: the class. A stale meta['val'] saying 8 columns (4 out) would hide
    # it; it contradicts the conv's recorded result, so the guard treats the shape as unknown.
    conv = ConvSpec(8, 2, (2, 2), stride=(1, 2), groups=2)
    with isa.forced(**{PROBE: True}):
        example = build_example(_conv_spec(conv, 2))
        if stale:
            q = next(n for n in example.gm.graph.nodes if "quantize_per_tensor" in n.name)
            q.meta["val"] = torch.empty(1, 8, 6, 8, dtype=torch.uint8, device="meta")
        _, report = lower_with_report(example.gm, example.inputs)
    if not stale:  # the shape is known: the column is cut out and the conv fused
        assert report.fired["qconv"] == 1 and not report.refused, report.summary()
        return
    (refusal,) = report.refused
    assert "one column wide (input of unknown shape)" in refusal.reason, report.summary()
