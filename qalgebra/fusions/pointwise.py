"""The quantized pointwise family: max_pool2d, cat and data movement run on the int8 tensor.

``dequant -> op -> quant`` where the op only selects or moves values and the quant uses the
input's scale, zero point and dtype: the output's quantized values are then the input's quantized
values, selected or moved, so the op runs on the int8 tensor itself -- no float round trip.
One definition per op, in every quant/dequant form (op ``.default``/``.tensor``, decomposed):

- ``QMAXPOOL2D``: ``max_pool2d`` in every spelling -- every default-argument variant (the matcher
  normalizes arguments by schema, so one call pattern with Vars covers kernel-only, +stride,
  +padding, +dilation, +ceil_mode), ``max_pool2d_with_indices -> getitem 0`` (what
  decompositions leave) and Inductor's ``prims._low_memory_max_pool_with_offsets -> getitem 0``
  (torch 2.13 has no ``aten._low_memory_max_pool2d_with_offsets``) -> ``quantized.max_pool2d``;
- ``QCAT``: ``cat`` of dequantized tensors -> ``aten.cat`` of the int8 tensors;
- ``QRESHAPE``: ``view``/``reshape``/``_unsafe_view``/``flatten``/``permute``/``transpose`` ->
  the same movement of the int8 tensor (``view`` and ``_unsafe_view`` become ``reshape``: a
  oneDNN conv output is channels_last and may not be viewable).

Why it is exact: with a positive scale, dequantize and quantize are non-decreasing, so they
commute with ``max`` and with moving values; with equal qparams ``quant(dequant(q))`` is ``q``
clamped to the quant's ``[quant_min, quant_max]``. The clamp is emitted unless every input's
values are known to lie in that range already (a fused producer recorded its range, or the input
is a quantize with a range inside it); oneDNN/quantized ops know no quant range (reduce_range).

Facts checked against torch 2.13 (see tests/test_lower_pointwise.py):
``quantized::max_pool2d(Tensor qx, int[] kernel_size, int[] stride, int[] padding,
int[] dilation, bool ceil_mode)`` on a plain uint8 CPU tensor equals dequant -> ``max_pool2d``
-> quant bit for bit when the qparams are equal (ceil_mode, padding, dilation, channels_last
input; the output keeps channels_last); ``stride=[]`` means the kernel; one-element lists are
rejected (expanded here); int8 is not implemented on CPU and a 3-D input is rejected, so both
are refused.

Refusals (left unlowered, the reason in the lowering report): input and output qparams or
dtypes differ (Inductor requires equal qparams too; X86InductorQuantizer shares them for these
ops, so only hand-made graphs differ -- requantizing is exact for a max but would leave a
dequant/quant pair, so qalgebra refuses instead), invalid qparams, a pool whose indices are read,
a pool whose rank is not 4 or unknown, a float op also read outside the match.

>>> QMAXPOOL2D.name, QCAT.name, QRESHAPE.name
('qmaxpool2d', 'qcat', 'qreshape')
>>> print(movement(Var("x", fx.Node), move_vars("m")).describe())
((aten.view.default | aten.reshape.default | aten._unsafe_view.default)(x, m_sizes)
 [m_kind=Movement.RESHAPE] | aten.flatten.using_ints(x, m_dim_a, m_dim_b) [m_kind=Movement.FLATTEN]
 | aten.permute.default(x, m_sizes) [m_kind=Movement.PERMUTE]
 | aten.transpose.int(x, m_dim_a, m_dim_b) [m_kind=Movement.TRANSPOSE])
>>> relu = torch.ops.aten.relu.default
>>> OpByName("aten", "relu") == relu, LOW_MEMORY_MAX_POOL == relu
(True, False)
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._ops import OpOverload

from qalgebra import emit
from qalgebra.checks import Check, dtype_in, reason, require, valid_qparams
from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import OQ, QUANT_RANGE_KEY, X, clamp_to_quant_range
from qalgebra.match import match_node
from qalgebra.ops import aten
from qalgebra.pattern import (
    Match,
    Pattern,
    PatternLike,
    Var,
    any_of,
    call,
    capture,
    ignored,
    list_of,
    tag,
)
from qalgebra.qparams import QParams, qparams
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape

__all__ = [
    "CAT_DIM",
    "CAT_INPUT",
    "CAT_INPUT_Q",
    "CEIL_MODE",
    "DILATION",
    "FLOAT_OP",
    "KERNEL",
    "LOW_MEMORY_MAX_POOL",
    "MOVE",
    "PADDING",
    "POOLED",
    "POOL_INPUT",
    "POOL_MULTI",
    "QCAT",
    "QMAXPOOL2D",
    "QRESHAPE",
    "READ_ONLY_BY_QUANT",
    "SCALE_RTOL",
    "STRIDE",
    "MoveVars",
    "Movement",
    "OpByName",
    "max_pool2d",
    "move_vars",
    "movement",
    "quantized_alike",
    "quantized_max_pool2d",
    "replay",
    "within_output_range",
]

#: The input's qparams: constants only (the quantized pointwise ops take no runtime ones).
XQ: QParams = qparams("x")


# --------------------------------------------------------------------------------------------
# An op that may be registered after this module is imported
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpByName:
    """A call target equal to the ``OpOverload`` named ``namespace.op.overload``, when it exists.

    Inductor registers ``prims._low_memory_max_pool_with_offsets`` only when ``torch._inductor``
    is imported (~7 s), so the op object cannot be named at import time; a pattern target
    compares equal to a graph node's target by name instead. (The matcher tests a node's target
    with ``in`` on the call's targets, which asks this object first; it must not be a pattern's
    root, whose targets are looked up by hash.)
    """

    namespace: str
    op: str
    overload: str = "default"

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.op}.{self.overload}"

    def resolve(self) -> OpOverload[..., Any] | None:
        """The op overload, or None while it is not registered."""
        packet = getattr(getattr(torch.ops, self.namespace), self.op, None)
        overload = getattr(packet, self.overload, None)
        return overload if isinstance(overload, OpOverload) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        op = self.resolve()
        if op is None:
            raise RuntimeError(f"{self.qualified_name} is not registered")
        return op(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OpByName):
            return self.qualified_name == other.qualified_name
        return isinstance(other, OpOverload) and str(other) == self.qualified_name

    def __hash__(self) -> int:
        return hash((OpByName, self.qualified_name))

    def __repr__(self) -> str:
        return f"OpByName({self.namespace!r}, {self.op!r}, {self.overload!r})"


#: Inductor's low-memory max pool: ``(values, int8 offsets)``; schema without defaults.
LOW_MEMORY_MAX_POOL = OpByName("prims", "_low_memory_max_pool_with_offsets")


# --------------------------------------------------------------------------------------------
# Checks: each failure is the reason of a refusal
# --------------------------------------------------------------------------------------------


#: Scales closer than this (relative) count as equal: a decomposed quantize multiplies by
#: ``1 / scale``, which reads back as ``scale`` only to within an ulp or two. Requantizing a
#: value ``|q - zp| <= 255`` with scales this close moves it by ``255 * 1e-6`` steps: nothing.
SCALE_RTOL = 1e-6


def quantized_alike(a: tuple[float, int, torch.dtype], b: tuple[float, int, torch.dtype]) -> bool:
    """Two (scale, zero point, dtype) describe the same quantization."""
    return a[1:] == b[1:] and math.isclose(a[0], b[0], rel_tol=SCALE_RTOL, abs_tol=0.0)


def _alike(qp: QParams, m: Match) -> tuple[float, int, torch.dtype]:
    return m[qp.scale], m[qp.zero_point], m[qp.dtype]


def _same_quantization(inp: QParams, out: QParams) -> Check:
    def why(m: Match) -> str | None:
        a, b = _alike(inp, m), _alike(out, m)
        if quantized_alike(a, b):
            return None
        return (
            f"the input is quantized with scale {a[0]!r}, zero point {a[1]}, {a[2]}; "
            f"the output with scale {b[0]!r}, zero point {b[1]}, {b[2]}"
        )

    return reason(why, f"{inp.scale.name[:-6]} and {out.scale.name[:-6]} are quantized alike")


def _equal_quantization(inp: QParams, out: QParams, dtypes: tuple[torch.dtype, ...]) -> Check:
    """Valid qparams, a supported dtype, and the output quantized like the input."""
    return (
        valid_qparams(inp)
        & valid_qparams(out)
        & dtype_in(out.dtype, dtypes)
        & _same_quantization(inp, out)
    )


#: The context of a refused quantization: the int8 values are kept, never requantized.
_NOT_REQUANTIZED = (
    "the int8 values are moved as they are, so input and output must be quantized alike"
)

#: Dtypes a cat / movement of quantized values supports (any aten op would; these are the ones
#: the catalog quantizes to).
_INT8 = (torch.uint8, torch.int8)


#: The float op a pointwise match replaces: the pooled values, the cat, the movement.
FLOAT_OP = Var("float_op", fx.Node)


def _read_only_by_quant(m: Match) -> str | None:
    op = m[FLOAT_OP]
    inside = set(m.nodes)
    for user in op.users:
        if user not in inside and (user.users or user.is_impure()):  # a dead reader is none
            return f"{user.name} also reads {op.name}: lowering would compute it twice"
    return None


#: The pointwise fusions are not ``exclusive``: their dequantizes may have other readers (the
#: int8 op reads the int8 tensor, nothing is computed twice), so no dequant promotion is
#: needed; the float op itself must be read only by the replaced quantize.
READ_ONLY_BY_QUANT: Check = reason(_read_only_by_quant, "float_op is read only by the quantize")


# --------------------------------------------------------------------------------------------
# Output range
# --------------------------------------------------------------------------------------------

_PRODUCER_Q = qparams("producer")
_PRODUCER = quantize_per_tensor(ignored(), _PRODUCER_Q)


def _known_range(node: fx.Node) -> tuple[int, int] | None:
    """The range the int8 values of ``node`` are known to lie in: recorded, or its quantize's."""
    recorded = node.meta.get(QUANT_RANGE_KEY)
    if isinstance(recorded, tuple) and len(recorded) == 2:
        return int(recorded[0]), int(recorded[1])
    producer = match_node(_PRODUCER, node)
    if producer is None:
        return None
    return producer[_PRODUCER_Q.quant_min], producer[_PRODUCER_Q.quant_max]


def within_output_range(
    m: Match, rw: Rewriter, node: fx.Node, sources: Sequence[fx.Node]
) -> fx.Node:
    """``node`` clamped to the output quant's range unless every source already lies within it.

    ``node`` selects or moves the values of ``sources`` (the int8 inputs); the replaced quant
    clamped them to ``[quant_min, quant_max]``. The range is recorded for later fusions.
    """
    low, high = m[OQ.quant_min], m[OQ.quant_max]
    ranges = [_known_range(rw.node(s)) for s in sources]
    if all(r is not None and low <= r[0] and r[1] <= high for r in ranges):
        rw.set_meta(node, QUANT_RANGE_KEY, (low, high))
        return node
    return clamp_to_quant_range(m, rw, node)


# --------------------------------------------------------------------------------------------
# qmaxpool2d
# --------------------------------------------------------------------------------------------

KERNEL = Var("kernel_size", list)
STRIDE = Var("stride", list)
PADDING = Var("padding", list)
DILATION = Var("dilation", list)
CEIL_MODE = Var("ceil_mode", bool)
#: The pooled values (the ``max_pool2d`` node, or ``getitem(..., 0)`` of a two-output pool).
POOLED = FLOAT_OP
#: The pool's input (its rank is the pooled tensor's, where that one's is not known).
POOL_INPUT = Var("pool_input", fx.Node)
#: The two-output pool node (``max_pool2d_with_indices`` or the low-memory one), when spelled so.
POOL_MULTI = Var("pool_with_indices", fx.Node)


def max_pool2d(x: PatternLike, *, users: int | None = None) -> Pattern:
    """``max_pool2d(x, ...)`` in every spelling; ``users`` constrains the pooled-values node."""
    x = capture(POOL_INPUT, x)
    args = (KERNEL, STRIDE, PADDING, DILATION, CEIL_MODE)
    two_outputs = call((aten.max_pool2d_with_indices.default, LOW_MEMORY_MAX_POOL), x, *args)
    return capture(
        POOLED,
        any_of(
            call(aten.max_pool2d.default, x, *args, users=users),
            call(operator.getitem, capture(POOL_MULTI, two_outputs), 0, users=users),
        ),
    )


def _pair(values: list[Any], what: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise Refusal(f"max_pool2d {what} {list(values)} is not a list of constant ints")
    if len(values) == 1:
        return [int(values[0])] * 2
    if len(values) != 2:
        raise Refusal(f"max_pool2d {what} {list(values)} does not have 2 entries")
    return [int(v) for v in values]


def _indices_unread(m: Match) -> str | None:
    if POOL_MULTI not in m:
        return None
    pool, pooled = m[POOL_MULTI], m[POOLED]
    for user in pool.users:
        if user is pooled or (user.target is operator.getitem and not user.users):
            continue  # the values we lower, or an unread getitem (dead code)
        return (
            f"{user.name} reads the indices of {pool.name}: quantized.max_pool2d computes "
            "no indices"
        )
    return None


def _rank_four(m: Match) -> str | None:
    shape = known_shape(m[POOLED]) or known_shape(m[POOL_INPUT])
    if shape is None:
        return (
            f"the rank of {m[POOLED].name} is unknown (no meta['val']): quantized.max_pool2d "
            "needs a 4-D input"
        )
    if len(shape) != 4:
        return f"{m[POOLED].name} is {len(shape)}-D: quantized.max_pool2d needs a 4-D input"
    return None


#: What ``quantized.max_pool2d`` needs beyond the qparams (a read of the indices is refused
#: with a reason: the fusions using this are not ``exclusive``, see READ_ONLY_BY_QUANT).
POOL_CHECKS: Check = (
    reason(_indices_unread, "the pool's indices are not read")
    & READ_ONLY_BY_QUANT
    & reason(_rank_four, "the pooled tensor is 4-D")
)


def quantized_max_pool2d(m: Match, rw: Rewriter, x: fx.Node) -> fx.Node:
    """``quantized.max_pool2d`` of the uint8 tensor ``x`` with the matched pool's arguments."""
    require(POOL_CHECKS, m)
    kernel = _pair(m[KERNEL], "kernel_size")
    stride = _pair(m[STRIDE], "stride") if m[STRIDE] else kernel
    padding = _pair(m[PADDING], "padding")
    dilation = _pair(m[DILATION], "dilation")
    return emit.quantized.max_pool2d.default(
        rw,
        qx=x,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=m[CEIL_MODE],
    )


_QMAXPOOL_QUANTIZATION = _equal_quantization(XQ, OQ, (torch.uint8,))


def _rewrite_qmaxpool2d(m: Match, rw: Rewriter) -> fx.Node:
    require(_QMAXPOOL_QUANTIZATION, m, _NOT_REQUANTIZED)
    pooled = quantized_max_pool2d(m, rw, m[X])
    return within_output_range(m, rw, pooled, [m[X]])


QMAXPOOL2D = Fusion(
    name="qmaxpool2d",
    family="quantized pointwise",
    pattern=quantize_per_tensor(max_pool2d(dequantize_per_tensor(X, XQ)), OQ),
    rewrite=_rewrite_qmaxpool2d,
    exclusive=False,  # see READ_ONLY_BY_QUANT
    doc="dequant -> max_pool2d (any spelling) -> quant, equal qparams  =>  quantized.max_pool2d",
)


# --------------------------------------------------------------------------------------------
# qcat
# --------------------------------------------------------------------------------------------

CAT_INPUT = Var("cat_input", fx.Node)
CAT_INPUT_Q: QParams = qparams("cat_input")
CAT_DIM = Var("cat_dim", int)


def _cat_inputs_like_output(m: Match) -> str | None:
    out = _alike(OQ, m)
    inputs = zip(
        m.each(CAT_INPUT),
        m.each(CAT_INPUT_Q.scale),
        m.each(CAT_INPUT_Q.zero_point),
        m.each(CAT_INPUT_Q.dtype),
        strict=True,
    )
    for i, (node, scale, zp, dtype) in enumerate(inputs):
        if not (math.isfinite(scale) and scale > 0):
            return f"cat input {i} ({node.name}) has scale {scale!r}, not a finite positive number"
        if not quantized_alike((scale, zp, dtype), out):
            return (
                f"cat input {i} ({node.name}) is quantized with scale {scale!r}, zero point {zp}, "
                f"{dtype}; the output with scale {out[0]!r}, zero point {out[1]}, {out[2]}"
            )
    return None


_QCAT_QUANTIZATION: Check = (
    READ_ONLY_BY_QUANT
    & valid_qparams(OQ)
    & dtype_in(OQ.dtype, _INT8)
    & reason(_cat_inputs_like_output, "every cat input is quantized like the output")
)


def _rewrite_qcat(m: Match, rw: Rewriter) -> fx.Node:
    require(_QCAT_QUANTIZATION, m, _NOT_REQUANTIZED)
    inputs = list(m.each(CAT_INPUT))
    joined = emit.aten.cat.default(rw, tensors=inputs, dim=m[CAT_DIM])
    return within_output_range(m, rw, joined, inputs)


QCAT = Fusion(
    name="qcat",
    family="quantized pointwise",
    pattern=quantize_per_tensor(
        capture(
            FLOAT_OP,
            call(aten.cat.default, list_of(dequantize_per_tensor(CAT_INPUT, CAT_INPUT_Q)), CAT_DIM),
        ),
        OQ,
    ),
    rewrite=_rewrite_qcat,
    exclusive=False,  # see READ_ONLY_BY_QUANT
    doc="cat of dequants -> quant, all qparams equal  =>  aten.cat of the int8 tensors",
)


# --------------------------------------------------------------------------------------------
# qreshape: data movement
# --------------------------------------------------------------------------------------------


class Movement(enum.Enum):
    """Ops that only move values (so they commute with any elementwise map, quantize included)."""

    NONE = "none"
    RESHAPE = "reshape"  # view, reshape, _unsafe_view
    FLATTEN = "flatten"
    PERMUTE = "permute"
    TRANSPOSE = "transpose"

    def __repr__(self) -> str:
        return f"Movement.{self.name}"


@dataclass(frozen=True, slots=True)
class MoveVars:
    """The Vars of one movement: which op, its size/dims list, its two dims."""

    kind: Var[Movement]
    sizes: Var[list[Any]]
    dim_a: Var[int]
    dim_b: Var[int]

    def absent(self) -> dict[Var[Any], object]:
        """The bindings of a movement that is not there (``optional`` defaults)."""
        return {self.kind: Movement.NONE, self.sizes: [], self.dim_a: 0, self.dim_b: 0}


def move_vars(prefix: str) -> MoveVars:
    """``MoveVars`` named ``{prefix}_kind``, ``{prefix}_sizes``, ``{prefix}_dim_a``, ..."""
    return MoveVars(
        Var(f"{prefix}_kind", Movement),
        Var(f"{prefix}_sizes", list),
        Var(f"{prefix}_dim_a", int),
        Var(f"{prefix}_dim_b", int),
    )


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def movement(x: PatternLike, mv: MoveVars, *, users: int | None = None) -> Pattern:
    """One data movement of ``x``; ``mv.kind`` binds which, the other Vars its arguments."""
    return any_of(
        tag(call(_RESHAPES, x, mv.sizes, users=users), mv.kind, Movement.RESHAPE),
        tag(
            call(aten.flatten.using_ints, x, mv.dim_a, mv.dim_b, users=users),
            mv.kind,
            Movement.FLATTEN,
        ),
        tag(call(aten.permute.default, x, mv.sizes, users=users), mv.kind, Movement.PERMUTE),
        tag(
            call(aten.transpose.int, x, mv.dim_a, mv.dim_b, users=users),
            mv.kind,
            Movement.TRANSPOSE,
        ),
    )


def replay(m: Match, mv: MoveVars, rw: Rewriter, x: fx.Node) -> fx.Node:
    """The matched movement applied to ``x`` (``x`` itself when the movement is absent)."""
    kind, ops = m[mv.kind], emit.aten
    sizes: list[Any] = m.get(mv.sizes, [])
    if kind is Movement.RESHAPE:
        return ops.reshape.default(rw, self=x, shape=sizes)
    if kind is Movement.FLATTEN:
        return ops.flatten.using_ints(rw, self=x, start_dim=m[mv.dim_a], end_dim=m[mv.dim_b])
    if kind is Movement.PERMUTE:
        return ops.permute.default(rw, self=x, dims=sizes)
    if kind is Movement.TRANSPOSE:
        return ops.transpose.int(rw, self=x, dim0=m[mv.dim_a], dim1=m[mv.dim_b])
    return x


MOVE = move_vars("move")
_QRESHAPE_QUANTIZATION = READ_ONLY_BY_QUANT & _equal_quantization(XQ, OQ, _INT8)


def _rewrite_qreshape(m: Match, rw: Rewriter) -> fx.Node:
    require(_QRESHAPE_QUANTIZATION, m, _NOT_REQUANTIZED)
    moved = replay(m, MOVE, rw, m[X])
    return within_output_range(m, rw, moved, [m[X]])


QRESHAPE = Fusion(
    name="qreshape",
    family="quantized pointwise",
    pattern=quantize_per_tensor(
        capture(FLOAT_OP, movement(dequantize_per_tensor(X, XQ), MOVE)), OQ
    ),
    rewrite=_rewrite_qreshape,
    exclusive=False,  # see READ_ONLY_BY_QUANT
    doc="dequant -> view/reshape/flatten/permute/transpose -> quant, equal qparams  =>  "
    "the same movement of the int8 tensor",
)
