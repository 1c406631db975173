"""The quantized pointwise family and quant lift-up on real torchao-quantized graphs.

Registry models (qalgebra/testing/models.py): ``inception`` has ``conv -> max_pool2d`` (3x3,
stride 1, padding 1), ``cat`` of three conv branches, ``max_pool2d(2)`` and ``flatten`` into a
linear, each as ``dequant -> op -> quant`` with shared qparams; ``maxpool_variants`` spells
max_pool2d with every default-argument combination, then cats four heads; ``resnet_like_2`` has
``conv -> relu -> max_pool2d -> quant`` (the pool left in float by the quantizer: the lift-up
over a pool makes the stem conv fuse with an int8 output) and ``avgpool -> flatten -> quant``
(the quant lifts over the flatten). ``LinearViewPermute`` (below) is Inductor's lift-up case.

Numerics: the pointwise ops move or select int8 values, so a lowering with only the pointwise
and lift-up fusions is bit-exact; with the whole catalog, float outputs stay within the bound
of tests/test_lower.py (one step on every input of the last layer).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from test_lower import assert_close_to_reference
from torch import fx, nn
from torch.fx.node import Argument

from qalgebra import isa
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion
from qalgebra.fusions.common import QUANT_RANGE_KEY
from qalgebra.fusions.liftup import QUANT_LIFT_UP, QUANT_LIFT_UP_MAX_POOL
from qalgebra.fusions.pointwise import LOW_MEMORY_MAX_POOL, QCAT, QMAXPOOL2D, QRESHAPE
from qalgebra.fusions.promotion import DEQUANT_PROMOTION
from qalgebra.lower import LoweringReport, lower, lower_with_report
from qalgebra.match import explain, find_matches
from qalgebra.testing.forms import FORMS, decompose_compute, to_decomposed
from qalgebra.testing.models import MODELS
from qalgebra.testing.pointwise_strategies import (
    POINTWISE_FUSIONS,
    PointwiseExample,
    pointwise_examples,
)
from qalgebra.testing.quantize import quantize_pt2e

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
onednn = torch.ops.onednn
QMAXPOOL_OP = torch.ops.quantized.max_pool2d.default

#: Only the fusions of this family (and promotion): the result must be bit-exact.
POINTWISE_ONLY: tuple[Fusion, ...] = (
    DEQUANT_PROMOTION,
    QUANT_LIFT_UP,
    QUANT_LIFT_UP_MAX_POOL,
    QMAXPOOL2D,
    QCAT,
    QRESHAPE,
)


class LinearViewPermute(nn.Module):
    """``fc2(fc1(x).view(b, s, 4, 8).permute(0, 2, 1, 3))``: the quantizer puts fc2's input
    quantize after the permute, so fc1 has a float output unless the quant is lifted."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.fc1(x).view(b, s, 4, 8).permute(0, 2, 1, 3)
        out: torch.Tensor = self.fc2(y)
        return out


def _linear_view_permute() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return LinearViewPermute().eval(), (torch.randn(2, 6, 16),)


@functools.cache
def _quantized(
    name: str, reduce_range: bool = True
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The model quantized with 7-bit activations (every CPU fuses and computes them exactly)
    or 8-bit ones."""
    model, inputs = _linear_view_permute() if name == "linear_view_permute" else MODELS[name]()
    return quantize_pt2e(model, inputs, reduce_range=reduce_range), inputs


@functools.cache
def _in_form(name: str, form: str) -> fx.GraphModule:
    """The model in ``form``: one of ``FORMS``; ``compute``: decomposed q/dq re-exported with
    decompositions (``max_pool2d_with_indices -> getitem``, flatten as ``view``), what Inductor
    sees; ``indices`` / ``decomposed_indices``: op / decomposed form with two-output pools."""
    gm, inputs = _quantized(name)
    if form == "compute":
        return decompose_compute(to_decomposed(gm), inputs)
    if form == "indices":  # op form, pools as decompositions spell them (no re-export)
        return _with_indices_spelling(gm)
    if form == "decomposed_indices":
        return to_decomposed(_with_indices_spelling(gm))
    return FORMS[form](gm)


#: Exact counts of this family's fusions (the others 0).
EXPECTED: dict[str, dict[str, int]] = {
    "inception": {"qmaxpool2d": 2, "qcat": 1, "qreshape": 1},
    "maxpool_variants": {"qmaxpool2d": 4, "qcat": 1},
    "resnet_like_2": {"quant_lift_up_max_pool": 1, "quant_lift_up": 1},
    "linear_view_permute": {"quant_lift_up": 1},
}
#: quantized.max_pool2d nodes in the lowered graph.
POOLS = {"inception": 2, "maxpool_variants": 4, "resnet_like_2": 1, "linear_view_permute": 0}
MODELS_WITH_POOLS = ("inception", "maxpool_variants", "resnet_like_2")
#: Forms every model is lowered in; ``compute`` (a re-export, seconds) only for two models.
REAL_FORMS = ("op", "tensor_qparams", "decomposed", "shared_dequants")


def _fired(report: LoweringReport) -> dict[str, int]:
    return {name: report.fired.get(name, 0) for name in POINTWISE_FUSIONS}


def _expected(name: str) -> dict[str, int]:
    return {k: EXPECTED[name].get(k, 0) for k in POINTWISE_FUSIONS}


def _calls(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _my_refusals(report: LoweringReport) -> list[str]:
    return [f"{r.fusion}: {r.reason}" for r in report.refused if r.fusion in POINTWISE_FUSIONS]


@pytest.mark.parametrize(
    ("name", "form"),
    [
        (name, form)
        for name in ("inception", "maxpool_variants", "resnet_like_2")
        for form in REAL_FORMS
    ]
    + [("inception", "compute"), ("maxpool_variants", "compute")],
)
def test_no_float_pointwise_island_is_left(name: str, form: str) -> None:
    graph = _in_form(name, form)
    inputs = _quantized(name)[1]
    before = graph.code
    lowered, report = lower_with_report(graph, inputs)
    assert _fired(report) == _expected(name), report.summary()
    assert not _my_refusals(report), report.summary()
    assert graph.code == before
    lowered.graph.lint()
    assert len(_calls(lowered, QMAXPOOL_OP)) == POOLS[name]
    float_pools = (aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
    assert not _calls(lowered, *float_pools)
    for fusion in (QMAXPOOL2D, QCAT, QRESHAPE):  # no dequant -> op -> quant left
        assert find_matches(fusion.pattern, lowered) == []
    assert_close_to_reference(graph(*inputs), lowered(*inputs), _quantized(name)[0])


@pytest.mark.parametrize("form", ["op", "decomposed", "indices", "decomposed_indices"])
@pytest.mark.parametrize("name", ["inception", "maxpool_variants", "resnet_like_2"])
def test_pointwise_lowering_alone_is_bit_exact(name: str, form: str) -> None:
    graph = _in_form(name, form)
    inputs = _quantized(name)[1]
    lowered, report = lower_with_report(graph, inputs, fusions=POINTWISE_ONLY)
    assert _fired(report) == _expected(name), report.summary()
    assert torch.equal(lowered(*inputs), graph(*inputs))


@pytest.mark.parametrize("bits", [7, 8])
def test_resnet_stem_conv_fuses_with_int8_output_into_the_pool(bits: int) -> None:
    # 8-bit activations fuse only where int8 products do not saturate (forced here: the
    # decisions are checked on every CPU; nothing is run)
    gm, inputs = _quantized("resnet_like_2", reduce_range=bits == 7)
    with isa.forced(int8_pairs_saturate=bits == 7):
        lowered = lower(gm, inputs)
    (pool,) = _calls(lowered, QMAXPOOL_OP)
    assert pool.args[1:] == ([2, 2], [2, 2], [0, 0], [1, 1], False)
    producer = pool.args[0]
    assert isinstance(producer, fx.Node)
    # the pool's input is known to lie in the stem's output range: no clamp after the pool
    assert producer.meta[QUANT_RANGE_KEY] == (0, 2**bits - 1)
    assert all("clamp" not in str(user.target) for user in pool.users)
    # a 7-bit range is folded into the stem's relu as a hardtanh: no clamp pass either
    assert isinstance(producer, fx.Node) and producer.target is onednn.qconv_pointwise.default
    assert producer.args[13] == torch.uint8
    assert producer.args[14] == ("hardtanh" if bits == 7 else "relu")


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_lift_up_over_view_and_permute_gives_the_linear_an_int8_output(form: str) -> None:
    graph = _in_form("linear_view_permute", form)
    inputs = _quantized("linear_view_permute")[1]
    lowered, report = lower_with_report(graph, inputs)
    assert _fired(report) == _expected("linear_view_permute"), report.summary()
    assert report.fired["qlinear"] == 2, report.summary()
    fc1, _ = _calls(lowered, onednn.qlinear_pointwise.default)
    assert fc1.args[9] == torch.uint8
    # the int8 tensor is reshaped and permuted, the float chain is gone
    assert len(_calls(lowered, aten.permute.default)) == 1
    assert_close_to_reference(
        graph(*inputs), lowered(*inputs), _quantized("linear_view_permute")[0]
    )


def test_lift_up_does_not_start_at_a_dequantize() -> None:
    gm, _ = _quantized("inception")
    (flatten,) = _calls(gm, aten.flatten.using_ints)
    (quant,) = flatten.users
    why = explain(QUANT_LIFT_UP.pattern, quant)
    assert why is not None and "not to be a dequantize" in why.reason
    assert explain(QRESHAPE.pattern, quant) is None


def _with_cat_input_rescaled(gm: fx.GraphModule, index: int) -> fx.GraphModule:
    """A copy whose cat input ``index`` is quantized with twice the scale (consistently)."""
    new = FORMS["op"](gm)
    (cat,) = _calls(new, aten.cat.default)
    tensors = cat.args[0]
    assert isinstance(tensors, list)
    dequant = tensors[index]
    assert isinstance(dequant, fx.Node) and dequant.target is qd.dequantize_per_tensor.default
    quant = dequant.args[0]
    assert isinstance(quant, fx.Node)
    for node in (quant, dequant):
        scale = node.args[1]
        assert isinstance(scale, float)
        node.args = (node.args[0], 2 * scale, *node.args[2:])
    new.recompile()
    return new


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_cat_of_differently_quantized_inputs_is_refused_with_the_input_named(form: str) -> None:
    gm, inputs = _quantized("inception")
    graph = _with_cat_input_rescaled(gm, 1)
    if form == "decomposed":
        graph = to_decomposed(graph)
    lowered, report = lower_with_report(graph, inputs)
    fired = _fired(report)
    assert fired["qcat"] == 0 and fired["qmaxpool2d"] == 2 and fired["qreshape"] == 1
    (refusal,) = _my_refusals(report)
    assert refusal.startswith("qcat: ") and "cat input 1 (" in refusal, refusal
    assert "must be quantized alike" in refusal
    assert len(_calls(lowered, aten.cat.default)) == 1  # the float cat stays
    assert_close_to_reference(graph(*inputs), lowered(*inputs), gm)


def _with_indices_read(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose first ``max_pool2d_with_indices`` also returns its indices."""
    new = FORMS["op"](gm)
    pool = _calls(new, aten.max_pool2d_with_indices.default)[0]
    (output,) = (n for n in new.graph.nodes if n.op == "output")
    with new.graph.inserting_before(output):
        indices = new.graph.call_function(operator.getitem, (pool, 1))
    returned = output.args[0]
    leaves = list(returned) if isinstance(returned, list | tuple) else [returned]
    output.args = ((*leaves, indices),)
    new.graph._codegen = fx.graph.CodeGen()  # plain outputs (export's pytree spec has one)
    new.graph.lint()
    new.recompile()
    return new


@pytest.mark.parametrize("form", ["indices", "compute"])
def test_a_pool_whose_indices_are_read_is_refused(form: str) -> None:
    graph = _with_indices_read(_in_form("maxpool_variants", form))
    inputs = _quantized("maxpool_variants")[1]
    lowered, report = lower_with_report(graph, inputs)
    assert _fired(report)["qmaxpool2d"] == 3, report.summary()
    (refusal,) = _my_refusals(report)
    assert refusal.startswith("qmaxpool2d: ") and "reads the indices" in refusal, refusal
    assert len(_calls(lowered, aten.max_pool2d_with_indices.default)) == 1
    out, indices = lowered(*inputs)
    ref_out, ref_indices = graph(*inputs)
    assert torch.equal(indices, ref_indices)
    assert_close_to_reference(ref_out, out, _quantized("maxpool_variants")[0])


def _with_indices_spelling(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with every ``max_pool2d`` respelled ``getitem(max_pool2d_with_indices(...), 0)``
    (what decompositions leave; cheaper than re-exporting with ``decompose_compute``)."""
    new = FORMS["op"](gm)
    for pool in _calls(new, aten.max_pool2d.default):
        with new.graph.inserting_before(pool):
            two = new.graph.call_function(aten.max_pool2d_with_indices.default, pool.args)
            values = new.graph.call_function(operator.getitem, (two, 0))
        values.meta.update(pool.meta)
        pool.replace_all_uses_with(values)
        new.graph.erase_node(pool)
    new.graph.lint()
    new.recompile()
    return new


def _with_low_memory_pools(gm: fx.GraphModule) -> fx.GraphModule:
    """``max_pool2d_with_indices`` respelled as Inductor's low-memory pool (explicit stride)."""
    import torch._inductor.inductor_prims  # noqa: F401  registers the prim (torchao did already)

    low_memory = LOW_MEMORY_MAX_POOL.resolve()
    assert low_memory is not None
    new = FORMS["op"](gm)
    defaults: list[Argument] = [[], [0, 0], [1, 1], False]
    for pool in _calls(new, aten.max_pool2d_with_indices.default):
        kernel = pool.args[1]
        given: list[Argument] = [*pool.args[2:], *defaults[len(pool.args) - 2 :]]
        stride, padding, dilation, ceil = given
        args = (pool.args[0], kernel, stride or kernel, padding, dilation, ceil)
        with new.graph.inserting_before(pool):
            replacement = new.graph.call_function(low_memory, args)
        pool.replace_all_uses_with(replacement)
        new.graph.erase_node(pool)
    new.graph.lint()
    new.recompile()
    return new


@pytest.mark.parametrize("form", ["indices", "compute"])
def test_the_low_memory_pool_spelling_lowers_too(form: str) -> None:
    graph = _with_low_memory_pools(_in_form("maxpool_variants", form))
    inputs = _quantized("maxpool_variants")[1]
    assert not _calls(graph, aten.max_pool2d_with_indices.default)
    lowered, report = lower_with_report(graph, inputs, fusions=POINTWISE_ONLY)
    assert _fired(report) == _expected("maxpool_variants"), report.summary()
    assert len(_calls(lowered, QMAXPOOL_OP)) == 4
    assert torch.equal(lowered(*inputs), graph(*inputs))


def test_a_dequant_shared_with_other_readers_needs_no_promotion() -> None:
    graph = _in_form("inception", "shared_dequants")
    inputs = _quantized("inception")[1]
    no_promotion = tuple(f for f in DEFAULT_FUSIONS if f is not DEQUANT_PROMOTION)
    lowered, report = lower_with_report(graph, inputs, fusions=no_promotion)
    assert _fired(report) == _expected("inception"), report.summary()
    assert_close_to_reference(graph(*inputs), lowered(*inputs), _quantized("inception")[0])


@pytest.mark.parametrize("variant", ["dynamic_batch", "bf16"])
def test_symbolic_batch_and_int8_mixed_bf16(variant: str) -> None:
    model, inputs = MODELS["inception"]()
    gm = quantize_pt2e(
        model,
        inputs,
        dynamic_batch=variant == "dynamic_batch",
        bf16=variant == "bf16",
        reduce_range=True,
    )
    lowered, report = lower_with_report(gm, inputs)
    assert _fired(report) == _expected("inception"), report.summary()
    # another batch size (the calibration values twice: random values would leave calibration
    # range, where oneDNN's and the reference's int8 rounding disagree more than the bound)
    runs = (inputs[0].repeat(2, 1, 1, 1),) if variant == "dynamic_batch" else inputs
    assert_close_to_reference(gm(*runs), lowered(*runs), gm)


def test_lowering_twice_fires_nothing_more() -> None:
    graph = _in_form("inception", "op")
    inputs = _quantized("inception")[1]
    once = lower(graph, inputs)
    twice, report = lower_with_report(once, inputs)
    assert not any(_fired(report).values()), report.summary()
    assert torch.equal(twice(*inputs), once(*inputs))


def _flat(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    assert isinstance(value, Sequence)
    return [t for v in value for t in _flat(v)]


@given(pointwise_examples())
def test_random_pointwise_graphs_lower_exactly(example: PointwiseExample) -> None:
    gm, inputs = example.gm, example.inputs
    before = gm.code
    reference = _flat(gm(*inputs))
    lowered, report = lower_with_report(gm, inputs)
    assert gm.code == before
    assert _fired(report) == dict(example.expected.fired), f"{example!r}\n{report.summary()}"
    reasons = [r.reason for r in report.refused]
    for expected in example.expected.refusals:
        assert any(expected in r for r in reasons), f"{example!r}: no {expected!r} in {reasons}"
    assert len(reasons) == len(example.expected.refusals), f"{example!r}: {reasons}"
    lowered.graph.lint()
    outputs = _flat(lowered(*inputs))
    assert len(outputs) == len(reference) == len(example.expected.outputs)
    for ours, ref in zip(outputs, reference, strict=True):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), f"{example!r}"
