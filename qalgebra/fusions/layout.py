"""Layout fix-ups after lowering.

oneDNN's quantized conv returns channels_last tensors where the eager conv returned contiguous
ones, so a ``view`` that was valid on the eager result -- directly, or after a ``cat``, pooling
or any op that keeps the layout -- may fail at run time on the fused one. Every ``view`` is
respelled ``reshape``: the same values, copying only when the layout requires it. This is safe
because the lowered graph is functional: its only in-place writes go to accumulators that no
aliasing op reads (see ``qalgebra.fusions.binary``).
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra.fusions.base import Fusion, Rewriter
from qalgebra.pattern import Match, Var, call, ignored

__all__ = ["ONEDNN_OUTPUT_OPS", "VIEW_AS_RESHAPE"]

aten = torch.ops.aten
onednn = torch.ops.onednn

#: Every oneDNN op the catalog emits, as a call with its schema's number of arguments ignored.
ONEDNN_OUTPUT_OPS = (
    call(onednn.qconv_pointwise.default, *([ignored()] * 17))
    | call(onednn.qconv2d_pointwise.binary, *([ignored()] * 22))
    | call(onednn.qlinear_pointwise.default, *([ignored()] * 13))
    | call(onednn.qlinear_pointwise.binary, *([ignored()] * 18))
)

_SOURCE = Var("source", fx.Node)
_SIZE = Var("size", list)


def _respell(m: Match, rw: Rewriter) -> fx.Node:
    return rw.call(aten.reshape.default, m[_SOURCE], m[_SIZE])


VIEW_AS_RESHAPE = Fusion(
    name="view_as_reshape",
    family="layout",
    pattern=call(aten.view.default, _SOURCE, _SIZE),
    rewrite=_respell,
    essential=True,  # a view of a channels_last oneDNN output fails at run time
    doc="view(x)  =>  reshape(x) (oneDNN conv outputs are channels_last; a view may not apply)",
)
