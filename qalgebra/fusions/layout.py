"""Layout fix-ups after lowering.

oneDNN's quantized conv returns channels_last tensors where the eager conv returned contiguous
ones, so a ``view`` that was valid on the eager result -- directly, or after a ``cat``, pooling
or any op that keeps the layout -- may fail at run time on the fused one. Every ``view`` is
respelled ``reshape``: the same values, copying only when the layout requires it. This is safe
because the lowered graph is functional: its only in-place writes go to accumulators that no
aliasing op reads (see ``qalgebra.fusions.binary``).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from qalgebra import emit
from qalgebra.fusion import Fusion
from qalgebra.ops import aten, onednn
from qalgebra.pattern import Match, Var, any_call, call
from qalgebra.rewriter import Rewriter

__all__ = ["ONEDNN_OUTPUT_OPS", "VIEW_AS_RESHAPE"]

#: A call of a oneDNN op the catalog emits (with constant activation qparams), any arguments.
ONEDNN_OUTPUT_OPS = any_call(
    (
        onednn.qconv_pointwise.default,
        onednn.qconv2d_pointwise.binary,
        onednn.qlinear_pointwise.default,
        onednn.qlinear_pointwise.binary,
    )
)

_SOURCE = Var("source", fx.Node)
_SIZE = Var("size", list)


def _respell(m: Match, rw: Rewriter) -> fx.Node:
    size: list[Any] = m[_SIZE]
    return emit.aten.reshape.default(rw, self=m[_SOURCE], shape=size)


VIEW_AS_RESHAPE = Fusion(
    name="view_as_reshape",
    family="layout",
    pattern=call(aten.view.default, _SOURCE, _SIZE),
    rewrite=_respell,
    essential=True,  # a view of a channels_last oneDNN output fails at run time
    doc="view(x)  =>  reshape(x) (oneDNN conv outputs are channels_last; a view may not apply)",
)
