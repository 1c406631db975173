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

Verdicts are cached per process by the call's *signature* -- the fusion, each new node's op,
its input shapes and dtypes, its geometry, post-op and output dtype (floats, such as scales,
and weight values are left out; zero points only as zero / non-zero): a model whose layers
repeat a shape pays for one run. What a check cannot evaluate (an unknown shape or dtype, a
reference that raises on random inputs) is counted as skipped and fused as before. So is every
kernel while probes are forced to another CPU's answers (:func:`qalgebra.isa.foreign_answers`):
the lowering then emits what another CPU runs, which this CPU may compute wrongly or crash on.

>>> stats = SelfCheckStats()
>>> SelfCheck("off", stats).enabled
False
>>> sorted(MODES)
['off', 'on']
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import fx

from qalgebra.errors import LoweringError, Refusal
from qalgebra.isa import foreign_answers
from qalgebra.match import node_dtype
from qalgebra.pattern import Match
from qalgebra.rewriter import Rewriter
from qalgebra.testing.oracle import BF16_RTOL, FLOAT_ATOL, FP32_RTOL, compare_outputs
from qalgebra.trial import (
    CheckStats,
    ConstantMemo,
    Operands,
    Skip,
    ancestors,
    clone,
    evaluate,
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

SelfCheckMode: TypeAlias = Literal["off", "on"]
"""``"on"``: check each new signature once per process; ``"off"``: never."""
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

    def summary(self) -> str:
        """One line for people."""
        return (
            f"self-check ({self.mode}): {self.ran} signature(s) run in {self.seconds * 1e3:.1f} "
            f"ms, {self.cached} served from the cache, {self.refused} refused, "
            + self.skipped_text()
        )


@dataclass(frozen=True, slots=True)
class _Verdict:
    ok: bool
    message: str


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
        self.stats = stats
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
        key = (fusion, ops.key(rw.module))
        cached = _VERDICTS.get(key)
        if cached is not None:
            self.stats.cached += 1
            return cached
        verdict = _run_check(m, rw.module, ops, new)
        self.stats.ran += 1
        _VERDICTS[key] = verdict
        return verdict


# --------------------------------------------------------------------------------------------
# Running both sides


def _run_check(m: Match, module: Any, ops: Operands, new: fx.Node) -> _Verdict:
    base = random_inputs(ops, module)
    try:
        ref_env = {n: promoted(v) for n, v in base.items()}
        evaluate(ancestors(m.root, set(m.nodes)), ref_env, module, promote=True)
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
    return agreement(
        ref_env[m.root],
        new_env[new],
        dtype=node_dtype(m.root),
        bf16=_computes_bf16(m.nodes),
        magnitude=_largest_float(ref_env[n] for n in m.nodes if n in ref_env),
    )


def _largest_float(values: Iterable[object]) -> float:
    """The largest magnitude among the float tensors in ``values`` (0.0 if none)."""
    largest = 0.0
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            low, high = torch.aminmax(value.detach())  # no |value| copy of a full-size tensor
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
    result = compare_outputs(
        refs, fuseds, quant_step=None, max_steps=MAX_STEPS, rtol=rtol,
        atol=FLOAT_ATOL + rtol * magnitude,
    )  # fmt: skip
    if not result.ok:
        return _Verdict(False, result.message)
    for i, (ref, out) in enumerate(zip(refs, fuseds, strict=True)):
        if ref.dtype in (torch.uint8, torch.int8) and ref.numel():
            equal = int(torch.count_nonzero(ref == out)) / ref.numel()
            if equal < MIN_AGREEMENT:
                return _Verdict(
                    False,
                    f"output {i}: only {equal:.3f} of the quantized elements equal the reference "
                    f"(need {MIN_AGREEMENT}); {result.message}",
                )
    return _Verdict(True, result.message)


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
