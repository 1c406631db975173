"""The fusion catalog, in priority order (a pattern is tried before any pattern it contains).

Within one family the larger variant comes first inside its pattern (int8 output before float
output, binary + unary before binary), and ``find_matches`` tries roots from the end of the graph
backwards, so a match is always preferred over the matches it contains. (How to write a fusion of
one's own, and where it goes in this order: :mod:`qalgebra.fusion`. ``Fusion``, ``Refusal`` and
``Rewriter`` are also importable from here, as they were before they moved to their own modules.)
"""

from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.fusions.binary import ACCUM_CLONE_ELISION, QCONV_BINARY, QLINEAR_BINARY
from qalgebra.fusions.conv import QCONV
from qalgebra.fusions.dynamic_fp16 import LINEAR_DYNAMIC_FP16
from qalgebra.fusions.inplace import EVAL_DROPOUT, FUNCTIONALIZE
from qalgebra.fusions.int_mm import INT_MM
from qalgebra.fusions.layout import VIEW_AS_RESHAPE
from qalgebra.fusions.liftup import (
    QUANT_LIFT_UP,
    QUANT_LIFT_UP_CAT,
    QUANT_LIFT_UP_MAX_POOL,
    QUANT_SHARE_MAX_POOL,
)
from qalgebra.fusions.linear import QLINEAR
from qalgebra.fusions.pointwise import QCAT, QMAXPOOL2D, QRESHAPE
from qalgebra.fusions.promotion import DEQUANT_PROMOTION
from qalgebra.fusions.reduce import QMEAN
from qalgebra.fusions.woq import WOQ, WOQ_CONCAT_LINEAR
from qalgebra.rewriter import Rewriter

__all__ = ["DEFAULT_FUSIONS", "Fusion", "Refusal", "Rewriter"]

#: The catalog, in the order the lowering applies it.
DEFAULT_FUSIONS: tuple[Fusion, ...] = (
    # First, so every pattern below sees one spelling: eval dropouts become their input, then
    # in-place ops whose write nothing else reads become functional (chains in graph order).
    EVAL_DROPOUT,
    FUNCTIONALIZE,
    DEQUANT_PROMOTION,
    # Lift-up first: a quantize moved above views / a max_pool2d then meets the conv or linear
    # that produced its input, which fuse with an int8 output.
    QUANT_LIFT_UP,
    # A pool whose input is quantized alike elsewhere reads that int8 tensor; then the input (a
    # cat read only by its quantize now) gets the quantize lifted over it, into every branch.
    QUANT_SHARE_MAX_POOL,
    QUANT_LIFT_UP_MAX_POOL,
    QUANT_LIFT_UP_CAT,
    QCONV_BINARY,
    QLINEAR_BINARY,
    QCONV,
    QLINEAR,
    # After conv/linear: a qconv's uint8 output then feeds quantized.max_pool2d / cat / reshape
    # directly (and conv/linear read their input's int8 range from the quantize producing it).
    # Before clone elision: it must see the int8 views (reshape, permute) these emit of a conv
    # output.
    QMAXPOOL2D,
    QCAT,
    QRESHAPE,
    # A global average pool / mean of an int8 tensor (squeeze-excitation, classifier heads):
    # like the pointwise ops, after conv/linear, so it reads a qconv's uint8 output.
    QMEAN,
    # Weight-only / dynamic families: no quantize/dequantize nodes, so disjoint from the above
    # (and from each other: int8 vs fp16 weights, _int_mm). Concat-linear before single WOQ: it
    # consumes a group of the single WOQ matches.
    WOQ_CONCAT_LINEAR,
    WOQ,
    INT_MM,
    LINEAR_DYNAMIC_FP16,
    ACCUM_CLONE_ELISION,
    VIEW_AS_RESHAPE,
)
