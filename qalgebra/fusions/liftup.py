"""Quant lift-up: move a quantize above the float ops that only move or select values.

``x -> view/permute/... -> quant`` becomes ``x -> quant -> view/permute/...`` (Inductor's
``quant_lift_up``), so the quant meets the op that produced ``x`` and ``dequant -> linear -> quant``
can fuse with an int8 output; the moved values are int8 afterwards. A quantize is elementwise, so
it commutes with every op that only moves values: numerics are unchanged, bit for bit.

- ``QUANT_LIFT_UP``: over a chain of up to ``LIFT_DEPTH`` movements (``view``/``reshape``/
  ``_unsafe_view``/``flatten``/``permute``/``transpose``; Inductor lifts over transpose, permute,
  view and reshape), each read only by the next, from an ``x`` read only by the chain (Inductor's
  conditions). A longer chain lifts over its last ``LIFT_DEPTH`` movements.
- ``QUANT_LIFT_UP_MAX_POOL``: beyond Inductor, over a ``max_pool2d`` (any spelling): with a
  positive scale the quantize is non-decreasing, so it commutes with a max as well --
  ``quant(max_pool2d(x)) == quantized.max_pool2d(quant(x))`` bit for bit. X86InductorQuantizer
  leaves ``conv -> relu -> max_pool2d -> quant`` (a ResNet stem) with the pool in float; lifted,
  the conv fuses with an int8 output and the pool runs on uint8.

- ``QUANT_SHARE_MAX_POOL``: ``x -> max_pool2d -> quant`` where ``x`` is also quantized alike
  by an earlier quantize ``q`` (an inception block's output: ``cat -> quant`` for its convs and
  ``cat -> max_pool2d -> quant`` for its pool branch; X86InductorQuantizer shares the pool's
  qparams with its input) becomes ``quantized.max_pool2d(q)``: the same values, no float pool.
- ``QUANT_LIFT_UP_CAT``: ``cat(x1, ..., xn) -> quant``, each ``xi`` read only by the cat and none
  a dequantize, becomes ``cat(quant(x1), ..., quant(xn))`` (a quantize is elementwise: bit for
  bit the same), so each ``conv -> relu -> quant`` fuses with an int8 output and the cat moves
  uint8 values. X86InductorQuantizer leaves GoogLeNet's branch outputs float into the cat.

Neither lifts from an ``x`` that is a dequantize: ``dequant -> op -> quant`` is the quantized
pointwise family's (:mod:`qalgebra.fusions.pointwise`); lifting would leave a dequant/quant pair.
The lifted quantize is emitted in op form (``quantize_per_tensor.default``; the decomposed
arithmetic computes the same values); replayed movements record the int8 range for later fusions.
These fusions must run before the conv/linear families, which then see the lifted quantize.
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra import emit
from qalgebra.aliasing import runs_after
from qalgebra.checks import Check, dtype_in, require, satisfies, single_user, valid_qparams
from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor, with_dtype_convert
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import OQ, QUANT_RANGE_KEY, output_quantize
from qalgebra.fusions.pointwise import (
    CAT_DIM,
    FLOAT_OP,
    max_pool2d,
    move_vars,
    movement,
    quantized_alike,
    quantized_max_pool2d,
    replay,
    within_output_range,
)
from qalgebra.match import match_node
from qalgebra.ops import aten
from qalgebra.pattern import (
    Match,
    Pattern,
    Var,
    call,
    capture,
    ignored,
    list_of,
    optional,
    where,
)
from qalgebra.qparams import qparams
from qalgebra.rewriter import Rewriter

__all__ = [
    "LIFT_DEPTH",
    "QUANT_LIFT_UP",
    "QUANT_LIFT_UP_CAT",
    "QUANT_LIFT_UP_MAX_POOL",
    "QUANT_SHARE_MAX_POOL",
]

#: The longest chain of movements one lift passes.
LIFT_DEPTH = 4

#: The tensor the chain starts from: the lifted quantize reads it.
SOURCE = Var("lift_source", fx.Node)
#: The steps of the chain, nearest the quantize first.
STEPS = tuple(move_vars(f"lift{k}") for k in range(LIFT_DEPTH))

_DEQUANT_DTYPE = Var("dequant_out_dtype", torch.dtype)
_DEQUANTIZED = with_dtype_convert(
    dequantize_per_tensor(ignored(), qparams("source", runtime=True)), _DEQUANT_DTYPE
)


def _not_dequantized(m: Match) -> bool:
    return match_node(_DEQUANTIZED, m[SOURCE]) is None


#: Where a lift may start: a tensor read only by what is lifted over, not a dequantize.
SOURCE_CHECK: Check = single_user(SOURCE) & satisfies(
    _not_dequantized,
    "lift_source not to be a dequantize (dequant -> op -> quant is the pointwise family's)",
)


def movement_chain(x: Pattern) -> Pattern:
    """1 to ``LIFT_DEPTH`` movements of ``x``, each read only by the next (the last by its user).

    Absent steps bind ``Movement.NONE``; longer chains are preferred.
    """
    p = x
    for mv in reversed(STEPS[1:]):
        p = optional(movement(p, mv, users=1), through=0, defaults=mv.absent())
    return movement(p, STEPS[0], users=1)


def _lifted_quant(m: Match, rw: Rewriter) -> fx.Node:
    return output_quantize(m, rw, m[SOURCE])


def _lift_over_movements(m: Match, rw: Rewriter) -> fx.Node:
    node = _lifted_quant(m, rw)
    for mv in reversed(STEPS):
        moved = replay(m, mv, rw, node)
        if moved is not node:
            rw.set_meta(moved, QUANT_RANGE_KEY, (m[OQ.quant_min], m[OQ.quant_max]))
        node = moved
    return node


QUANT_LIFT_UP = Fusion(
    name="quant_lift_up",
    family="quant lift-up",
    pattern=where(quantize_per_tensor(movement_chain(SOURCE), OQ), SOURCE_CHECK),
    rewrite=_lift_over_movements,
    doc="x -> view/permute/... -> quant  =>  x -> quant -> view/permute/... (int8)",
)


def _lift_over_max_pool(m: Match, rw: Rewriter) -> fx.Node:
    require(valid_qparams(OQ) & dtype_in(OQ.dtype, (torch.uint8,)), m, "the lifted quantize")
    q = _lifted_quant(m, rw)
    pooled = quantized_max_pool2d(m, rw, q)
    return within_output_range(m, rw, pooled, [q])


QUANT_LIFT_UP_MAX_POOL = Fusion(
    name="quant_lift_up_max_pool",
    family="quant lift-up",
    pattern=where(quantize_per_tensor(max_pool2d(SOURCE, users=1), OQ), SOURCE_CHECK),
    rewrite=_lift_over_max_pool,
    exclusive=False,  # see pointwise.POOL_CHECKS
    doc="x -> max_pool2d -> quant  =>  x -> quant -> quantized.max_pool2d",
)


# --------------------------------------------------------------------------------------------
# A pool reading a tensor that is quantized alike elsewhere; a quantize over a cat
# --------------------------------------------------------------------------------------------

_SHARED_Q = qparams("shared")
_QUANT_OF_SOURCE = quantize_per_tensor(SOURCE, _SHARED_Q)


def _shared_quant(m: Match) -> fx.Node | None:
    """An earlier quantize of ``SOURCE`` with the output quant's qparams and range, or None."""
    want = (m[OQ.scale], m[OQ.zero_point], m[OQ.dtype])
    for user in m[SOURCE].users:
        if user in m.nodes or not runs_after(m.root, user):
            continue
        q = match_node(_QUANT_OF_SOURCE, user)
        if q is None or q[SOURCE] is not m[SOURCE]:
            continue
        got = (q[_SHARED_Q.scale], q[_SHARED_Q.zero_point], q[_SHARED_Q.dtype])
        same_range = (q[_SHARED_Q.quant_min], q[_SHARED_Q.quant_max]) == (
            m[OQ.quant_min],
            m[OQ.quant_max],
        )
        if same_range and quantized_alike(got, want):
            return user
    return None


def _pool_shared_quant(m: Match, rw: Rewriter) -> fx.Node:
    require(valid_qparams(OQ) & dtype_in(OQ.dtype, (torch.uint8,)), m, "the shared quantize")
    shared = _shared_quant(m)
    if shared is None:  # the pattern's check found it; nothing rewrote it since
        raise AssertionError("the shared quantize disappeared")
    pooled = quantized_max_pool2d(m, rw, shared)
    return within_output_range(m, rw, pooled, [shared])


QUANT_SHARE_MAX_POOL = Fusion(
    name="quant_share_max_pool",
    family="quant lift-up",
    pattern=where(
        quantize_per_tensor(max_pool2d(SOURCE, users=1), OQ),
        satisfies(
            lambda m: _not_dequantized(m) and _shared_quant(m) is not None,
            "lift_source is quantized alike before (and is not a dequantize)",
        ),
    ),
    rewrite=_pool_shared_quant,
    exclusive=False,  # see pointwise.POOL_CHECKS
    doc="x -> quant (q); x -> max_pool2d -> quant, alike  =>  quantized.max_pool2d(q)",
)


_CAT_INPUT = Var("lifted_cat_input", fx.Node)


def _cat_inputs_lift(m: Match) -> bool:
    return all(
        len(x.users) == 1 and match_node(_DEQUANTIZED, x) is None for x in m.each(_CAT_INPUT)
    )


def _lift_over_cat(m: Match, rw: Rewriter) -> fx.Node:
    require(valid_qparams(OQ) & dtype_in(OQ.dtype, (torch.uint8, torch.int8)), m, "the quantize")
    quantized: dict[fx.Node, fx.Node] = {}
    for x in m.each(_CAT_INPUT):
        if x not in quantized:
            rw.anchor = m[FLOAT_OP]  # each quantize right before the cat, after its input
            quantized[x] = output_quantize(m, rw, x)
    rw.anchor = m.root
    inputs = [quantized[x] for x in m.each(_CAT_INPUT)]
    joined = emit.aten.cat.default(rw, tensors=inputs, dim=m[CAT_DIM])
    rw.set_meta(joined, QUANT_RANGE_KEY, (m[OQ.quant_min], m[OQ.quant_max]))
    return joined


QUANT_LIFT_UP_CAT = Fusion(
    name="quant_lift_up_cat",
    family="quant lift-up",
    pattern=where(
        quantize_per_tensor(
            capture(FLOAT_OP, call(aten.cat.default, list_of(_CAT_INPUT), CAT_DIM, users=1)), OQ
        ),
        satisfies(
            _cat_inputs_lift, "every cat input is read only by the cat and is not a dequantize"
        ),
    ),
    rewrite=_lift_over_cat,
    doc="cat(x1, ..., xn) -> quant  =>  cat(quant(x1), ..., quant(xn)) (int8)",
)
