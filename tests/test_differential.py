"""Differential tests: qalgebra against torchao's lowering of the same graphs.

``qalgebra.testing.quantize.torchao_lower`` runs torchao's ``lower_pt2e_quantized_to_x86``
(Inductor's quantization fusion passes, no codegen). On drawn graphs in op form -- the form
torchao's patterns are written for -- qalgebra must fuse at least what torchao fuses *correctly*
(its module runs and its outputs are within the example's numerics bounds). Every other
disagreement is pinned below by a test that shows torchao's behaviour and qalgebra's, and is
described in docs/findings.md ("Differential: torchao").

The opt-in slow test (``QALGEBRA_SLOW=1``) compares with ``torch.compile`` + freezing and
Inductor's own counters.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import fx

from qalgebra import isa
from qalgebra.combinators import Unary
from qalgebra.lower import lower, lower_with_report
from qalgebra.testing.properties import PropertyFailure, check_example, check_numerics
from qalgebra.testing.quantize import torchao_lower
from qalgebra.testing.strategies import (
    ConvSpec,
    DType,
    Example,
    GraphSpec,
    Layer,
    LinearSpec,
    LinearSpelling,
    QuantSpec,
    Residual,
    build_example,
    flat_tensors,
    graph_specs,
)

onednn = torch.ops.onednn

#: Fused oneDNN ops by family: what is counted on both sides.
KINDS = {
    "conv": (onednn.qconv_pointwise.default, onednn.qconv2d_pointwise.binary),
    "conv binary": (onednn.qconv2d_pointwise.binary,),
    "linear": (
        onednn.qlinear_pointwise.default,
        onednn.qlinear_pointwise.tensor,
        onednn.qlinear_pointwise.binary,
        onednn.qlinear_pointwise.binary_tensor,
    ),
    "linear binary": (onednn.qlinear_pointwise.binary, onednn.qlinear_pointwise.binary_tensor),
}

U8_7BIT = (torch.uint8, 0, 127)


pytestmark = pytest.mark.usefixtures("one_thread")


def fused(gm: fx.GraphModule) -> Counter[str]:
    """Fused oneDNN ops per family of :data:`KINDS`."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        for kind, targets in KINDS.items():
            if node.op == "call_function" and node.target in targets:
                counts[kind] += 1
    return counts


@dataclass(frozen=True)
class TorchaoRun:
    """torchao's lowering of an example and what running it did."""

    fused: Counter[str]
    error: str | None  # lowering or running failed
    wrong: str | None  # ran, but outside the example's numerics bounds
    wrote_inputs: tuple[int, ...]  # indices of the caller's inputs it modified

    @property
    def correct(self) -> bool:
        return self.error is None and self.wrong is None and not self.wrote_inputs


def run_torchao(ex: Example) -> TorchaoRun:
    try:
        lowered = torchao_lower(ex.gm, ex.inputs)
    except Exception as exc:  # torchao failing to lower is a result, recorded as such
        return TorchaoRun(Counter(), f"lowering: {type(exc).__name__}: {exc}", None, ())
    mine = tuple(t.clone() for t in ex.inputs)
    try:
        outputs = flat_tensors(lowered(*mine))
    except Exception as exc:
        return TorchaoRun(fused(lowered), f"running: {type(exc).__name__}: {exc}", None, ())
    written = tuple(
        i for i, (a, b) in enumerate(zip(mine, ex.inputs, strict=True)) if not torch.equal(a, b)
    )
    reference = flat_tensors(ex.gm(*(t.clone() for t in ex.inputs)))
    try:
        check_numerics(ex.expected.outputs, reference, outputs)
        wrong = None
    except PropertyFailure as failure:
        wrong = str(failure)
    return TorchaoRun(fused(lowered), None, wrong, written)


def _q(
    scale: float, zp: int, qmin: int = 0, qmax: int = 127, dtype: torch.dtype = torch.uint8
) -> QuantSpec:
    return QuantSpec(scale, zp, qmin, qmax, dtype)


# --------------------------------------------------------------------------------------------
# The differential property


def _op_form_examples() -> st.SearchStrategy[Example]:
    families = st.sampled_from(["qconv", "qlinear", "qconv_binary", "qlinear_binary"])
    specs = families.flatmap(lambda f: graph_specs(f, activation_ranges=[U8_7BIT], dtypes=["fp32"]))
    return specs.map(lambda spec: build_example(spec, "op"))


# torchao lowers in seconds: a handful of drawn graphs per run (the profile's count is capped).
@settings(
    max_examples=min(settings().max_examples, 8),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(ex=_op_form_examples())
def test_qalgebra_fuses_at_least_what_torchao_fuses_correctly(ex: Example) -> None:
    assume(not ex.expected.refusals)  # both must support it: no refusal on this CPU
    note(ex.code())
    ours = fused(lower(ex.gm, ex.inputs))
    theirs = run_torchao(ex)
    note(f"qalgebra {dict(ours)}, torchao {dict(theirs.fused)}: {theirs}")
    if not theirs.correct:
        event(f"torchao wrong or failing: {(theirs.error or theirs.wrong or 'wrote inputs')[:40]}")
        return
    for kind in KINDS:
        assert ours[kind] >= theirs.fused[kind], f"torchao fuses more {kind}: {theirs.fused}"
    if ours != theirs.fused:
        event("qalgebra fuses more than torchao")


# --------------------------------------------------------------------------------------------
# Pinned disagreements (docs/findings.md, "Differential: torchao")


def _conv_block(family: str = "qconv", **parts: Any) -> GraphSpec:
    """A 4-channel 3x3 conv on a 5x5 input (7-bit uint8 activations) and ``parts``."""
    return GraphSpec(
        family,
        (1, 4, 5, 5),
        _q(0.02, 3),
        Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=3),
        **parts,
    )


def _linear(shape: tuple[int, ...] = (4, 16), spelling: LinearSpelling = "linear") -> GraphSpec:
    return GraphSpec(
        "qlinear",
        shape,
        _q(0.03, 10),
        Layer(LinearSpec(16, 8, spelling=spelling), Unary.RELU, seed=1),
        output_quant=_q(0.05, 20, 0, 255),
        returns="dequantized",
    )


def _conv(form: str = "op", dtype: DType = "fp32") -> Example:
    spec = _conv_block(output_quant=_q(0.05, 20, 0, 255), returns="quantized", dtype=dtype)
    return build_example(spec, form)


MISSED_BY_TORCHAO = {
    "conv_decomposed": (_conv("decomposed"), "conv"),
    "conv_tensor_qparams": (_conv("tensor_qparams"), "conv"),
    "conv_bf16": (_conv("op+fp32_before_quant", "bf16"), "conv"),
    "linear_decomposed": (build_example(_linear(), "decomposed"), "linear"),
    "linear_3d": (build_example(_linear(shape=(2, 3, 16)), "op"), "linear"),
    "linear_3d_view_mm_view": (
        build_example(_linear(shape=(2, 3, 16), spelling="matmul_permute")),
        "linear",
    ),
    "conv_add_float_input": (
        build_example(_conv_block("qconv_binary", residual=Residual("float"))),
        "conv binary",
    ),
}


@pytest.mark.parametrize("name", sorted(MISSED_BY_TORCHAO))
def test_forms_torchao_leaves_unfused_and_qalgebra_fuses(name: str) -> None:
    ex, kind = MISSED_BY_TORCHAO[name]
    theirs = run_torchao(ex)
    assert theirs.error is None and theirs.fused[kind] == 0, theirs
    check_example(ex)
    assert fused(lower(ex.gm, ex.inputs))[kind] == 1


def test_torchao_writes_into_the_callers_input_and_qalgebra_does_not() -> None:
    # fc(x) + y with a float y: torchao's qlinear binary "sum" accumulates into y in place.
    ex = build_example(
        GraphSpec("qlinear_binary", (4, 16), _q(0.03, 10), Layer(LinearSpec(16, 8), seed=1),
                  residual=Residual("float"))
    )  # fmt: skip
    theirs = run_torchao(ex)
    assert theirs.fused["linear binary"] == 1 and theirs.wrote_inputs == (1,), theirs
    check_example(ex)  # includes: qalgebra's module never writes its inputs


def test_torchao_fused_outputs_ignore_a_narrow_quant_range() -> None:
    # A 7-bit output quant (reduce_range: [0, 127]): torchao's fused uint8 output goes to 255.
    ex = build_example(_conv_block(output_quant=_q(0.05, 20), returns="quantized"))
    theirs = run_torchao(ex)
    assert theirs.fused["conv"] == 1 and theirs.wrong is not None, theirs
    check_example(ex)


def test_torchao_conv_sum_with_a_model_input_fails_at_run_time() -> None:
    # conv(x) + dequant(quant(y)): torchao sums into y's int8 tensor as laid out (NCHW); oneDNN
    # needs the accumulator channels_last. qalgebra sums into a channels_last copy it owns.
    spec = _conv_block(
        "qconv_binary",
        residual=Residual("dequant", quant=_q(0.1, 10)),
        output_quant=_q(0.2, 0, 0, 255),
        returns="quantized",
    )
    ex = build_example(spec)
    theirs = run_torchao(ex)
    assert theirs.error is not None and "accum tensor must be contiguous" in theirs.error
    check_example(ex)


def test_torchao_fuses_int8_products_that_saturate_here(pairs_saturate: bool) -> None:
    # Full-range uint8 activations: without VNNI the fused kernel overflows int16 pair sums.
    # torchao fuses them on every CPU; qalgebra refuses them where products saturate.
    full = GraphSpec(
        "refused",
        (1, 4, 5, 5),
        _q(0.02, 3, 0, 255),
        Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=3),
    )
    ex = build_example(full)
    theirs = run_torchao(ex)
    assert theirs.fused["conv"] == 1 and theirs.error is None, theirs
    _, report = lower_with_report(ex.gm, ex.inputs)
    if pairs_saturate:
        assert report.fired["qconv"] == 0
        assert any("saturating" in r.reason for r in report.refused)
    else:
        assert report.fired["qconv"] == 1 and not report.refused
    check_example(ex)  # the drawn data: levels every CPU computes exactly (see strategies)


def test_torchao_fuses_a_conv_with_int8_activations_that_cannot_run() -> None:
    spec = GraphSpec(
        "refused",
        (1, 4, 5, 5),
        _q(0.02, 0, -128, 127, torch.int8),
        Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=3),
    )
    ex = build_example(spec)
    theirs = run_torchao(ex)
    assert theirs.error is not None and "uint8" in theirs.error, theirs
    check_example(ex)  # qalgebra fuses it on uint8 levels shifted by +128 (or refuses: saturating)


def test_torchao_fuses_int8_activations_into_a_linear_that_saturates_here(
    pairs_saturate: bool,
) -> None:
    spec = GraphSpec(
        "refused", (4, 16), _q(0.02, 0, -128, 127, torch.int8), Layer(LinearSpec(16, 8), seed=3)
    )
    ex = build_example(spec)
    theirs = run_torchao(ex)
    assert theirs.fused["linear"] == 1 and theirs.error is None, theirs
    _, report = lower_with_report(ex.gm, ex.inputs)
    assert report.fired["qlinear"] == (0 if pairs_saturate else 1)
    check_example(ex)  # refused where products saturate ("saturating"), else fused


@pytest.mark.parametrize("activation", ["uint8", "int8"])
def test_torchao_is_wrong_exactly_where_this_cpu_saturates(activation: str) -> None:
    # A fact about this CPU's kernels and torchao (which never refuses), not a decision of
    # qalgebra's: the same graph, fed levels whose pair sums overflow int16 (uint8 255; int8
    # 100 with zero point 0, shifted to 228), is wrong exactly where the probe measures
    # saturation. (The drawn examples above use levels every CPU computes exactly.)
    if activation == "uint8":
        q, layer = _q(0.02, 3, 0, 255), Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=3)
        spec, x = GraphSpec("refused", (1, 4, 5, 5), q, layer), torch.full((1, 4, 5, 5), 5.04)
    else:
        q, layer = _q(0.02, 0, -128, 127, torch.int8), Layer(LinearSpec(16, 8), seed=3)
        spec, x = GraphSpec("refused", (4, 16), q, layer), torch.full((4, 16), 2.0)
    gm = build_example(spec).gm
    lowered = torchao_lower(gm, (x,))
    wrong = not torch.allclose(lowered(x), gm(x), rtol=1e-3, atol=1e-3)
    assert wrong == isa.measured("int8_pairs_saturate")


def test_torchao_sums_into_an_int8_accumulator_and_returns_int8() -> None:
    # conv(x) + dequant(int8 other) -> uint8 output: torchao fuses the sum and returns the
    # accumulator's dtype; qalgebra refuses the binary ("accumulator dtype"), fuses both convs.
    other = Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=4)
    spec = _conv_block(
        "qconv_binary",
        residual=Residual("layer", quant=_q(0.1, 0, -128, 127, torch.int8), layer=other),
        output_quant=_q(0.2, 0, 0, 255),
        returns="quantized",
    )
    ex = build_example(spec)
    theirs = run_torchao(ex)
    assert theirs.fused["conv binary"] == 1 and "torch.int8" in (theirs.wrong or ""), theirs
    check_example(ex)


# --------------------------------------------------------------------------------------------
# Opt-in: torch.compile + freezing, Inductor's counters


@pytest.mark.skipif(not os.environ.get("QALGEBRA_SLOW"), reason="set QALGEBRA_SLOW=1 (minutes)")
@pytest.mark.parametrize("name", ["conv", "linear_binary"])
def test_inductor_freezing_counters(name: str) -> None:
    from torch._dynamo.utils import counters
    from torch._inductor import config

    if name == "conv":
        ex = build_example(
            _conv_block(
                output_quant=_q(0.05, 20),
                returns="dequantized",
                consumer=Layer(ConvSpec(4, 4, (1, 1)), seed=5),
            )
        )
        keys, ours_name = ("qconv_weight_prepack_matcher_count",), "qconv"
    else:
        ex = build_example(
            GraphSpec("qlinear_binary", (4, 16), _q(0.03, 10), Layer(LinearSpec(16, 8), seed=1),
                      residual=Residual("dequant", quant=_q(0.1, 10)))
        )  # fmt: skip
        keys, ours_name = ("qlinear_weight_prepack_matcher_count",), "qlinear_binary"
    counters.clear()
    torch._dynamo.reset()
    with config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(ex.gm)
        out = flat_tensors(compiled(*ex.inputs))
    inductor = sum(counters["inductor"][k] for k in keys)
    _, report = lower_with_report(ex.gm, ex.inputs)
    assert report.fired[ours_name] >= inductor >= 1, dict(counters["inductor"])
    check_example(ex)
    # Inductor's numerics are not asserted: with a 7-bit output quant its fused conv output is
    # up to 128 steps off (docs/findings.md), like torchao's lowering (same passes).
    assert len(out) == len(ex.expected.outputs)
