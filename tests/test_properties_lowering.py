"""Properties of the lowering on random quantized graphs nobody wrote by hand.

Every family of ``qalgebra.testing.strategies.families()`` (built-in: qconv, qlinear, their
binary variants, dequant promotion, refusals, graphs outside the catalog; plug-ins: pointwise,
weight-only) draws graphs in every form, and each drawn example must satisfy every property of
:mod:`qalgebra.testing.properties`: the expected fusions fire (and the expected refusals are
reported, nothing else), the input module and tensors are untouched, the lowered graph lints
and runs without writing its inputs or aliasing them, its outputs are within the derived
bound of the reference, and lowering it again fires nothing and changes nothing.

``test_family[...]`` is :func:`qalgebra.testing.campaign.family_test`, parametrized by family:
the one definition of a family's property test, which ``qalgebra fuzz`` and HypoFuzz run too.
The Hypothesis profile (tests/conftest.py) sets the number of examples: ``ci`` is derandomized.
A failure shrinks to a small graph; its standalone reproduction script (``example.code()``) is
printed with the falsifying example.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings

from qalgebra.combinators import Unary
from qalgebra.testing.campaign import family_test
from qalgebra.testing.properties import (
    PropertyFailure,
    check_example,
    check_fires,
    check_numerics,
)
from qalgebra.testing.strategies import (
    ConvSpec,
    Example,
    ExampleLike,
    Expected,
    GraphSpec,
    Layer,
    LinearSpec,
    OutputBound,
    QuantSpec,
    Residual,
    build_example,
    examples,
    families,
)

FAMILY_NAMES = sorted(families())

_SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")


def _check(ex: ExampleLike) -> None:
    note(ex.code())
    check_example(ex)


def _q(
    scale: float, zp: int, qmin: int = 0, qmax: int = 127, dtype: torch.dtype = torch.uint8
) -> QuantSpec:
    return QuantSpec(scale, zp, qmin, qmax, dtype)


#: Zero point 0 everywhere, decomposed: the add/sub nodes are absent (the seed-000 shape).
ZERO_ZP_DECOMPOSED = build_example(
    GraphSpec(
        family="qconv",
        input_shape=(1, 3, 6, 6),
        input_quant=_q(0.02, 0),
        main=Layer(ConvSpec(3, 4, (3, 3), padding=(1, 1)), Unary.RELU, seed=1),
        output_quant=_q(0.05, 0),
        returns="dequantized",
        consumer=Layer(ConvSpec(4, 4, (1, 1)), Unary.NONE, seed=2),
    ),
    form="decomposed",
)
#: ``other + conv(x)``: the residual on the left of the add, then relu and an int8 output.
SWAPPED_ADD = build_example(
    GraphSpec(
        family="qconv_binary",
        input_shape=(1, 4, 5, 5),
        input_quant=_q(0.02, 3),
        main=Layer(ConvSpec(4, 4, (3, 3), padding=(1, 1)), seed=3),
        residual=Residual("dequant", swapped=True, relu=True, quant=_q(0.1, 10)),
        output_quant=_q(0.2, 0),
        returns="quantized",
    ),
    form="decomposed_single_clamp",
)
#: int8-mixed-bf16: dequant -> to(bf16) -> linear -> gelu in bf16 -> quantize.
BF16_CONVERT = build_example(
    GraphSpec(
        family="qlinear",
        input_shape=(2, 3, 16),
        input_quant=_q(0.03, 64),
        main=Layer(LinearSpec(16, 8), Unary.GELU, seed=4),
        output_quant=_q(0.05, 20),
        returns="dequantized",
        dtype="bf16",
    ),
    form="op",
)


@_SLOW_OK
@given(ex=examples())
@example(ex=ZERO_ZP_DECOMPOSED)
@example(ex=SWAPPED_ADD)
@example(ex=BF16_CONVERT)
def test_every_family_every_form(ex: ExampleLike) -> None:
    _check(ex)


#: One Hypothesis test per family (the definition ``qalgebra fuzz`` and HypoFuzz run too):
#: ``hypothesis fuzz -- tests/test_properties_lowering.py -k test_family`` fuzzes each family.
test_family = pytest.mark.parametrize("family", FAMILY_NAMES)(_SLOW_OK(family_test()))


@pytest.mark.parametrize(
    "ex", [ZERO_ZP_DECOMPOSED, SWAPPED_ADD, BF16_CONVERT], ids=["zero_zp", "swapped_add", "bf16"]
)
def test_pinned_examples_fire_what_they_say(ex: Example) -> None:
    fired = {k: v for k, v in ex.expected.fired.items() if v}
    assert fired, "a pinned example must expect at least one fusion"
    outcome = check_example(ex)
    assert {k: outcome.report.fired[k] for k in fired} == fired


def test_pinned_examples_are_what_they_claim() -> None:
    zero_zp = ZERO_ZP_DECOMPOSED.gm.graph
    subs = [
        n
        for n in zero_zp.nodes
        if n.target in (torch.ops.aten.sub.Tensor, torch.ops.aten.add.Tensor)
    ]
    assert not subs  # zp == 0: no zero-point add/sub at all
    (add,) = [
        n
        for n in SWAPPED_ADD.gm.graph.nodes
        if n.target is torch.ops.aten.add.Tensor and isinstance(n.args[1], torch.fx.Node)
    ]
    assert add.args[1].target is torch.ops.aten.conv2d.default  # the conv is the right operand
    to_bf16 = [n for n in BF16_CONVERT.gm.graph.nodes if n.kwargs.get("dtype") is torch.bfloat16]
    assert len(to_bf16) >= 2  # activation and weight converted to bf16


def test_example_code_rebuilds_the_same_graph() -> None:
    ex = SWAPPED_ADD
    namespace: dict[str, object] = {"__name__": "reproduction"}
    exec(compile(ex.code(), "<example>", "exec"), namespace)
    gm, inputs = namespace["gm"], namespace["inputs"]
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(inputs, tuple)
    assert gm.code == ex.gm.code
    assert all(torch.equal(a, b) for a, b in zip(inputs, ex.inputs, strict=True))
    assert torch.equal(gm(*inputs), ex.gm(*ex.inputs))


def test_repr_rebuilds_the_example() -> None:
    import qalgebra.testing.strategies as strategies

    rebuilt = eval(repr(SWAPPED_ADD), vars(strategies))  # our own repr
    assert rebuilt.gm.code == SWAPPED_ADD.gm.code
    assert rebuilt.expected == SWAPPED_ADD.expected


# The checkers themselves must fail where they should (a property that cannot fail proves
# nothing): wrong counts, a missing refusal, numbers off by more than the bound.


def test_check_fires_reports_a_silent_miss() -> None:
    outcome = check_example(SWAPPED_ADD)
    wants_more = Expected(fired={**SWAPPED_ADD.expected.fired, "qconv": 1})
    with pytest.raises(PropertyFailure, match=r"\[fires\].*'qconv': \(1, 0\)"):
        check_fires(wants_more, outcome.report)
    wants_refusal = Expected(fired={}, refusals=("saturating",))
    with pytest.raises(PropertyFailure, match="expected a refusal"):
        check_fires(wants_refusal, outcome.report)


def test_check_numerics_catches_one_step_too_many() -> None:
    ref = torch.tensor([10, 20, 30], dtype=torch.uint8)
    check_numerics([OutputBound("quantized", steps=1)], [ref], [ref + 1])
    with pytest.raises(PropertyFailure, match=r"\[numerics\]"):
        check_numerics([OutputBound("quantized", steps=1)], [ref], [ref + 2])
    many = torch.zeros(100)
    off = many.clone()
    off[:5] = 1e-3
    check_numerics([OutputBound("float", atol=1e-2, agree=0.9, agree_atol=1e-6)], [many], [off])
    with pytest.raises(PropertyFailure, match="agree"):
        check_numerics(
            [OutputBound("float", atol=1e-2, agree=0.99, agree_atol=1e-6)], [many], [off]
        )
