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

The conv/linear families' decisions depend on whether this CPU's int8 pair sums saturate:
``test_family`` runs them under this CPU's answer of ``qalgebra.isa.int8_pairs_saturate`` and
``test_family_other_cpu`` under the other answer (forced), so every CPU checks both sets of
decisions; the drawn data is such that both kinds of CPU compute what they fuse exactly (see
``qalgebra.testing.strategies``). Pinned examples cover every post-op with signed int8 and
float outputs, fp32 and int8-mixed-bf16.

The Hypothesis profile (tests/conftest.py) sets the number of examples: ``ci`` is derandomized.
A failure shrinks to a small graph; its standalone reproduction script (``example.code()``) is
printed with the falsifying example.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings

from qalgebra import isa
from qalgebra.combinators import Unary
from qalgebra.fusions.conv import CONV_UNARIES
from qalgebra.fusions.linear import LINEAR_UNARIES
from qalgebra.testing.campaign import family_test
from qalgebra.testing.properties import (
    PropertyFailure,
    check_dtypes,
    check_example,
    check_fires,
    check_numerics,
)
from qalgebra.testing.strategies import (
    ConvSpec,
    DType,
    Example,
    ExampleLike,
    Expected,
    GraphSpec,
    Layer,
    LinearSpec,
    OutputBound,
    QuantSpec,
    Residual,
    _randint,  # the seeded weights of a spec
    build_example,
    examples,
    families,
    flat_tensors,
    graph_specs,
)

qd = torch.ops.quantized_decomposed

FAMILY_NAMES = sorted(families())
#: Families whose expected fusions depend on ``isa.int8_pairs_saturate``: drawn under both.
SATURATION_FAMILIES = frozenset(
    {"qconv", "qlinear", "qconv_binary", "qlinear_binary", "dequant_promotion", "refused"}
)

_SLOW_OK = settings(
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the forced probe holds for every example
    ]
)


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
def test_every_family_every_form(pairs_saturate: bool, ex: ExampleLike) -> None:
    _check(ex)


#: One Hypothesis test per family (the definition ``qalgebra fuzz`` and HypoFuzz run too):
#: ``hypothesis fuzz -- tests/test_properties_lowering.py -k test_family`` fuzzes each family.
test_family = pytest.mark.parametrize("family", FAMILY_NAMES)(_SLOW_OK(family_test()))


@pytest.mark.parametrize("family", sorted(SATURATION_FAMILIES))
def test_family_other_cpu(family: str) -> None:
    """``test_family`` as on a CPU whose int8 pair sums saturate the other way than this one's."""
    other = not isa.measured("int8_pairs_saturate")
    with isa.forced(int8_pairs_saturate=other):
        _SLOW_OK(family_test())(family)


#: Pre-activations of the post-op examples below span about +-RMS (see ``_post_op_spec``).
RMS = 16.0
#: Post-op scalars: hardtanh with a negative minimum, a leaky slope that is not the default.
POST_SCALARS = {Unary.HARDTANH: (-0.6 * RMS, 0.8 * RMS), Unary.LEAKY_RELU: (0.2,)}
#: A signed output: int8 with a negative zero point, scale for about +-4 RMS.
SIGNED = _q(4 * RMS / 127, -4, -128, 127, torch.int8)
NEGATIVE_BELOW_ONE_STEP = ("gelu", "gelu_tanh", "silu", "hardswish")


def _post_op_spec(kind: str, post: Unary, output: str, dtype: DType) -> GraphSpec:
    """A conv or linear whose ``post`` keeps both signs of its pre-activation, with a signed int8
    or a float output (7-bit uint8 input, zero point 40: values about -2 .. 4.4)."""
    op: ConvSpec | LinearSpec = (
        ConvSpec(4, 6, (3, 3), padding=(1, 1)) if kind == "conv" else LinearSpec(16, 12)
    )
    shape = (1, 4, 6, 6) if kind == "conv" else (2, 3, 16)
    layer = Layer(op, post, POST_SCALARS.get(post, ()), weight_scale=0.01, bias_scale=RMS, seed=7)
    quantized = output == "int8"
    return GraphSpec(
        f"q{kind}",
        shape,
        _q(0.05, 40),
        layer,
        output_quant=SIGNED if quantized else None,
        returns="quantized" if quantized else "float",
        dtype=dtype,
        seed=3,
    )


_BOTH: tuple[DType, ...] = ("fp32", "bf16")
_BF16: tuple[DType, ...] = ("bf16",)
POST_OP_EXAMPLES = {
    f"{kind}-{post.name.lower()}-{output}-{dtype}": build_example(
        _post_op_spec(kind, post, output, dtype)
    )
    for kind, posts, dtypes in (("linear", LINEAR_UNARIES, _BOTH), ("conv", CONV_UNARIES, _BF16))
    for post in posts
    for output in ("int8", "float")
    for dtype in dtypes
}


@pytest.mark.parametrize("name", sorted(POST_OP_EXAMPLES))
def test_every_post_op_with_signed_and_float_outputs(name: str) -> None:
    ex = POST_OP_EXAMPLES[name]
    outcome = check_example(ex)
    assert outcome.report.fired[f"q{name.split('-')[0]}"] == 1
    # both signs reach the output: a post-op that got its negative side wrong is visible (the
    # negative side of gelu, silu and hardswish is below one step of the int8 output)
    (out,) = flat_tensors(ex.gm(*ex.inputs))
    post, quantized = name.split("-")[1], out.dtype == torch.int8
    zero = float(SIGNED.zero_point) if quantized else 0.0
    if post not in ("relu", "relu6") and not (quantized and post in NEGATIVE_BELOW_ONE_STEP):
        assert bool((out.double() < zero).any()) and bool((out.double() > zero).any()), name


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


def test_pinned_examples_expect_the_same_on_both_kinds_of_cpu() -> None:
    # Built once at import, whatever the probe said then: 7-bit inputs make every decision the
    # same on a saturating CPU and a VNNI one.
    import qalgebra.testing.strategies as strategies

    pinned = [ZERO_ZP_DECOMPOSED, SWAPPED_ADD, BF16_CONVERT, *POST_OP_EXAMPLES.values()]
    for ex in pinned:
        for saturating in (True, False):
            with isa.forced(int8_pairs_saturate=saturating):
                rebuilt = eval(repr(ex), vars(strategies))  # our own repr
            assert rebuilt.expected == ex.expected, repr(ex)


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


def test_check_numerics_holds_each_element_to_its_own_bound() -> None:
    ref = torch.tensor([10, 20, 30], dtype=torch.uint8)
    lo, hi = torch.tensor([10.0, 19.0, 30.0]), torch.tensor([11.0, 20.0, 30.0])
    interval = OutputBound("quantized", steps=1, interval=(lo, hi))
    check_numerics([interval], [ref], [torch.tensor([11, 19, 30], dtype=torch.uint8)])
    for wrong in ([9, 20, 30], [10, 21, 30], [10, 20, 31]):  # one level outside, one element
        with pytest.raises(PropertyFailure, match=r"\[numerics\]"):
            check_numerics([interval], [ref], [torch.tensor(wrong, dtype=torch.uint8)])
    floats = torch.tensor([1.0, 100.0])
    per_element = OutputBound("float", atol=torch.tensor([1e-3, 1.0], dtype=torch.float64))
    check_numerics([per_element], [floats], [floats + torch.tensor([5e-4, 0.9])])
    with pytest.raises(PropertyFailure, match=r"at \[0\]"):  # within the largest, not its own
        check_numerics([per_element], [floats], [floats + torch.tensor([2e-3, 0.0])])


def test_check_dtypes_sees_the_outputs_without_running_kernels() -> None:
    outcome = check_example(BF16_CONVERT)
    (reference,) = flat_tensors(BF16_CONVERT.gm(*BF16_CONVERT.inputs))
    check_dtypes(outcome.lowered, BF16_CONVERT.inputs, [reference])
    assert reference.dtype == torch.bfloat16
    with pytest.raises(PropertyFailure, match=r"\[dtypes\]"):
        check_dtypes(outcome.lowered, BF16_CONVERT.inputs, [reference.float()])


@settings(max_examples=20, deadline=None)
@given(spec=graph_specs("refused"))
def test_inputs_a_saturating_cpu_refuses_hold_levels_every_cpu_computes(spec: GraphSpec) -> None:
    # Data a fused layer reads from the graph's input: exact on a CPU whose int8 pair sums
    # saturate too, so the lowering a VNNI CPU does is checked (numerics included) on any CPU.
    ex = build_example(spec)
    levels = qd.quantize_per_tensor.default(ex.inputs[0], *spec.input_quant.args()).int()
    shifted = levels + (128 if spec.input_quant.dtype == torch.int8 else 0)
    w_max = int(
        _randint(spec.main.seed, spec.main.op.weight_shape, spec.main.weight_max).abs().max()
    )
    assert int(shifted.max()) <= isa.pair_safe_level(w_max)


def _saturating_consumer(output: QuantSpec) -> GraphSpec:
    return GraphSpec(
        "qlinear",
        (4, 16),
        _q(0.05, 0),
        Layer(LinearSpec(16, 8), Unary.RELU, seed=2),
        output_quant=output,
        returns="quantized",
        consumer=Layer(LinearSpec(8, 4), seed=3),
    )


def test_a_fused_layer_reading_levels_only_vnni_computes_exactly_is_left_unchecked() -> None:
    # The consumer reads uint8 levels up to 255 with weights up to 127: fused where pairs do
    # not saturate, its numbers differ on a CPU where they do. Its output is not held to a
    # bound then (the decisions are); where it is refused, or reads 7-bit levels, it is.
    wide, narrow = _q(0.02, 0, 0, 255), _q(0.04, 0, 0, 127)
    with isa.forced(int8_pairs_saturate=False):
        unchecked = build_example(_saturating_consumer(wide)).expected.outputs[1]
        checked = build_example(_saturating_consumer(narrow)).expected.outputs[1]
    with isa.forced(int8_pairs_saturate=True):
        refused = build_example(_saturating_consumer(wide))
        check_example(refused)
    assert unchecked.atol == math.inf and "saturating CPU" in unchecked.why
    assert isinstance(checked.atol, torch.Tensor)
    assert isinstance(refused.expected.outputs[1].atol, torch.Tensor)
    assert refused.expected.refusals == ("saturating",)
