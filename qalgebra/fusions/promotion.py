"""Dequant promotion: a dequantize read by several consumers becomes one dequantize per consumer.

Each fusion consumes the dequant in front of its compute op; a dequant shared by two convs (or a
conv and a residual add) would otherwise stop both from fusing. The shared chain -- the dequant in
any form (constant or runtime qparams), with its optional bf16 conversion and reshape -- is copied
once per extra user; the copies read the same qparams nodes.
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra.checks import users_at_most
from qalgebra.combinators import dequantize_per_tensor, with_dtype_convert, with_reshape
from qalgebra.fusion import Fusion
from qalgebra.pattern import Match, Var, capture, where
from qalgebra.qparams import qparams
from qalgebra.rewriter import Rewriter

__all__ = ["DEQUANT_PROMOTION"]

_X = Var("x", fx.Node)
_Q = qparams("x", runtime=True)
_DTYPE = Var("promoted_dtype", torch.dtype)
_SHARED = Var("shared", fx.Node)


def _promote(m: Match, rw: Rewriter) -> fx.Node:
    shared = m[_SHARED]
    users = list(shared.users)
    for user in users[1:]:
        rw.anchor = user
        rw.redirect(user, shared, rw.duplicate(m.nodes))
    return shared


DEQUANT_PROMOTION = Fusion(
    name="dequant_promotion",
    family="dequant promotion",
    pattern=where(
        capture(_SHARED, with_reshape(with_dtype_convert(dequantize_per_tensor(_X, _Q), _DTYPE))),
        ~users_at_most(_SHARED, 1),
    ),
    rewrite=_promote,
    exclusive=False,
    doc="dequant (-> convert) (-> reshape) with n users  =>  n copies, one per user",
)
