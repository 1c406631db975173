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

Neither lifts from an ``x`` that is a dequantize: ``dequant -> op -> quant`` is the quantized
pointwise family's (:mod:`qalgebra.fusions.pointwise`); lifting would leave a dequant/quant pair.
The lifted quantize is emitted in op form (``quantize_per_tensor.default``; the decomposed
arithmetic computes the same values); replayed movements record the int8 range for later fusions.
These fusions must run before the conv/linear families, which then see the lifted quantize.
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra.checks import Check, dtype_in, satisfies, single_user, valid_qparams
from qalgebra.combinators import (
    dequantize_per_tensor,
    qparams,
    quantize_per_tensor,
    with_dtype_convert,
)
from qalgebra.fusions.base import Fusion, Rewriter
from qalgebra.fusions.common import OQ, QUANT_RANGE_KEY
from qalgebra.fusions.pointwise import (
    max_pool2d,
    move_vars,
    movement,
    quantized_max_pool2d,
    replay,
    require,
    within_output_range,
)
from qalgebra.match import match_node
from qalgebra.pattern import Match, Pattern, Var, ignored, optional, where

__all__ = ["LIFT_DEPTH", "QUANT_LIFT_UP", "QUANT_LIFT_UP_MAX_POOL"]

qd = torch.ops.quantized_decomposed

#: The longest chain of movements one lift passes.
LIFT_DEPTH = 4

#: The tensor the chain starts from: the lifted quantize reads it.
SOURCE = Var("lift_source", fx.Node)
#: The steps of the chain, nearest the quantize first.
STEPS = tuple(move_vars(f"lift{k}") for k in range(LIFT_DEPTH))

_DEQUANT_DTYPE = Var("dequant_out_dtype", torch.dtype)
_DEQUANTIZED = with_dtype_convert(
    dequantize_per_tensor(ignored(), qparams("source")), _DEQUANT_DTYPE
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
    q = rw.call(
        qd.quantize_per_tensor.default,
        m[SOURCE],
        m[OQ.scale],
        m[OQ.zero_point],
        m[OQ.quant_min],
        m[OQ.quant_max],
        m[OQ.dtype],
    )
    rw.set_meta(q, QUANT_RANGE_KEY, (m[OQ.quant_min], m[OQ.quant_max]))
    return q


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
