"""Leave a layer in float where that is faster, on this machine, than its fused int8 kernel.

A oneDNN int8 conv or linear pays a fixed cost per call (the primitive lookup, the scales,
the output's allocation) that a small layer never earns back: measured on one thread, a
``[64, 32] x [32, 64]`` ``onednn.qlinear_pointwise`` takes 35-59 us where the float ``addmm``
takes 8-11 us on an AMX Xeon (45-52 us against 7 us with oneDNN held to AVX2). Under
``torch.compile`` a layer left unfused runs in float -- the quantize/dequantize around it
become arithmetic that Inductor fuses into its neighbours' C++ kernels, the conv or matmul an
ATen call -- and computes the reference's own function. So :class:`CostCheck` times both
sides of each fusion that would call a kernel, once per kernel *signature* (as the self-check
caches verdicts: shapes, dtypes, geometry, post-op; not weight values) and thread count, and
refuses the fusion (:class:`~qalgebra.errors.Refusal`, cause ``"cost"``) when the float side
is faster by :data:`MARGIN` and :data:`MIN_GAIN_SECONDS` a call -- for kernels in the
fixed-cost regime only (:data:`MAX_FLOPS`, :data:`MAX_ELEMENTS`).

What is timed: the match's float compute ops (:data:`FLOAT_COMPUTE`: convolution, matmuls),
called as the compiled model calls them (:data:`COMPILED_CALL`) on the match's own values,
against the ops the rewrite wrote (the kernel calls, and the copy of an accumulator an
in-place sum needs), on theirs -- random inputs of the real shapes
(:mod:`qalgebra.trial`), at the caller's thread count, after a warm-up call (the float side's
counts its operations: a larger layer is not timed; under compile the shapes the nodes carry
count them first, and a larger layer gets no inputs at all), both once when the sides are
:data:`CLEAR_RATIO` apart, else alternating, the fastest of :data:`REPEATS`.
Quantize/dequantize ops are left out on both sides (Inductor compiles them into the C++
kernels around the layer; where no neighbour takes one in it is a kernel of its own, which the
float side does not count: GoogLeNet's 1x1 reductions at batch 1 dequantize their shared
``[1, 480, 14, 14]`` input in 82 us, more than their float conv); the float op runs eagerly,
without the weight prepacking Inductor's freezing may give it. It is for compiled graphs: an
eager lowering pays every left-over quantize/dequantize as its own call, so
:func:`qalgebra.lower.lower` leaves it ``"off"``.

The decision depends on the machine and on timing: two compiles may choose differently where
the two sides are close (each sample is a few calls in a row, :data:`CALLS_PER_SAMPLE`, so
that the timing runs in the steady state the compiled model does). Tests force the
timings (``clock=``, or :func:`wall_clock` replaced).

>>> CostCheck("off", CostStats()).enabled
False
>>> sorted(MODES)
['measure', 'off']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import fx

from qalgebra.errors import LoweringError, Refusal
from qalgebra.isa import foreign_answers
from qalgebra.pattern import Match
from qalgebra.rewriter import Rewriter
from qalgebra.selfcheck import emits_kernel
from qalgebra.trial import (
    CheckStats,
    ConstantMemo,
    Skip,
    ancestors,
    bound_call,
    clone,
    evaluate,
    fetch_attr,
    intra_op_threads,
    operands,
    random_inputs,
    unique,
)

__all__ = [
    "AS_TIMED_KEY",
    "CLEAR_RATIO",
    "COMPILED_CALL",
    "FLOAT_COMPUTE",
    "MARGIN",
    "MAX_ELEMENTS",
    "MAX_FLOPS",
    "MIN_GAIN_SECONDS",
    "MODES",
    "REPEATS",
    "Clock",
    "CostCheck",
    "CostMode",
    "CostStats",
    "Side",
    "Timing",
    "clear_cache",
    "wall_clock",
]

CostMode: TypeAlias = Literal["off", "measure"]
"""``"measure"``: time each new signature once per process and thread count; ``"off"``: fuse."""
MODES: tuple[str, ...] = get_args(CostMode)

aten = torch.ops.aten

#: How the compiled model calls each float op: Inductor's wrapper code calls ATen's Python
#: bindings (``extern_kernels.convolution`` is ``torch.convolution``), whose argument parsing
#: costs 5-6 us less than the ``OpOverload`` a graph node holds (a 16-channel 16x16 conv at
#: batch 1, one thread: 29-31 us against 34-37 us) -- at the size where the check decides, a
#: sixth of the float side. The kernel side is timed through its ``OpOverload``, as the
#: wrapper code calls it.
COMPILED_CALL: Mapping[Any, Callable[..., object]] = {
    aten.convolution.default: torch.convolution,
    aten.conv1d.default: torch.conv1d,
    aten.conv2d.default: torch.conv2d,
    aten.conv3d.default: torch.conv3d,
    aten.linear.default: torch.nn.functional.linear,
    aten.addmm.default: torch.addmm,
    aten.mm.default: torch.mm,
    aten.bmm.default: torch.bmm,
    aten.baddbmm.default: torch.baddbmm,
    aten.matmul.default: torch.matmul,
}
#: The float ops whose time stands for the float path of a match.
FLOAT_COMPUTE: frozenset[Any] = frozenset(COMPILED_CALL)

#: ``node.meta`` key set on the convolutions of a match left float: compiled, they must run the
#: call that was timed (ATen's own convolution, which picks its algorithm by shape: at batch 1
#: and few channels a direct convolution) rather than the oneDNN call Inductor's freezing
#: would prepack a constant weight for (``resnet_like(8)``'s 16-channel convs at batch 1: 29-46
#: us direct, 60-120 us prepacked). :func:`qalgebra.inductor_prep.convolutions_as_timed` reads it.
AS_TIMED_KEY = "qalgebra_float_as_timed"

#: The float side must be this many times faster to be chosen ...
MARGIN = 1.25
#: ... and faster by this much a call. A layer left float costs the compile the C++ kernels
#: for the quantize/dequantize arithmetic around it (0.3-0.6 s of compile each on the 2-core
#: machine measured, before layers differing only in qparams shared them:
#: ``ffn_stack(8, 3d)`` all float compiled in 10.9 s, all fused in 5.4 s; shared, 4.4-5.3 s),
#: and a few microseconds is within what the eager timing cannot tell apart from how Inductor
#: runs the float op (``resnet_like(8)``'s 16-channel 16x16 convs at batch 1: the float conv
#: 44-47 us timed, 28-32 us as Inductor's ATen call inside the compiled model).
MIN_GAIN_SECONDS = 10e-6
#: Timed samples of each side (the fastest counts), after one warm-up call, when the first
#: samples are not :data:`CLEAR_RATIO` apart.
REPEATS = 7
#: A first sample this many times faster on one side decides at once.
CLEAR_RATIO = 3.0
#: Each timed sample is the mean of this many calls in a row, as the compiled model runs a layer
#: between its neighbours' calls, not a lone call after the other side's: alone, each call paid for
#: the other side's working set in its caches, the float conv more than the kernel (the cause
#: inferred from the numbers below, not traced). Measured on an AVX2-only EPYC, ``resnet_like(8)``'s
#: 16-channel 16x16 convs at batch 1, one thread: in the compiled models the float conv ran in 43 us
#: and the int8 kernel in 76 us; timed a call alone, the kernel/float ratio had a median of
#: 1.28-1.37 over 20-30 lowerings and fell below :data:`MARGIN` in 5 of 40 and 16 of 60 (so about 1
#: compile in 4 fused them, and ran 1.3-1.5x as long as with them float); timed 4 in a row, a median
#: of 1.54 and never below.
CALLS_PER_SAMPLE = 4
#: The float side is considered only for layers of at most this many floating-point operations
#: (2 per multiply-add; counted by ``torch.utils.flop_counter``): where a call's fixed cost
#: decides. Beyond it, timing one op alone does not predict the compiled model: a layer left
#: float also moves fp32 activations through the quantize/dequantize kernels around it and may
#: change their layout (measured: MobileNet-V2 with the layers whose kernels took 185 us to
#: 5.5 ms, 20 MFLOPs and more, and whose float op timed 1.3-1.7x faster, left float ran 1.12x
#: (batch 1) and 1.39x (batch 8) as long as with every layer fused). A count, not a time: a
#: bound on the kernel's time, tried first, moved with the load of the compile it runs in
#: (``ffn_stack(8, 3d)``'s 0.26 MFLOP linears timed over 100 us there, 60 us alone).
MAX_FLOPS = 4_000_000
#: Nor for layers whose largest tensor -- the float op's input, weight or output -- has more
#: elements than this. The timing runs the op on the same tensors over and over, so they sit in
#: cache; left float in the model, the layer fetches its weight as fp32 (4 bytes an element,
#: against 1 for int8) and moves its activations as fp32 through quantize/dequantize kernels
#: the timing leaves out, a kernel of its own where a fused neighbour reads the same input.
#: Measured on the bench models: every layer whose float choice paid off under compile has
#: tensors of at most 2**15 elements (``ffn_stack(8, 3d)`` at batch 8, [8, 64, 64]: 0.82x
#: Inductor's runtime against 1.06x all fused; ``resnet_like(8)`` at batch 1, [1, 16, 32, 32]:
#: 0.74x against 1.00x); GoogLeNet's 1x1 reductions of [1, 480, 14, 14] and [1, 832, 7, 7]
#: at batch 1, timed 1.7-3x faster in float, ran 1.002x left float against 0.979x fused and
#: cost 5 C++ kernels more to compile; EfficientNet-B0's depthwise convs over [1, 480, 14, 14]
#: (timed 1.34x faster) and MobileNet-V3's squeeze-excitation convs with 960x240 weights were
#: left float to no gain.
MAX_ELEMENTS = 32_768

Side: TypeAlias = Literal["float", "kernel"]
Clock: TypeAlias = Callable[[Side, Callable[[], object]], float]
"""Seconds one call of a side's op takes (tests replace it to force a decision)."""


def wall_clock(side: Side, call: Callable[[], object]) -> float:
    """The wall time of one ``call``: the mean of :data:`CALLS_PER_SAMPLE` calls in a row."""
    start = time.perf_counter()
    for _ in range(CALLS_PER_SAMPLE):
        call()
    return (time.perf_counter() - start) / CALLS_PER_SAMPLE


@dataclass(slots=True)
class CostStats(CheckStats):
    """What the cost check did during one lowering (``LoweringReport.cost``); ``refused``:
    matches left in float, the float side being faster."""

    #: Signatures timed now (not in the cache before this lowering).
    measured: int = 0

    def summary(self) -> str:
        """One line for people."""
        return (
            f"cost check ({self.mode}): {self.measured} signature(s) timed in "
            f"{self.seconds * 1e3:.1f} ms, {self.cached} from the cache, {self.refused} left "
            f"in float (faster there), " + self.skipped_text()
        )


@dataclass(frozen=True, slots=True)
class Timing:
    """The fastest call of each side of one signature, in seconds."""

    float_seconds: float
    kernel_seconds: float

    @property
    def float_is_faster(self) -> bool:
        """Whether the float side wins by :data:`MARGIN` and :data:`MIN_GAIN_SECONDS`."""
        return (
            self.float_seconds * MARGIN < self.kernel_seconds
            and self.kernel_seconds - self.float_seconds >= MIN_GAIN_SECONDS
        )

    def clear(self) -> bool:
        """Whether one side is :data:`CLEAR_RATIO` times the other: no noise decides that."""
        low, high = sorted((self.float_seconds, self.kernel_seconds))
        return high >= CLEAR_RATIO * low

    def describe(self) -> str:
        if math.isinf(self.float_seconds):
            return (
                f"not timed: over {MAX_FLOPS / 1e6:g} MFLOPs or a tensor of {MAX_ELEMENTS} "
                "elements, the kernel's fixed cost is small"
            )
        return (
            f"float {self.float_seconds * 1e6:.1f} us against the fused kernel's "
            f"{self.kernel_seconds * 1e6:.1f} us"
        )


_TIMINGS: dict[Hashable, Timing] = {}


def clear_cache() -> None:
    """Forget every timing (tests; after the machine's load changed a lot)."""
    _TIMINGS.clear()


class CostCheck:
    """Times each rewrite of one lowering (see the module docstring); counts into ``stats``.

    ``threads``: the intra-op thread count the compiled model will run with (the caller's,
    taken when the check is made: the lowering itself runs on one thread).
    """

    def __init__(
        self,
        mode: CostMode,
        stats: CostStats,
        *,
        threads: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        if mode not in MODES:
            raise LoweringError(f"lower: cost must be one of {MODES}, got {mode!r}")
        self.enabled = mode != "off"
        self.stats = stats
        self.threads = torch.get_num_threads() if threads is None else threads
        self.clock = wall_clock if clock is None else clock
        stats.mode = mode
        self._constant = ConstantMemo()

    def check(self, fusion: str, m: Match, rw: Rewriter, new: fx.Node) -> None:
        """Raise :class:`Refusal` if ``m`` computes faster in float than the nodes ``rw`` built."""
        if not self.enabled or new is m.root or not emits_kernel(rw.created):
            return
        anchors = [n for n in m.nodes if n.op == "call_function" and n.target in FLOAT_COMPUTE]
        if not anchors:
            self.stats.skipped["no float conv or matmul in the match"] += 1
            return
        if foreign_answers():  # the kernel is another CPU's: this one may crash on it
            self.stats.skipped["probes forced to another CPU's answers"] += 1
            return
        start = time.perf_counter()
        try:
            timing = self._timing(fusion, m, rw, new, anchors)
        except Skip as skip:
            self.stats.skipped[str(skip)] += 1
            return
        finally:
            self.stats.seconds += time.perf_counter() - start
        if timing.float_is_faster:
            self.stats.refused += 1
            for anchor in anchors:
                anchor.meta[AS_TIMED_KEY] = True
            raise Refusal(
                f"cost: faster in float here ({timing.describe()}, {self.threads} thread(s))",
                cause="cost",
            )

    def _timing(
        self, fusion: str, m: Match, rw: Rewriter, new: fx.Node, anchors: Sequence[fx.Node]
    ) -> Timing:
        ops = operands(m, rw, new, self._constant)
        key = (fusion, ops.key(rw.module), self.threads)
        cached = _TIMINGS.get(key)
        if cached is not None:
            self.stats.cached += 1
            return cached
        counted = _counted_size(anchors, rw.module)
        if counted is not None and _beyond(*counted):
            timing = Timing(math.inf, math.inf)  # beyond the fixed-cost regime: nothing run
            self.stats.measured += 1
            _TIMINGS[key] = timing
            return timing
        base = random_inputs(ops, rw.module)
        float_env = dict(base)
        kernel_env = {n: clone(v) for n, v in base.items()}
        try:
            inside = set(m.nodes)
            evaluate(unique(n for a in anchors for n in ancestors(a, inside)), float_env, rw.module)
            evaluate(ops.candidate, kernel_env, rw.module)
            float_side = [
                bound_call(n, float_env, rw.module, call_as=COMPILED_CALL.get(n.target))
                for n in anchors
            ]
            kernel_side = [bound_call(n, kernel_env, rw.module) for n in ops.candidate if _timed(n)]
            inputs = _largest_input(anchors, float_env)
            timing = self._measure(float_side, kernel_side, inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise Skip(f"a side raised {type(exc).__name__} on random inputs") from exc
        self.stats.measured += 1
        _TIMINGS[key] = timing
        return timing

    def _measure(
        self,
        float_side: Sequence[Callable[[], object]],
        kernel_side: Sequence[Callable[[], object]],
        inputs: int,
    ) -> Timing:
        """The two sides timed; ``inputs``: the elements of the float side's largest input."""
        def total(side: Side, calls: Sequence[Callable[[], object]]) -> float:
            return sum(self.clock(side, call) for call in calls)

        with intra_op_threads(self.threads), torch.no_grad():
            flops, outputs = _size(float_side)  # also the float side's warm-up call
            if _beyond(flops, max(inputs, outputs)):
                return Timing(math.inf, math.inf)  # beyond the fixed-cost regime: not timed
            for call in kernel_side:
                call()  # untimed: a kernel's first call creates its primitive
            first = Timing(total("float", float_side), total("kernel", kernel_side))
            if first.clear():
                return first
            best_float, best_kernel = first.float_seconds, first.kernel_seconds
            for _ in range(REPEATS):
                best_float = min(best_float, total("float", float_side))
                best_kernel = min(best_kernel, total("kernel", kernel_side))
        return Timing(best_float, best_kernel)


def _counted_size(anchors: Sequence[fx.Node], module: Any) -> tuple[int, int] | None:
    """The anchors' floating-point operations and the elements of their largest tensor, from the
    shapes their inputs carry (``meta["val"]``, as under compile), on meta tensors: nothing is
    computed. None where an input's shape is unknown or symbolic; the timing then counts on
    real values.

    Measured on ResNet-50 at batch 8, whose layers are all beyond :data:`MAX_FLOPS`: random
    inputs and two full-size float convolutions a signature, only to count, were a quarter of
    the pass."""
    env: dict[fx.Node, object] = {}
    for anchor in anchors:
        for arg in anchor.all_input_nodes:
            val = arg.meta.get("val")
            if val is None and arg.op == "get_attr":
                val = fetch_attr(module, str(arg.target))
            if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
                return None
            env[arg] = torch.empty_strided(
                tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device="meta"
            )
    try:
        flops, outputs = _size([bound_call(anchor, env, module) for anchor in anchors])
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError, Skip):
        return None
    return flops, max(_largest_input(anchors, env), outputs)


def _beyond(flops: int, elements: int) -> bool:
    """Whether a layer of ``flops`` whose largest tensor has ``elements`` is beyond the
    fixed-cost regime (:data:`MAX_FLOPS`, :data:`MAX_ELEMENTS`)."""
    return flops > MAX_FLOPS or elements > MAX_ELEMENTS


def _size(calls: Sequence[Callable[[], object]]) -> tuple[int, int]:
    """The floating-point operations of one run of ``calls`` (which runs them), and the
    elements of the largest tensor they return."""
    from torch.utils.flop_counter import FlopCounterMode

    largest = 0
    with FlopCounterMode(display=False) as counter:
        for call in calls:
            out = call()
            if isinstance(out, torch.Tensor):
                largest = max(largest, out.numel())
    return int(counter.get_total_flops()), largest


def _largest_input(anchors: Sequence[fx.Node], values: Mapping[fx.Node, object]) -> int:
    """The elements of the anchors' largest tensor input (weights included)."""
    sizes = [
        value.numel()
        for anchor in anchors
        for arg in anchor.all_input_nodes
        if isinstance(value := values.get(arg), torch.Tensor)
    ]
    return max(sizes, default=0)


def _timed(node: fx.Node) -> bool:
    """Whether a node the rewrite wrote counts on the kernel side: not a quantize/dequantize
    (Inductor compiles those into C++ kernels as it does the float side's; run eagerly they are
    Python decompositions, tens of microseconds each)."""
    return node.op == "call_function" and (
        getattr(node.target, "namespace", None) != "quantized_decomposed"
    )
