"""The cost check: a layer stays float where float is faster, timed on this machine.

Its decision depends on timings, so the tests force them both ways (a clock that makes one side
slow) and check what follows from each: the refusal and its cause, the numbers the graph then
computes, the cache. One test runs the real clock and checks only that the decision follows the
timing it measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from qalgebra import costcheck
from qalgebra.compile import COST_OPTION, backend, compile
from qalgebra.costcheck import CostCheck, CostStats, Side, Timing
from qalgebra.errors import LoweringError, UnsupportedGraphError
from qalgebra.lower import lower_with_report
from qalgebra.testing.models import build
from qalgebra.testing.oracle import assert_outputs_close, output_quant_steps
from qalgebra.testing.quantize import quantize_pt2e

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("qconv", "qconv_binary", "qlinear", "qlinear_binary")


@pytest.fixture(autouse=True)
def fresh_timings() -> Iterator[None]:
    costcheck.clear_cache()
    yield
    costcheck.clear_cache()


def slow(loser: Side) -> Callable[[Side, Callable[[], object]], float]:
    """A clock under which each op of ``loser``'s side takes 20 us (a kernel side of up to five
    ops stays in the fixed-cost regime) and each of the other's 0.1 us."""

    def clock(side: Side, call: Callable[[], object]) -> float:
        call()
        return 20e-6 if side == loser else 0.1e-6

    return clock


#: Small registry models with convs, a binary conv and 3-D linears.
MODELS = ("conv2d_relu", "ffn_stack_2_3d", "resnet_like_2")


def quantized(name: str) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The registry model ``name`` quantized, and its inputs."""
    model, inputs = build(name)
    return quantize_pt2e(model, inputs), inputs


def fused(fired: dict[str, int]) -> int:
    return sum(fired.get(name, 0) for name in FAMILIES)


def run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = module(*inputs)
    assert isinstance(out, torch.Tensor)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_where_float_is_faster_every_layer_stays_float_with_the_reference_values(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    gm, inputs = quantized(name)
    lowered, report = lower_with_report(gm, inputs, cost="measure")
    assert fused(report.fired) == 0, report.summary()
    by_cost = [r for r in report.refused if r.cause == "cost"]
    assert by_cost and all("faster in float" in r.reason for r in by_cost)
    assert report.cost.refused == len(by_cost) and report.cost.measured > 0
    assert_outputs_close(run(gm, inputs), run(lowered, inputs), quant_step=None, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_where_the_kernel_is_faster_the_lowering_is_what_it_is_without_the_check(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(costcheck, "wall_clock", slow("float"))
    gm, inputs = quantized(name)
    _, measured = lower_with_report(gm, inputs, cost="measure")
    _, unchecked = lower_with_report(gm, inputs)
    assert dict(measured.fired) == dict(unchecked.fired) and fused(measured.fired) > 0
    assert not [r for r in measured.refused if r.cause == "cost"]
    assert measured.cost.measured > 0 and measured.cost.refused == 0
    assert unchecked.cost.mode == "off" and unchecked.cost.measured == 0


def test_the_wall_clock_times_calls_in_a_row_and_returns_one_call_s_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A call timed alone pays for the other side's working set in its caches (the float conv
    # more than the kernel): the compiled model runs each layer in a steady stream.
    ticks = iter([10.0, 10.0 + 8e-6 * costcheck.CALLS_PER_SAMPLE])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    calls: list[None] = []
    seconds = costcheck.wall_clock("float", lambda: calls.append(None))
    assert costcheck.CALLS_PER_SAMPLE > 1 and len(calls) == costcheck.CALLS_PER_SAMPLE
    assert seconds == pytest.approx(8e-6)


def test_a_signature_is_timed_once_then_served_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Side] = []

    def counting(side: Side, call: Callable[[], object]) -> float:
        calls.append(side)
        return slow("float")(side, call)

    monkeypatch.setattr(costcheck, "wall_clock", counting)
    gm, inputs = quantized("ffn_stack_2_3d")
    _, first = lower_with_report(gm, inputs, cost="measure")
    timed = len(calls)
    _, second = lower_with_report(gm, inputs, cost="measure")
    assert timed > 0 and len(calls) == timed  # nothing timed again
    assert second.cost.measured == 0 and second.cost.cached == first.cost.measured + (
        first.cost.cached
    )


def test_quantize_ops_a_rewrite_writes_are_not_timed_its_kernels_and_copies_are() -> None:
    # Inductor compiles a quantize into the C++ kernels around the layer on either path; run
    # eagerly it is a Python decomposition that would weigh against the kernel.
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    q = graph.call_function(
        torch.ops.quantized_decomposed.quantize_per_tensor.default,
        (x, 0.1, 0, 0, 255, torch.uint8),
    )
    copy = graph.call_function(torch.ops.aten.clone.default, (q,))
    pool = graph.call_function(
        torch.ops.quantized.max_pool2d.default, (copy, [2, 2], [2, 2], [0, 0], [1, 1], False)
    )
    weight = graph.get_attr("w")
    assert [costcheck._timed(n) for n in (x, q, copy, pool, weight)] == [
        False,
        False,
        True,
        True,
        False,
    ]


def test_a_layer_beyond_the_fixed_cost_regime_is_kept_without_timing() -> None:
    calls: list[Side] = []

    def clock(side: Side, call: Callable[[], object]) -> float:
        calls.append(side)
        return 1.0 if side == "kernel" else 1e-9

    a, b = torch.randn(128, 256), torch.randn(256, 128)  # 8.4 MFLOPs
    check = CostCheck("measure", CostStats(), clock=clock)
    timing = check._measure([lambda: torch.mm(a, b)], [lambda: None], a.numel())
    assert calls == [] and not timing.float_is_faster
    assert "not timed" in timing.describe()
    # few FLOPs, but a tensor over MAX_ELEMENTS elements: the output, then an input
    column, one = torch.randn(costcheck.MAX_ELEMENTS + 1, 1), torch.randn(1, 1)
    timing = check._measure([lambda: torch.mm(column, one)], [lambda: None], 0)
    assert calls == [] and not timing.float_is_faster
    timing = check._measure([lambda: torch.mm(one, one)], [lambda: None], column.numel())
    assert calls == [] and not timing.float_is_faster
    # 0.26 MFLOPs and 2**12 elements at most: timed; float wins
    small, square = torch.randn(32, 64), torch.randn(64, 64)
    timing = check._measure([lambda: torch.mm(small, square)], [lambda: None], square.numel())
    assert calls and timing.float_is_faster


@pytest.mark.parametrize(("features", "timed"), [(128, True), (256, False)])
def test_a_linear_whose_weight_is_over_the_bound_is_fused_untimed(
    features: int, timed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 1, few FLOPs either way: a 128x128 weight (2**14 elements) is timed and left
    float under a slow kernel; a 256x256 one (2**16) is over :data:`MAX_ELEMENTS` -- in the
    model it is fetched from memory as fp32, where the timing has it in cache -- so fused."""
    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    model = torch.nn.Sequential(torch.nn.Linear(features, features), torch.nn.ReLU()).eval()
    inputs = (torch.randn(1, features),)
    gm = quantize_pt2e(model, inputs)
    lowered, report = lower_with_report(gm, inputs, cost="measure")
    assert report.cost.measured == 1 and report.cost.refused == int(timed), report.summary()
    assert fused(report.fired) == int(not timed), report.summary()
    assert_outputs_close(run(gm, inputs), run(lowered, inputs), quant_step=None, rtol=1e-5)


def test_sides_close_together_are_timed_again_and_the_fastest_calls_count() -> None:
    # each round times the float side, then the kernel's
    times = iter([4e-5, 3e-5, 1e-5, 5e-5] + [6e-5, 6e-5] * 10)

    def clock(side: Side, call: Callable[[], object]) -> float:
        return next(times)

    check = CostCheck("measure", CostStats(), clock=clock)
    timing = check._measure([lambda: None], [lambda: None], 0)
    assert (timing.float_seconds, timing.kernel_seconds) == (1e-5, 3e-5)
    assert timing.float_is_faster


def test_timing_decides_by_the_margin_and_the_gain() -> None:
    assert Timing(1e-5, 3e-5).float_is_faster
    assert not Timing(2e-5, 2e-5).float_is_faster  # a tie goes to the kernel
    assert not Timing(3e-5, 2e-5).float_is_faster
    assert not Timing(2e-5, 2.4e-5).float_is_faster  # within the margin
    assert not Timing(1e-6, 5e-6).float_is_faster  # 5x, but 4 us a call


def test_on_the_real_clock_the_decision_follows_the_timing_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Timing] = []
    measure = CostCheck._measure

    def recording(
        self: CostCheck,
        float_side: list[Callable[[], object]],
        kernel_side: list[Callable[[], object]],
        inputs: int,
    ) -> Timing:
        timing = measure(self, float_side, kernel_side, inputs)
        seen.append(timing)
        return timing

    monkeypatch.setattr(CostCheck, "_measure", recording)
    gm, inputs = quantized("ffn_stack_2_3d")
    lowered, report = lower_with_report(gm, inputs, cost="measure")
    assert seen and all(t.float_seconds > 0 and t.kernel_seconds > 0 for t in seen)
    assert report.cost.measured == len(seen)
    by_cost = [r for r in report.refused if r.cause == "cost"]
    assert len(by_cost) == report.cost.refused
    # each refusal comes from a timing that said float (measured now, or its cached copy)
    assert bool(by_cost) == any(t.float_is_faster for t in seen)
    assert report.cost.refused <= report.cost.measured + report.cost.cached
    (step,) = output_quant_steps(gm)
    assert_outputs_close(run(gm, inputs), run(lowered, inputs), quant_step=step)


def test_an_unknown_cost_mode_is_a_clear_error() -> None:
    gm, inputs = quantized("conv2d_relu")
    unknown: Any = "fast"  # what an untyped caller might pass
    with pytest.raises(LoweringError, match="cost must be one of"):
        lower_with_report(gm, inputs, cost=unknown)
    with pytest.raises(UnsupportedGraphError, match=COST_OPTION):
        backend(gm, list(inputs), options={COST_OPTION: "fast"})


@pytest.mark.usefixtures("fresh_dynamo")
def test_under_compile_a_layer_left_float_computes_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    gm, inputs = quantized("ffn_stack_2_3d")
    compiled = compile(gm, inputs)  # cost="measure" is the default under compile
    (report,) = compiled.reports
    assert fused(report.lowering.fired) == 0
    assert {r.cause for r in report.lowering.refused} >= {"cost"}
    assert report.inductor_quant_fusions == {}  # nor did Inductor's patterns fuse them
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=None, rtol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_layers_left_float_that_differ_only_in_qparams_share_their_cpp_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every FFN of a stack has the same shapes and its own scales. Read from tensor constants
    rather than written into the C++ source, the scales no longer make each FFN's kernels new
    sources: eight FFNs left float compile fewer kernels than there are FFNs (each FFN brought
    two or more of its own before), and the numbers stay the reference's."""
    from torch._inductor.utils import run_and_get_code

    from qalgebra.ops import quantized_decomposed as qd
    from qalgebra.testing.models import ffn_stack

    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    model, inputs = ffn_stack(8, True)()
    gm = quantize_pt2e(model, inputs)
    compiled, sources = run_and_get_code(lambda: compile(gm, inputs))
    (report,) = compiled.reports
    assert fused(report.lowering.fired) == 0  # every linear left float
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=None, rtol=1e-5)
    kernels = sum(source.count("async_compile.cpp_pybinding(") for source in sources)
    assert 0 < kernels < 8
    scales = {
        float(n.args[1])
        for n in gm.graph.find_nodes(op="call_function", target=qd.quantize_per_tensor.default)
    }
    assert len(scales) > 8
    written = {s for s in scales if any(repr(v) in "".join(sources) for v in (s, 1.0 / s))}
    assert written == set()


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_conv_left_float_runs_atens_convolution_as_timed_not_a_prepacked_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check timed ATen's convolution (which picks its algorithm by shape); compiled, the
    layer calls it too, rather than the oneDNN convolution Inductor's freezing prepacks a
    constant weight for."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    gm, inputs = quantized("conv2d_relu")
    compiled, sources = run_and_get_code(lambda: compile(gm, inputs))
    (report,) = compiled.reports
    assert fused(report.lowering.fired) == 0
    code = "".join(sources)
    assert "extern_kernels.convolution(" in code
    assert "_convolution_pointwise" not in code
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=None, rtol=1e-5)


def test_a_layers_size_is_counted_from_the_shapes_it_carries_without_computing() -> None:
    """FLOPs, and the elements of the largest tensor read or written, the weight included."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.empty(256, 1024))
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    mm = graph.call_function(torch.ops.aten.mm.default, (a, b))
    a.meta["val"] = torch.empty(128, 256, device="meta")
    b.meta["val"] = torch.empty(256, 128, device="meta")
    assert costcheck._counted_size([mm], module) == (2 * 128 * 256 * 128, 128 * 256)
    a.meta["val"] = torch.empty(512, 32, device="meta")  # the output is the largest
    b.meta["val"] = torch.empty(32, 512, device="meta")
    assert costcheck._counted_size([mm], module) == (2 * 512 * 32 * 512, 512 * 512)
    by_weight = graph.call_function(torch.ops.aten.mm.default, (b, graph.get_attr("weight")))
    b.meta["val"] = torch.empty(8, 256, device="meta")  # the weight is the largest
    assert costcheck._counted_size([by_weight], module) == (2 * 8 * 256 * 1024, 256 * 1024)
    del b.meta["val"]  # an unknown shape: the timing counts on real values instead
    assert costcheck._counted_size([mm], module) is None


@pytest.mark.usefixtures("fresh_dynamo")
def test_under_compile_a_large_layer_is_decided_without_inputs_or_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 75 MFLOP conv: its shapes say it is beyond the fixed-cost regime, so the check makes
    no random inputs and times nothing; the conv is fused."""
    from qalgebra.trial import random_inputs as real_inputs

    made: list[object] = []

    def counting_inputs(*args: Any) -> Any:
        made.append(args)
        return real_inputs(*args)

    clocked: list[Side] = []

    def clock(side: Side, call: Callable[[], object]) -> float:
        clocked.append(side)
        return 1.0 if side == "kernel" else 1e-9  # float would win if it were timed

    monkeypatch.setattr(costcheck, "random_inputs", counting_inputs)
    monkeypatch.setattr(costcheck, "wall_clock", clock)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).eval()
    inputs = (torch.randn(1, 64, 32, 32),)
    gm = quantize_pt2e(model, inputs)
    compiled = compile(gm, inputs)
    (report,) = compiled.reports
    assert fused(report.lowering.fired) == 1
    assert report.lowering.cost.measured == 1
    assert made == [] and clocked == []


@pytest.mark.usefixtures("fresh_dynamo")
def test_under_compile_the_sides_are_timed_as_eager_code_runs_without_the_python_dispatcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AOT autograd compiles with the Python dispatcher on; an op run under it costs tens of
    microseconds more (a 16-channel conv at batch 1: about 45 us alone, 80-135 us in the pass),
    which pulled the two sides of a small layer together. The check times them without it."""
    dispatcher_on: list[bool] = []

    def clock(side: Side, call: Callable[[], object]) -> float:
        dispatcher_on.append(
            torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher)
        )
        call()
        return 20e-6 if side == "kernel" else 0.1e-6

    monkeypatch.setattr(costcheck, "wall_clock", clock)
    gm, inputs = quantized("conv2d_relu")
    compiled = compile(gm, inputs)
    (report,) = compiled.reports
    assert report.lowering.cost.measured >= 1
    assert dispatcher_on and not any(dispatcher_on)
    assert fused(report.lowering.fired) == 0  # the forced clock still decides


@pytest.mark.parametrize("op", sorted(costcheck.FLOAT_COMPUTE, key=str))
def test_each_float_op_is_timed_through_a_binding_computing_the_same(op: Any) -> None:
    """The float side is timed through the Python binding the compiled model calls; each must
    take the graph's arguments as they are and compute what the graph's op computes."""
    torch.manual_seed(0)
    x4, w4, b = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3), torch.randn(4)
    a, m, bm = torch.randn(5, 8), torch.randn(8, 4), torch.randn(2, 5, 8)
    args: dict[Any, tuple[object, ...]] = {
        torch.ops.aten.convolution.default: (x4, w4, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        torch.ops.aten.conv1d.default: (x4[:, :, 0], w4[..., 0], b, [1], [1], [1], 1),
        torch.ops.aten.conv2d.default: (x4, w4, b, [2, 2], [0, 0], [1, 1], 1),
        torch.ops.aten.conv3d.default: (x4[:, :, None], w4[:, :, None], b, [1] * 3, [0, 1, 1]),
        torch.ops.aten.linear.default: (a, m.t(), b),
        torch.ops.aten.addmm.default: (b, a, m),
        torch.ops.aten.mm.default: (a, m),
        torch.ops.aten.bmm.default: (bm, torch.randn(2, 8, 3)),
        torch.ops.aten.baddbmm.default: (torch.randn(2, 5, 3), bm, torch.randn(2, 8, 3)),
        torch.ops.aten.matmul.default: (bm, m),
    }
    expected = op(*args[op])
    assert costcheck.COMPILED_CALL[op] is not op
    torch.testing.assert_close(costcheck.COMPILED_CALL[op](*args[op]), expected)


@pytest.mark.usefixtures("fresh_dynamo")
def test_under_compile_the_float_side_is_timed_through_the_binding_the_compiled_model_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def convolution(*args: Any, **kwargs: Any) -> object:
        calls.append(1)
        return torch.convolution(*args, **kwargs)

    recording = {**costcheck.COMPILED_CALL, torch.ops.aten.convolution.default: convolution}
    monkeypatch.setattr(costcheck, "COMPILED_CALL", recording)
    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    gm, inputs = quantized("conv2d_relu")
    compiled = compile(gm, inputs)
    (report,) = compiled.reports
    assert report.lowering.cost.measured >= 1
    assert calls  # the timed float side, not the graph's OpOverload
    assert_outputs_close(run(gm, inputs), run(compiled, inputs), quant_step=None, rtol=1e-5)


def test_nothing_is_timed_while_probes_decide_for_another_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a probe forced to another CPU's answer the lowering emits that CPU's kernels,
    which this one may compute wrongly or crash on: the check neither runs nor refuses them.
    Forced to this CPU's own answer, it times as usual (the same verdict on either CPU)."""
    from qalgebra import isa

    monkeypatch.setattr(costcheck, "wall_clock", slow("kernel"))
    gm, inputs = quantized("conv2d_relu")  # fp32 and no binary conv: fused under either answer
    other = not isa.measured("qconv_binary_emits_bf16")
    with isa.forced(qconv_binary_emits_bf16=other):
        _, report = lower_with_report(gm, inputs, cost="measure")
    assert report.cost.measured == 0 and report.cost.refused == 0, report.summary()
    assert list(report.cost.skipped) == ["probes forced to another CPU's answers"]
    assert fused(report.fired) > 0
    with isa.forced(qconv_binary_emits_bf16=not other):
        _, report = lower_with_report(gm, inputs, cost="measure")
    assert report.cost.measured > 0 and report.cost.refused > 0, report.summary()
    assert fused(report.fired) == 0
