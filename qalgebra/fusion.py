"""What a fusion is: a pattern, and typed replacement code for what it matches.

A :class:`Fusion` pairs a pattern (:mod:`qalgebra.pattern`, :mod:`qalgebra.combinators`) with
``rewrite(m, rw) -> fx.Node``, which

- reads the match's typed captures (``m[x_scale]`` is a ``float``, ``m[x]`` an ``fx.Node``);
- builds the replacement through the :class:`~qalgebra.rewriter.Rewriter` ``rw``, each op call
  by keyword through :mod:`qalgebra.emit` (``emit.aten.relu.default(rw, self=m[x])``): mypy
  checks the arguments against the op's schema, and so does the Rewriter when the rewrite runs;
- returns the node that takes the place of ``m.root`` (``m.root`` itself: nothing replaced);
- refuses a match it cannot lower exactly by raising :class:`~qalgebra.errors.Refusal`, or with
  ``require(check, m)`` (:mod:`qalgebra.checks`): the lowering rolls the rewrite back and lists
  the reason in its report. Any other exception is rolled back too (``report.failed``).

>>> import torch
>>> from torch import fx
>>> from qalgebra import Match, Rewriter, Var, call, emit
>>> from qalgebra.lower import lower_with_report
>>> aten = torch.ops.aten
>>> x = Var("x", fx.Node)
>>> def one_relu(m: Match, rw: Rewriter) -> fx.Node:
...     return emit.aten.relu.default(rw, self=m[x])
>>> RELU_RELU = Fusion(
...     "relu_relu", "demo", call(aten.relu.default, call(aten.relu.default, x)), one_relu
... )
>>> class Twice(torch.nn.Module):
...     def forward(self, t: torch.Tensor) -> torch.Tensor:
...         return aten.relu.default(aten.relu.default(t))
>>> lowered, report = lower_with_report(fx.symbolic_trace(Twice()), (torch.randn(4),),
...                                     fusions=(RELU_RELU,))
>>> calls = [str(n.target) for n in lowered.graph.nodes if n.op == "call_function"]
>>> report.fired["relu_relu"], calls
(1, ['aten.relu.default'])

**Where a fusion goes** in the order ``lower(gm, inputs, fusions=...)`` applies them: each
fusion runs over the whole graph before the next, and a match is tried at every root from the
end of the graph backwards, so within one fusion a larger match wins over those it contains.
Across fusions, a pattern goes before any pattern it contains or overlaps (the catalog puts
``int8 output`` before ``float output``, binary before unary), after the rewrites that give it
the spelling it is written in (the catalog's first fusions make in-place ops functional, drop
eval dropouts and give each consumer its own dequantize), and before ``view_as_reshape``.
``qalgebra.fusions.DEFAULT_FUSIONS`` lists the catalog in its order, with the reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from qalgebra.match import Matcher
from qalgebra.pattern import Match, Pattern
from qalgebra.rewriter import Rewriter

__all__ = ["DOC_WIDTH", "Fusion", "Rewrite"]

#: Replacement code: the match and the transaction to build through; the node taking the place
#: of ``m.root``.
Rewrite = Callable[[Match, Rewriter], fx.Node]

#: A derived ``doc`` is cut to this many characters.
DOC_WIDTH = 120


@dataclass(frozen=True, slots=True)
class Fusion:
    """One catalog entry: a pattern, and the typed code that replaces what it matches.

    A fusion compiles its pattern once, when it is made (``matcher``: the lowering matches
    through it), and describes itself from its pattern: ``describe()`` is the pattern's short
    description; ``doc`` defaults to its first line, cut to a line's length.

    ``exclusive`` (the default): a match is taken only if its inner nodes -- every matched node
    but the root -- are read by nothing outside it. Replacing the root of a match whose inner
    dequantize also feeds another op would leave that dequantize (and all above it) computed
    for the other reader: the fused op then costs more than it saves. The matcher passes such
    a match over and tries the next way to match at that root. Turn it off for a fusion that
    keeps what it matched (dequant promotion copies a shared dequantize, clone elision returns
    an inner node) or that decides itself which outside readers are fine
    (:func:`qalgebra.checks.closed` in the pattern, or a check in ``rewrite``).

    ``essential``: a rewrite that fails (not a refusal) fails the whole lowering, for fix-ups
    the lowered graph cannot run without.

    >>> import torch
    >>> from qalgebra import Var, call
    >>> relu = Fusion("relu", "demo", call(torch.ops.aten.relu.default, Var("x", fx.Node)),
    ...               lambda m, rw: m.root)
    >>> relu.doc
    'aten.relu.default(x)'
    """

    name: str
    family: str
    pattern: Pattern
    rewrite: Rewrite
    #: What is replaced with what, in one line for people (``qalgebra catalog``).
    doc: str = ""
    #: Inner nodes of a match must be read only inside it (else fusing would compute them
    #: twice); off for fusions that keep their inner nodes (promotion, clone elision).
    exclusive: bool = True
    #: A failed rewrite (not a refusal) fails the lowering even without ``strict``: for fix-ups
    #: the lowered graph cannot run without (view respelling after channels_last convs).
    essential: bool = False
    #: The pattern compiled: its plans and indexes, kept for every lowering.
    matcher: Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", Matcher(self.pattern))
        if not self.doc:
            object.__setattr__(self, "doc", _first_line(self.pattern.describe()))

    def describe(self) -> str:
        """The pattern in English, each shared part once (see :mod:`qalgebra.sharing`)."""
        return self.pattern.describe()

    def __repr__(self) -> str:
        return f"<Fusion {self.name} ({self.family})>"


def _first_line(text: str) -> str:
    line = text.split("\n", 1)[0]
    return line if len(line) <= DOC_WIDTH else line[: DOC_WIDTH - 3] + "..."
