"""The qalgebra exception hierarchy.

Everything qalgebra raises on purpose derives from :class:`QAlgebraError`, so callers can catch one
type. Subclasses say which phase refused: building a pattern, matching, lowering a graph, or
one rewrite (:class:`Refusal`, raised by a fusion's replacement code and reported, not raised,
by the lowering).
"""

from __future__ import annotations

__all__ = [
    "EmitError",
    "ExampleDatabaseError",
    "InvalidQParamsError",
    "LoweringError",
    "MatchError",
    "PatternError",
    "QAlgebraError",
    "Refusal",
    "RewriteError",
    "UnsupportedGraphError",
]


class QAlgebraError(Exception):
    """Root of every error qalgebra raises deliberately."""


class PatternError(QAlgebraError, TypeError):
    """A pattern was malformed at construction (bad target, Var typed twice, bad optional...)."""


class MatchError(QAlgebraError, LookupError):
    """A match result was used wrongly (reading a Var the match did not bind, ...)."""


class EmitError(QAlgebraError, TypeError):
    """Replacement code called an op with arguments its schema does not take (an unknown or a
    missing argument, a constant where the op takes a graph node, a node where it takes a
    constant); raised before anything is built, so the rewrite rolls back."""


class Refusal(QAlgebraError):
    """Raised by replacement code that will not lower this match; the reason is reported.

    The lowering rolls the rewrite back and lists the reason in ``report.refused``; the rest of
    the graph still lowers. :func:`qalgebra.checks.require` raises it from a check's failure.

    ``cause`` says what decided, for the report: ``"rule"`` (the fusion's own checks),
    ``"probe:<name>"`` (a :mod:`qalgebra.isa` probe found this CPU computes it wrongly),
    ``"selfcheck"`` (the fused op disagreed with its reference, :mod:`qalgebra.selfcheck`) or
    ``"cost"`` (the layer computes faster in float here, :mod:`qalgebra.costcheck`).
    """

    def __init__(self, reason: str, *, cause: str = "rule") -> None:
        super().__init__(reason)
        self.cause = cause


class LoweringError(QAlgebraError):
    """`qalgebra.lower` refused its input."""


class InvalidQParamsError(LoweringError, ValueError):
    """Quantization parameters are invalid (scale <= 0 or NaN, zero point out of range...)."""


class UnsupportedGraphError(LoweringError):
    """The input is not something qalgebra can lower (not a GraphModule, ...)."""


class RewriteError(LoweringError):
    """A fusion's rewrite raised (a oneDNN error, a bug in replacement code) under
    ``lower(..., strict=True)``; chained to the cause. Without ``strict`` the rewrite is rolled
    back and reported instead."""

    def __init__(self, fusion: str, node: str, cause: str) -> None:
        super().__init__(fusion, node, cause)
        self.fusion = fusion
        self.node = node
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.fusion} failed at {self.node}: {self.cause}"


class ExampleDatabaseError(QAlgebraError, ValueError):
    """The example database named for the properties cannot be used (unreachable server...)."""


class CatalogError(QAlgebraError, ValueError):
    """Fusions cannot be added to the catalog as asked (unknown anchor, a name taken, placement
    by containment contradictory) or loaded (no such file, module or name)."""
