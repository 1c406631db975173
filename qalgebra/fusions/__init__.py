"""The fusion catalog, in priority order (a pattern is tried before any pattern it contains).

Within one family the larger variant comes first inside its pattern (int8 output before float
output, binary + unary before binary), and ``find_matches`` tries roots from the end of the graph
backwards, so a match is always preferred over the matches it contains.
"""

from qalgebra.fusions.base import Fusion, Refusal, Rewriter
from qalgebra.fusions.binary import ACCUM_CLONE_ELISION, QCONV_BINARY, QLINEAR_BINARY
from qalgebra.fusions.conv import QCONV
from qalgebra.fusions.layout import VIEW_AS_RESHAPE
from qalgebra.fusions.linear import QLINEAR
from qalgebra.fusions.promotion import DEQUANT_PROMOTION

__all__ = ["DEFAULT_FUSIONS", "Fusion", "Refusal", "Rewriter"]

#: The catalog, in the order the lowering applies it.
DEFAULT_FUSIONS: tuple[Fusion, ...] = (
    DEQUANT_PROMOTION,
    QCONV_BINARY,
    QLINEAR_BINARY,
    QCONV,
    QLINEAR,
    ACCUM_CLONE_ELISION,
    VIEW_AS_RESHAPE,
)
