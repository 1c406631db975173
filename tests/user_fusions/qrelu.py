"""A fusion that is not in the catalog, written as a user would, from the public API only.

The tests copy this file into a temporary directory outside the repository and load it from
there (``qalgebra ... --fusions /tmp/.../qrelu.py:QRELU_FAMILY``), as a user's file would be.

``qrelu``: ``quantize(relu(dequantize(x)))`` with the same scale, zero point and dtype is the
int8 tensor clamped below at the zero point (and to the output range): exact, no float.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import fx

from qalgebra import Match, Var, call, emit, where
from qalgebra.catalog import Placed
from qalgebra.checks import same_qparams, satisfies
from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
from qalgebra.fusions import Fusion, Rewriter
from qalgebra.qparams import qparams
from qalgebra.testing.families import FusionFamily
from qalgebra.testing.strategies import (
    Example,
    Expected,
    GraphBuilder,
    OutputBound,
    apply_form,
    quant_specs,
)

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

X = Var("x", fx.Node)
IN = qparams("a")
OUT = qparams("o")

PATTERN = where(
    quantize_per_tensor(call(aten.relu.default, dequantize_per_tensor(X, IN)), OUT),
    same_qparams(IN, OUT) & satisfies(lambda m: m[IN.dtype] == m[OUT.dtype], "a_dtype == o_dtype"),
)


def clamp_levels(m: Match, rw: Rewriter) -> fx.Node:
    low = max(m[IN.zero_point], m[OUT.quant_min])
    return emit.aten.clamp.default(rw, self=m[X], min=low, max=m[OUT.quant_max])


QRELU = Fusion("qrelu", "mine", PATTERN, clamp_levels, doc="q(relu(dq(x))) -> clamp(x, zp)")

#: A variant placed explicitly: right before the catalog's qconv.
QRELU_BEFORE_QCONV = Placed(QRELU, before="qconv")

FORMS = ("op", "decomposed", "decomposed_single_clamp")


@st.composite
def qrelu_examples(draw: st.DrawFn) -> Example:
    """``x -> quantize -> dequantize -> relu -> quantize -> dequantize``, in a drawn form."""
    q = draw(quant_specs())
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    form = draw(st.sampled_from(FORMS))
    seed = draw(st.integers(0, 2**16))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * q.scale * 20
    b = GraphBuilder()
    x = b.placeholder("x", values, f"torch.randn({shape!r})")
    levels = b.call(qd.quantize_per_tensor.default, x, *q.args())
    relu = b.call(aten.relu.default, b.call(qd.dequantize_per_tensor.default, levels, *q.args()))
    out = b.call(qd.quantize_per_tensor.default, relu, *q.args())
    b.output([b.call(qd.dequantize_per_tensor.default, out, *q.args())])
    gm = apply_form(b.module("export"), form)
    expected = Expected(fired={"qrelu": 1}, outputs=(OutputBound("exact", why="exact levels"),))
    return Example("qrelu", form, gm, tuple(b.inputs), expected, recipe=f"<qrelu {q} {form}>")


def _examples() -> st.SearchStrategy[Any]:
    return qrelu_examples()


QRELU_FAMILY = FusionFamily("qrelu", (QRELU,), _examples)
