"""qalgebra inside torch.compile: the ``qalgebra`` backend and ``qalgebra.compile.compile``.

Each compile costs seconds (5-30 s with a cold Inductor cache on a loaded 2-core machine), so CI
compiles ten small registry models, one property per compile (about 2-5 minutes in all); the
comparison with Inductor's own quantization path on the decomposed form is opt-in
(``QALGEBRA_SLOW=1``), as are the larger comparisons of bench/bench_compile.py. Numerics are
checked against the quantized module run eagerly, by the oracle's rules. The tests that count
fusions compile with ``cost="off"``: the cost check's choices depend on this machine's timings
(tests/test_costcheck.py forces them both ways).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from importlib.metadata import entry_points
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from qalgebra import isa, selfcheck
from qalgebra.catalog_pass import CatalogPass
from qalgebra.combinators import Unary
from qalgebra.compile import (
    COST_OPTION,
    SELFCHECK_OPTION,
    CompileReport,
    backend,
    compile,
    inductor_quant_fusions,
    recording,
)
from qalgebra.errors import LoweringError, UnsupportedGraphError
from qalgebra.fusions.conv import QCONV
from qalgebra.inductor_prep import (
    choose_qparams_with_zero,
    decompose,
    fetch,
    functional_clamps,
    in_place_clamp_lowerings,
    kernels_closed_to_post_op_patterns,
    respell_unfused,
    scalar_constants_as_vectors,
)
from qalgebra.lower import LoweringReport, lower_with_report
from qalgebra.qdq_arithmetic import respell_runtime_as_arithmetic
from qalgebra.testing.config_strategies import DynamicLinearSpec
from qalgebra.testing.config_strategies import build_example as build_config_example
from qalgebra.testing.forms import to_decomposed, to_tensor_qparams
from qalgebra.testing.models import build
from qalgebra.testing.oracle import BF16_RTOL, assert_outputs_close, output_quant_steps
from qalgebra.testing.properties import check_compiled
from qalgebra.testing.quantize import quantize_pt2e

aten = torch.ops.aten
FAMILIES = ("qconv", "qconv_binary", "qlinear", "qlinear_binary")

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def the_step(gm: fx.GraphModule) -> float | None:
    """The quantization step of a one-output model's output (None: a compute op's output)."""
    (step,) = output_quant_steps(gm)
    return step


def families(report: LoweringReport) -> dict[str, int]:
    return {name: report.fired.get(name, 0) for name in FAMILIES}


def only_report(reports: list[CompileReport]) -> CompileReport:
    assert len(reports) == 1, [r.summary() for r in reports]
    return reports[0]


def run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = module(*inputs)
    assert isinstance(out, torch.Tensor)
    return out


# ---------------------------------------------------------------------------------------------
# Cheap: no compile


def test_the_backend_is_registered_by_its_entry_point() -> None:
    points = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert points.get("qalgebra") == "qalgebra.compile:backend"
    assert "qalgebra" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("qalgebra") is backend


@pytest.mark.parametrize("form", ["op", "tensor_qparams"])
def test_respelled_quant_nodes_compute_the_same_values_with_no_quant_op_left(form: str) -> None:
    model, inputs = build("conv_add_conv_rhs_relu")
    gm = quantize_pt2e(model, inputs)
    if form == "tensor_qparams":
        gm = to_tensor_qparams(gm)
    unlowered, _ = lower_with_report(gm, inputs, fusions=())  # every q/dq node left
    respelled = copy.deepcopy(unlowered)
    hidden = respell_unfused(respelled)
    left = [
        n.name
        for n in respelled.graph.nodes
        if getattr(n.target, "namespace", None) == "quantized_decomposed"
    ]
    assert hidden and not left, (hidden, left)
    assert torch.equal(run(respelled, inputs), run(gm, inputs))  # bit-exact: same arithmetic


def test_respelled_qparams_are_tensor_constants_where_inductor_would_write_numbers() -> None:
    """fp32 arithmetic on a tensor of rank 2 or more reads its scale and zero point from
    shared (1,)*rank constants (so C++ kernels differing only in qparams have one source);
    a 1-d input and a bf16 dequantize keep numbers (broadcasting would change the shape, a
    tensor operand the dtype); the values are the op's, bit for bit."""
    from torch.fx.experimental.proxy_tensor import make_fx

    qd = torch.ops.quantized_decomposed

    def model(x4: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for x in (x4, x1):
            q = qd.quantize_per_tensor.default(x, 0.02, 3, 0, 255, torch.uint8)
            outs.append(qd.dequantize_per_tensor.default(q, 0.02, 3, 0, 255, torch.uint8))
        q = qd.quantize_per_tensor.default(x4, 0.02, 3, 0, 255, torch.uint8)
        outs.append(
            qd.dequantize_per_tensor.default(
                q, 0.02, 3, 0, 255, torch.uint8, out_dtype=torch.bfloat16
            )
        )
        return tuple(outs)

    inputs = (torch.randn(2, 3, 4, 5) * 3, torch.randn(7) * 3)
    gm = make_fx(model, tracing_mode="fake")(*inputs)  # fake meta vals, as under compile
    expected = model(*inputs)
    respell_unfused(gm)
    constants = {
        str(n.target): fetch(gm, str(n.target)) for n in gm.graph.find_nodes(op="get_attr")
    }
    assert sorted(float(c) for c in constants.values()) == pytest.approx(sorted([0.02, 3.0, 50.0]))
    assert {c.shape for c in constants.values()} == {(1, 1, 1, 1)}
    assert {c.dtype for c in constants.values()} == {torch.float32}
    numbers = [
        a
        for n in gm.graph.nodes
        if n.target in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor)
        for a in n.args[1:]
        if isinstance(a, float | int)
    ]
    assert sorted(numbers) == pytest.approx(sorted([50.0, 3, 3, 0.02, 3, 0.02]))
    for got, want in zip(gm(*inputs), expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)


def test_leftover_post_ops_are_decomposed_by_inductors_table() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(torch.nn.functional.hardswish(x)) + 1

    x = torch.randn(64)
    gm = make_fx(model, tracing_mode="fake")(x)  # aten.gelu, aten.hardswish, fake meta vals
    kept = {aten.gelu.default, aten.hardswish.default}
    assert kept <= {n.target for n in gm.graph.nodes}
    assert decompose(gm.graph) == 2
    gm.recompile()
    assert not kept & {n.target for n in gm.graph.nodes}
    assert torch.allclose(gm(x), model(x), atol=1e-6)


@pytest.mark.parametrize("padding,ceil_mode", [(0, False), (1, True)])
def test_a_uint8_max_pool_becomes_inductors_own_with_the_same_values(
    padding: int, ceil_mode: bool
) -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def pool(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.quantized.max_pool2d(
            x, [3, 3], [2, 2], [padding, padding], [1, 1], ceil_mode
        )
        return out

    x = torch.randint(0, 256, (2, 8, 9, 9), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    gm = make_fx(pool, tracing_mode="fake")(x)
    assert decompose(gm.graph) == 1
    gm.recompile()
    assert not any("quantized" in str(n.target) for n in gm.graph.nodes)
    assert torch.equal(gm(x), pool(x))


def test_a_uint8_max_pool_over_many_channels_stays_the_vectorized_aten_call() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from qalgebra.inductor_prep import VECTOR_POOL_CHANNELS

    def pool(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.quantized.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        return out

    x = torch.randint(0, 256, (1, VECTOR_POOL_CHANNELS, 9, 9), dtype=torch.uint8)
    gm = make_fx(pool, tracing_mode="fake")(x.contiguous(memory_format=torch.channels_last))
    assert decompose(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        torch.ops.quantized.max_pool2d.default
    ]


def test_a_0d_constant_a_onednn_op_reads_becomes_a_1_element_vector() -> None:
    root = torch.nn.Module()
    root.zp = torch.tensor(3, dtype=torch.int64)
    root.scale = torch.tensor(0.5)
    graph = fx.Graph()
    x = graph.placeholder("x")
    zp, scale = graph.get_attr("zp"), graph.get_attr("scale")
    kernel = graph.call_function(torch.ops.onednn.qlinear_pointwise.tensor, (x, scale, zp))
    other = graph.call_function(aten.mul.Tensor, (x, scale))  # not a oneDNN op: left as it is
    graph.output((kernel, other))
    gm = fx.GraphModule(root, graph)
    assert scalar_constants_as_vectors(gm) == 2
    scale_arg, zp_arg = kernel.args[1], kernel.args[2]
    assert isinstance(scale_arg, fx.Node) and isinstance(zp_arg, fx.Node)
    new_scale, new_zp = fetch(gm, str(scale_arg.target)), fetch(gm, str(zp_arg.target))
    assert (new_scale.shape, new_zp.shape) == ((1,), (1,))
    assert (float(new_scale), int(new_zp), new_zp.dtype) == (0.5, 3, torch.int64)
    assert other.args[1] is scale and zp not in gm.graph.nodes  # the unread 0-d one is gone
    gm.graph.lint()
    # the compile it was for: tests/test_properties_compile.py, one-row int_mm


def test_a_float_output_kernel_with_one_reader_is_read_through_an_identity_permute() -> None:
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"] = torch.empty(1, 3, 4, 4)

    def qconv(output_dtype: torch.dtype) -> fx.Node:
        geometry = ([1, 1], [0, 0], [1, 1], 1)
        return graph.call_function(
            torch.ops.onednn.qconv_pointwise.default,
            (x, 1.0, 0, w, w, w, None, *geometry, 1.0, 0, output_dtype, "relu", [], ""),
        )

    fused = qconv(torch.float32)  # relu inside, then a hardtanh Inductor's patterns would add
    after = graph.call_function(aten.hardtanh.default, (fused, 0.0, 6.0))
    quantized = qconv(torch.uint8)  # a uint8 output: its patterns end in a quantize op
    widened = graph.call_function(aten._to_copy.default, (quantized,), {"dtype": torch.float32})
    shared = qconv(torch.float32)  # two readers: their patterns need one
    graph.output((after, widened, shared, graph.call_function(aten.neg.default, (shared,))))
    assert kernels_closed_to_post_op_patterns(graph) == 1
    view = after.args[0]
    assert isinstance(view, fx.Node) and view.target is aten.permute.default
    assert view.args == (fused, [0, 1, 2, 3]) and list(fused.users) == [view]
    assert widened.args[0] is quantized and len(shared.users) == 2
    graph.lint()


def test_propagate_vals_reruns_new_nodes_and_what_reads_them_only() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from qalgebra.inductor_prep import mark_traced, propagate_vals

    def model(x: torch.Tensor) -> torch.Tensor:
        return (x * 2 + 1).relu()

    gm = make_fx(model, tracing_mode="fake")(torch.randn(4, 4))
    mark_traced(gm.graph)
    mul = gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)[0]
    (x,) = gm.graph.find_nodes(op="placeholder")
    with gm.graph.inserting_after(mul):  # the same shape, transposed strides
        swapped = gm.graph.call_function(aten.permute.default, (x, [1, 0]))
    swapped.meta["val"] = mul.meta["val"]  # carried over, as a rewrite carries a root's value
    mul.replace_all_uses_with(swapped)
    gm.graph.erase_node(mul)
    assert propagate_vals(gm) == 3  # the permute, then the add and relu reading it: not x
    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        assert node.meta["val"].stride() == (1, 4), node  # the layout the permute gives
    unchanged = make_fx(model, tracing_mode="fake")(torch.randn(4, 4))
    mark_traced(unchanged.graph)
    assert propagate_vals(unchanged) == 0


def test_propagate_vals_converts_a_new_constant_once_for_all_its_readers() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter
    from torch.fx.experimental.proxy_tensor import make_fx

    from qalgebra.inductor_prep import mark_traced, propagate_vals

    def model(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).relu() + x

    gm = make_fx(model, tracing_mode="fake")(torch.randn(4, 4))
    mark_traced(gm.graph)
    gm.register_buffer("offset", torch.randn(4, 4).t())  # transposed strides
    mul = gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)[0]
    (relu,) = mul.users
    with gm.graph.inserting_before(relu):
        offset = gm.graph.get_attr("offset")
        shifted = gm.graph.call_function(aten.add.Tensor, (mul, offset))
        doubled = gm.graph.call_function(aten.mul.Tensor, (offset, 2))
        both = gm.graph.call_function(aten.add.Tensor, (shifted, doubled))
    relu.replace_input_with(mul, both)
    conversions: list[tuple[int, ...]] = []
    original = FakeTensorConverter.from_real_tensor

    def counting(self: FakeTensorConverter, *args: Any, **kwargs: Any) -> FakeTensor:
        conversions.append(tuple(args[1].stride()))  # (fake_mode, tensor, ...)
        return original(self, *args, **kwargs)

    with mock.patch.object(FakeTensorConverter, "from_real_tensor", counting):
        assert propagate_vals(gm) == 5  # the constant, the 3 new nodes, relu (layout unchanged)
    assert conversions == [(1, 4)]  # once, though two ops read it
    val = offset.meta["val"]
    assert isinstance(val, FakeTensor) and val.stride() == (1, 4) and val.shape == (4, 4)
    assert all(isinstance(n.meta.get("val"), FakeTensor) for n in (shifted, doubled, both))


def test_in_place_clamps_of_an_owned_tensor_become_functional_where_inductor_fuses_them() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    owned = graph.call_function(aten.mul.Tensor, (x, 2.0))
    clamped = graph.call_function(aten.clamp_max_.default, (owned, 3.0))
    shared = graph.call_function(aten.mul.Tensor, (x, 3.0))
    in_place = graph.call_function(aten.clamp_min_.default, (shared, 0.0))
    # read only by an extern op (a oneDNN call): a kernel of its own, so it stays an ATen call
    before_pool = graph.call_function(
        aten.clamp_max_.default, (graph.call_function(aten.mul.Tensor, (x, 4.0)), 5.0)
    )
    pooled = graph.call_function(torch.ops.quantized.max_pool2d.default, (before_pool, [2, 2]))
    # read by an extern op and by arithmetic Inductor generates: functional, fused there
    mixed = graph.call_function(
        aten.clamp_max_.default, (graph.call_function(aten.mul.Tensor, (x, 6.0)), 7.0)
    )
    pooled_too = graph.call_function(torch.ops.quantized.max_pool2d.default, (mixed, [2, 2]))
    summed = graph.call_function(aten.add.Tensor, (mixed, 1.0))
    graph.output((clamped, in_place, shared, pooled, pooled_too, summed))
    assert functional_clamps(graph) == 2
    assert clamped.target is aten.clamp_max.default
    assert in_place.target is aten.clamp_min_.default  # `shared` is read after its clamp
    assert before_pool.target is aten.clamp_max_.default
    assert mixed.target is aten.clamp_max.default


def test_inductor_lowers_the_in_place_clamps_inside_the_block_only() -> None:
    # (the compile that leaves one in place runs with CI set in .ci/run: an implicit fallback
    # would raise there)
    from torch._inductor.lowering import lowerings

    ops = (aten.clamp_max_.default, aten.clamp_min_.default, aten.clamp_.default)
    before = {op: lowerings.get(op) for op in ops}
    with in_place_clamp_lowerings():
        assert all(op in lowerings for op in ops)
    assert {op: lowerings.get(op) for op in ops} == before


def test_the_catalog_pass_refuses_to_run_outside_a_freezing_compile() -> None:
    graph = fx.symbolic_trace(torch.nn.ReLU()).graph
    with pytest.raises(LoweringError, match="freezing compile"):
        CatalogPass(())(graph)


def test_compile_keeps_its_own_backend() -> None:
    with pytest.raises(TypeError, match="backend"):
        compile(torch.nn.ReLU(), (torch.randn(2),), backend="inductor")


# ---------------------------------------------------------------------------------------------
# One compile each


@pytest.mark.parametrize("name", ["resnet_like_2", "ffn_stack_2_3d"])
def test_compiled_model_fuses_what_the_eager_lowering_fuses(name: str) -> None:
    model, inputs = build(name)
    gm = quantize_pt2e(model, inputs)
    _, eager = lower_with_report(gm, inputs)
    compiled = compile(gm, inputs, cost="off")
    report = only_report(compiled.reports)
    assert families(report.lowering) == families(eager) and sum(families(eager).values()) > 0
    assert report.inductor_quant_fusions == {}  # Inductor's own patterns found nothing
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


class ResidualChain(torch.nn.Module):
    """A stem conv, then ``blocks`` basic residual blocks (``relu(conv(relu(conv(h))) + h)``)
    back to back, then a mean: each block's output is read by the next block's convs only."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(2 * blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for first, second in zip(self.convs[::2], self.convs[1::2], strict=True):
            h = torch.relu(second(torch.relu(first(h))) + h)
        return h.mean((2, 3))


@pytest.mark.usefixtures("pairs_saturate")
def test_a_7_bit_range_clamp_between_onednn_calls_stays_an_in_place_aten_call() -> None:
    """With 7-bit activations each binary conv's uint8 output is clamped to 127: where only the
    next block's convs read it, by ATen's in-place clamp, not a C++ kernel of its own; where
    arithmetic Inductor generates reads it too, in that kernel."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model, inputs = ResidualChain(3).eval(), (torch.randn(2, 3, 8, 8),)
    gm = quantize_pt2e(model, inputs, reduce_range=True)
    compiled, codes = run_and_get_code(lambda: compile(gm, inputs, cost="off"))
    code = "\n".join(codes)
    assert only_report(compiled.reports).lowering.fired["qconv_binary"] == 3
    # the first block's clamp; the second's output is also dequantized (the last block sums in
    # float, for the mean), and the clamp is fused into that kernel; the third's is float
    assert code.count("torch.ops.aten.clamp_max_.default(") == 1
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


def test_a_users_catalog_replaces_inductors_patterns() -> None:
    mine = dataclasses.replace(QCONV, name="my_qconv")
    model, inputs = build("conv2d_relu")
    gm = quantize_pt2e(model, inputs)
    compiled = compile(gm, inputs, fusions=(mine,), cost="off")
    report = only_report(compiled.reports)
    assert dict(report.lowering.fired) == {"my_qconv": 2}
    assert report.inductor_quant_fusions == {}
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


class DropoutFFN(torch.nn.Module):
    """``x + dropout(fc2(relu(fc1(x))))``: in eval mode AOT autograd traces the dropout as a
    clone, between the linear and the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update: torch.Tensor = self.dropout(self.fc2(torch.relu(self.fc1(x))))
        return x + update


def test_an_eval_dropout_does_not_keep_a_linear_from_its_residual_add() -> None:
    torch.manual_seed(0)
    model, inputs = DropoutFFN().eval(), (torch.randn(2, 4, 16),)
    gm = quantize_pt2e(model, inputs)
    compiled = compile(gm, inputs, cost="off")
    fired = only_report(compiled.reports).lowering.fired
    assert (fired["qlinear"], fired["qlinear_binary"]) == (1, 1), fired
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


def test_backend_by_name_inlines_module_tensors_and_refuses_stale_ones() -> None:
    # Traced without Inductor's freezing: dynamo passes the module's tensors as inputs.
    model, inputs = build("conv2d_relu")
    gm = quantize_pt2e(model, inputs)
    with recording() as reports, torch.no_grad():
        compiled = torch.compile(gm, backend="qalgebra", options={COST_OPTION: "off"})
        out = compiled(*inputs)
    report = only_report(reports)
    assert report.frozen_inputs > 0 and report.lowering.fired["qconv"] == 2
    assert_outputs_close(run(gm, inputs), out, quant_step=the_step(gm))
    weight = next(b for name, b in gm.named_buffers() if "frozen_param" in name)
    weight.mul_(1)  # written in place: the compiled weights may be stale
    with pytest.raises(LoweringError, match="changed after compiling"), torch.no_grad():
        compiled(*inputs)


class StridedLinear(torch.nn.Module):
    """A float linear over a transposed 3-D input, as ``nn.MultiheadAttention``'s in-projection
    with ``batch_first``: ``matmul`` folds it into one ``mm`` only when the weight requires
    grad, as a parameter traced with freezing does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.transpose(0, 1))
        return out


def test_the_self_check_is_the_callers_choice_under_compile() -> None:
    """On by default, as in the eager lowering; ``selfcheck="off"`` (or the option through
    ``torch.compile``) runs no kernel before Inductor compiles, and fuses the same."""
    model, inputs = build("conv2d_relu")
    gm = quantize_pt2e(model, inputs)
    selfcheck.clear_cache()
    checked = only_report(compile(gm, inputs, cost="off").reports).lowering
    assert (checked.selfcheck.mode, checked.fired["qconv"]) == ("on", 2)
    assert checked.selfcheck.ran > 0
    torch._dynamo.reset()
    selfcheck.clear_cache()
    options: dict[str, Any] = {COST_OPTION: "off", SELFCHECK_OPTION: "off"}
    with recording() as reports, torch.no_grad():
        out = torch.compile(copy.deepcopy(gm), backend="qalgebra", options=options)(*inputs)
    trusted = only_report(reports).lowering
    assert (trusted.selfcheck.mode, trusted.selfcheck.ran) == ("off", 0)
    assert trusted.fired == checked.fired
    assert_outputs_close(run(gm, inputs), out, quant_step=the_step(gm))
    with pytest.raises(UnsupportedGraphError, match=SELFCHECK_OPTION):
        backend(gm, list(inputs), options={SELFCHECK_OPTION: "fast"})


def test_backend_by_name_prepacks_a_float_linear_over_a_strided_input_as_freezing_does() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, x = StridedLinear().eval(), torch.randn(4, 3, 16)
    packed = "mkldnn_linear_weight_pack_matcher_count"
    before = counters["inductor"][packed]
    with recording() as reports, torch.no_grad():
        out = torch.compile(model, backend="qalgebra", options={COST_OPTION: "off"})(x)
        want = model(x)
    assert only_report(reports).frozen_inputs == 2  # traced without freezing: inlined
    assert counters["inductor"][packed] - before == 1  # a bmm over the weight expanded: 0
    torch.testing.assert_close(out, want)


def test_a_conv_qalgebra_refuses_is_not_fused_by_inductor_either() -> None:
    # Full-range uint8 activations on a CPU whose int8 pair sums saturate: qalgebra refuses the
    # convs; Inductor's prepack pattern would fuse them (and compute wrong values there).
    model, inputs = build("conv2d_relu")
    with isa.forced(int8_pairs_saturate=True):
        gm = quantize_pt2e(model, inputs, reduce_range=False)
        compiled = compile(gm, inputs, cost="off")
    report = only_report(compiled.reports)
    assert report.lowering.fired["qconv"] == 0
    assert any("saturat" in r.reason for r in report.lowering.refused), report.summary()
    assert report.inductor_quant_fusions == {}
    assert report.hidden_quant_nodes
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


def test_every_conv_and_linear_of_the_decomposed_form_fuses() -> None:
    model, inputs = build("resnet_like_2")
    gm = to_decomposed(quantize_pt2e(model, inputs))
    convs = len(gm.graph.find_nodes(op="call_function", target=aten.conv2d.default))
    linears = len(gm.graph.find_nodes(op="call_function", target=aten.linear.default))
    compiled = compile(gm, inputs, cost="off")
    fired = only_report(compiled.reports).lowering.fired
    assert (fired["qconv"] + fired["qconv_binary"], fired["qlinear"]) == (convs, linears)
    assert convs > 0 and linears > 0
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=the_step(gm))


class SigmoidBetweenLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.sigmoid(self.first(x)))
        return out


def test_a_dynamically_quantized_activation_of_one_sign_gets_the_ops_own_qparams() -> None:
    # the second linear's activation is > 0: the op's range includes zero, Inductor's
    # decomposition of choose_qparams did not (scale (max - min) / 255, zero point clamped)
    torch.manual_seed(0)
    model, inputs = SigmoidBetweenLinears().eval(), (torch.randn(4, 16),)
    # 7-bit activations: exact on every CPU, whatever its int8 pairs do
    gm = quantize_pt2e(model, inputs, dynamic=True, reduce_range=True)
    compiled = compile(gm, inputs, cost="off")
    assert only_report(compiled.reports).lowering.fired["qlinear"] == 2
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=None, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=40),
    sign=st.sampled_from([1.0, -1.0, 0.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    qrange=st.sampled_from([(0, 255), (0, 127), (-128, 127)]),
)
def test_choose_qparams_decomposed_computes_what_the_op_computes(
    values: list[float], sign: float, dtype: torch.dtype, qrange: tuple[int, int]
) -> None:
    x = torch.tensor(values).to(dtype)
    if sign:  # all of one sign, as after a relu
        x = x.abs() * sign
    qmin, qmax = qrange
    qdtype = torch.int8 if qmin < 0 else torch.uint8
    expected = torch.ops.quantized_decomposed.choose_qparams.tensor(x, qmin, qmax, 2**-12, qdtype)
    got = choose_qparams_with_zero(x, qmin, qmax, 2**-12, qdtype)
    for e, g in zip(expected, got, strict=True):
        assert (e.dtype, e.shape) == (g.dtype, g.shape) and torch.equal(e, g), (e, g)


@settings(max_examples=100, deadline=None)
@given(
    levels=st.lists(st.integers(-300, 300), min_size=1, max_size=40),
    fraction=st.sampled_from([0.0, 0.5, -0.5, 0.25, 0.4999]),  # ties round to even
    scale=st.floats(1e-4, 2.0),
    zero_point=st.integers(0, 255),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
    rows=st.integers(1, 3),
)
def test_dynamic_quantize_and_dequantize_respelled_compute_what_the_ops_compute(
    levels: list[int],
    fraction: float,
    scale: float,
    zero_point: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    rows: int,
) -> None:
    # qparams as choose_qparams returns them (float64, int64, one element), values on and
    # around the quantize's rounding boundaries
    qd = torch.ops.quantized_decomposed
    x = ((torch.tensor(levels) + fraction) * scale).repeat(rows, 1).to(dtype)
    qparams = (torch.tensor([scale], dtype=torch.float64), torch.tensor([zero_point]))
    graph = fx.Graph()
    node, s_node, zp_node = (graph.placeholder(name) for name in ("x", "scale", "zero_point"))
    qparam_args = (s_node, zp_node, 0, 255, torch.uint8)
    q = graph.call_function(qd.quantize_per_tensor.tensor, (node, *qparam_args))
    dequantize = qd.dequantize_per_tensor.tensor
    dq = graph.call_function(dequantize, (q, *qparam_args), {"out_dtype": out_dtype})
    graph.output((q, dq))
    expected = fx.GraphModule(torch.nn.Module(), graph)(x, *qparams)
    for op in (q, dq):
        op.replace_all_uses_with(respell_runtime_as_arithmetic(op, x.dim()))
        graph.erase_node(op)
    assert {getattr(n.target, "namespace", "") for n in graph.nodes} <= {"", "aten", "prims"}
    got = fx.GraphModule(torch.nn.Module(), graph)(x, *qparams)
    for e, g in zip(expected, got, strict=True):
        assert e.dtype == g.dtype and torch.equal(e, g), (e, g)


def test_a_dynamic_quantize_left_unfused_is_respelled_so_no_inductor_pattern_fires() -> None:
    # refused linears (saturating int8 pairs, 8-bit activations) leave the dynamic quantize
    # and its dequantize of two readers: Inductor's dequant promotion duplicated it
    spec = DynamicLinearSpec(
        (4, 32), (8, 8), (Unary.NONE, Unary.NONE), bias=False, combine="add",
        share_dequant=False, quant_max=255, weight_max=127,
    )  # fmt: skip
    with isa.forced(int8_pairs_saturate=True):
        report = check_compiled(build_config_example(spec))
    assert not report.lowering.fired["qlinear"] and report.lowering.refused
    assert report.inductor_quant_fusions == {}


def test_a_symbolic_batch_compiles_once_for_every_batch_size() -> None:
    model, inputs = build("linear3d_gelu")
    gm = quantize_pt2e(model, inputs, dynamic_batch=True)
    example = inputs[0].clone()
    torch._dynamo.mark_dynamic(example, 0)
    compiled = compile(gm, (example,), cost="off")
    for batch in (3, 7):
        x = torch.randn(batch, *example.shape[1:])
        assert_outputs_close(run(gm, (x,)), run(compiled, (x,)), quant_step=the_step(gm))
    report = only_report(compiled.reports)  # no recompile for the new batch sizes
    assert report.lowering.fired["qlinear"] == 2


def test_under_bf16_autocast_the_int8_mixed_bf16_form_fuses() -> None:
    model, inputs = build("conv2d_relu")
    gm = quantize_pt2e(model, inputs)
    _, eager_bf16 = lower_with_report(quantize_pt2e(model, inputs, bf16=True), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = compile(gm, inputs, cost="off")
        reference, out = run(gm, inputs), run(compiled, inputs)
    assert families(only_report(compiled.reports).lowering) == families(eager_bf16)
    assert eager_bf16.fired["qconv"] == 2
    assert out.dtype == reference.dtype == torch.bfloat16
    assert_outputs_close(reference, out, quant_step=the_step(gm), rtol=BF16_RTOL)


# ---------------------------------------------------------------------------------------------
# Opt-in: Inductor's own path on the decomposed form


@pytest.mark.skipif(not os.environ.get("QALGEBRA_SLOW"), reason="set QALGEBRA_SLOW=1 (minutes)")
def test_inductor_alone_fuses_no_conv_or_linear_of_the_decomposed_form() -> None:
    from torch._inductor import config

    model, inputs = build("resnet_like_2")
    gm = to_decomposed(quantize_pt2e(model, inputs))
    before = inductor_quant_fusions()
    with config.patch(freezing=True), torch.no_grad():
        torch.compile(copy.deepcopy(gm))(*inputs)
    after = inductor_quant_fusions()
    after.subtract(before)
    prepacked = [k for k, v in after.items() if v > 0 and "weight_prepack" in k]
    assert prepacked == [], dict(after)
    fired = only_report(compile(gm, inputs, cost="off").reports).lowering.fired
    assert fired["qconv"] + fired["qconv_binary"] > 0 and fired["qlinear"] > 0
