"""Measuring a lowering: numerics, speed and op counts, side by side in one process.

The ``qalgebra`` command (:mod:`qalgebra.cli`) and the benchmarks (``bench/``) measure through
these: :func:`compare` quantizes a model with torchao's PT2E flow, lowers it with qalgebra and with
torchao and compares them; :func:`timed_samples` times modules in interleaved rounds so that
:func:`paired_ratio` compares calls made moments apart (the machine's load changes under a
benchmark). torch, torchao and the lowering are imported inside the functions that use them, so
that importing this module (the CLI does, for ``--help`` too) costs nothing.

>>> import torch
>>> relu = torch.nn.ReLU()
>>> samples = timed_samples({"a": relu, "b": relu}, (torch.randn(4),), runs=3, warmup=1)
>>> sorted(samples), [len(s) for s in samples.values()]
(['a', 'b'], [3, 3])
>>> max_abs_diff((torch.ones(2), torch.zeros(1)), (torch.ones(2), torch.ones(1)))
1.0
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

    from qalgebra.lower import LoweringReport

__all__ = [
    "Comparison",
    "StepFn",
    "compare",
    "max_abs_diff",
    "median_ms",
    "mutates_inputs",
    "no_steps",
    "onednn_op_count",
    "op_histogram",
    "paired_ratio",
    "quantize_in_steps",
    "quiet_third_party",
    "run_fresh",
    "timed_samples",
]

StepFn = Callable[[str], AbstractContextManager[None]]
"""``step("resnet: export")`` returns a context manager around one slow step (for progress)."""


def quiet_third_party() -> None:
    """Silence torchao's import-time library warnings and export/quantizer chatter."""
    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def _nothing(_: str) -> Iterator[None]:
    yield


no_steps: StepFn = _nothing
"""A :data:`StepFn` that shows nothing."""


def _tensors(value: object) -> list[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def max_abs_diff(a: object, b: object) -> float:
    """Largest ``|a - b|`` over the tensors of two outputs of the same structure (inf if not)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or not ta:
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
    return worst


def _abs_max(value: object) -> float:
    return max((float(t.float().abs().max()) for t in _tensors(value) if t.numel()), default=0.0)


def _fresh(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies of the inputs: a module that writes into its inputs cannot disturb the next run."""
    return tuple(x.clone() for x in inputs)


def run_fresh(module: Callable[..., object], inputs: Sequence[torch.Tensor]) -> object:
    """``module`` called without grad on fresh copies of ``inputs``."""
    import torch

    with torch.no_grad():
        return module(*_fresh(inputs))


def mutates_inputs(module: Callable[..., object], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether calling ``module`` writes into the tensors it is called with."""
    import torch

    args = _fresh(inputs)
    with torch.no_grad():
        module(*args)
    return any(not torch.equal(a, b) for a, b in zip(args, inputs, strict=True))


def timed_samples(
    modules: Mapping[str, Callable[..., object]],
    inputs: Sequence[torch.Tensor],
    *,
    runs: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Wall times (s) of ``runs`` calls of each module after ``warmup`` calls, round by round.

    The modules take turns (one call each per round, the order rotating so none always runs
    first), so that a change of machine load affects all of them alike and sample ``i`` of two
    modules can be compared pairwise. Every call gets fresh copies of the inputs, made outside
    the timed region.
    """
    import torch

    names = list(modules)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for i in range(warmup + runs):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                args = _fresh(inputs)
                start = time.perf_counter()
                modules[name](*args)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def median_ms(
    modules: Mapping[str, Callable[..., object]],
    inputs: Sequence[torch.Tensor],
    *,
    runs: int,
    warmup: int,
) -> dict[str, float]:
    """Median wall time of each module over ``runs`` calls after ``warmup`` calls, in ms
    (measured by :func:`timed_samples`)."""
    times = timed_samples(modules, inputs, runs=runs, warmup=warmup)
    return {name: statistics.median(samples) * 1e3 for name, samples in times.items()}


def paired_ratio(samples: Mapping[str, Sequence[float]], num: str, den: str) -> float | None:
    """Median over rounds of ``num``'s time / ``den``'s time in the same round (None if absent).

    Under a changing load, the ratio of two medians mixes rounds measured at different loads;
    a per-round ratio compares calls made moments apart.
    """
    if num not in samples or den not in samples:
        return None
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def onednn_op_count(gm: fx.GraphModule) -> int:
    """Nodes that call an op of the ``onednn`` or ``quantized`` namespace."""
    from qalgebra.ops import calls_kernel_op

    return sum(1 for n in gm.graph.nodes if calls_kernel_op(n))


def op_histogram(gm: fx.GraphModule) -> Counter[str]:
    """How many times each ``call_function`` target occurs in the graph."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def quantize_in_steps(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], step: StepFn, label: str
) -> fx.GraphModule:
    """torchao's PT2E flow (X86InductorQuantizer), one :data:`StepFn` step per phase.

    The same flow as :func:`qalgebra.testing.quantize.quantize_pt2e` with its defaults (7-bit
    activations where oneDNN's int8 products saturate, :func:`qalgebra.isa.int8_pairs_saturate`;
    two calibration batches: the example inputs and a seeded perturbation), split so that a
    progress display can follow it.
    """
    import torch
    from torch import fx
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from qalgebra.isa import int8_pairs_saturate

    inputs = tuple(example_inputs)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=int8_pairs_saturate())
    )
    model = copy.deepcopy(model).eval()
    with step(f"{label}: export"):
        exported = torch.export.export(model, inputs).module()
    with step(f"{label}: prepare"):
        prepared = prepare_pt2e(exported, quantizer)
    gen = torch.Generator().manual_seed(0)
    perturbed = tuple(x + 0.1 * torch.randn(x.shape, generator=gen) for x in inputs)
    with step(f"{label}: calibrate"), torch.no_grad():
        for batch in (inputs, perturbed):
            prepared(*batch)
    with step(f"{label}: convert"), torch.no_grad():
        converted = convert_pt2e(prepared)
    assert isinstance(converted, fx.GraphModule)
    return converted


@dataclass
class Comparison:
    """One model quantized, lowered by qalgebra and by torchao, and measured."""

    name: str
    reference_nodes: int = 0
    report: LoweringReport | None = None
    qalgebra_error: str | None = None
    torchao_error: str | None = None
    qalgebra_lower_ms: float | None = None
    torchao_lower_ms: float | None = None
    onednn_ops: dict[str, int] = field(default_factory=dict)
    ops: dict[str, Counter[str]] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)
    """max |output - reference| for "qalgebra", "torchao" and "fp32" (the quantization error)."""
    reference_abs_max: float = 0.0
    mutates_inputs: dict[str, bool] = field(default_factory=dict)
    runtime_ms: dict[str, float] = field(default_factory=dict)
    """Median runtime of "fp32", "reference", "torchao", "qalgebra" (and others a caller adds)."""
    qalgebra_over_torchao: float | None = None
    """Median per-round ratio of qalgebra's runtime to torchao's (see :func:`paired_ratio`)."""
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    """The modules that ran: "reference", and "qalgebra" / "torchao" where lowering worked."""


def _short_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def compare(
    name: str,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    step: StepFn = no_steps,
    runs: int = 20,
    warmup: int = 3,
    lower_repeats: int = 3,
    time_reference: bool = True,
) -> Comparison:
    """Quantize ``model``, lower it with qalgebra and torchao, compare numerics and speed.

    The reference is the quantized (un-lowered) module run eagerly. qalgebra's lowering time is
    the median of ``lower_repeats`` lowerings (it takes milliseconds, so the first call's
    one-time costs would dominate a single sample); torchao's is one call (seconds). Each timed
    lowering starts after a ``gc.collect()``, so neither pays for the other's garbage. A crash of
    either lowering is recorded (traceback in ``*_error``), never raised. Every module call gets
    fresh copies of the inputs: a lowered module that writes into its inputs is reported in
    ``mutates_inputs`` and cannot disturb the other measurements. ``time_reference=False``
    leaves the (slow, un-lowered) reference out of the runtime rounds.
    """
    from qalgebra.lower import lower_with_report
    from qalgebra.testing.quantize import torchao_lower

    inputs = tuple(example_inputs)
    result = Comparison(name)
    reference = quantize_in_steps(model, inputs, step, name)
    result.reference_nodes = len(reference.graph.nodes)
    ref_out = run_fresh(reference, inputs)
    result.reference_abs_max = _abs_max(ref_out)
    result.diff["fp32"] = max_abs_diff(run_fresh(model, inputs), ref_out)
    lowered: dict[str, fx.GraphModule] = {}

    with step(f"{name}: qalgebra lowering"):
        try:
            samples: list[float] = []
            for _ in range(max(lower_repeats, 1)):
                gc.collect()  # garbage of earlier steps is not this lowering's to collect
                start = time.perf_counter()
                qa, report = lower_with_report(reference, inputs)
                samples.append(time.perf_counter() - start)
            result.qalgebra_lower_ms = statistics.median(samples) * 1e3
            result.report = report
            lowered["qalgebra"] = qa
        except Exception as exc:
            result.qalgebra_error = _short_error(exc)
    with step(f"{name}: torchao lowering"):
        try:
            gc.collect()
            start = time.perf_counter()
            lowered["torchao"] = torchao_lower(reference, inputs)
            result.torchao_lower_ms = (time.perf_counter() - start) * 1e3
        except Exception as exc:
            result.torchao_error = _short_error(exc)

    for who, gm in lowered.items():
        result.onednn_ops[who] = onednn_op_count(gm)
        result.ops[who] = op_histogram(gm)
        try:
            result.diff[who] = max_abs_diff(run_fresh(gm, inputs), ref_out)
            result.mutates_inputs[who] = mutates_inputs(gm, inputs)
        except Exception as exc:
            message = f"running the {who}-lowered module failed:\n{_short_error(exc)}"
            if who == "qalgebra":
                result.qalgebra_error = message
            else:
                result.torchao_error = message
    if result.qalgebra_error is not None:
        lowered.pop("qalgebra", None)
    if result.torchao_error is not None:
        lowered.pop("torchao", None)
    result.graphs = {"reference": reference, **lowered}

    if runs > 0:
        timed: dict[str, Callable[..., object]] = {"fp32": model}
        if time_reference:
            timed["reference"] = reference
        timed.update(lowered)
        with step(f"{name}: runtime ({runs} runs each)"):
            per_round = timed_samples(timed, inputs, runs=runs, warmup=warmup)
        result.runtime_ms.update(
            {who: statistics.median(times) * 1e3 for who, times in per_round.items()}
        )
        result.qalgebra_over_torchao = paired_ratio(per_round, "qalgebra", "torchao")
    return result
