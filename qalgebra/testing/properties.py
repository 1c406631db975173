"""The properties every lowering must have, checked on one :class:`~.strategies.Example`.

Shared by the pytest properties (tests/test_properties_lowering.py), the fuzzing campaign
(:mod:`qalgebra.fuzz`) and the scripts that :meth:`Example.code` writes. Each check raises
:class:`PropertyFailure` naming the property:

==================  ======================================================================
property            holds when
==================  ======================================================================
``untouched``       the input module's code, tensors and the caller's example inputs are
                    unchanged by lowering
``fires``           every expected fusion fired exactly as often as expected, every expected
                    refusal was reported, and nothing else was refused (no silent miss)
``dtypes``          the lowered module returns the dtypes and shapes the input module returns
                    (propagated with fake tensors: a decision checked without running a kernel)
``runs``            the lowered graph lints and runs
``inputs``          running it writes none of the caller's tensors, and no output aliases one
``numerics``        every output is within its :class:`~.strategies.OutputBound` of the
                    reference (the input module run eagerly), and enough elements agree
``idempotent``      lowering the lowered module fires nothing and gives the same outputs
==================  ======================================================================

:func:`check_compiled` checks what ships through ``torch.compile``: the example compiled with
the ``qalgebra`` backend (:data:`COMPILED_PROPERTIES`: ``runs``, ``inputs``, ``numerics`` as
above, except that a float output bounded as bit-identical eagerly (a value the lowering does
not replace, or int8 values a pointwise family moves, dequantized) may move by Inductor's own
float rounding, :func:`compiled_bounds`; and ``inductor``: none of Inductor's own quantization
patterns fired).

>>> import torch
>>> from qalgebra.testing.strategies import GraphSpec, Layer, LinearSpec, QuantSpec, build_example
>>> q = QuantSpec(scale=0.02, zero_point=3, quant_min=0, quant_max=127, dtype=torch.uint8)
>>> ex = build_example(GraphSpec("qlinear", (4, 16), q, Layer(LinearSpec(16, 8))))
>>> check_example(ex).report.fired["qlinear"]
1

Every check that lowers takes ``fusions=`` (default: the catalog), so a fusion you write is
checked by the same properties: ``check_example(ex, fusions=with_fusions(DEFAULT_FUSIONS,
mine))`` (:func:`qalgebra.catalog.with_fusions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from qalgebra.fusion import Fusion
from qalgebra.lower import DEFAULT_FUSIONS, LoweringReport, lower_with_report
from qalgebra.testing.oracle import bound_failure, output_quant_steps
from qalgebra.testing.strategies import (
    TRACKED_FUSIONS,
    BoundLike,
    ExampleLike,
    ExpectedLike,
    OutputBound,
    flat_tensors,
)

if TYPE_CHECKING:
    from qalgebra.compile import CompileReport

__all__ = [
    "COMPILED_PROPERTIES",
    "COMPILED_ROUNDING_ULPS",
    "PROPERTIES",
    "Outcome",
    "PropertyFailure",
    "Snapshot",
    "check_compiled",
    "check_decisions",
    "check_dtypes",
    "check_example",
    "check_fires",
    "check_idempotent",
    "check_inputs",
    "check_numerics",
    "check_untouched",
    "compiled_bounds",
    "flat_outputs",
    "snapshot",
]

#: The property names, in the order :func:`check_example` checks them.
PROPERTIES = ("untouched", "fires", "dtypes", "runs", "inputs", "numerics", "idempotent")
#: The property names :func:`check_compiled` checks, in order.
COMPILED_PROPERTIES = ("runs", "inputs", "numerics", "inductor")


class PropertyFailure(AssertionError):
    """A property does not hold; ``prop`` names it (one of :data:`PROPERTIES`)."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"[{prop}] {message}")
        self.prop = prop


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :func:`check_example` saw: the lowering's report and the lowered module."""

    report: LoweringReport
    lowered: fx.GraphModule
    seconds: float


flat_outputs = flat_tensors


def _clones(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in inputs)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A module's code and tensors and the example inputs, copied before a lowering
    (:func:`snapshot`), for :func:`check_untouched` after it."""

    code: str
    tensors: dict[str, torch.Tensor]
    inputs: tuple[torch.Tensor, ...]


def snapshot(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Snapshot:
    """Copy what a lowering must leave as it was: ``gm``'s code and tensors, and ``inputs``."""
    tensors = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}
    return Snapshot(gm.code, tensors, _clones(inputs))


def check_untouched(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], before: Snapshot) -> None:
    """The module's code and tensors, and the example inputs, are as ``before`` saw them."""
    if gm.code != before.code:
        raise PropertyFailure("untouched", "lowering changed the input module's code")
    now = gm.state_dict(keep_vars=True)
    if set(now) != set(before.tensors):
        raise PropertyFailure(
            "untouched", f"tensors added/removed: {set(now) ^ set(before.tensors)}"
        )
    for name, value in before.tensors.items():
        if not torch.equal(now[name].detach(), value):
            raise PropertyFailure("untouched", f"lowering wrote the input module's tensor {name}")
    for i, (now_in, then) in enumerate(zip(inputs, before.inputs, strict=True)):
        if not torch.equal(now_in, then):
            raise PropertyFailure("untouched", f"lowering wrote example input {i}")


def check_fires(expected: ExpectedLike, report: LoweringReport) -> None:
    """Exact counts for the expected fusions; expected refusals reported; no other refusal."""
    got = {name: report.fired.get(name, 0) for name in expected.fired}
    want = dict(expected.fired)
    if got != want:
        diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        raise PropertyFailure(
            "fires",
            f"fusion counts (expected, fired) differ: {diff}\n{report.summary()}",
        )
    reasons = [r.reason for r in report.refused]
    for needle in expected.refusals:
        if not any(needle in reason for reason in reasons):
            raise PropertyFailure(
                "fires", f"expected a refusal mentioning {needle!r}\n{report.summary()}"
            )
    allowed = (*expected.refusals, *expected.allowed_refusals)
    for r in report.refused:
        if not any(needle in r.reason for needle in allowed):
            raise PropertyFailure(
                "fires",
                f"unexpected refusal by {r.fusion} at {r.root}: {r.reason}\n{report.summary()}",
            )


def check_dtypes(
    lowered: fx.GraphModule, inputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> None:
    """The lowered module's outputs have the reference's dtypes and shapes.

    Propagated through fake tensors (every oneDNN op has a fake kernel), so the contract is
    checked whatever this CPU's kernels can run: a lowering forced to emit bf16 where oneDNN
    cannot is still checked here, on any CPU.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            fakes = tuple(mode.from_tensor(t) for t in inputs)
            outputs = flat_outputs(lowered(*fakes))
    except Exception as exc:
        raise PropertyFailure("dtypes", f"fake-tensor run: {type(exc).__name__}: {exc}") from exc
    got = [(t.dtype, tuple(t.shape)) for t in outputs]
    want = [(t.dtype, tuple(t.shape)) for t in reference]
    if got != want:
        raise PropertyFailure("dtypes", f"outputs (dtype, shape) {got} != reference {want}")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def check_inputs(
    mine: Sequence[torch.Tensor], originals: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> None:
    """The tensors the lowered module ran on are unchanged, and no output aliases one."""
    for i, (ours, original) in enumerate(zip(mine, originals, strict=True)):
        if not torch.equal(ours, original):
            raise PropertyFailure("inputs", f"the lowered module wrote into its input {i}")
    inputs = {_storage(t) for t in mine if t.numel()}
    for j, out in enumerate(outputs):
        if out.numel() and _storage(out) in inputs:
            raise PropertyFailure("inputs", f"output {j} aliases an input")


def check_numerics(
    bounds: Sequence[BoundLike], reference: Sequence[torch.Tensor], got: Sequence[torch.Tensor]
) -> None:
    """Each output within its bound of the reference."""
    if len(reference) != len(got):
        raise PropertyFailure("numerics", f"{len(got)} outputs, reference has {len(reference)}")
    if len(bounds) != len(reference):
        raise PropertyFailure("numerics", f"{len(bounds)} bounds for {len(reference)} outputs")
    for i, (bound, ref, out) in enumerate(zip(bounds, reference, got, strict=True)):
        failure = bound_failure(bound, ref, out)
        if failure is not None:
            raise PropertyFailure("numerics", f"output {i} ({bound.kind}; {bound.why}): {failure}")


def check_idempotent(
    lowered: fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
) -> LoweringReport:
    """Lowering ``lowered`` again with ``fusions`` fires nothing and computes the same outputs."""
    twice, report = lower_with_report(lowered, _clones(inputs), fusions=fusions, strict=True)
    if report.total_fired:
        raise PropertyFailure(
            "idempotent", f"lowering the lowered graph fired again:\n{report.summary()}"
        )
    again = flat_outputs(twice(*_clones(inputs)))
    for i, (a, b) in enumerate(zip(outputs, again, strict=True)):
        if not torch.equal(a, b):
            raise PropertyFailure("idempotent", f"output {i} changed after lowering twice")
    return report


def check_example(example: ExampleLike, *, fusions: Sequence[Fusion] = DEFAULT_FUSIONS) -> Outcome:
    """Lower ``example.gm`` once with ``fusions`` and check every property of
    :data:`PROPERTIES` on it.

    Eager aten ops -- the whole reference, what the lowering leaves -- run on PyTorch's native
    kernels, not oneDNN's: on AMX, oneDNN's eager bf16 conv gets degenerate geometries wrong
    too (docs/findings.md, bug 5), which would make the reference wrong.
    """
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with torch.no_grad():
            return _check_example(example, fusions)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def check_compiled(
    example: ExampleLike, *, fusions: Sequence[Fusion] = DEFAULT_FUSIONS
) -> CompileReport:
    """Compile ``example.gm`` with the ``qalgebra`` backend and ``fusions`` (every layer they
    can fuse: ``cost="off"``) and check :data:`COMPILED_PROPERTIES` on it; returns the report.

    The reference is the example's graph run eagerly on PyTorch's native kernels, as in
    :func:`check_example`. Each call compiles a new module: dynamo keeps what it compiled until
    ``torch._dynamo.reset()``.
    """
    from qalgebra.compile import compile as qalgebra_compile

    gm, inputs = example.gm, example.inputs
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with torch.no_grad():
            reference = [t.clone() for t in flat_outputs(gm(*_clones(inputs)))]
    finally:
        torch._C._set_mkldnn_enabled(enabled)
    mine = _clones(inputs)
    try:
        compiled = qalgebra_compile(gm, _clones(inputs), fusions=fusions, cost="off")
        with torch.no_grad():
            outputs = flat_outputs(compiled(*mine))
    except Exception as exc:
        raise PropertyFailure("runs", f"{type(exc).__name__}: {exc}") from exc
    bounds = compiled_bounds(example.expected.outputs, reference, output_quant_steps(gm))
    _check_outputs(example, mine, reference, outputs, bounds=bounds)
    if not compiled.reports:
        raise PropertyFailure("runs", "the backend compiled no graph")
    report = compiled.reports[-1]
    if report.inductor_quant_fusions:
        raise PropertyFailure(
            "inductor", f"Inductor's quantization patterns fired: {report.summary()}"
        )
    return report


#: How far, in units in the last place of its dtype relative to its largest magnitude, a float
#: output the lowering does not replace may move under ``torch.compile``: Inductor's generated
#: code fuses, reorders and vectorizes float arithmetic (and keeps bf16 in float32 between
#: ops), so it rounds otherwise than the eager reference (measured on drawn examples: 2.4e-7
#: on a ``qmean`` example's float output, 3e-8 on graphs outside the catalog).
COMPILED_ROUNDING_ULPS = 16


def compiled_bounds(
    bounds: Sequence[BoundLike],
    reference: Sequence[torch.Tensor],
    steps: Sequence[float | None] = (),
) -> list[BoundLike]:
    """``bounds`` for a compiled run: each ``"exact"`` float output within
    :data:`COMPILED_ROUNDING_ULPS` of its largest magnitude, plus one quantization step where
    ``steps`` (:func:`~qalgebra.testing.oracle.output_quant_steps`) says it is dequantized: a
    float value Inductor computes otherwise before a quantize can land one level off (a
    ``conv_transpose`` outside the catalog, which Inductor's freezing runs through oneDNN).
    Every other bound stays as it is: an integer output must still be bit-identical."""
    out: list[BoundLike] = []
    for i, (bound, ref) in enumerate(zip(bounds, reference, strict=False)):
        if bound.kind != "exact" or not ref.is_floating_point() or ref.numel() == 0:
            out.append(bound)
            continue
        magnitude = float(ref.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
        ulp = torch.finfo(ref.dtype).eps * max(magnitude, torch.finfo(ref.dtype).tiny)
        step = steps[i] if i < len(steps) else None
        why = f"{bound.why}; compiled: Inductor's float rounding, {COMPILED_ROUNDING_ULPS} ulps"
        if step is not None:
            why += " and one quantization step"
        atol = COMPILED_ROUNDING_ULPS * ulp + (step or 0.0)
        out.append(OutputBound("float", atol=atol, why=why))
    out.extend(bounds[len(out) :])
    return out


def check_decisions(
    example: ExampleLike, *, fusions: Sequence[Fusion] = DEFAULT_FUSIONS
) -> Outcome:
    """Lower ``example.gm`` and check what the lowering decided without running its kernels:
    ``untouched``, ``fires`` and ``dtypes``. For lowerings forced to another CPU's answers
    (``qalgebra.isa.forced``) that this CPU's kernels cannot run or compute alike."""
    with torch.no_grad():
        return _decide(example, fusions)[0]


def _decide(example: ExampleLike, fusions: Sequence[Fusion]) -> tuple[Outcome, list[torch.Tensor]]:
    gm, inputs = example.gm, example.inputs
    before = snapshot(gm, inputs)
    reference = [t.clone() for t in flat_outputs(gm(*_clones(inputs)))]
    # strict: a failed rewrite is a bug
    lowered, report = lower_with_report(gm, inputs, fusions=fusions, strict=True)
    check_untouched(gm, inputs, before)
    check_fires(example.expected, report)
    check_dtypes(lowered, inputs, reference)
    return Outcome(report, lowered, report.seconds), reference


def _check_outputs(
    example: ExampleLike,
    mine: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    *,
    bounds: Sequence[BoundLike] | None = None,
) -> None:
    """``inputs`` and ``numerics`` of a run on ``mine`` (clones of the example's inputs), within
    ``bounds`` (default: the example's)."""
    check_inputs(mine, example.inputs, outputs)
    check_numerics(example.expected.outputs if bounds is None else bounds, reference, outputs)
    own_check = getattr(example, "check_outputs", None)
    if callable(own_check):
        message = own_check(reference, outputs)
        if message:
            raise PropertyFailure("numerics", str(message))


def _check_example(example: ExampleLike, fusions: Sequence[Fusion]) -> Outcome:
    outcome, reference = _decide(example, fusions)
    lowered, inputs = outcome.lowered, example.inputs
    try:
        lowered.graph.lint()
        mine = _clones(inputs)
        outputs = flat_outputs(lowered(*mine))
    except Exception as exc:
        raise PropertyFailure("runs", f"{type(exc).__name__}: {exc}") from exc
    _check_outputs(example, mine, reference, outputs)
    check_idempotent(lowered, inputs, outputs, fusions=fusions)
    return outcome


def fired_families(report: LoweringReport) -> dict[str, int]:
    """The report's counts for the fusions examples pin."""
    return {name: report.fired.get(name, 0) for name in TRACKED_FUSIONS}
