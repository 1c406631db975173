"""qalgebra: a typed, immutable pattern algebra for quantized-operator fusion on torch.fx graphs.

This module re-exports what a fusion is written with: pattern values and factories
(:mod:`qalgebra.pattern`), the :class:`Fusion` and its :class:`Rewriter` (:mod:`qalgebra.fusion`,
:mod:`qalgebra.rewriter`), checks and :func:`require` (:mod:`qalgebra.checks`), the typed
graph-side op namespaces :mod:`qalgebra.emit`, and the errors (:mod:`qalgebra.errors`). The
quantization building blocks are in :mod:`qalgebra.combinators` and :mod:`qalgebra.qparams`, the
matcher in :mod:`qalgebra.match`, the oneDNN lowering and its catalog in :mod:`qalgebra.lower`
and :mod:`qalgebra.fusions`. Importing it loads neither the catalog nor the testing kit.
"""

from types import ModuleType as _ModuleType

from qalgebra import emit
from qalgebra.checks import Check, reason, require, satisfies
from qalgebra.errors import (
    EmitError,
    InvalidQParamsError,
    LoweringError,
    MatchError,
    PatternError,
    QAlgebraError,
    Refusal,
    RewriteError,
    UnsupportedGraphError,
)
from qalgebra.fusion import Fusion
from qalgebra.pattern import (
    Match,
    Mismatch,
    Pattern,
    Var,
    any_call,
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
from qalgebra.rewriter import Rewriter

__all__ = [
    "Check",
    "EmitError",
    "Fusion",
    "InvalidQParamsError",
    "LoweringError",
    "Match",
    "MatchError",
    "Mismatch",
    "Pattern",
    "PatternError",
    "QAlgebraError",
    "Refusal",
    "RewriteError",
    "Rewriter",
    "UnsupportedGraphError",
    "Var",
    "any_call",
    "any_of",
    "call",
    "capture",
    "dtype_of",
    "emit",
    "ignored",
    "let",
    "list_of",
    "literal",
    "optional",
    "reason",
    "reciprocal",
    "require",
    "satisfies",
    "tag",
    "where",
]


def _check_exports(public: set[str]) -> None:
    """``__all__`` is exactly the public names defined here (as Hypothesis checks its own)."""
    assert set(__all__) == public, (set(__all__) - public, public - set(__all__))


# Submodules imported on the way are attributes too; of those only ``emit`` is an export.
_check_exports(
    {
        name
        for name, value in globals().items()
        if not name.startswith("_") and (name == "emit" or not isinstance(value, _ModuleType))
    }
)
del _check_exports
