"""Hypothesis strategies for the quantized pointwise family and quant lift-up.

Each drawn value is a :class:`PointwiseExample`: a small GraphModule built directly with
``fx.Graph`` (``meta['val']`` on every node; milliseconds per example), its inputs, the form it
is spelled in, and what the lowering must do with it -- :class:`Expected`: exact counts
of the pointwise / lift-up fusions, substrings of the refusal reasons that must be reported, and
one bound per output. The shape (``family``, ``form``, ``gm``, ``inputs``, ``expected.fired``,
``expected.refusals``, ``expected.allowed_refusals``, ``expected.outputs``) matches the
conv/linear strategies' ``Example``, so one property checker serves both; :data:`FAMILIES` maps
each family name to a factory taking ``forms=``.

Every graph is ``float input(s) -> quantize -> [dequantize] -> op -> quantize`` and returns the
last quantize's int8 tensor (or its dequantized value): the lowering is exact on these graphs,
so every output must equal the reference bit for bit.

- :func:`quantizations`: per-tensor qparams -- log-uniform scale, any zero point in range (0
  preferred when shrinking), uint8 0..255 or 7-bit 0..127 (reduce_range), or int8;
- :func:`qmaxpool2d_specs`: a 4-D pool, random kernel / stride (or ``[]``) / padding /
  dilation / ceil_mode, spelled ``max_pool2d`` (trailing defaults dropped, as export does),
  ``max_pool2d_with_indices -> getitem 0`` or (when registered) Inductor's low-memory pool;
  equal or unequal qparams, uint8 or int8, indices read or not, from a dequantize or (lift-up
  over a pool) from a float ``relu``;
- :func:`qcat_specs`: 2-4 inputs of random shapes along a random dim, each quantized like the
  output or one of them not;
- :func:`movement_specs`: 1-3 movements (view/reshape/_unsafe_view/flatten/permute/transpose)
  from a dequantize (``qreshape``, and lift-up over the later movements) or from a float tensor
  (lift-up);
- :func:`pointwise_examples`: any of them, built in any of :data:`FORMS`.

>>> q = QuantSpec(0.05, 64, 0, 127, torch.uint8)
>>> spec = CatSpec(shapes=((1, 2), (1, 3)), dim=1, quants=(q, q), out_quant=q)
>>> ex = build_example(spec, "decomposed")
>>> ex.family, ex.expected.fired["qcat"], ex.expected.refusals
('qcat', 1, ())
>>> pointwise_examples(["qcat"], forms=["decomposed"])  # a strategy of such examples
builds(build_example, qcat_specs(), sampled_from(['decomposed', ...]))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import torch
import torch.ao.quantization.fx._decomposed
from hypothesis import assume
from hypothesis import strategies as st
from torch import fx

from qalgebra.fusions.pointwise import LOW_MEMORY_MAX_POOL
from qalgebra.testing import forms as _forms
from qalgebra.testing.strategies import (
    PRIMARY_FORMS,
    SCRIPT_CHECK,
    Example,
    Expected,
    Modifier,
    OutputBound,
    QuantSpec,
    form_name,
)

__all__ = [
    "EXACT",
    "FAMILIES",
    "FORMS",
    "POINTWISE_FUSIONS",
    "CatSpec",
    "MaxPoolSpec",
    "Move",
    "MovementSpec",
    "PointwiseExample",
    "build_example",
    "movement_specs",
    "pointwise_examples",
    "qcat_specs",
    "qmaxpool2d_specs",
    "quantizations",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

#: The fusions whose counts every example pins.
POINTWISE_FUSIONS: tuple[str, ...] = (
    "qmaxpool2d",
    "qcat",
    "qreshape",
    "quant_lift_up",
    "quant_lift_up_max_pool",
)

#: Forms an example may be drawn in: ``primary`` or ``primary+modifier``, the primaries those
#: of the conv/linear strategies (:data:`qalgebra.testing.strategies.PRIMARY_FORMS`).
MODIFIERS: tuple[Modifier, ...] = (
    Modifier.NONE,
    Modifier.SHARED_DEQUANTS,
    Modifier.VIEW_VIEW,
    Modifier.VIEW_RESHAPE,
    Modifier.VIEW_UNSAFE_VIEW,
)
FORMS: tuple[str, ...] = tuple(form_name(p, m) for p in PRIMARY_FORMS for m in MODIFIERS)

#: The refusal reasons (substrings) the fusions give.
DIFFERENT_QPARAMS = "must be quantized alike"
NOT_UINT8 = "expected one of (torch.uint8,)"
INDICES_READ = "reads the indices"


# --------------------------------------------------------------------------------------------
# What an example is
# --------------------------------------------------------------------------------------------


#: Every output of a pointwise example: int8 values moved or selected, so bit-identical.
EXACT = OutputBound("exact", why="the pointwise family moves or selects int8 values: exact")
#: Why a max pool's index output may hold anything where a window reads padding only.
PADDING_ONLY = (
    "exact, but a window of padding only has no index (eager writes one, Inductor -1)"
)


@dataclass(frozen=True, eq=False)
class PointwiseExample(Example):
    """An :class:`~qalgebra.testing.strategies.Example` whose ``repr`` (its recipe) rebuilds it
    from its spec, and whose :meth:`code` is that recipe and the graph."""

    def __repr__(self) -> str:
        return self.recipe or f"<PointwiseExample {self.family} in form {self.form}>"

    def code(self) -> str:
        """A standalone script: rebuild the example from its recipe, and check every property
        when run (the graph it is, as comments, for failure reports)."""
        return (
            "import torch\n\n"
            "from qalgebra.testing.strategies import QuantSpec\n"
            f"from {type(self).__module__} import *\n\n"
            f"example = {self.recipe}\n"
            f"# expected: {self.expected!r}\n"
            + "\n".join(f"# {line}" for line in str(self.gm.graph).splitlines())
            + "\n\nif __name__ == '__main__':\n"
            f"    {SCRIPT_CHECK[0]}\n\n"
            f"    {SCRIPT_CHECK[1]}  # raises on a failing property\n"
        )


# --------------------------------------------------------------------------------------------
# Specs (frozen; repr is Python that rebuilds them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaxPoolSpec:
    """``[dequant(quant(x)) | relu(x)] -> max_pool2d -> quant``; ``also_read``: the pool's input
    is also a graph output (a dequantize with another reader, or a relu the lift cannot pass)."""

    shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, ...]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    spelling: Literal["max_pool2d", "with_indices", "low_memory"]
    source: Literal["dequant", "relu"]
    x_quant: QuantSpec
    out_quant: QuantSpec
    indices_read: bool = False
    also_read: bool = False
    returns: Literal["quantized", "dequantized"] = "quantized"
    seed: int = 0


@dataclass(frozen=True, slots=True)
class CatSpec:
    """``cat([dequant(quant(x_i)) ...], dim) -> quant``; ``also_read``: the first dequantize is
    also a graph output."""

    shapes: tuple[tuple[int, ...], ...]
    dim: int
    quants: tuple[QuantSpec, ...]
    out_quant: QuantSpec
    also_read: bool = False
    returns: Literal["quantized", "dequantized"] = "quantized"
    seed: int = 0


MoveKind: TypeAlias = Literal["view", "reshape", "unsafe_view", "flatten", "permute", "transpose"]


@dataclass(frozen=True, slots=True)
class Move:
    """One movement: ``kind`` and its arguments (shape, dims, or start/end / dim0/dim1)."""

    kind: MoveKind
    args: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MovementSpec:
    """``[dequant(quant(x)) | relu(x) | x] -> move -> ... -> quant``; ``also_read``: the source
    is also a graph output (never for ``x``: an output may not be an input)."""

    shape: tuple[int, ...]
    moves: tuple[Move, ...]
    source: Literal["dequant", "relu", "input"]
    x_quant: QuantSpec
    out_quant: QuantSpec
    also_read: bool = False
    returns: Literal["quantized", "dequantized"] = "quantized"
    seed: int = 0


Spec: TypeAlias = MaxPoolSpec | CatSpec | MovementSpec


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _input(seed: int, shape: Sequence[int], q: QuantSpec) -> torch.Tensor:
    """Values spread over (a little beyond) the quantization's range, so the clamp matters."""
    gen = torch.Generator().manual_seed(seed)
    low = (q.quant_min - q.zero_point - 4) * q.scale
    high = (q.quant_max - q.zero_point + 4) * q.scale
    return torch.rand(tuple(shape), generator=gen) * (high - low) + low


class _Graph:
    """Builds an example graph; ``finish`` adds ``meta['val']`` on every node (fake tensors)."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.inputs: list[torch.Tensor] = []

    def placeholder(self, value: torch.Tensor) -> fx.Node:
        self.inputs.append(value)
        return self.graph.placeholder(f"x{len(self.inputs) - 1}")

    def call(self, target: Any, *args: Any) -> fx.Node:
        return self.graph.call_function(target, args)

    def quant(self, x: fx.Node, q: QuantSpec) -> fx.Node:
        return self.call(qd.quantize_per_tensor.default, x, *q.args())

    def dequant(self, x: fx.Node, q: QuantSpec) -> fx.Node:
        return self.call(qd.dequantize_per_tensor.default, x, *q.args())

    def returned(self, out: fx.Node, q: QuantSpec, returns: str) -> fx.Node:
        return self.dequant(out, q) if returns == "dequantized" else out

    def finish(self, *outputs: fx.Node) -> fx.GraphModule:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.graph.output(outputs[0] if len(outputs) == 1 else outputs)
        gm = fx.GraphModule(torch.nn.Module(), self.graph)
        mode = FakeTensorMode()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, self.inputs, strict=True):
            node.meta["val"] = mode.from_tensor(value)
        if not _forms._propagate_meta(gm):  # with_meta, in place: the module is ours
            raise ValueError("fake-tensor propagation failed on a pointwise example")
        return gm


def _fired(**counts: int) -> dict[str, int]:
    fired = dict.fromkeys(POINTWISE_FUSIONS, 0)
    fired.update(counts)
    return fired


def _pool_args(spec: MaxPoolSpec) -> list[object]:
    """The pool's arguments with trailing defaults dropped (as export writes them)."""
    args: list[object] = [
        list(spec.kernel),
        list(spec.stride),
        list(spec.padding),
        list(spec.dilation),
        spec.ceil_mode,
    ]
    defaults: list[object] = [None, [], [0, 0], [1, 1], False]
    while len(args) > 1 and args[-1] == defaults[len(args) - 1]:
        args.pop()
    return args


def _build_max_pool(spec: MaxPoolSpec) -> tuple[fx.GraphModule, Expected]:
    b = _Graph()
    x = b.placeholder(_input(spec.seed, spec.shape, spec.x_quant))
    if spec.source == "dequant":
        src = b.dequant(b.quant(x, spec.x_quant), spec.x_quant)
    else:
        src = b.call(aten.relu.default, x)
    indices: list[fx.Node] = []
    if spec.spelling == "max_pool2d":
        pooled = b.call(aten.max_pool2d.default, src, *_pool_args(spec))
    else:
        if spec.spelling == "low_memory":
            pool = b.call(
                LOW_MEMORY_MAX_POOL.resolve(),
                src,
                list(spec.kernel),
                list(spec.stride or spec.kernel),  # Inductor spells out the default stride
                list(spec.padding),
                list(spec.dilation),
                spec.ceil_mode,
            )
        else:
            pool = b.call(aten.max_pool2d_with_indices.default, src, *_pool_args(spec))
        pooled = b.call(operator.getitem, pool, 0)
        if spec.indices_read:
            indices.append(b.call(operator.getitem, pool, 1))
    out = b.quant(pooled, spec.out_quant)
    extra = [*indices, src] if spec.also_read else indices
    gm = b.finish(b.returned(out, spec.out_quant, spec.returns), *extra)

    # A relu with another reader is not lifted from: no match, so nothing fires or is refused.
    matches = spec.source == "dequant" or not spec.also_read
    refusals: list[str] = []
    if not matches:
        pass
    elif spec.out_quant.dtype != torch.uint8:
        refusals.append(NOT_UINT8)
    elif spec.source == "dequant" and not spec.x_quant.alike(spec.out_quant):
        refusals.append(DIFFERENT_QPARAMS)
    elif spec.indices_read:
        refusals.append(INDICES_READ)
    fusion = "qmaxpool2d" if spec.source == "dequant" else "quant_lift_up_max_pool"
    fired = _fired(**{fusion: int(matches and not refusals)})
    outputs = [EXACT] * (1 + len(extra))
    if indices:
        outputs[1] = _indices_bound(spec, gm, b.inputs)
    return gm, Expected(fired, tuple(refusals), outputs=tuple(outputs))


def _indices_bound(
    spec: MaxPoolSpec, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]
) -> OutputBound:
    """The index output's bound: exact where a window reads an element of the input; any
    value where it reads padding only (a dilated window can step over the input), which
    PyTorch leaves to the kernel (found by ``qalgebra fuzz --compiled``)."""
    stride = spec.stride or spec.kernel
    args = (spec.kernel, stride, spec.padding, spec.dilation, spec.ceil_mode)
    padding_only = torch.nn.functional.max_pool2d(torch.ones(spec.shape), *args) == -math.inf
    if not bool(padding_only.any()):
        return EXACT
    with torch.no_grad():
        reference = gm(*inputs)[1].double()
    anything = torch.full_like(reference, 2.0**40)
    interval = (
        torch.where(padding_only, -anything, reference),
        torch.where(padding_only, anything, reference),
    )
    return OutputBound("quantized", interval=interval, why=PADDING_ONLY)


def _build_cat(spec: CatSpec) -> tuple[fx.GraphModule, Expected]:
    b = _Graph()
    dequants = []
    for i, (shape, q) in enumerate(zip(spec.shapes, spec.quants, strict=True)):
        x = b.placeholder(_input(spec.seed + i, shape, q))
        dequants.append(b.dequant(b.quant(x, q), q))
    out = b.quant(b.call(aten.cat.default, dequants, spec.dim), spec.out_quant)
    extra = dequants[:1] if spec.also_read else []
    gm = b.finish(b.returned(out, spec.out_quant, spec.returns), *extra)
    unlike = [i for i, q in enumerate(spec.quants) if not q.alike(spec.out_quant)]
    refusals = (f"cat input {unlike[0]} ",) if unlike else ()
    outputs = (EXACT,) * (1 + len(extra))
    return gm, Expected(_fired(qcat=int(not unlike)), refusals, outputs=outputs)


_MOVE_TARGETS: dict[str, Any] = {
    "view": aten.view.default,
    "reshape": aten.reshape.default,
    "unsafe_view": aten._unsafe_view.default,
    "permute": aten.permute.default,
}


def _move(b: _Graph, x: fx.Node, move: Move) -> fx.Node:
    if move.kind == "flatten":
        return b.call(aten.flatten.using_ints, x, *move.args)
    if move.kind == "transpose":
        return b.call(aten.transpose.int, x, *move.args)
    return b.call(_MOVE_TARGETS[move.kind], x, list(move.args))


def _build_movement(spec: MovementSpec) -> tuple[fx.GraphModule, Expected]:
    b = _Graph()
    x = b.placeholder(_input(spec.seed, spec.shape, spec.x_quant))
    if spec.source == "dequant":
        node = b.dequant(b.quant(x, spec.x_quant), spec.x_quant)
    elif spec.source == "relu":
        node = b.call(aten.relu.default, x)
    else:
        node = x
    extra = [node] if spec.also_read and spec.source != "input" else []
    outputs = (EXACT,) * (1 + len(extra))
    for move in spec.moves:
        node = _move(b, node, move)
    out = b.quant(node, spec.out_quant)
    gm = b.finish(b.returned(out, spec.out_quant, spec.returns), *extra)
    if spec.source != "dequant":
        # The whole chain lifts, unless its source has another reader; then the lift starts
        # after the first movement (a movement, read only by the next), if there is a next.
        lifts = not extra or len(spec.moves) > 1
        return gm, Expected(_fired(quant_lift_up=int(lifts)), outputs=outputs)
    # The lift passes the movements after the first (their chain starts at a movement, not at
    # the dequantize); the first one is qreshape's.
    alike = spec.x_quant.alike(spec.out_quant)
    fired = _fired(quant_lift_up=int(len(spec.moves) > 1), qreshape=int(alike))
    refusals = () if alike else (DIFFERENT_QPARAMS,)
    return gm, Expected(fired, refusals, outputs=outputs)


def build_example(spec: Spec, form: str = "op") -> PointwiseExample:
    """The example ``spec`` describes, spelled in ``form`` (one of :data:`FORMS`)."""
    if isinstance(spec, MaxPoolSpec):
        family = "qmaxpool2d" if spec.source == "dequant" else "quant_lift_up_max_pool"
        gm, expected = _build_max_pool(spec)
    elif isinstance(spec, CatSpec):
        family = "qcat"
        gm, expected = _build_cat(spec)
    else:
        family = "qreshape" if spec.source == "dequant" else "quant_lift_up"
        gm, expected = _build_movement(spec)
    primary, _, modifier = form.partition("+")
    names = [n for n in (primary, modifier) if n and n != "op"]  # "op" would only copy
    gm = _forms.respell(gm, *names) if names else gm
    inputs = tuple(_inputs_of(spec))  # the seeded tensors the graph was built for
    return PointwiseExample(
        family, form, gm, inputs, expected, recipe=f"build_example({spec!r}, {form!r})"
    )


def _inputs_of(spec: Spec) -> list[torch.Tensor]:
    if isinstance(spec, CatSpec):
        return [
            _input(spec.seed + i, shape, q)
            for i, (shape, q) in enumerate(zip(spec.shapes, spec.quants, strict=True))
        ]
    return [_input(spec.seed, spec.shape, spec.x_quant)]


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_RANGES: dict[torch.dtype, tuple[tuple[int, int], ...]] = {
    torch.uint8: ((0, 255), (0, 127)),
    torch.int8: ((-128, 127), (-64, 63)),
}


@st.composite
def quantizations(
    draw: st.DrawFn,
    dtypes: Sequence[torch.dtype] = (torch.uint8, torch.int8),
    like: QuantSpec | None = None,
) -> QuantSpec:
    """Per-tensor qparams; with ``like``, its scale, zero point and dtype in a drawn range."""
    if like is not None:
        ranges = [r for r in _RANGES[like.dtype] if r[0] <= like.zero_point <= r[1]]
        low, high = draw(st.sampled_from(ranges))
        return QuantSpec(like.scale, like.zero_point, low, high, like.dtype)
    dtype = draw(st.sampled_from(list(dtypes)))
    low, high = draw(st.sampled_from(_RANGES[dtype]))
    zero_point = draw(st.integers(low, high))  # shrinks towards 0
    exponent = draw(st.floats(-10.0, -2.0, allow_nan=False, allow_infinity=False))
    return QuantSpec(float(2.0**exponent), zero_point, low, high, dtype)


@st.composite
def _unlike(draw: st.DrawFn, q: QuantSpec) -> QuantSpec:
    """``q`` with another scale or zero point."""
    if draw(st.booleans()):
        factor = draw(st.sampled_from([0.5, 0.75, 1.5, 2.0, 3.0]))
        return QuantSpec(q.scale * factor, q.zero_point, q.quant_min, q.quant_max, q.dtype)
    shift = draw(st.sampled_from([-3, -1, 1, 2, 5]))
    zero_point = min(max(q.zero_point + shift, q.quant_min), q.quant_max)
    if zero_point == q.zero_point:
        zero_point = q.zero_point - shift if q.quant_min <= q.zero_point - shift else q.quant_max
    return QuantSpec(q.scale, zero_point, q.quant_min, q.quant_max, q.dtype)


@st.composite
def _related(draw: st.DrawFn, out: QuantSpec, alike: bool) -> QuantSpec:
    return draw(quantizations(like=out)) if alike else draw(_unlike(out))


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


@st.composite
def qmaxpool2d_specs(
    draw: st.DrawFn, sources: Sequence[Literal["dequant", "relu"]] = ("dequant", "relu")
) -> MaxPoolSpec:
    """A 4-D ``max_pool2d`` from a dequantize (``qmaxpool2d``) or a float relu (lift-up)."""
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 8)),
    )
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride: tuple[int, ...] = draw(
        st.one_of(st.just(()), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    )
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ceil_mode = draw(st.booleans())
    s = stride or kernel
    for i in range(2):
        assume(
            _pool_out_size(shape[2 + i], kernel[i], s[i], padding[i], dilation[i], ceil_mode) > 0
        )
    spellings: list[Literal["max_pool2d", "with_indices", "low_memory"]] = [
        "max_pool2d",
        "with_indices",
    ]
    if LOW_MEMORY_MAX_POOL.resolve() is not None:
        spellings.append("low_memory")
    spelling = draw(st.sampled_from(spellings))
    out_quant = draw(quantizations(dtypes=(torch.uint8, torch.uint8, torch.int8)))
    alike = draw(st.integers(0, 3)) > 0
    return MaxPoolSpec(
        shape=shape,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
        spelling=spelling,
        source=draw(st.sampled_from(list(sources))),
        x_quant=draw(_related(out_quant, alike)),
        out_quant=out_quant,
        indices_read=spelling != "max_pool2d" and draw(st.integers(0, 4)) == 0,
        also_read=draw(st.integers(0, 4)) == 0,
        returns=draw(st.sampled_from(["quantized", "dequantized"])),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def qcat_specs(draw: st.DrawFn) -> CatSpec:
    """``cat`` of 2-4 dequantized inputs; all quantized like the output, or one not."""
    rank = draw(st.integers(1, 4))
    base = [draw(st.integers(1, 3)) for _ in range(rank)]
    dim = draw(st.integers(-rank, rank - 1))
    n = draw(st.integers(2, 4))
    shapes = []
    for _ in range(n):
        shape = list(base)
        shape[dim] = draw(st.integers(1, 3))
        shapes.append(tuple(shape))
    out_quant = draw(quantizations())
    quants = [draw(quantizations(like=out_quant)) for _ in range(n)]
    if draw(st.integers(0, 2)) == 0:
        odd = draw(st.integers(0, n - 1))
        quants[odd] = draw(_unlike(out_quant))
    return CatSpec(
        shapes=tuple(shapes),
        dim=dim,
        quants=tuple(quants),
        out_quant=out_quant,
        also_read=draw(st.integers(0, 4)) == 0,
        returns=draw(st.sampled_from(["quantized", "dequantized"])),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def _moves(draw: st.DrawFn, shape: tuple[int, ...], n: int) -> tuple[Move, ...]:
    """``n`` valid movements of a tensor of ``shape``; no reshape after a permute/transpose
    (the ``view_*`` forms respell reshapes as views, which need a contiguous input)."""
    moves: list[Move] = []
    current = list(shape)
    permuted = False
    for _ in range(n):
        kinds: list[MoveKind] = ["flatten", "permute", "transpose"]
        if not permuted:
            kinds += ["view", "reshape", "unsafe_view"]
        kind = draw(st.sampled_from(kinds))
        rank = len(current)
        if kind == "flatten":
            start = draw(st.integers(0, rank - 1))
            end = draw(st.integers(start, rank - 1))
            size = math.prod(current[start : end + 1])
            moves.append(Move(kind, (start, end - rank if draw(st.booleans()) else end)))
            current = [*current[:start], size, *current[end + 1 :]]
        elif kind == "permute":
            dims = draw(st.permutations(list(range(rank))))
            moves.append(Move(kind, tuple(dims)))
            current = [current[d] for d in dims]
            permuted = True
        elif kind == "transpose":
            a, c = draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1))
            moves.append(Move(kind, (a, c)))
            current[a], current[c] = current[c], current[a]
            permuted = True
        else:
            keep = draw(st.integers(0, rank - 1))
            new = [*current[:keep], math.prod(current[keep:])]
            if draw(st.booleans()):
                new.append(1)
            spelled = list(new)
            if draw(st.booleans()):
                spelled[keep] = -1
            moves.append(Move(kind, tuple(spelled)))
            current = new
    return tuple(moves)


@st.composite
def movement_specs(
    draw: st.DrawFn,
    sources: Sequence[Literal["dequant", "relu", "input"]] = ("dequant", "relu", "input"),
) -> MovementSpec:
    """1-3 movements from a dequantize (``qreshape``) or from a float tensor (lift-up)."""
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    out_quant = draw(quantizations())
    alike = draw(st.integers(0, 3)) > 0
    return MovementSpec(
        shape=shape,
        moves=draw(_moves(shape, draw(st.integers(1, 3)))),
        source=draw(st.sampled_from(list(sources))),
        x_quant=draw(_related(out_quant, alike)),
        out_quant=out_quant,
        also_read=draw(st.integers(0, 4)) == 0,
        returns=draw(st.sampled_from(["quantized", "dequantized"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _specs(family: str) -> st.SearchStrategy[Spec]:
    if family == "qmaxpool2d":
        return qmaxpool2d_specs(sources=("dequant",))
    if family == "quant_lift_up_max_pool":
        return qmaxpool2d_specs(sources=("relu",))
    if family == "qcat":
        return qcat_specs()
    if family == "qreshape":
        return movement_specs(sources=("dequant",))
    return movement_specs(sources=("relu", "input"))


def _examples(family: str, forms: Sequence[str] | None) -> st.SearchStrategy[PointwiseExample]:
    allowed = [f for f in FORMS if forms is None or f in forms or f.split("+")[0] in forms]
    return st.builds(build_example, _specs(family), st.sampled_from(allowed or list(FORMS)))


def _factory(family: str) -> Callable[..., st.SearchStrategy[PointwiseExample]]:
    def factory(forms: Sequence[str] | None = None) -> st.SearchStrategy[PointwiseExample]:
        return _examples(family, forms)

    return factory


FAMILIES: Mapping[str, Callable[..., st.SearchStrategy[PointwiseExample]]] = MappingProxyType(
    {name: _factory(name) for name in POINTWISE_FUSIONS}
)
"""Each family by name (the fusion it exercises): ``FAMILIES[name](forms=None)``."""


def pointwise_examples(
    families: Sequence[str] | None = None, forms: Sequence[str] | None = None
) -> st.SearchStrategy[PointwiseExample]:
    """Examples of the named families (default: all of :data:`FAMILIES`) in ``forms``
    (entries of :data:`FORMS` or primary forms; None: any)."""
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    return st.one_of([FAMILIES[n](forms=forms) for n in names])
