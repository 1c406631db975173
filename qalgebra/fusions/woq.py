"""Weight-only int8 linears (WOQ) and their concat-linear grouping, from one definition.

``F.linear(x, w_int8.to(x.dtype)) * scales``  =>  ``aten._weight_int8pack_mm(x2d, w_int8, scales)``

Inductor registers one pattern per graph shape (``_register_woq_mm_int8_pattern1..4`` in
``torch/_inductor/fx_passes/quantization.py``); here one definition covers them all, in every
spelling of the conversion (``convert_element_type``, ``_to_copy``, ``to.dtype``), of the
transpose (``permute(w, [1, 0])``, ``t``) and of the reshapes (``view``, ``reshape``,
``_unsafe_view``) -- the linear spellings of :func:`qalgebra.combinators.linear`:

- ``mul(linear(x, convert(w)), scales)``: the op form ``torch.export`` leaves;
- ``mul([reshape] mm([reshape] x, transpose(convert(w))) [reshape], scales) [reshape]``: Inductor's
  patterns 1 and 2 (with and without the reshapes around a >2-D ``x``), and torchao's
  ``Int8WeightOnlyConfig`` exported (which reshapes *after* the ``mul``);
- ``mul(mm(x, convert(transpose(w))), scales)``: pattern 4, the transpose before the conversion
  (torchao's ``to(t(w))``);
- ``mul(bmm(expand(x), expand(transpose(convert(w)))), scales)``: pattern 3, what the linear
  decomposition gives for a non-contiguous >2-D ``x`` (with export's identity ``view``\\ s).

``mul`` commutes, so ``scales * linear(...)`` matches too. The weight is any constant (a
``get_attr`` tensor, possibly through views, conversions or a tensor subclass' inner tensor:
see :func:`qalgebra.constants.fold_constant`); the scales are any constant as well, folded at
lowering time.

Facts checked against the op (torch 2.13, AVX2; docs/onednn_ops.md and the ATen CPU kernel):
``_weight_int8pack_mm(A, B, scales)`` takes ``A`` 2-D fp32/bf16/fp16 with a contiguous last
dimension, ``B`` int8 ``[N, K]`` contiguous, ``scales`` 1-D ``[N]`` of ``A``'s dtype, and
returns ``A @ (B * scales[:, None]).T`` in ``A``'s dtype, accumulating in fp32. On x86 only bf16
is vectorized: 8 (AVX2) or 16 (AVX512) values of ``A`` at a time, with aligned loads and no tail,
so a K that is not a multiple **segfaults** (measured: every K % 8 != 0 on this AVX2 machine);
fp32/fp16 run a scalar loop, measured up to 3.6x slower than the eager linear (bf16: 2-5x
faster). The default catalog therefore lowers bf16 only -- Inductor's condition too
(``_is_valid_woq_optimization_pattern``: bf16 x, int8 weight, bf16 scales, one device) --
refuses a bf16 K the kernel cannot take, and hands the kernel a fresh (aligned) copy of x and an
aligned weight; ``make_woq((torch.float32, torch.bfloat16))`` also lowers fp32. Refused, with the
reason in the report: fp32 (by default), a weight that is not int8, devices that differ, scales
that are not one per output channel (per tensor, per row, broadcasting to more dimensions),
scales whose dtype differs from ``x``'s (the product would be promoted), a non-constant weight or
scale, a bf16 K the kernel cannot take.

Concat-linear (``WOQ_CONCAT_LINEAR``): WOQ linears reading the same ``x`` become one
``_weight_int8pack_mm`` over the concatenated weights and scales, then ``split_with_sizes``.
Inductor (``addmm_patterns_init`` in ``freezing_patterns.py`` + ``_register_int8_woq_concat_
linear_pattern``) does this only with ``config.cpp.enable_concat_linear`` (off by default), on CPU,
for exactly three 2-D ``mm`` linears whose weights are int8 converted to bf16, each weight and
scale read by that linear only, with bf16 ``x`` and scales and ``num_scales == N1 + N2 + N3``.
qalgebra groups every set of two or more lowerable WOQ linears of one ``x`` (any of the forms
above): each output column is the same dot product either way, and the concatenated weight is a
new constant, so sharing the originals does not matter. The pieces are made contiguous (a split
is a strided view, and the eager result was contiguous) and reshaped like the graph's results.

The fusion API replaces one root per match, so the group is matched at its *last* linear (in
graph order): the pattern's check finds the siblings from ``x``'s users, and the replacement
redirects them to their pieces of the split and erases their chains. ``nodes_consumed`` in the
report counts that last linear's nodes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qalgebra import emit
from qalgebra.checks import Check, closed
from qalgebra.combinators import (
    LinearForm,
    LinearVars,
    constant,
    dtype_convert,
    linear,
    linear_vars,
    transposed,
    with_reshape,
)
from qalgebra.constants import fold_constant
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.isa import aten_vectors_are_avx2
from qalgebra.match import match_node
from qalgebra.ops import aten
from qalgebra.pattern import Match, Pattern, Var, any_of, call, capture, where
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape, same_dims, tensor_meta

__all__ = [
    "DEFAULT_WOQ_DTYPES",
    "LV",
    "SUPPORTED_WOQ_DTYPES",
    "WOQ",
    "WOQ_CONCAT_LINEAR",
    "WOQ_PATTERN",
    "bf16_k_multiple",
    "last_of_woq_group",
    "make_woq",
    "plan_woq",
    "shape_args",
    "woq_group",
    "woq_linear",
]


# --------------------------------------------------------------------------------------------
# A result shape from x's dimensions
# --------------------------------------------------------------------------------------------


def shape_args(
    rw: Rewriter, x: fx.Node, x_shape: Sequence[object], target: Sequence[object]
) -> list[Any] | None:
    """``target`` as reshape arguments: ints stay, a symbolic dimension equal to one of ``x``'s
    becomes ``sym_size(x, i)``; one other symbolic dimension becomes -1. None if impossible."""
    out: list[Any] = []
    inferred = False
    for dim in target:
        if isinstance(dim, int):
            out.append(dim)
            continue
        index = next((i for i, d in enumerate(x_shape) if str(d) == str(dim)), None)
        if index is not None:
            out.append(emit.aten.sym_size.int(rw, self=x, dim=index))
        elif not inferred:
            inferred = True
            out.append(-1)
        else:
            return None
    return out


# --------------------------------------------------------------------------------------------
# The WOQ pattern
# --------------------------------------------------------------------------------------------


X = Var("woq_x", fx.Node)
W = Var("woq_w", fx.Node)
DTYPE = Var("woq_dtype", torch.dtype)
SCALES = Var("woq_scales", fx.Node)
CORE = Var("woq_core", fx.Node)
#: The reshapes around a 2-D mm, the expand before a bmm, which spelling matched.
LV: LinearVars = linear_vars("woq")
#: The reshape after the ``mul`` by the scales (torchao's form).
SCALED_SHAPE = Var("woq_scaled_shape", list)


def _weight_kn() -> Pattern:
    """The int8 ``[N, K]`` weight as the float ``[K, N]`` operand: converted then transposed
    (Inductor's patterns 1-3) or transposed then converted (pattern 4, torchao)."""
    w = constant(W)
    return any_of(transposed(dtype_convert(w, DTYPE)), dtype_convert(transposed(w), DTYPE))


def woq_linear() -> Pattern:
    """``linear(x, convert(w)) * scales`` in every spelling (see the module docstring)."""
    core = linear(X, LV, w=dtype_convert(constant(W), DTYPE), w_t=_weight_kn())
    return with_reshape(call(aten.mul.Tensor, capture(CORE, core), SCALES), SCALED_SHAPE)


#: Activation dtypes the default catalog lowers. The ATen CPU kernel is vectorized only for bf16
#: on x86 (fp32/fp16 run a scalar loop, measured up to 3.6x slower than the eager linear); this
#: is also Inductor's condition. ``make_woq((torch.float32, torch.bfloat16))`` lowers fp32 too.
DEFAULT_WOQ_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
#: Every activation dtype the kernel accepts and qalgebra can lower.
SUPPORTED_WOQ_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)


def bf16_k_multiple() -> int:
    """What K must be a multiple of for the bf16 kernel on this CPU.

    The vectorized bf16 kernel reads x 8 (AVX2) or 16 (AVX512; 8 with NEON) values at a time,
    with aligned loads and no tail: another K reads past the rows and crashes (measured on AVX2:
    a segfault for every K % 8 != 0). 16 is safe for every path. The vector width is the probe
    :func:`qalgebra.isa.aten_vectors_are_avx2`, so tests see both answers on any CPU.
    """
    return 8 if aten_vectors_are_avx2() else 16


@dataclass(frozen=True, slots=True)
class WoqPlan:
    """What one matched WOQ linear lowers to; built only when every check passed."""

    x: fx.Node
    x_shape: tuple[object, ...] | None
    weight: torch.Tensor  # int8 [N, K], contiguous
    scales: torch.Tensor  # [N], the dtype of x, contiguous
    dtype: torch.dtype
    out_shape: tuple[object, ...] | None  # the result's shape (meta), if known
    reshape_to: list[Any] | None  # the graph's own final reshape arguments, if it had one

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


def _device(node: fx.Node) -> torch.device | None:
    val = tensor_meta(node)
    return val.device if val is not None else None


def _per_channel_scales(s: torch.Tensor, n: int, core_rank: int | None) -> str | None:
    """Why ``s`` is not one scale per output channel of an ``[..., n]`` result, or None."""
    shape = list(s.shape)
    if s.numel() == 1 and n != 1:
        return f"scales {shape} are per tensor, not one per output channel ({n})"
    if not shape or shape[-1] != n or any(d != 1 for d in shape[:-1]):
        return (
            f"scales of shape {shape} are not one per output channel: expected [{n}] "
            "(broadcast along the last dimension of the result)"
        )
    limit = core_rank if core_rank is not None else 1
    if s.dim() > limit:
        return f"scales of shape {shape} would broadcast the result to more dimensions"
    return None


def plan_woq(m: Match, dtypes: Sequence[torch.dtype] = DEFAULT_WOQ_DTYPES) -> WoqPlan:
    """Check one WOQ match and fold its constants; raise :class:`Refusal` with the reason."""
    x = m[X]
    w = fold_constant(m[W])
    if w is None:
        raise Refusal(f"the weight {m[W].name} could not be folded to a constant")
    if w.dtype != torch.int8:
        raise Refusal(f"weight dtype {w.dtype} is not int8 (_weight_int8pack_mm takes int8 only)")
    if w.dim() != 2:
        raise Refusal(f"weight of shape {list(w.shape)} is not 2-D")
    dtype = m[DTYPE]
    if dtype not in dtypes:
        why = (
            " (the fp32 kernel is a scalar loop on x86, slower than the eager linear)"
            if dtype == torch.float32
            else ""
        )
        raise Refusal(f"activation dtype {dtype} is not lowered: expected {tuple(dtypes)}{why}")
    if dtype == torch.bfloat16 and w.shape[1] % bf16_k_multiple():
        raise Refusal(
            f"K = {w.shape[1]} is not a multiple of {bf16_k_multiple()}: the bf16 kernel reads "
            "x in aligned vectors without a tail and would crash"
        )
    x_val = tensor_meta(x)
    if x_val is not None and x_val.dtype != dtype:
        raise Refusal(f"x is {x_val.dtype} but the weight is converted to {dtype}")
    scales = fold_constant(m[SCALES])
    if scales is None:
        raise Refusal(f"the scales {m[SCALES].name} are not a constant (get_attr) tensor")
    devices = {"x": _device(x), "weight": w.device, "scales": scales.device}
    known = {k: d for k, d in devices.items() if d is not None}
    if len(set(known.values())) > 1:
        placed = ", ".join(f"{k} on {d}" for k, d in known.items())
        raise Refusal(f"devices differ: {placed}")
    core_shape = known_shape(m[CORE])
    not_per_channel = _per_channel_scales(
        scales, int(w.shape[0]), None if core_shape is None else len(core_shape)
    )
    if not_per_channel is not None:
        raise Refusal(not_per_channel)
    if scales.dtype != dtype:
        raise Refusal(
            f"scales are {scales.dtype}, x is {dtype}: the product is promoted and "
            "_weight_int8pack_mm needs scales of x's dtype"
        )
    x_shape = known_shape(x)
    if x_shape is not None and x_shape[-1] != w.shape[1]:
        raise Refusal(f"x has {x_shape[-1]} input features, the weight {w.shape[1]}")
    if m[LV.form] is LinearForm.BMM:
        expanded = known_shape(m[LV.x_expanded])
        if x_shape is None or expanded is None or not same_dims(x_shape, expanded):
            raise Refusal(
                f"bmm input expand {expanded} is not the identity on x {x_shape}: "
                "the batch would be broadcast"
            )
    reshape_to = m.get(SCALED_SHAPE, []) or m.get(LV.out_shape, []) or None
    return WoqPlan(
        x=x,
        x_shape=x_shape,
        weight=w.contiguous(),
        scales=scales.reshape(-1).contiguous(),
        dtype=dtype,
        out_shape=known_shape(m.root),
        reshape_to=reshape_to,
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous, in a fresh allocation unless it already starts 64-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _emit_matmul(
    rw: Rewriter, plan: WoqPlan, weight: torch.Tensor, scales: torch.Tensor
) -> fx.Node:
    """``_weight_int8pack_mm`` of x flattened to 2-D with a contiguous last dimension.

    The bf16 kernel loads x with aligned vector loads: a contiguous view that starts mid-vector
    (a slice) would crash it, so x is cloned into a fresh (aligned) allocation; an [M, K] copy
    is small next to the [N, K] weight the kernel streams.
    """
    x = rw.node(plan.x)
    if plan.x_shape is None or len(plan.x_shape) != 2:
        x = emit.aten.reshape.default(rw, self=x, shape=[-1, plan.in_features])
    if plan.dtype == torch.bfloat16:
        x = emit.aten.clone.default(rw, self=x, memory_format=torch.contiguous_format)
    else:
        x = emit.aten.contiguous.default(rw, self=x)
    w_node = rw.constant("woq_weight", _aligned(weight))
    s_node = rw.constant("woq_scales", scales.contiguous())
    return emit.aten._weight_int8pack_mm.default(rw, self=x, mat2=w_node, scales=s_node)


def _result_shape(rw: Rewriter, plan: WoqPlan) -> list[Any] | None:
    """Reshape arguments that give the 2-D ``[M, N]`` result the matched result's shape, or None
    when it already has it. Symbolic dimensions are read from x (``sym_size``)."""
    x_is_2d = plan.x_shape is not None and len(plan.x_shape) == 2
    if plan.out_shape is None:
        if x_is_2d or plan.reshape_to is None:
            if x_is_2d:
                return None
            raise Refusal("the shape of the result is unknown (no meta['val'])")
        return plan.reshape_to
    if x_is_2d and len(plan.out_shape) == 2:
        return None
    args = shape_args(rw, rw.node(plan.x), plan.x_shape or (), plan.out_shape)
    if args is None:
        raise Refusal(f"cannot express the result shape {plan.out_shape} from x's dimensions")
    return args


@dataclass(frozen=True, slots=True)
class _RewriteWoq:
    """The replacement of one WOQ linear, for activations of ``dtypes``."""

    dtypes: tuple[torch.dtype, ...]

    def __call__(self, m: Match, rw: Rewriter) -> fx.Node:
        plan = plan_woq(m, self.dtypes)
        y = _emit_matmul(rw, plan, plan.weight, plan.scales)
        # The graph's own reshape when it had one; a 2-D mm needs none; else from x's shape.
        shape = plan.reshape_to
        if shape is None and m[LV.form] is not LinearForm.MM:
            shape = _result_shape(rw, plan)
        if shape is not None:
            y = emit.aten.reshape.default(rw, self=y, shape=shape)
        return y


WOQ_PATTERN = where(woq_linear(), closed())


# --------------------------------------------------------------------------------------------
# Concat-linear: several WOQ linears of one x -> one _weight_int8pack_mm, then split
# --------------------------------------------------------------------------------------------

#: How far below x a WOQ root can be: reshape -> mm -> reshape -> mul -> reshape (+ expands).
_SEARCH_DEPTH = 7
_ROOT_PACKETS = frozenset(str(p) for p in (aten.mul, aten.view, aten.reshape, aten._unsafe_view))


def _candidate_roots(x: fx.Node) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = [x]
    found: list[fx.Node] = []
    for _ in range(_SEARCH_DEPTH):
        nxt: list[fx.Node] = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                nxt.append(user)
                packet = getattr(user.target, "overloadpacket", None)
                if user.op == "call_function" and str(packet) in _ROOT_PACKETS:
                    found.append(user)
        frontier = nxt
    return found


def woq_group(
    x: fx.Node, dtypes: Sequence[torch.dtype] = DEFAULT_WOQ_DTYPES
) -> list[tuple[Match, WoqPlan]]:
    """The lowerable WOQ linears reading ``x`` (two or more, else none), outermost matches only,
    in graph order."""
    matches = [
        found
        for root in _candidate_roots(x)
        if (found := match_node(WOQ_PATTERN, root)) is not None and found[X] is x
    ]
    inner = {n for found in matches for n in found.nodes if n is not found.root}
    group: list[tuple[Match, WoqPlan]] = []
    for found in matches:
        if found.root in inner:
            continue
        try:
            plan = plan_woq(found, dtypes)
        except Refusal:
            continue
        if plan.out_shape is None or plan.x_shape is None:
            continue
        group.append((found, plan))
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    group.sort(key=lambda item: order[item[0].root])
    kinds = {plan.dtype for _, plan in group}
    return group if len(group) >= 2 and len(kinds) == 1 else []


@dataclass(frozen=True, slots=True)
class _LastOfGroup(Check):
    dtypes: tuple[torch.dtype, ...]

    def failure(self, m: Match) -> str | None:
        group = woq_group(m[X], self.dtypes)
        if not group:
            return f"{m[X].name} feeds fewer than two lowerable WOQ linears"
        if group[-1][0].root is not m.root:
            return f"{m.root.name} is not the last WOQ linear reading {m[X].name}"
        return None

    def describe(self) -> str:
        return "the last of two or more WOQ linears reading the same x"

    def __repr__(self) -> str:
        return f"last_of_woq_group({self.dtypes!r})"


def last_of_woq_group(dtypes: Sequence[torch.dtype] = DEFAULT_WOQ_DTYPES) -> Check:
    """The match is the last (in graph order) of two or more lowerable WOQ linears of one x."""
    return _LastOfGroup(tuple(dtypes))


@dataclass(frozen=True, slots=True)
class _RewriteConcat:
    """The replacement of a group of WOQ linears reading one x, for activations of ``dtypes``."""

    dtypes: tuple[torch.dtype, ...]

    def __call__(self, m: Match, rw: Rewriter) -> fx.Node:
        return _rewrite_concat(m, rw, self.dtypes)


def _rewrite_concat(m: Match, rw: Rewriter, dtypes: Sequence[torch.dtype]) -> fx.Node:
    group = woq_group(rw.node(m[X]), dtypes)
    if len(group) < 2 or group[-1][0].root is not m.root:
        raise Refusal("the group of WOQ linears changed since it was matched")
    plans = [plan for _, plan in group]
    rw.anchor = group[0][0].root  # before every use of every member's result
    weight = torch.cat([p.weight for p in plans], 0)
    scales = torch.cat([p.scales for p in plans], 0)
    y = _emit_matmul(rw, plans[0], weight, scales)
    sizes = [p.out_features for p in plans]
    parts = emit.aten.split_with_sizes.default(rw, self=y, split_sizes=sizes, dim=1)
    pieces: list[fx.Node] = []
    for i, plan in enumerate(plans):
        piece = emit.aten.contiguous.default(rw, self=rw.getitem(parts, i))
        shape = _result_shape(rw, plan)
        if shape is not None:
            piece = emit.aten.reshape.default(rw, self=piece, shape=shape)
        pieces.append(piece)
    # The other members are roots too: each is replaced by its piece, and its chain erased
    # with the match's (the lowering replaces the last member, the match's root).
    for (found, _), piece in zip(group[:-1], pieces[:-1], strict=True):
        rw.replace(rw.node(found.root), piece, consumed=found.nodes)
    return pieces[-1]


def make_woq(
    dtypes: Sequence[torch.dtype] = DEFAULT_WOQ_DTYPES,
) -> tuple[Fusion, Fusion]:
    """The (concat-linear, single) WOQ fusions, in priority order, lowering activations of
    ``dtypes`` (a subset of ``SUPPORTED_WOQ_DTYPES``); others are refused with the reason."""
    chosen = tuple(dtypes)
    unsupported = [d for d in chosen if d not in SUPPORTED_WOQ_DTYPES]
    if unsupported or not chosen:
        raise ValueError(f"make_woq: expected dtypes among {SUPPORTED_WOQ_DTYPES}, got {chosen}")
    concat = Fusion(
        name="woq_int8_concat_linear",
        family="weight-only int8",
        pattern=where(WOQ_PATTERN, last_of_woq_group(chosen)),
        rewrite=_RewriteConcat(chosen),
        exclusive=False,
        doc="n >= 2 WOQ linears of one x  =>  one aten._weight_int8pack_mm over the "
        "concatenated weights and scales, split_with_sizes",
    )
    single = Fusion(
        name="woq_int8",
        family="weight-only int8",
        pattern=WOQ_PATTERN,
        rewrite=_RewriteWoq(chosen),
        exclusive=False,  # closed() in the pattern checks it, tolerating export's asserts
        doc="linear(x, w_int8.to(x.dtype)) * scales (linear | [view] mm [view] | expand-bmm)  "
        "=>  aten._weight_int8pack_mm",
    )
    return concat, single


WOQ_CONCAT_LINEAR, WOQ = make_woq()
