"""The quantized reduction family: a global average pool (or mean) read straight from int8.

``dequant -> adaptive_avg_pool2d([1, 1]) | mean.dim -> quant`` is how a squeeze-excitation block
and a classifier head pool a quantized tensor (X86InductorQuantizer quantizes
``adaptive_avg_pool2d`` int8 in, int8 out, with the input's qparams): ``QMEAN`` replaces it with
the mean of the int8 levels, computed in float32 directly from the uint8/int8 tensor, and one
quantize of the (small) result -- no dequantized float copy of the large input:

    quantize_per_tensor(mean.dim(x, dims, keepdim, dtype=float32) - x_zp,
                        out_scale / x_scale, out_zp, out_qmin, out_qmax, out_dtype)

With input and output quantized alike (what the quantizer writes) that quantize is a rounding:
``round(mean)`` converted to the dtype, clamped only if the output's range is narrower than
the input's known range.

One definition, in every quant/dequant form: ``adaptive_avg_pool2d`` and
``_adaptive_avg_pool2d`` with output ``[1, 1]`` (the mean over the last two dims, kept), and
``mean.dim`` over any list of dims, keepdim or not (what decompositions, Inductor and
``x.mean([2, 3])`` write).

Why it is exact to within one quantization step: dequantizing is affine, so the mean of
``(q - x_zp) * x_scale`` is ``(mean(q) - x_zp) * x_scale``; the quantize of either is
``round(that / out_scale) + out_zp``, clamped. The two computations differ only by float
rounding (the reference rounds every dequantized element and sums floats; here a sum of integer
levels, exact below 2**24), so an output moves by one step at most, where the value lies within
float rounding of a rounding boundary.

Why this kernel: on plain uint8, ``adaptive_avg_pool2d``, ``avg_pool2d`` and ``mean`` without a
dtype are not implemented; ``aten.adaptive_avg_pool2d`` and ``aten.mean`` have QuantizedCPU
kernels (faster still), but they take ``torch.quint8`` tensors, whose creation torch deprecates
(a copy through ``_make_per_tensor_quantized_tensor``, ``int_repr`` back). Measured against the
float path (``dequant -> pool -> quant``): 0.12-0.44x its time on the squeeze-excitation shapes
of three models (docs/onednn_ops.md, "Int8 squeeze-excitation and attention";
``bench/bench_int8_kernels.py``).

Refusals (left unlowered, the reason in the report): an adaptive pool to another output size
(a windowed average: no plain int8 kernel), invalid qparams, a dtype other than uint8/int8, a
float reduction also read outside the match.

>>> QMEAN.name, QMEAN.family
('qmean', 'quantized reduction')
>>> print(QMEAN.doc)
dequant -> adaptive_avg_pool2d([1, 1]) / mean -> quant  =>  mean of the int8 levels -> quant
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra import emit
from qalgebra.checks import Check, dtype_in, require, valid_qparams
from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import OQ, X, output_quantize
from qalgebra.fusions.pointwise import (
    FLOAT_OP,
    READ_ONLY_BY_QUANT,
    quantized_alike,
    within_output_range,
)
from qalgebra.ops import aten
from qalgebra.pattern import Match, Pattern, PatternLike, Var, any_of, call, capture
from qalgebra.qparams import QParams, qparams
from qalgebra.rewriter import Rewriter

__all__ = [
    "ADAPTIVE_POOLS",
    "KEEPDIM",
    "MEAN_DIMS",
    "OUTPUT_SIZE",
    "QMEAN",
    "REDUCED",
    "global_mean",
    "int8_mean",
]


#: The input's qparams, constants only (the requantize is computed when lowering; a scale known
#: only at run time, from dynamic quantization, is left to the graph).
XQ: QParams = qparams("x")

#: The adaptive average pools a global pool is spelled with (``_adaptive_avg_pool2d`` is what
#: ``adaptive_avg_pool2d`` decomposes to for an output other than ``[1, 1]``).
ADAPTIVE_POOLS = (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
#: The pool's output size (only ``[1, 1]`` is lowered).
OUTPUT_SIZE = Var("output_size", list)
#: The dims a ``mean.dim`` reduces, and whether it keeps them.
MEAN_DIMS = Var("mean_dims", list)
KEEPDIM = Var("keepdim", bool)
#: The reduced float tensor (the pool or the mean node).
REDUCED = FLOAT_OP

_INT8 = (torch.uint8, torch.int8)


def global_mean(x: PatternLike) -> Pattern:
    """A mean of ``x``: a global adaptive average pool, or ``mean.dim`` (no dtype argument)."""
    return capture(
        REDUCED,
        any_of(
            call(ADAPTIVE_POOLS, x, OUTPUT_SIZE),
            call(aten.mean.dim, x, MEAN_DIMS, KEEPDIM),
        ),
    )


def _reduced_dims(m: Match) -> tuple[list[int], bool]:
    """(dims, keepdim) of the matched reduction, refusing a pool that is not global."""
    if OUTPUT_SIZE not in m:
        dims: list[int] = m[MEAN_DIMS]
        return list(dims), m[KEEPDIM]
    size: list[int] = m[OUTPUT_SIZE]
    if not size or len(size) > 2 or any(s != 1 for s in size):
        raise Refusal(
            f"{m[REDUCED].target} to {size}: only a global average pool (output [1, 1]) "
            "is a mean of the int8 levels; a windowed average has no plain int8 kernel"
        )
    return [-1, -2], True  # a global pool averages the last two dims and keeps them


def int8_mean(m: Match, rw: Rewriter, x: fx.Node, dims: list[int], keepdim: bool) -> fx.Node:
    """The matched output quantize of the mean of ``x``'s levels (dequantized with ``XQ``).

    Quantized alike (what the quantizer writes), the output levels are the mean's, rounded: a
    ``round`` and a conversion of the small result (measured 7-20 us where the decomposed
    quantize takes 20-85 us, as much as the mean itself), clamped only when the output's range
    is narrower than what ``x`` is known to hold. Otherwise the mean is requantized.
    """
    levels = emit.aten.mean.dim(rw, self=x, dim=dims, keepdim=keepdim, dtype=torch.float32)
    alike = (m[XQ.scale], m[XQ.zero_point], m[XQ.dtype])
    if quantized_alike(alike, (m[OQ.scale], m[OQ.zero_point], m[OQ.dtype])):
        rounded = emit.aten.round.default(rw, self=levels)
        out = emit.aten._to_copy.default(rw, self=rounded, dtype=m[OQ.dtype])
        return within_output_range(m, rw, out, [x])
    if m[XQ.zero_point]:
        levels = emit.aten.sub.Scalar(rw, self=levels, other=m[XQ.zero_point])
    return output_quantize(m, rw, levels, scale=m[OQ.scale] / m[XQ.scale])


_QMEAN_CHECKS: Check = (
    READ_ONLY_BY_QUANT
    & valid_qparams(XQ)
    & valid_qparams(OQ)
    & dtype_in(XQ.dtype, _INT8)
    & dtype_in(OQ.dtype, _INT8)
)


def _rewrite_qmean(m: Match, rw: Rewriter) -> fx.Node:
    require(_QMEAN_CHECKS, m)
    dims, keepdim = _reduced_dims(m)
    return int8_mean(m, rw, m[X], dims, keepdim)


QMEAN = Fusion(
    name="qmean",
    family="quantized reduction",
    pattern=quantize_per_tensor(global_mean(dequantize_per_tensor(X, XQ)), OQ),
    rewrite=_rewrite_qmean,
    exclusive=False,  # the int8 mean reads the int8 tensor: a shared dequantize is no obstacle
    doc="dequant -> adaptive_avg_pool2d([1, 1]) / mean -> quant  =>  "
    "mean of the int8 levels -> quant",
)
