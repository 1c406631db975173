"""qalgebra: a typed, immutable pattern algebra for quantized-operator fusion on torch.fx graphs.

This module only re-exports the public names; see :mod:`qalgebra.pattern` for the values,
:mod:`qalgebra.match` for the matcher and :mod:`qalgebra.lower` for the oneDNN lowering.
"""

from qalgebra.errors import (
    InvalidQParamsError,
    LoweringError,
    MatchError,
    PatternError,
    QAlgebraError,
    RewriteError,
    UnsupportedGraphError,
)
from qalgebra.pattern import (
    Match,
    Mismatch,
    Pattern,
    Var,
    any_of,
    call,
    capture,
    dtype_of,
    ignored,
    let,
    list_of,
    literal,
    optional,
    reciprocal,
    tag,
    where,
)

__all__ = [
    "InvalidQParamsError",
    "LoweringError",
    "Match",
    "MatchError",
    "Mismatch",
    "Pattern",
    "PatternError",
    "QAlgebraError",
    "RewriteError",
    "UnsupportedGraphError",
    "Var",
    "any_of",
    "call",
    "capture",
    "dtype_of",
    "ignored",
    "let",
    "list_of",
    "literal",
    "optional",
    "reciprocal",
    "tag",
    "where",
]
