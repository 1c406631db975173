"""The former home of :class:`Fusion`, :class:`Rewriter` and :class:`Refusal`, kept so that
imports written against it still work: they live in :mod:`qalgebra.fusion`,
:mod:`qalgebra.rewriter` and :mod:`qalgebra.errors` (all three exported by ``qalgebra``).
"""

from qalgebra.errors import Refusal
from qalgebra.fusion import DOC_WIDTH, Fusion
from qalgebra.rewriter import Rewriter

__all__ = ["DOC_WIDTH", "Fusion", "Refusal", "Rewriter"]
