"""Lowering-time self-check: every distinct fused kernel call runs once against its reference.

A rewrite replaces a matched subgraph (``m.nodes``, reading some nodes outside it) by new nodes
reading the same outside nodes: both compute one function. When the new nodes call a kernel
(an ``onednn.*`` / ``quantized.*`` op, or ``aten._weight_int8pack_mm``), :class:`SelfCheck` runs
both on the same random inputs -- shapes from ``meta['val']`` or :func:`~qalgebra.shapes.
known_shape` (symbolic sizes at their hints), dtypes from :func:`~qalgebra.match.node_dtype`,
integer values within the tensor's recorded quantization range -- and refuses the match
(:class:`~qalgebra.errors.Refusal`, cause ``"selfcheck"``) when the kernel's result is
outside :func:`agreement`'s bound. The check only reads the graph: it needs nothing from the
fusion, so it covers user-written fusions too.

Both sides run at the intra-op thread count the caller had when the lowering began -- the
count the model will run with, so the kernel splits its work as it will there (the lowering
itself prepacks on one thread).

Verdicts are cached per process by the call's *signature* -- the fusion, each new node's op,
its input shapes and dtypes, its geometry, post-op and output dtype (floats, such as scales,
and weight values are left out; zero points only as zero / non-zero) -- and thread count: a
model whose layers repeat a shape pays for one run. What a check cannot evaluate (an unknown
shape or dtype, a reference that raises on random inputs) is counted as skipped and fused as
before. So is every kernel while probes are forced to another CPU's answers
(:func:`qalgebra.isa.foreign_answers`): the lowering then emits what another CPU runs, which
this CPU may compute wrongly or crash on.

>>> stats = SelfCheckStats()
>>> SelfCheck("off", stats).enabled
False
>>> sorted(MODES)
['full', 'off', 'on']
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import fx

from qalgebra.draws import dense_strides
from qalgebra.errors import LoweringError, Refusal
from qalgebra.isa import foreign_answers
from qalgebra.match import node_dtype
from qalgebra.pattern import Match
from qalgebra.rewriter import Rewriter
from qalgebra.row_sample import sampled_reference, take_rows
from qalgebra.testing.oracle import BF16_RTOL, FLOAT_ATOL, FP32_RTOL, compare_outputs
from qalgebra.trial import (
    CheckStats,
    ConstantMemo,
    Operands,
    Skip,
    ancestors,
    clone,
    evaluate,
    intra_op_threads,
    operands,
    promoted,
    random_inputs,
)

__all__ = [
    "MODES",
    "SelfCheck",
    "SelfCheckMode",
    "SelfCheckStats",
    "agreement",
    "clear_cache",
    "emits_kernel",
    "is_kernel",
]

SelfCheckMode: TypeAlias = Literal["off", "on", "full"]
"""``"on"``: check each new signature once per process, the reference on sampled rows of the
batch where that is exact (:mod:`qalgebra.row_sample`); ``"full"``: the same on every row;
``"off"``: never."""
MODES: tuple[str, ...] = get_args(SelfCheckMode)

#: Namespaces whose ops are kernels the check distrusts; plus the single aten kernels below.
KERNEL_NAMESPACES = frozenset({"onednn", "quantized"})
KERNEL_OPS = frozenset({torch.ops.aten._weight_int8pack_mm.default})

#: A quantized output may differ from the reference by this many integer levels (a value at
#: x.5 rounded the other way) ...
MAX_STEPS = 1
#: ... and this fraction of its elements must be exactly equal (a kernel computing the same
#: function differs only where the exact value sits on a rounding edge). Measured on 1,500
#: drawn graphs of every family (fp32 and bf16): 0 steps, every element equal.
MIN_AGREEMENT = 0.9


@dataclass(slots=True)
class SelfCheckStats(CheckStats):
    """What the self-check did during one lowering (``LoweringReport.selfcheck``); ``refused``:
    matches whose kernel disagreed with the reference."""

    #: Signatures run now (not in the cache before this lowering).
    ran: int = 0
    #: Of those, how many ran the reference on sampled rows of the batch.
    sampled: int = 0

    def summary(self) -> str:
        """One line for people."""
        return (
            f"self-check ({self.mode}): {self.ran} signature(s) run in {self.seconds * 1e3:.1f} "
            f"ms ({self.sampled} on sampled rows), {self.cached} served from the cache, "
            f"{self.refused} refused, " + self.skipped_text()
        )


@dataclass(frozen=True, slots=True)
class _Verdict:
    ok: bool
    message: str
    #: The reference ran on sampled rows (:mod:`qalgebra.row_sample`).
    sampled: bool = False


_VERDICTS: dict[Hashable, _Verdict] = {}


def clear_cache() -> None:
    """Forget every cached verdict (tests; after replacing a kernel at runtime)."""
    _VERDICTS.clear()


def emits_kernel(nodes: Iterable[fx.Node]) -> bool:
    """Whether any of ``nodes`` calls a kernel the self-check distrusts."""
    return any(is_kernel(n.target) for n in nodes if n.op == "call_function")


def is_kernel(target: object) -> bool:
    """Whether ``target`` is a kernel the self-check distrusts (an op of a kernel namespace)."""
    return target in KERNEL_OPS or getattr(target, "namespace", None) in KERNEL_NAMESPACES


class SelfCheck:
    """Checks each rewrite of one lowering (see the module docstring); counts into ``stats``."""

    def __init__(self, mode: SelfCheckMode, stats: SelfCheckStats) -> None:
        if mode not in MODES:
            raise LoweringError(f"lower: selfcheck must be one of {MODES}, got {mode!r}")
        self.enabled = mode != "off"
        self.sample = mode == "on"
        self.stats = stats
        #: The intra-op thread count the checks run at: the caller's when the check is made.
        self.threads = torch.get_num_threads()
        stats.mode = mode
        self._constant = ConstantMemo()

    def check(self, fusion: str, m: Match, rw: Rewriter, new: fx.Node) -> None:
        """Raise :class:`Refusal` if the nodes ``rw`` built for ``m`` disagree with ``m``."""
        if not self.enabled or new is m.root or not emits_kernel(rw.created):
            return
        foreign = foreign_answers()
        if foreign:
            names = ", ".join(sorted(foreign))
            self.stats.skipped[f"probes forced to another CPU's answers ({names})"] += 1
            return
        start = time.perf_counter()
        try:
            verdict = self._verdict(fusion, m, rw, new)
        except Skip as skip:
            self.stats.skipped[str(skip)] += 1
            return
        finally:
            self.stats.seconds += time.perf_counter() - start
        if not verdict.ok:
            self.stats.refused += 1
            raise Refusal(f"self-check: {verdict.message}", cause="selfcheck")

    def _verdict(self, fusion: str, m: Match, rw: Rewriter, new: fx.Node) -> _Verdict:
        ops = operands(m, rw, new, self._constant)
        key = (fusion, self.sample, self.threads, ops.key(rw.module))
        cached = _VERDICTS.get(key)
        if cached is not None:
            self.stats.cached += 1
            return cached
        with intra_op_threads(self.threads), torch.no_grad():
            verdict = _run_check(m, rw.module, ops, new, sample=self.sample)
        self.stats.ran += 1
        self.stats.sampled += verdict.sampled
        _VERDICTS[key] = verdict
        return verdict


# --------------------------------------------------------------------------------------------
# Running both sides


def _run_check(m: Match, module: Any, ops: Operands, new: fx.Node, *, sample: bool) -> _Verdict:
    base = random_inputs(ops, module)
    order = ancestors(m.root, set(m.nodes))
    try:
        sampled = (
            sampled_reference(order, base, module, drawn=set(ops.external), promote=True)
            if sample
            else None
        )
        if sampled is not None and m.root not in sampled.batched:
            sampled = None  # an output that does not depend on the batch: compare it whole
        if sampled is None:
            ref_env = {n: promoted(v) for n, v in base.items()}
            evaluate(order, ref_env, module, promote=True)
        else:
            ref_env = sampled.env
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise Skip(f"the reference raised {type(exc).__name__}") from exc
    readable = set(base) | set(ops.candidate)
    if any(
        a not in readable and a.op != "get_attr" for n in ops.candidate for a in n.all_input_nodes
    ):
        raise Skip("the replacement reads a node inside the match")
    new_env = {n: clone(v) for n, v in base.items()}
    try:
        evaluate(ops.candidate, new_env, module)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _Verdict(
            False, f"the fused op raised {type(exc).__name__} on random inputs: {first}"
        )
    fused = new_env[new]
    if sampled is not None:
        if not _rows_of(fused, sampled.batch):
            return _Verdict(
                False,
                f"the fused op returns {_kind(fused)}, the reference {sampled.batch} rows",
            )
        fused = take_rows(fused, sampled.rows)
    # only the float bound reads the subgraph's largest value: a quantized output skips the
    # pass over every value the reference computed
    magnitude = 0.0
    if any(t.is_floating_point() for t in _tensors(fused) or []):
        magnitude = _largest_float(ref_env[n] for n in m.nodes if n in ref_env)
    verdict = agreement(
        ref_env[m.root],
        fused,
        dtype=node_dtype(m.root),
        bf16=_computes_bf16(m.nodes),
        magnitude=magnitude,
    )
    if sampled is None:
        return verdict
    rows = sampled.rows.tolist()
    return _Verdict(verdict.ok, f"{verdict.message} (rows {rows} of {sampled.batch})", True)


def _rows_of(value: object, batch: int) -> bool:
    """Whether ``value`` is a tensor, or tensors, of ``batch`` rows along dim 0."""
    tensors = _tensors(value)
    return bool(tensors) and all(t.dim() > 0 and t.shape[0] == batch for t in tensors or [])


def _largest_float(values: Iterable[object]) -> float:
    """The largest magnitude among the float tensors in ``values`` (0.0 if none)."""
    largest = 0.0
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            # no |value| copy of a full-size tensor; memory read in order
            low, high = torch.aminmax(_in_memory_order(value.detach()))
            largest = max(largest, abs(float(low)), abs(float(high)))
    return largest


def _computes_bf16(nodes: Iterable[fx.Node]) -> bool:
    return any(node_dtype(n) == torch.bfloat16 for n in nodes)


def agreement(
    reference: object,
    fused: object,
    *,
    dtype: torch.dtype | None = None,
    bf16: bool = False,
    magnitude: float = 0.0,
) -> _Verdict:
    """Whether ``fused`` computes ``reference`` closely enough (the self-check's bound).

    ``dtype``: the dtype the replaced node had (None: unknown), which ``fused`` must have; a
    float ``reference`` computed in float32 for a bf16 graph (``bf16``) is rounded to it first.
    Quantized outputs: at most :data:`MAX_STEPS` integer levels apart and at least
    :data:`MIN_AGREEMENT` of the elements equal. Float outputs: within the oracle's relative
    tolerance of the reference's magnitude (``FP32_RTOL``; ``BF16_RTOL`` for a bf16 graph,
    whose kernel rounds where the float32 reference does not), and of ``magnitude``, the
    largest float value the replaced subgraph computes: a squashing post-op (tanh, sigmoid)
    keeps the rounding error of its larger pre-activation while shrinking the output (measured:
    a dynamic linear + tanh, outputs up to 1, differed by 1.8e-5 from its pre-activation sums).
    """
    refs, fuseds = _tensors(reference), _tensors(fused)
    if refs is None or fuseds is None or len(refs) != len(fuseds):
        return _Verdict(
            False, f"the fused op returns {_kind(fused)}, the reference {_kind(reference)}"
        )
    if dtype is not None and len(fuseds) == 1 and fuseds[0].dtype != dtype:
        return _Verdict(False, f"the fused op returns {_kind(fused)}, the graph's value {dtype}")
    refs = [
        r.to(f.dtype) if r.is_floating_point() and f.is_floating_point() else r
        for r, f in zip(refs, fuseds, strict=True)
    ]
    rtol = BF16_RTOL if bf16 else FP32_RTOL
    bound = FLOAT_ATOL + rtol * magnitude
    pairs = [_aligned(r, f) for r, f in zip(refs, fuseds, strict=True)]
    if all(_surely_within(r, f, rtol, bound) for r, f in pairs):
        message = f"within {MAX_STEPS} step(s) or rtol {rtol:g} (quick check)"
    else:
        result = compare_outputs(
            refs, fuseds, quant_step=None, max_steps=MAX_STEPS, rtol=rtol, atol=bound
        )
        if not result.ok:
            return _Verdict(False, result.message)
        message = result.message
    for i, (ref, out) in enumerate(pairs):
        if ref.dtype in (torch.uint8, torch.int8) and ref.numel():
            equal = int(torch.count_nonzero(ref == out)) / ref.numel()
            if equal < MIN_AGREEMENT:
                return _Verdict(
                    False,
                    f"output {i}: only {equal:.3f} of the quantized elements equal the reference "
                    f"(need {MIN_AGREEMENT}); {message}",
                )
    return _Verdict(True, message)


def _surely_within(ref: torch.Tensor, out: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether ``out`` is within the bound of ``ref`` by a cheap test; False: look closer.

    :func:`compare_outputs` reports where and by how much two outputs differ, in float64 and
    with NaN/inf cases: on a batch-8 model's full-size tensors that was half of the check's
    time. Nearly every kernel agrees exactly (quantized) or well inside the bound (float), which
    a few reductions settle: ``torch.equal`` or the int16 difference's extremes (quantized),
    the float32 difference's maximum against the bound shrunk by the subtraction's rounding
    (float). Anything else -- a larger step, NaN, inf, a difference near the bound -- goes to
    the full comparison.
    """
    if ref.dtype != out.dtype or ref.shape != out.shape:
        return False
    if ref.dtype in (torch.uint8, torch.int8):
        if torch.equal(ref, out):
            return True
        low, high = torch.aminmax(torch.sub(out.to(torch.int16), ref.to(torch.int16)))
        return max(-int(low), int(high)) <= MAX_STEPS
    if not ref.is_floating_point() or ref.numel() == 0:
        return False
    low, high = torch.aminmax(ref)
    largest = max(abs(float(low)), abs(float(high)))  # NaN stays NaN, inf stays inf
    if not math.isfinite(largest):  # the full comparison's bound reads finite values only
        return False
    worst = float(torch.sub(out.float(), ref.float()).abs_().max())
    return worst <= (atol + rtol * largest) * (1 - 1e-6)  # False for NaN and inf


def _in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a 1-D view in memory order, or unchanged if its layout is not dense.

    A whole-tensor reduction over a channels-last ``[8, 96, 112, 112]`` tensor took 24 ms,
    over the same memory read in order 1.8 ms.
    """
    if dense_strides(tensor.shape, tensor.stride()) is None:
        return tensor
    return tensor.as_strided((tensor.numel(),), (1,))


def _aligned(ref: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in ``out``'s memory order, flat (``ref`` copied into ``out``'s layout if it has
    another): elementwise comparisons then pair the same elements and read memory in order.
    Unchanged when ``out`` is not dense or the two differ in shape or dtype."""
    ref, out = ref.detach(), out.detach()
    flat_out = _in_memory_order(out)
    if flat_out is out or ref.shape != out.shape or ref.dtype != out.dtype:
        return ref, out
    if ref.stride() != out.stride() or ref.storage_offset() != out.storage_offset():
        ref = torch.empty_strided(out.shape, out.stride(), dtype=ref.dtype).copy_(ref)
    return ref.as_strided((ref.numel(),), (1,)), flat_out


def _tensors(value: object) -> list[torch.Tensor] | None:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__
