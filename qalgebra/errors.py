"""The qalgebra exception hierarchy.

Everything qalgebra raises on purpose derives from :class:`QAlgebraError`, so callers can catch one
type. Subclasses say which phase refused: building a pattern, matching, or lowering a graph.
"""

from __future__ import annotations

__all__ = [
    "ExampleDatabaseError",
    "InvalidQParamsError",
    "LoweringError",
    "MatchError",
    "PatternError",
    "QAlgebraError",
    "RewriteError",
    "UnsupportedGraphError",
]


class QAlgebraError(Exception):
    """Root of every error qalgebra raises deliberately."""


class PatternError(QAlgebraError, TypeError):
    """A pattern was malformed at construction (bad target, Var typed twice, bad optional...)."""


class MatchError(QAlgebraError, LookupError):
    """A match result was used wrongly (reading a Var the match did not bind, ...)."""


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
