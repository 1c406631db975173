"""The numerics oracle: does a lowered (or rewritten) module compute what the reference does?

A quantized graph cannot be compared with one float tolerance: a uint8 output that moved by one
quantization step is as good as the reference (the kernel rounded ``x.5`` the other way), a
float output that is a dequantized value may move by ``scale``, and a float output of a conv or
linear (no quantize after it) should agree to float rounding. :func:`compare_outputs` applies
the right rule per output and returns a :class:`Comparison` that says what it checked.

Rules (docs/design.md, "Lowering: numerics"):

==================================  ===========================================================
output                              accepted when
==================================  ===========================================================
int8 / uint8                        ``max |cand - ref| <= max_steps`` in integer units (1)
float, ``quant_step`` given         ``|cand - ref| <= max_steps * quant_step + float_tol``
(a dequantized value)
float, ``quant_step=None``          ``|cand - ref| <= float_tol``
==================================  ===========================================================

``float_tol = atol + rtol * max|ref|``: relative to the output's largest magnitude, not to each
element, because a value near zero produced by a long sum carries the absolute error of the sum.

The defaults were measured (see docs/onednn_ops.md, "Measured agreement"): torchao's own
lowering of every registry model that it lowers and runs agrees with the eager reference to
``max|diff| <= 4.8e-7`` with ``max|diff| / max|ref| <= 3.7e-7`` (fp32 outputs, 7-bit activations
on this AVX2 machine). ``FP32_RTOL = 1e-5`` leaves 25x headroom and is still ~400x tighter than
one quantization step of an 8-bit output (``1/255`` of the range), so a flipped upstream int8
value is caught. int8-mixed-bf16 graphs agree to ``max|diff| / max|ref| <= 1.2e-2`` (the
reference rounds the conv result to bf16 before quantizing it, the fused kernel does not):
``BF16_RTOL = 3e-2``, the default for bf16 outputs; pass it explicitly for an fp32 output of a
bf16 graph.

The last section gives the drawn examples' bounds (``qalgebra.testing.strategies``) their
arithmetic: per element, how far a fused kernel may be from the reference, from the actual
magnitudes of its inputs, weights and results (:func:`compute_error`, :func:`unary_error`) and
which int8 levels a fused quantize may then produce (:func:`level_interval`).

>>> import torch
>>> ref = torch.tensor([10, 20, 30], dtype=torch.uint8)
>>> compare_outputs(ref, ref + 1, quant_step=None).ok
True
>>> print(compare_outputs(ref, ref + 2, quant_step=None).message)
MISMATCH: quantized uint8[3]: max |diff| = 2 step(s) at [0] (reference 10, candidate 12); allowed 1
>>> compare_outputs(ref.float() * 0.1, (ref + 1).float() * 0.1, quant_step=0.1).ok
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

import torch
from torch import Tensor, fx

__all__ = [
    "BF16_RTOL",
    "BF16_UNIT_ROUNDOFF",
    "FLOAT_ATOL",
    "FP32_COMPUTE_REL",
    "FP32_RTOL",
    "BoundLike",
    "Comparison",
    "OutputKind",
    "assert_outputs_close",
    "bound_failure",
    "compare_outputs",
    "compute_error",
    "level_interval",
    "output_quant_steps",
    "quantize_levels",
    "rounding",
    "unary_error",
]

FP32_RTOL = 1e-5
"""Relative (to ``max|ref|``) tolerance for fp32 outputs; measured agreement is <= 3.7e-7."""
BF16_RTOL = 3e-2
"""Relative tolerance for outputs of int8-mixed-bf16 graphs; measured agreement <= 1.2e-2."""
FLOAT_ATOL = 1e-6
"""Absolute floor, so an all-zero reference does not demand bit equality."""

OutputKind: TypeAlias = Literal["quantized", "dequantized", "float", "mismatch"]
"""What rule a comparison applied (``mismatch``: dtype or shape differ, nothing compared)."""

_QUANTIZED = (torch.uint8, torch.int8)


@dataclass(frozen=True, slots=True)
class Comparison:
    """The verdict on one output (or the worst of several), with the evidence.

    ``max_abs_diff`` is in the output's units (integer levels for int8/uint8);
    ``max_steps`` is that difference in quantization steps (integer levels for int8/uint8,
    ``diff / quant_step`` for a dequantized float, NaN when no step is known); ``tolerance`` is
    the largest accepted ``|diff|`` in output units; ``worst_index`` locates ``max_abs_diff``.
    Truth-testing raises: write ``result.ok``, so ``assert compare_outputs(...)`` cannot pass
    silently.
    """

    ok: bool
    kind: OutputKind
    max_abs_diff: float
    max_steps: float
    tolerance: float
    worst_index: tuple[int, ...]
    reference_value: float
    candidate_value: float
    dtype: str
    shape: tuple[int, ...]
    output_index: int | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        raise TypeError("a Comparison is not a bool: use `.ok` (and `.message` to report)")

    @property
    def message(self) -> str:
        """One readable line: verdict, rule, worst element, and the allowed bound."""
        where = "" if self.output_index is None else f"output {self.output_index}: "
        verdict = "ok" if self.ok else "MISMATCH"
        if self.kind == "mismatch":
            return f"{verdict}: {where}{self.detail}"
        shape = list(self.shape)
        at = list(self.worst_index)
        if self.kind == "quantized":
            return (
                f"{verdict}: {where}quantized {self.dtype}{shape}: max |diff| = "
                f"{self.max_abs_diff:g} step(s) at {at} (reference {self.reference_value:g}, "
                f"candidate {self.candidate_value:g}); allowed {self.tolerance:g}"
            )
        steps = "" if math.isnan(self.max_steps) else f" = {self.max_steps:.3g} step(s)"
        return (
            f"{verdict}: {where}{self.kind} {self.dtype}{shape}: max |diff| = "
            f"{self.max_abs_diff:.3g}{steps} at {at} (reference {self.reference_value:.6g}, "
            f"candidate {self.candidate_value:.6g}); allowed {self.tolerance:.3g}"
            + (f" ({self.detail})" if self.detail else "")
        )


def _mismatch(reference: Tensor, detail: str) -> Comparison:
    return Comparison(
        ok=False,
        kind="mismatch",
        max_abs_diff=math.inf,
        max_steps=math.inf,
        tolerance=0.0,
        worst_index=(),
        reference_value=math.nan,
        candidate_value=math.nan,
        dtype=str(reference.dtype).removeprefix("torch."),
        shape=tuple(reference.shape),
        detail=detail,
    )


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index: list[int] = []
    for size in reversed(shape):
        index.append(flat_index % size if size else 0)
        flat_index = flat_index // size if size else 0
    return tuple(reversed(index))


def _compare_one(
    reference: Tensor,
    candidate: Tensor,
    quant_step: float | None,
    max_steps: int,
    rtol: float | None,
    atol: float,
) -> Comparison:
    if not isinstance(reference, Tensor) or not isinstance(candidate, Tensor):
        raise TypeError(
            f"expected tensors, got {type(reference).__name__} and {type(candidate).__name__}"
        )
    if reference.dtype != candidate.dtype:
        return _mismatch(reference, f"dtype {candidate.dtype} != reference {reference.dtype}")
    if reference.shape != candidate.shape:
        return _mismatch(
            reference, f"shape {list(candidate.shape)} != reference {list(reference.shape)}"
        )
    if quant_step is not None and not (quant_step > 0 and math.isfinite(quant_step)):
        raise ValueError(f"quant_step must be a positive finite float, got {quant_step!r}")
    dtype = str(reference.dtype).removeprefix("torch.")
    shape = tuple(reference.shape)
    ref = reference.detach().to("cpu")
    cand = candidate.detach().to("cpu")
    if reference.dtype in _QUANTIZED:
        diff = (cand.to(torch.int32) - ref.to(torch.int32)).abs()
        kind: OutputKind = "quantized"
        tolerance = float(max_steps)
        detail = ""
    else:
        ref64, cand64 = ref.to(torch.float64), cand.to(torch.float64)
        both_nan = torch.isnan(ref64) & torch.isnan(cand64)
        same_inf = torch.isinf(ref64) & (ref64 == cand64)
        diff = torch.where(both_nan | same_inf, 0.0, (cand64 - ref64).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        finite = ref64[torch.isfinite(ref64)]
        magnitude = float(finite.abs().max()) if finite.numel() else 0.0
        if rtol is None:
            rtol = BF16_RTOL if reference.dtype in (torch.bfloat16, torch.float16) else FP32_RTOL
        float_tol = atol + rtol * magnitude
        if quant_step is None:
            kind = "float"
            tolerance = float_tol
        else:
            kind = "dequantized"
            tolerance = max_steps * quant_step + float_tol
        detail = f"atol {atol:g} + rtol {rtol:g} * max|ref| {magnitude:.3g}"
    # argmax of the whole tensor and indexing read strided (channels-last) tensors in place;
    # reshape(-1) copied each one (a quarter of the self-check on ResNet-50 at batch 8)
    worst_flat = int(diff.argmax()) if diff.numel() else 0
    index = _unravel(worst_flat, shape)
    worst = float(diff[index]) if diff.numel() else 0.0
    ref_value = float(ref[index]) if ref.numel() else math.nan
    cand_value = float(cand[index]) if cand.numel() else math.nan
    if kind == "quantized":
        steps = worst
    elif quant_step is not None:
        steps = worst / quant_step
    else:
        steps = math.nan
    return Comparison(
        ok=worst <= tolerance,
        kind=kind,
        max_abs_diff=worst,
        max_steps=steps,
        tolerance=tolerance,
        worst_index=index,
        reference_value=ref_value,
        candidate_value=cand_value,
        dtype=dtype,
        shape=shape,
        detail=detail,
    )


def compare_outputs(
    reference: Tensor | Sequence[Tensor],
    candidate: Tensor | Sequence[Tensor],
    *,
    quant_step: float | Sequence[float | None] | None,
    max_steps: int = 1,
    rtol: float | None = None,
    atol: float = FLOAT_ATOL,
) -> Comparison:
    """Compare a candidate output with the reference by the rule its dtype calls for.

    ``quant_step`` is the scale of the quantize/dequantize that produced a float output (see
    :func:`output_quant_steps`), or None for a float output of a compute op; it is ignored for
    int8/uint8 outputs, which are compared in integer levels. ``rtol=None`` picks
    :data:`FP32_RTOL` or :data:`BF16_RTOL` by dtype. For several outputs (a tuple or list),
    ``quant_step`` may be one value per output; the result is the first failing comparison,
    else the one with the most steps (or the largest difference).
    """
    if isinstance(reference, Tensor) or isinstance(candidate, Tensor):
        if not (isinstance(reference, Tensor) and isinstance(candidate, Tensor)):
            raise TypeError("reference and candidate must both be tensors or both sequences")
        if quant_step is not None and not isinstance(quant_step, (int, float)):
            raise TypeError("a single output takes a single quant_step (float or None)")
        return _compare_one(reference, candidate, quant_step, max_steps, rtol, atol)
    refs, cands = list(reference), list(candidate)
    if len(refs) != len(cands):
        raise ValueError(f"{len(cands)} candidate outputs for {len(refs)} reference outputs")
    if quant_step is None or isinstance(quant_step, (int, float)):
        steps: list[float | None] = [quant_step] * len(refs)
    else:
        steps = list(quant_step)
        if len(steps) != len(refs):
            raise ValueError(f"{len(steps)} quant_steps for {len(refs)} outputs")
    results = [
        _compare_one(ref, cand, step, max_steps, rtol, atol)
        for ref, cand, step in zip(refs, cands, steps, strict=True)
    ]
    if not results:
        raise ValueError("no outputs to compare")
    indexed = [dataclasses.replace(res, output_index=i) for i, res in enumerate(results)]
    failing = [res for res in indexed if not res.ok]
    if failing:
        return failing[0]

    def badness(res: Comparison) -> float:
        return res.max_abs_diff / res.tolerance if res.tolerance > 0 else res.max_abs_diff

    return max(indexed, key=badness)


def assert_outputs_close(
    reference: Tensor | Sequence[Tensor],
    candidate: Tensor | Sequence[Tensor],
    *,
    quant_step: float | Sequence[float | None] | None,
    max_steps: int = 1,
    rtol: float | None = None,
    atol: float = FLOAT_ATOL,
) -> Comparison:
    """:func:`compare_outputs`, raising AssertionError with its message when not ok."""
    result = compare_outputs(
        reference, candidate, quant_step=quant_step, max_steps=max_steps, rtol=rtol, atol=atol
    )
    if not result.ok:
        raise AssertionError(result.message)
    return result


class BoundLike(Protocol):
    """How far one output may be from the reference, per element
    (:class:`qalgebra.testing.strategies.OutputBound`, or a plug-in's); read by
    :func:`bound_failure`. A bound may also have an ``interval`` (see ``OutputBound``), read
    when present."""

    @property
    def kind(self) -> Literal["quantized", "float", "exact"]: ...
    @property
    def steps(self) -> int: ...
    @property
    def atol(self) -> float | Tensor: ...
    @property
    def agree(self) -> float | None: ...
    @property
    def agree_atol(self) -> float | Tensor: ...
    @property
    def why(self) -> str: ...


def bound_failure(bound: BoundLike, ref: Tensor, got: Tensor) -> str | None:
    """Why ``got`` is not within ``bound`` of the reference ``ref``, element by element (None:
    it is). The rule of the drawn examples (``qalgebra.testing.strategies``), whose bounds
    come from the values their graphs compute; :func:`compare_outputs` is the rule for graphs
    nothing is known about."""
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return f"{got.dtype}{list(got.shape)} != reference {ref.dtype}{list(ref.shape)}"
    if bound.kind == "exact":
        if not torch.equal(ref, got) and not (
            ref.is_floating_point()
            and torch.equal(ref.isnan(), got.isnan())
            and torch.equal(ref.nan_to_num(), got.nan_to_num())
        ):
            diff = (ref.double() - got.double()).abs().nan_to_num(float("inf")).max()
            return f"not bit-identical, max |diff| {diff}"
        return None
    if ref.numel() == 0:
        return None
    ref, got = ref.detach(), got.detach()
    interval: tuple[Tensor, Tensor] | None = getattr(bound, "interval", None)
    if bound.kind == "quantized":
        diff = (ref.to(torch.int32) - got.to(torch.int32)).abs().double()
        agree_limit: float | Tensor = 0.0
        if interval is None:
            limit: float | Tensor = float(bound.steps)
        else:  # the allowed levels, as a distance from the reference on each side
            lo, hi = interval
            level = ref.double()
            limit = torch.where(got.double() >= level, hi - level, level - lo)
    else:
        diff = (ref.double() - got.double()).abs().nan_to_num(float("inf"))
        limit, agree_limit = bound.atol, bound.agree_atol
    excess = diff - limit
    worst = float(excess.max())
    if worst > 0:
        at = [int(i) for i in torch.unravel_index(excess.argmax(), diff.shape)]
        allowed = limit if isinstance(limit, float) else float(limit[tuple(at)])
        return (
            f"|diff| {float(diff[tuple(at)]):.6g} > {allowed:.6g} at {at} "
            f"(reference {float(ref[tuple(at)]):.6g}, lowered {float(got[tuple(at)]):.6g}; "
            f"max |diff| {float(diff.max()):.6g})"
        )
    if bound.agree is not None:
        fraction = float((diff <= agree_limit).double().mean())
        if fraction < bound.agree:
            return (
                f"only {fraction:.4f} of the elements agree to their tight bound "
                f"(need {bound.agree}); max |diff| {float(diff.max()):.6g}"
            )
    return None


# ---------------------------------------------------------------------------------------------
# Finding the quantization step of each graph output

_qd = torch.ops.quantized_decomposed
_aten = torch.ops.aten
_prims = torch.ops.prims
_DTYPE_CONVERSIONS = (_prims.convert_element_type.default, _aten._to_copy.default, _aten.to.dtype)


def _scalar_attr(gm: fx.GraphModule, node: object) -> float | None:
    """A float scale read from a 1-element get_attr tensor, or a Python float."""
    if isinstance(node, (int, float)):
        return float(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: object = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor) and obj.numel() == 1:
            return float(obj.reshape(-1)[0])
    return None


def _dequant_scale(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """The scale if ``node`` yields a dequantized value, in op or decomposed form."""
    while (node.op == "call_function" and node.target in _DTYPE_CONVERSIONS) or (
        node.op == "call_method" and node.target == "to"
    ):
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            return None
        node = arg
    if node.op != "call_function":
        return None
    if node.target in (_qd.dequantize_per_tensor.default, _qd.dequantize_per_tensor.tensor):
        return _scalar_attr(gm, node.args[1])
    if node.target is _aten.mul.Tensor and len(node.args) == 2:
        x, scale = node.args
        if not isinstance(x, fx.Node) or not isinstance(scale, (int, float)):
            return None
        if x.op == "call_function" and x.target is _aten.sub.Tensor:
            inner = x.args[0]
            if not isinstance(inner, fx.Node):
                return None
            x = inner
        if x.op == "call_function" and x.target is _prims.convert_element_type.default:
            return float(scale)
    return None


def output_quant_steps(gm: fx.GraphModule) -> tuple[float | None, ...]:
    """Per flattened graph output: the dequantize scale that produced it, else None.

    Recognises op-form dequantize (``.default`` and ``.tensor``) and the decomposed
    ``mul(sub?(convert_element_type(q)), scale)``, looking through dtype conversions -- the
    value to pass as ``compare_outputs(quant_step=...)``.
    """
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves: list[object] = []

    def flatten(arg: object) -> None:
        if isinstance(arg, (tuple, list)):
            for item in arg:
                flatten(item)
        elif isinstance(arg, dict):
            for item in arg.values():
                flatten(item)
        else:
            leaves.append(arg)

    flatten(output.args[0])
    return tuple(_dequant_scale(gm, leaf) if isinstance(leaf, fx.Node) else None for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# Per-element error bounds: how far a fused kernel may be from the eager reference

BF16_UNIT_ROUNDOFF = 2.0**-8
"""Largest relative error of one rounding to bf16 (8 significant bits, to nearest)."""
FP32_COMPUTE_REL = 1e-5
"""Float32 error of a conv/linear relative to ``sum |x| |w| + |b|`` of each element: the
summation order (at most ``K`` roundings of ``2**-24``: 4.3e-6 for the largest fan-in drawn,
72) and the kernel's scale and bias steps; also the post-ops' own approximation in oneDNN."""


def rounding(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Per element: the largest change rounding ``value`` to ``dtype`` makes (0 for float32,
    whose roundings :data:`FP32_COMPUTE_REL` covers)."""
    magnitude = value.detach().to(torch.float64).abs()
    if dtype == torch.bfloat16:
        return BF16_UNIT_ROUNDOFF * magnitude
    return torch.zeros_like(magnitude)


def compute_error(
    apply: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    x_err: Tensor,
    weight: Tensor,
    bias: Tensor,
    result: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """Per output element: a bound of ``|fused - reference|`` for a conv or linear.

    ``apply(x, w)`` is the op without bias (float64 in, float64 out), ``x`` the reference's
    input and ``x_err`` how far the kernel's input may be from it (per element), ``weight`` the
    dequantized fp32 weight, ``bias`` the fp32 bias broadcast to the result (zeros if none),
    ``result`` the reference's output, ``dtype`` its compute dtype. The kernel multiplies exact
    int8 levels; the reference multiplies its (bf16-rounded) inputs by the (bf16-rounded)
    weight, adds the (rounded) bias and rounds the result::

        |W| x_err  +  (u_w + FP32_COMPUTE_REL) |W||x|  +  (u + FP32_COMPUTE_REL) |b|  +  u |y|

    with ``u`` the dtype's unit roundoff (0 for fp32) and ``u_w`` the weight's rounding.
    """
    w_abs = weight.detach().to(torch.float64).abs()
    terms = apply(x.detach().to(torch.float64).abs(), w_abs)
    u = BF16_UNIT_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    b_abs = bias.detach().to(torch.float64).abs()
    moved = apply(x_err.to(torch.float64), w_abs)
    return moved + (u + FP32_COMPUTE_REL) * (terms + b_abs) + rounding(result, dtype)


def unary_error(
    pre: Tensor,
    err: Tensor,
    out: Tensor,
    dtype: torch.dtype,
    fn: Callable[[Tensor], Tensor],
    *,
    valley: float | None = None,
) -> Tensor:
    """Per element: a bound of ``|f(fused pre) - reference f(pre)|`` given ``|pre| <= err``.

    ``fn`` is ``f`` in float64, decreasing up to ``valley`` and increasing after it (None: it
    is monotone), so the interval ``pre +- err`` maps to the interval between ``f`` at its ends
    (and at ``valley`` inside it) exactly. Then the reference's rounding of ``out`` and both
    sides' approximation of ``f`` (:data:`FP32_COMPUTE_REL` of ``|pre| + |out|``).
    """
    p = pre.detach().to(torch.float64)
    low_end, high_end = fn(p - err), fn(p + err)
    low, high = torch.minimum(low_end, high_end), torch.maximum(low_end, high_end)
    if valley is not None:
        inside = (p - err <= valley) & (valley <= p + err)
        bottom = fn(torch.tensor(valley, dtype=torch.float64))
        low = torch.where(inside, torch.minimum(low, bottom), low)
    mid = fn(p)
    moved = torch.maximum(high - mid, mid - low)
    o = out.detach().to(torch.float64)
    return moved + FP32_COMPUTE_REL * (p.abs() + o.abs()) + rounding(o, dtype)


def quantize_levels(value: Tensor, scale: float, zero_point: int, low: int, high: int) -> Tensor:
    """``quantize_per_tensor``'s levels of float64 ``value`` (round half to even, clamp)."""
    return (torch.round(value / scale) + zero_point).clamp(low, high)


def level_interval(
    value: Tensor, err: Tensor, levels: Tensor, scale: float, zero_point: int, low: int, high: int
) -> tuple[Tensor, Tensor]:
    """The levels a fused quantize may produce when its input is within ``err`` of ``value``.

    Quantizing is monotone: ``[q(value - err), q(value + err)]``, widened by ``2**-20`` of the
    operands for the kernel's float32 division and containing the reference's ``levels``.
    """
    v = value.detach().to(torch.float64)
    reach = err + 2.0**-20 * (v.abs() + scale)
    ref = levels.to(torch.float64)
    lo = torch.minimum(quantize_levels(v - reach, scale, zero_point, low, high), ref)
    hi = torch.maximum(quantize_levels(v + reach, scale, zero_point, low, high), ref)
    return lo, hi
