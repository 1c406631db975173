"""Hypothesis strategies for the quantized reduction family (``qmean``): a plug-in family.

Each drawn value is a :class:`ReductionExample` (the shape of the pointwise family's examples:
``family``, ``form``, ``gm``, ``inputs``, ``expected``), so the shared property checker
(:mod:`qalgebra.testing.properties`) runs it: ``float input -> quantize -> dequantize ->
reduction -> quantize``, returning the last quantize's int8 tensor or its dequantized value.
The reduction is drawn from every spelling the fusion covers -- ``adaptive_avg_pool2d`` and
``_adaptive_avg_pool2d`` (3-D or 4-D input; output ``[1, 1]``, or a windowed size that must be
refused) and ``mean.dim`` over any dims, keepdim or not -- with input and output quantized alike
(what X86InductorQuantizer writes) or not, in uint8 or int8 (or int16, refused), in every form
of :data:`qalgebra.testing.pointwise_strategies.FORMS`.

Numerics: the lowered mean is exact to within one step (``OutputBound`` of one step, or one
output scale for a dequantized output), and :meth:`ReductionExample.check_outputs` demands
more: every output element whose exact value -- the mean of the integer levels, in float64 --
is not within ``TIE_TOLERANCE`` of a rounding boundary must equal its correctly rounded level.
A truncation, a dropped zero point or a swapped scale cannot hide under the one-step bound.

>>> q = QuantSpec(0.05, 3, 0, 255, torch.uint8)
>>> spec = MeanSpec((2, 3, 5, 5), "adaptive_avg_pool2d", (1, 1), (), True, q, q)
>>> ex = build_example(spec, "decomposed")
>>> ex.family, ex.expected.fired["qmean"], ex.expected.refusals
('qmean', 1, ())
>>> reduction_examples(forms=["op"])  # a strategy of such examples
builds(build_example, mean_specs(), sampled_from(['op', ...]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
import torch.ao.quantization.fx._decomposed
from hypothesis import strategies as st
from torch import fx

from qalgebra.testing import forms as _forms
from qalgebra.testing.pointwise_strategies import (
    FORMS,
    PointwiseExample,
    _Graph,  # the pointwise examples' graph builder (fake-tensor meta on every node)
    quantizations,
)
from qalgebra.testing.pointwise_strategies import (
    _input as _spread,  # their inputs: spread a little beyond the quantization's range
)
from qalgebra.testing.strategies import Expected, OutputBound, QuantSpec

__all__ = [
    "FAMILIES",
    "GLOBAL_POOL_ONLY",
    "READ_TWICE",
    "REDUCTION_FUSIONS",
    "TIE_RELATIVE",
    "TIE_TOLERANCE",
    "UNSUPPORTED_DTYPE",
    "MeanSpec",
    "Reduction",
    "ReductionExample",
    "build_example",
    "exact_levels",
    "mean_specs",
    "reduction_examples",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

#: The fusions whose counts every example pins.
REDUCTION_FUSIONS: tuple[str, ...] = ("qmean",)

#: The refusal reasons (substrings) the fusion gives.
GLOBAL_POOL_ONLY = "only a global average pool"
READ_TWICE = "lowering would compute it twice"
UNSUPPORTED_DTYPE = "expected one of (torch.uint8, torch.int8)"

#: How close (in output levels, plus this much relative to the value) an exact value may lie to
#: a rounding boundary and still round either way: the reference and the lowering both compute
#: in float32 (a few roundings of relative 6e-8 each, and the reference's float sums).
TIE_TOLERANCE = 1e-3
TIE_RELATIVE = 1e-5

Reduction = Literal["adaptive_avg_pool2d", "_adaptive_avg_pool2d", "mean"]

_POOLS = {
    "adaptive_avg_pool2d": aten.adaptive_avg_pool2d.default,
    "_adaptive_avg_pool2d": aten._adaptive_avg_pool2d.default,
}


@dataclass(frozen=True, slots=True)
class MeanSpec:
    """``dequant(quant(x)) -> reduction -> quant``; ``output_size`` for a pool, ``dims`` and
    ``keepdim`` for a mean. ``also_read``: the float reduction is also a graph output (refused);
    ``dequant_also_read``: the dequantize is (fires: the int8 mean reads the int8 tensor)."""

    shape: tuple[int, ...]
    reduction: Reduction
    output_size: tuple[int, ...]
    dims: tuple[int, ...]
    keepdim: bool
    x_quant: QuantSpec
    out_quant: QuantSpec
    also_read: bool = False
    dequant_also_read: bool = False
    returns: Literal["quantized", "dequantized"] = "quantized"
    seed: int = 0

    @property
    def reduced_dims(self) -> tuple[list[int], bool]:
        """The dims the reduction averages over, and whether it keeps them."""
        if self.reduction == "mean":
            return list(self.dims), self.keepdim
        return [-1, -2], True

    @property
    def is_global(self) -> bool:
        return self.reduction == "mean" or all(s == 1 for s in self.output_size)


def _input(spec: MeanSpec) -> torch.Tensor:
    """Values spread over (a little beyond) the input quantization's range."""
    return _spread(spec.seed, spec.shape, spec.x_quant)


def exact_levels(spec: MeanSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output levels the reduction of ``x`` rounds to exactly, and where the exact value
    lies within :data:`TIE_TOLERANCE` (+ :data:`TIE_RELATIVE`) of a rounding boundary (either
    neighbour is right there)."""
    xq, oq = spec.x_quant, spec.out_quant
    levels = qd.quantize_per_tensor.default(x, *xq.args()).to(torch.float64)
    dims, keepdim = spec.reduced_dims
    exact = (levels.mean(dims, keepdim=keepdim) - xq.zero_point) * (xq.scale / oq.scale)
    fraction = exact - exact.floor()
    near_tie = (fraction - 0.5).abs() < TIE_TOLERANCE + TIE_RELATIVE * exact.abs()
    rounded = (exact.round() + oq.zero_point).clamp(oq.quant_min, oq.quant_max)
    return rounded, near_tie


@dataclass(frozen=True, eq=False)
class ReductionExample(PointwiseExample):
    """A pointwise-style example that also checks its outputs against the exact mean."""

    spec: MeanSpec = field(kw_only=True)

    def check_outputs(
        self, reference: Sequence[torch.Tensor], lowered: Sequence[torch.Tensor]
    ) -> str | None:
        """Where the exact value is not near a rounding boundary, the lowered level is it."""
        if not self.expected.fired["qmean"]:
            return None  # left unlowered: the exact bound of every output applies
        want, near_tie = exact_levels(self.spec, self.inputs[0])
        got = lowered[0]
        oq = self.spec.out_quant
        if got.is_floating_point():  # a dequantized output: back to levels
            got = (got.double() / oq.scale).round() + oq.zero_point
        wrong = (got.double() != want) & ~near_tie
        if bool(wrong.any()):
            at = [int(i) for i in wrong.nonzero()[0]]
            return (
                f"output 0 at {at}: level {float(got[tuple(at)])}, the exact mean rounds to "
                f"{float(want[tuple(at)])} ({int(wrong.sum())} such elements)"
            )
        return None


def _expected(spec: MeanSpec) -> Expected:
    unsupported = spec.x_quant.dtype not in (torch.uint8, torch.int8)
    refusals: tuple[str, ...] = ()
    if spec.also_read:
        refusals = (READ_TWICE,)
    elif unsupported:
        refusals = (UNSUPPORTED_DTYPE,)
    elif not spec.is_global:
        refusals = (GLOBAL_POOL_ONLY,)
    fires = not refusals
    oq = spec.out_quant
    if not fires:
        main = OutputBound("exact", why="left unlowered: the reference's own ops")
    elif spec.returns == "quantized":
        main = OutputBound("quantized", steps=1, why="a float-rounding tie moves one step")
    else:
        # one step, plus the float32 rounding of the two dequantized values compared: up to
        # an ulp of the largest level's value (a step at -38.4 measured 0.224487 against a
        # scale of 0.224484 in a fuzz campaign)
        rounding = 2 * torch.finfo(torch.float32).eps * oq.max_abs_level * oq.scale
        main = OutputBound(
            "float", atol=oq.scale * (1 + 1e-5) + rounding, why="one step of the output"
        )
    extra = (OutputBound("exact", why="a value the lowering does not replace"),) * (
        int(spec.also_read) + int(spec.dequant_also_read)
    )
    return Expected({"qmean": int(fires)}, refusals, outputs=(main, *extra))


def _graph(spec: MeanSpec) -> fx.GraphModule:
    b = _Graph()
    x = b.placeholder(_input(spec))
    dequant = b.dequant(b.quant(x, spec.x_quant), spec.x_quant)
    if spec.reduction == "mean":
        reduced = b.call(aten.mean.dim, dequant, list(spec.dims), spec.keepdim)
    else:
        reduced = b.call(_POOLS[spec.reduction], dequant, list(spec.output_size))
    out = b.quant(reduced, spec.out_quant)
    extra = [reduced] if spec.also_read else []
    if spec.dequant_also_read:
        extra.append(dequant)
    return b.finish(b.returned(out, spec.out_quant, spec.returns), *extra)


def build_example(spec: MeanSpec, form: str = "op") -> ReductionExample:
    """The example ``spec`` describes, spelled in ``form`` (one of :data:`FORMS`)."""
    gm = _graph(spec)
    primary, _, modifier = form.partition("+")
    names = [n for n in (primary, modifier) if n and n != "op"]
    gm = _forms.respell(gm, *names) if names else gm
    recipe = f"build_example({spec!r}, {form!r})"
    inputs = (_input(spec),)
    return ReductionExample("qmean", form, gm, inputs, _expected(spec), recipe, spec=spec)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_INT16 = (torch.int16, -(2**15), 2**15 - 1)


@st.composite
def _x_quant(draw: st.DrawFn, out: QuantSpec) -> QuantSpec:
    """The input's qparams: the output's (what the quantizer shares), others, or int16."""
    kind = draw(st.integers(0, 7))  # (Hypothesis favours the ends of a range)
    if kind == 4:
        dtype, low, high = _INT16
        return QuantSpec(out.scale, draw(st.integers(-300, 300)), low, high, dtype)
    if kind in (2, 5):
        return draw(quantizations())
    return draw(quantizations(like=out))


@st.composite
def mean_specs(draw: st.DrawFn) -> MeanSpec:
    """A reduction of a 2-D to 4-D dequantized tensor, in any spelling the fusion covers."""
    reduction: Reduction = draw(st.sampled_from(["adaptive_avg_pool2d", "_adaptive_avg_pool2d"]))
    if draw(st.booleans()):
        reduction = "mean"
    rank = draw(st.integers(2, 4)) if reduction == "mean" else draw(st.integers(3, 4))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(rank))
    output_size: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()
    if reduction == "mean":
        chosen = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
        dims = tuple(d - rank if draw(st.booleans()) else d for d in chosen)
    else:
        windowed = draw(st.integers(0, 4)) == 2
        output_size = (2, draw(st.integers(1, 2))) if windowed else (1, 1)
    out_quant = draw(quantizations())
    return MeanSpec(
        shape=shape,
        reduction=reduction,
        output_size=output_size,
        dims=dims,
        keepdim=draw(st.booleans()),
        x_quant=draw(_x_quant(out_quant)),
        out_quant=out_quant,
        also_read=draw(st.integers(0, 5)) == 3,
        dequant_also_read=draw(st.integers(0, 4)) == 0,
        returns=draw(st.sampled_from(["quantized", "dequantized"])),
        seed=draw(st.integers(0, 2**16)),
    )


def reduction_examples(forms: Sequence[str] | None = None) -> st.SearchStrategy[ReductionExample]:
    """Examples of the ``qmean`` family in ``forms`` (entries of :data:`FORMS` or primary
    forms; None: any)."""
    allowed = [f for f in FORMS if forms is None or f in forms or f.split("+")[0] in forms]
    return st.builds(build_example, mean_specs(), st.sampled_from(allowed or list(FORMS)))


FAMILIES: Mapping[str, Callable[..., st.SearchStrategy[ReductionExample]]] = MappingProxyType(
    {"qmean": reduction_examples}
)
"""The family by name (the fusion it exercises): ``FAMILIES["qmean"](forms=None)``."""
