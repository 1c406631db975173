"""Hypothesis strategies that build random quantized ``torch.fx`` graphs, and what they expect.

Each drawn value is an :class:`Example`: a GraphModule built directly with ``fx.Graph`` (no
quantizer run: an example costs milliseconds), its example inputs, the form it is spelled in,
its family, and what the lowering must do with it -- the fusions that must fire, the refusals
that must be reported, and how close each output must stay to the reference -- all derived from
what was generated. ``example.code()`` is a standalone Python script that rebuilds the graph and
checks it (for failure reports); ``repr(example)`` is the expression that rebuilds the example.

>>> q = QuantSpec(scale=0.02, zero_point=0, quant_min=0, quant_max=127, dtype=torch.uint8)
>>> spec = GraphSpec("qconv", (1, 3, 6, 6), q, Layer(ConvSpec(3, 4, (3, 3)), Unary.RELU))
>>> ex = build_example(spec, form="decomposed")
>>> ex.family, ex.form, ex.expected.fired["qconv"]
('qconv', 'decomposed', 1)
>>> ex.expected.outputs[0].kind
'float'

Strategies (public factories; the classes behind them are plain frozen dataclasses):

- :func:`quant_specs`: per-tensor quantization parameters -- scales log-uniform, zero points
  anywhere in range (0 included and preferred when shrinking), uint8 or int8 ranges;
- :func:`conv_specs`, :func:`linear_specs`: conv2d geometry (channels, kernel, stride, padding,
  dilation, groups incl. depthwise) and linear shapes (bias or not, every spelling);
- :func:`graph_specs`: a quantized block ``dequant -> conv|linear -> post-op -> [add other
  -> relu] -> [quant]``, optionally read by a second layer (a quantized tensor with two users),
  dequants shared or one per user, fp32 or int8-mixed-bf16, ``meta['val']`` on every node, on
  all but quantize/dequantize nodes (what ``convert_pt2e`` leaves) or on none;
- :func:`uncovered_specs`: graphs outside the catalog (float-only, or quantized ops it does not
  cover), which must come back equivalent;
- :func:`examples`: an :class:`Example` of any registered family, in any form of
  :data:`FORMS` (op form ``.default`` / ``.tensor``, decomposed with and without zero-point
  nodes, single clamp, each optionally respelled by one of :data:`MODIFIERS`).

Families plug in through :data:`FAMILIES` (name -> zero-argument factory of a strategy of
Examples): :func:`register_family` adds one; the modules named in :data:`PLUGIN_MODULES` (the
pointwise, weight-only, other-config and reduction families) are imported on first use and may
either call :func:`register_family` or define a ``FAMILIES`` mapping of their own.

Numerics bounds (:class:`OutputBound`), per element, from the values the graph computes. The
builder runs the reference while it builds and bounds, for every element of every value, how
far the lowered module may be from it (:mod:`qalgebra.testing.oracle`, "Per-element error
bounds"): a fused conv/linear multiplies exact int8 levels, where the reference multiplies its
inputs by the weights after rounding both (bf16: ``2**-8`` each; fp32: ``1e-5`` covers the
summation order), adds the bias and rounds the result, so the bound of an output element is
``|W| e_x + (u + 1e-5) sum|x||w| + u|b| + u|y|`` over its own row or window; post-ops map
it through exactly (monotone ones) or by their Lipschitz constant, and add their own rounding;
a fused quantize may produce any level between those of ``value - err`` and ``value + err``
(an int8 output is checked against that interval element by element; a reader sees the levels
that moved); where a kernel returns a bf16 float, both sides round. A float output must also
agree, on :data:`AGREE` of its elements, to the bound computed as if no level had moved
upstream.

Every CPU computes the examples alike: the probe ``qalgebra.isa.int8_pairs_saturate`` decides
what is refused (tests force it both ways), and where a layer that a saturating CPU would
refuse reads the graph's input, that input is drawn with levels every CPU computes exactly
(``qalgebra.isa.pair_safe_level``). A layer reading another layer's int8 output cannot be held
to that: when it fuses with levels a saturating CPU would not compute exactly, its output is
left unchecked (``why`` says so; decisions are still checked).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeAlias, get_args

import torch
import torch.ao.quantization.fx._decomposed
from hypothesis import assume
from hypothesis import strategies as st
from torch import fx

from qalgebra.combinators import Unary
from qalgebra.isa import (
    INT16_MAX,
    int8_pairs_saturate,
    pair_safe_level,
    qconv_single_column_stride_wrong,
)
from qalgebra.testing import forms as _forms
from qalgebra.testing import oracle
from qalgebra.testing.oracle import BoundLike

__all__ = [
    "FAMILIES",
    "FORMS",
    "MODIFIERS",
    "PLUGIN_MODULES",
    "PRIMARY_FORMS",
    "SCRIPT_CHECK",
    "TRACKED_FUSIONS",
    "BoundLike",
    "CaseExample",
    "ConvSpec",
    "DType",
    "Example",
    "ExampleLike",
    "Expected",
    "ExpectedLike",
    "GraphBuilder",
    "GraphSpec",
    "Layer",
    "LinearSpec",
    "LinearSpelling",
    "Modifier",
    "OutputBound",
    "PrimaryForm",
    "QuantSpec",
    "Residual",
    "Unary",
    "UncoveredSpec",
    "apply_form",
    "build_example",
    "conv_geometry_refusal",
    "conv_specs",
    "examples",
    "families",
    "flat_tensors",
    "form_name",
    "graph_code",
    "graph_specs",
    "layers",
    "linear_specs",
    "quant_specs",
    "register_family",
    "saturates",
    "uncovered_specs",
]

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed

DType: TypeAlias = Literal["fp32", "bf16"]
LinearSpelling: TypeAlias = Literal["linear", "matmul_permute", "matmul_t"]
MetaMode: TypeAlias = Literal["all", "export", "none"]
Returns: TypeAlias = Literal["quantized", "dequantized", "float", "none"]

#: Fusions whose counts an Example pins exactly (other catalog entries -- layout fix-ups,
#: accumulator clone elision -- are free to fire or not).
TRACKED_FUSIONS: tuple[str, ...] = (
    "qconv",
    "qlinear",
    "qconv_binary",
    "qlinear_binary",
    "dequant_promotion",
)


class PrimaryForm(enum.StrEnum):
    """The first respelling of an op-form example (:func:`apply_form`): how its
    quantize/dequantize nodes are spelled. A ``str``: ``PrimaryForm.DECOMPOSED == "decomposed"``."""

    OP = "op"
    TENSOR_QPARAMS = "tensor_qparams"
    TENSOR_QPARAMS_F32 = "tensor_qparams_f32"
    DECOMPOSED = "decomposed"
    DECOMPOSED_SINGLE_CLAMP = "decomposed_single_clamp"
    DECOMPOSED_KEEP_ZERO_ZP = "decomposed_keep_zero_zp"


class Modifier(enum.StrEnum):
    """A respelling applied after the primary form (``NONE``: none); a form is
    ``"primary+modifier"`` (:func:`form_name`)."""

    NONE = ""
    SHARED_DEQUANTS = "shared_dequants"
    WEIGHT_CLONE = "weight_clone"
    FP32_BEFORE_QUANT = "fp32_before_quant"
    DTYPE_PRIMS = "dtype_prims"
    DTYPE_TO_COPY = "dtype_to_copy"
    DTYPE_TO_DTYPE = "dtype_to_dtype"
    VIEW_VIEW = "view_view"
    VIEW_RESHAPE = "view_reshape"
    VIEW_UNSAFE_VIEW = "view_unsafe_view"


def form_name(primary: PrimaryForm | str, modifier: Modifier | str = Modifier.NONE) -> str:
    """The form's name, as :data:`FORMS` and ``Example.form`` hold it: ``primary[+modifier]``."""
    primary, modifier = str(PrimaryForm(primary)), str(Modifier(modifier))
    return f"{primary}+{modifier}" if modifier else primary


#: The first form applied to the op-form graph (names of ``qalgebra.testing.forms.FORMS``).
PRIMARY_FORMS: tuple[PrimaryForm, ...] = tuple(PrimaryForm)
#: Respellings applied after the primary form (``Modifier.NONE`` = none).
MODIFIERS: tuple[Modifier, ...] = tuple(Modifier)
#: Every form an example may be drawn in: ``primary`` or ``primary+modifier``.
FORMS: tuple[str, ...] = tuple(form_name(p, m) for p in PRIMARY_FORMS for m in MODIFIERS)

#: Modules of other families, imported on first use when present.
PLUGIN_MODULES: tuple[str, ...] = (
    "qalgebra.testing.pointwise_strategies",
    "qalgebra.testing.woq_strategies",
    "qalgebra.testing.config_strategies",
    "qalgebra.testing.reduce_strategies",
)

_CONV_UNARIES = (
    Unary.NONE,
    Unary.RELU,
    Unary.HARDTANH,
    Unary.RELU6,
    Unary.HARDSWISH,
    Unary.SILU,
)
_LINEAR_UNARIES = (*_CONV_UNARIES, Unary.GELU, Unary.GELU_TANH, Unary.LEAKY_RELU, Unary.TANH)
FLOAT_ATOL = 1e-6
"""Absolute floor of every float tolerance."""


# --------------------------------------------------------------------------------------------
# Specs: what a graph is made of (frozen, repr is Python that rebuilds them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """Per-tensor quantization parameters."""

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: torch.dtype

    @property
    def max_abs_level(self) -> int:
        """The largest ``|q - zero_point|`` the range allows."""
        return max(abs(self.quant_min - self.zero_point), abs(self.quant_max - self.zero_point))

    def args(self) -> tuple[float, int, int, int, torch.dtype]:
        return (self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype)

    def alike(self, other: QuantSpec) -> bool:
        """Same scale, zero point and dtype (the range may differ)."""
        return (self.scale, self.zero_point, self.dtype) == (
            other.scale,
            other.zero_point,
            other.dtype,
        )


@dataclass(frozen=True, slots=True)
class ConvSpec:
    """A conv2d: geometry, bias, and how the graph spells it."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    spelling: Literal["conv2d", "convolution"] = "conv2d"

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel[0] * self.kernel[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def out_features(self) -> int:
        return self.out_channels

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        n, _, *spatial = input_shape
        out = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                spatial, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        ]
        return (n, self.out_channels, *out)


@dataclass(frozen=True, slots=True)
class LinearSpec:
    """A linear, spelled ``aten.linear`` or as export decomposes it (``[view] addmm|mm [view]``
    with the weight transposed by ``permute`` or ``t``)."""

    in_features: int
    out_features: int
    bias: bool = True
    spelling: LinearSpelling = "linear"

    @property
    def fan_in(self) -> int:
        return self.in_features

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*input_shape[:-1], self.out_features)


@dataclass(frozen=True, slots=True)
class Layer:
    """A quantized conv or linear and its post-op; weights are int8 per-channel symmetric.

    Weights are drawn uniformly in ``[-weight_max, weight_max]`` and per-channel scales in
    ``weight_scale * [1, 4]`` from ``seed``; the bias (if any) is ``bias_scale * randn``.
    ``post_scalars`` are hardtanh's (min, max) or leaky_relu's (slope,).
    """

    op: ConvSpec | LinearSpec
    post_op: Unary = Unary.NONE
    post_scalars: tuple[float, ...] = ()
    weight_max: int = 127
    weight_scale: float = 0.01
    bias_scale: float = 0.1
    seed: int = 0

    @property
    def kind(self) -> Literal["conv", "linear"]:
        return "conv" if isinstance(self.op, ConvSpec) else "linear"


@dataclass(frozen=True, slots=True)
class Residual:
    """``main op other`` (or ``other op main`` when ``swapped``), then relu if asked.

    ``source``: ``"dequant"`` -- a second input, quantized with ``quant`` and dequantized;
    ``"float"`` -- a second float input used as is; ``"layer"`` -- ``layer`` applied to the
    block's own quantized input, its output quantized with ``quant``. ``op`` is ``add`` (the
    catalog's binary families) or ``sub`` (not in the catalog: only the compute op may fuse).
    ``float_scale`` is the standard deviation of the float second input.
    """

    source: Literal["dequant", "float", "layer"]
    op: Literal["add", "sub"] = "add"
    swapped: bool = False
    relu: bool = False
    quant: QuantSpec | None = None
    layer: Layer | None = None
    float_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """One quantized block and its surroundings; see :func:`graph_specs`.

    ``x -> quant(input_quant) -> dequant -> main -> [residual] -> [quant(output_quant)]``;
    ``returns`` says what leaves the graph from the block (its quantized output, that output
    dequantized, its float output, or nothing when only ``consumer`` reads it); ``consumer``
    is a second layer reading the block's quantized output (float output, always returned).
    ``share_dequants``: one dequant node per quantized tensor, read by all its users (else one
    per user, as ``convert_pt2e`` builds them). ``meta``: where ``meta['val']`` is set.
    """

    family: str
    input_shape: tuple[int, ...]
    input_quant: QuantSpec
    main: Layer
    residual: Residual | None = None
    output_quant: QuantSpec | None = None
    returns: Returns = "float"
    consumer: Layer | None = None
    share_dequants: bool = False
    dtype: DType = "fp32"
    meta: MetaMode = "export"
    seed: int = 0


UncoveredKind: TypeAlias = Literal[
    "float_conv",
    "float_linear",
    "avg_pool",
    "sigmoid",
    "activation_matmul",
    "conv_transpose",
]


@dataclass(frozen=True, slots=True)
class UncoveredSpec:
    """A graph the catalog does not cover; lowering must return it equivalent (bit-exact).

    ``float_conv`` / ``float_linear``: no quantization at all; ``avg_pool``, ``sigmoid``:
    ``dequant -> op -> quant``; ``activation_matmul``: ``bmm`` of two dequantized activations;
    ``conv_transpose``: a transposed conv of dequantized input and weight.
    """

    kind: UncoveredKind
    input_shape: tuple[int, ...]
    quant: QuantSpec
    channels: int = 4
    meta: MetaMode = "export"
    seed: int = 0
    family: str = "uncovered"


# --------------------------------------------------------------------------------------------
# What an example expects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class OutputBound:
    """How far one output of the lowered module may be from the reference (elementwise).

    ``kind``: ``"quantized"`` (int8/uint8: at most ``steps`` integer levels, or per element
    within ``interval``: the inclusive lowest and highest level), ``"float"`` (at most ``atol``
    in output units: one number, or one per element) or ``"exact"`` (bit-identical).
    ``agree``: the fraction of elements that must be within ``agree_atol`` (exactly equal for
    quantized outputs), or None. ``why`` says how the bound was derived (printed on failure).
    """

    kind: Literal["quantized", "float", "exact"]
    steps: int = 0
    atol: float | torch.Tensor = 0.0
    agree: float | None = None
    agree_atol: float | torch.Tensor = 0.0
    why: str = ""
    interval: tuple[torch.Tensor, torch.Tensor] | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutputBound):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    def __repr__(self) -> str:
        parts = [repr(self.kind)]
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if _same(value, f.default):
                continue
            parts.append(f"{f.name}={_render_value(value)}")
        return f"OutputBound({', '.join(parts)})"


def _same(a: object, b: object) -> bool:
    """Equality of bound fields that may hold tensors (or tuples of them)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _render_value(value: object) -> str:
    """Python source for a bound field (tensors as ``torch.tensor([...])`` expressions)."""
    if isinstance(value, torch.Tensor):
        return _render_tensor(value)
    if isinstance(value, tuple):
        return "(" + "".join(f"{_render_value(v)}, " for v in value) + ")"
    return repr(value)


@dataclass(frozen=True, slots=True)
class Expected:
    """What the lowering must do with an example.

    ``fired``: exact counts for these fusion names (a name absent here may fire any number of
    times); ``refusals``: substrings each of which some refusal reason must contain;
    ``allowed_refusals``: every refusal reason must contain one of ``refusals`` or of these;
    ``outputs``: one bound per flattened graph output.
    """

    fired: Mapping[str, int]
    refusals: tuple[str, ...] = ()
    allowed_refusals: tuple[str, ...] = ()
    outputs: tuple[OutputBound, ...] = ()

    def __repr__(self) -> str:
        fired = dict(sorted(self.fired.items()))
        return (
            f"Expected(fired={fired!r}, refusals={self.refusals!r}, "
            f"allowed_refusals={self.allowed_refusals!r}, outputs={self.outputs!r})"
        )


@dataclass(frozen=True, eq=False)
class Example:
    """A drawn graph, its inputs, and what the lowering must do with it.

    ``recipe`` is the Python expression that rebuilds this example (also its ``repr``);
    ``constants_code`` / ``inputs_code`` give short expressions for the module's tensors and
    the inputs (seeded generators), used by :meth:`code` instead of literal values.
    """

    family: str
    form: str
    gm: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    expected: Expected
    recipe: str = ""
    constants_code: Mapping[str, str] = field(default_factory=dict)
    inputs_code: str | None = None

    def __repr__(self) -> str:
        return self.recipe or f"<Example {self.family} in form {self.form}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints falsifying examples with this: the rebuilding expression."""
        printer.text(repr(self))

    def code(self) -> str:
        """A standalone script: rebuild this graph and inputs, lower, check every property."""
        return graph_code(
            self.gm,
            self.inputs,
            constants_code=self.constants_code,
            inputs_code=self.inputs_code,
            title=f"family {self.family}, form {self.form}",
            recipe=self.recipe,
            expected=self.expected,
            family=self.family,
            form=self.form,
        )


class ExpectedLike(Protocol):
    """What the properties read from an example's expectations."""

    @property
    def fired(self) -> Mapping[str, int]: ...
    @property
    def refusals(self) -> tuple[str, ...]: ...
    @property
    def allowed_refusals(self) -> tuple[str, ...]: ...
    @property
    def outputs(self) -> Sequence[BoundLike]: ...


class ExampleLike(Protocol):
    """What the properties and the fuzzer need from an example: :class:`Example` and the
    plug-in families' examples have this shape. An example may also define
    ``check_outputs(reference, lowered) -> str | None`` for numerics its bounds cannot say."""

    @property
    def family(self) -> str: ...
    @property
    def form(self) -> str: ...
    @property
    def gm(self) -> fx.GraphModule: ...
    @property
    def inputs(self) -> tuple[torch.Tensor, ...]: ...
    @property
    def expected(self) -> ExpectedLike: ...
    def code(self) -> str: ...


#: The check an example's :meth:`~ExampleLike.code` runs when executed (under
#: ``if __name__ == '__main__':``, on the ``example`` it defines): its import and its call.
#: ``qalgebra fuzz --compiled`` swaps both for the compiled check (``campaign.compiled_script``).
SCRIPT_CHECK = (
    "from qalgebra.testing.properties import check_example",
    "print(check_example(example).report.summary())",
)


# --------------------------------------------------------------------------------------------
# Seeded tensors (their source is also emitted into Example.code())
# --------------------------------------------------------------------------------------------


def _uniform(seed: int, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * (high - low) + low


def _randint(seed: int, shape: tuple[int, ...], bound: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-bound, bound + 1, shape, generator=g).to(torch.int8)


def _normal(seed: int, shape: tuple[int, ...], std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std


_HELPERS = (_uniform, _randint, _normal)


def may_saturate(quant: QuantSpec, weight_max: int) -> bool:
    """Whether these operands could overflow a saturating CPU's int16 pair sums.

    Without VNNI/AMX, oneDNN adds adjacent ``u8 * s8`` products in saturating int16. Measured
    (docs/findings.md): uint8 activations saturate when ``2 * quant_max * weight_max > 32767``;
    int8 activations are shifted to uint8 (``+128``) first, so they may reach 255 whatever their
    range (with zero point 0 they do compute wrongly; with another zero point they were measured
    exact, but the lowering refuses every int8 activation the same way, conservatively:
    ``2 * 255 * weight_max > 32767``).
    """
    top = max(abs(quant.quant_min), abs(quant.quant_max)) if quant.dtype == torch.uint8 else 255
    return 2 * top * weight_max > INT16_MAX


def saturates(quant: QuantSpec, weight_max: int) -> bool:
    """Whether the lowering must refuse these operands: they :func:`may_saturate` and the probe
    ``qalgebra.isa.int8_pairs_saturate`` says this CPU saturates (tests force it both ways)."""
    return int8_pairs_saturate() and may_saturate(quant, weight_max)


def _shifted_max_level(quant: QuantSpec, max_abs_weight: int) -> int:
    """The largest level of ``quant`` a layer with these weights computes exactly on every CPU
    (:func:`qalgebra.isa.pair_safe_level`; int8 levels are shifted by +128 there)."""
    safe = pair_safe_level(max_abs_weight)
    return safe if quant.dtype == torch.uint8 else safe - 128


def _max_abs_weight(layer: Layer) -> int:
    return int(_randint(layer.seed, layer.op.weight_shape, layer.weight_max).abs().max())


def _geometry_classes(op: ConvSpec, input_shape: tuple[int, ...]) -> tuple[bool, bool]:
    """(some output position reads only padding, the output is one column wide from a kernel
    and a stride both wider than 1)."""
    height, width = input_shape[2:]
    taps = torch.nn.functional.conv2d(
        torch.ones(1, 1, height, width),
        torch.ones(1, 1, *op.kernel),
        None,
        op.stride,
        op.padding,
        op.dilation,
    )
    one_column = op.output_shape(input_shape)[-1] == 1
    return not bool(taps.all()), one_column and op.kernel[1] > 1 and op.stride[1] > 1


def _as_emitted(
    op: ConvSpec, input_shape: tuple[int, ...] | None
) -> tuple[ConvSpec, tuple[int, ...] | None]:
    """The conv as the lowering calls oneDNN (exact rewrites, ``qalgebra.fusions.conv``): a
    size-1 kernel dimension undilated; padding as wide as a window written into the activation;
    an output of one column that is padded or strided computed from its one window (known
    shapes only), unpadded and unstrided."""
    dilation = (
        1 if op.kernel[0] == 1 else op.dilation[0],
        1 if op.kernel[1] == 1 else op.dilation[1],
    )
    extent = [d * (k - 1) + 1 for k, d in zip(op.kernel, dilation, strict=True)]
    column = False
    if input_shape is not None:
        width, s, p = input_shape[-1], op.stride[-1], op.padding[-1]
        column = 0 <= width + 2 * p - extent[-1] < s and not (p == 0 and s == 1)
    window_in_padding = any(p >= e for p, e in zip(op.padding, extent, strict=True))
    if not (column or window_in_padding):
        return replace(op, dilation=dilation), input_shape
    unpadded = replace(op, dilation=dilation, padding=(0, 0))
    if input_shape is None:
        return unpadded, None
    height, width = (n + 2 * p for n, p in zip(input_shape[2:], op.padding, strict=True))
    if column:
        return replace(unpadded, stride=(op.stride[0], 1)), (*input_shape[:2], height, extent[1])
    return unpadded, (*input_shape[:2], height, width)


def conv_geometry_refusal(op: ConvSpec, input_shape: tuple[int, ...] | None) -> str | None:
    """Why the lowering must refuse this conv's geometry (a substring of the reason), or None.

    Measured (docs/onednn_ops.md, "Conv geometries oneDNN gets wrong"), of the conv as the
    lowering emits it (:func:`_as_emitted`): an output position reading only padding is garbage
    (or a crash) with the AVX512 and AMX kernels; a one-column output from a kernel and a
    stride wider than 1 is wrong with them for some channel counts (probe
    ``qconv_single_column_stride_wrong``). ``input_shape=None``: the lowering cannot see it and
    judges the smallest input the conv accepts.
    """
    op, input_shape = _as_emitted(op, input_shape)
    if input_shape is None:
        smallest = [
            max(1, d * (k - 1) + 1 - 2 * p)
            for k, p, d in zip(op.kernel, op.padding, op.dilation, strict=True)
        ]
        input_shape = (1, op.in_channels, *smallest)
    padding_only, strided_column = _geometry_classes(op, input_shape)
    if padding_only:
        return "read only padding"
    if strided_column and qconv_single_column_stride_wrong():
        return "one column wide"
    return None


def _bf16_reference_reliable(spec: GraphSpec) -> bool:
    """Whether eager bf16 convs compute this graph's reference on every CPU.

    They share the two oneDNN faults the lowering refuses (docs/onednn_ops.md): with AMX,
    ``F.conv2d`` in bf16 returns garbage for a strided one-column output and garbage or a crash
    where outputs read only padding. Such bf16 graphs are not drawn: their reference cannot be
    computed.
    """
    convs: list[tuple[ConvSpec, tuple[int, ...]]] = []
    if isinstance(spec.main.op, ConvSpec):
        convs.append((spec.main.op, spec.input_shape))
        if spec.consumer is not None and isinstance(spec.consumer.op, ConvSpec):
            convs.append((spec.consumer.op, spec.main.op.output_shape(spec.input_shape)))
    layer = spec.residual.layer if spec.residual is not None else None
    if layer is not None and isinstance(layer.op, ConvSpec):
        convs.append((layer.op, spec.input_shape))
    return not any(any(_geometry_classes(op, shape)) for op, shape in convs)


# --------------------------------------------------------------------------------------------
# Building: an fx.Graph whose nodes are evaluated while they are added
# --------------------------------------------------------------------------------------------


@dataclass
class _Value:
    """A built node, the reference's value, and how far the lowered module may be from it.

    ``err`` bounds ``|lowered - reference|`` per element (float64, real units); ``tight`` is the
    same bound if no fused int8 intermediate upstream moved a level; ``levels`` are the integer
    levels a fused quantize may produce, per element (inclusive); ``unchecked`` says why the
    numerics downstream are not the same on every CPU (empty: they are).
    """

    node: fx.Node
    value: torch.Tensor
    err: torch.Tensor
    tight: torch.Tensor
    levels: tuple[torch.Tensor, torch.Tensor] | None = None
    unchecked: str = ""


def _exact(node: fx.Node, value: torch.Tensor) -> _Value:
    """A value both sides compute alike (a graph input, its quantize)."""
    zero = torch.zeros(value.shape, dtype=torch.float64)
    levels = (value.to(torch.float64), value.to(torch.float64))
    return _Value(node, value, zero, zero, levels if not value.is_floating_point() else None)


_Q_TARGETS = (
    qd.quantize_per_tensor.default,
    qd.dequantize_per_tensor.default,
    qd.dequantize_per_channel.default,
)


class GraphBuilder:
    """An ``fx.Graph`` built node by node, each node evaluated as it is added.

    The builder behind every example, public so that a fusion of yours gets examples like the
    catalog's: each node keeps its reference value (``values``) and a ``meta['val']``;
    ``placeholder``/``const`` take the Python code that rebuilds their tensor (for the
    reproduction scripts); ``module(meta)`` drops ``meta['val']`` as export (``"export"``: off
    q/dq and constants) or entirely (``"none"``) and returns the GraphModule.

    >>> b = GraphBuilder()
    >>> x = b.placeholder("x", torch.ones(2, 3), "torch.ones(2, 3)")
    >>> y = b.call(torch.ops.aten.relu.default, x)
    >>> b.output([y])
    >>> gm = b.module("all")
    >>> gm(*b.inputs).shape, b.values[y].sum().item()
    (torch.Size([2, 3]), 6.0)
    """

    def __init__(self) -> None:
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.constants_code: dict[str, str] = {}
        self.inputs: list[torch.Tensor] = []
        self.inputs_code: list[str] = []
        self.values: dict[fx.Node, torch.Tensor] = {}
        self._n = 0

    def placeholder(self, name: str, value: torch.Tensor, code: str) -> fx.Node:
        node = self.graph.placeholder(name)
        self.inputs.append(value)
        self.inputs_code.append(code)
        self._record(node, value)
        return node

    def const(self, hint: str, value: torch.Tensor, code: str) -> fx.Node:
        name = f"{hint}{self._n}"
        self._n += 1
        self.root.register_buffer(name, value)
        self.constants_code[name] = code
        node = self.graph.get_attr(name)
        self._record(node, value)
        return node

    def call(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        real_args = fx.node.map_arg(args, lambda n: self.values[n])
        real_kwargs = fx.node.map_arg(kwargs, lambda n: self.values[n])
        value = target(*real_args, **real_kwargs)
        self._record(node, value)
        return node

    def _record(self, node: fx.Node, value: torch.Tensor) -> None:
        self.values[node] = value
        node.meta["val"] = torch.empty_strided(
            value.shape, value.stride(), dtype=value.dtype, device="meta"
        )

    def output(self, nodes: Sequence[fx.Node]) -> None:
        self.graph.output(nodes[0] if len(nodes) == 1 else tuple(nodes))

    def module(self, meta: MetaMode = "export") -> fx.GraphModule:
        for node in self.graph.nodes:
            drop = meta == "none" or (
                meta == "export" and (node.target in _Q_TARGETS or node.op == "get_attr")
            )
            if drop:
                node.meta.pop("val", None)
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)


def _float_dtype(dtype: DType) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def _exact_quantize(b: GraphBuilder, x: fx.Node, q: QuantSpec) -> _Value:
    """A quantize of a graph input: nothing fuses it, both sides compute it the same."""
    node = b.call(qd.quantize_per_tensor.default, x, *q.args())
    return _exact(node, b.values[node])


def _fused_quantize(b: GraphBuilder, v: _Value, q: QuantSpec) -> _Value:
    """A quantize the lowering fuses into the op before it: per element, the levels between
    those of ``value - err`` and ``value + err`` (:func:`~qalgebra.testing.oracle.level_interval`;
    the op upcasts a bf16 input itself)."""
    node = b.call(qd.quantize_per_tensor.default, v.node, *q.args())
    levels = b.values[node]
    args = (q.scale, q.zero_point, q.quant_min, q.quant_max)
    lo, hi = oracle.level_interval(v.value, v.err, levels, *args)
    tight_lo, tight_hi = oracle.level_interval(v.value, v.tight, levels, *args)
    ref = levels.to(torch.float64)
    moved = torch.maximum(hi - ref, ref - lo) * q.scale
    tight = torch.maximum(tight_hi - ref, ref - tight_lo) * q.scale
    return _Value(node, levels, moved, tight, (lo, hi), v.unchecked)


def _dequantize(b: GraphBuilder, q: _Value, qp: QuantSpec, dtype: DType) -> _Value:
    """Dequantize ``q`` (then convert to bf16 in int8-mixed-bf16, which the fused kernel that
    reads the int8 levels does not: the reference's input differs by that rounding)."""
    node = b.call(qd.dequantize_per_tensor.default, q.node, *qp.args())
    err, tight = q.err, q.tight
    if dtype == "bf16":
        node = b.call(aten._to_copy.default, node, dtype=torch.bfloat16)
        own = oracle.rounding(b.values[node], torch.bfloat16)
        err, tight = err + own, tight + own
    return _Value(node, b.values[node], err, tight, None, q.unchecked)


class _QTensor:
    """A quantized tensor and the dequant nodes its users read (one shared, or one each)."""

    def __init__(
        self, b: GraphBuilder, v: _Value, q: QuantSpec, dtype: DType, *, share: bool
    ) -> None:
        self.b, self.v, self.q, self.dtype, self.share = b, v, q, dtype, share
        self._shared: _Value | None = None
        self.dequant_users = 0

    def dequant(self) -> _Value:
        self.dequant_users += 1
        if self.share and self._shared is not None:
            return self._shared
        value = _dequantize(self.b, self.v, self.q, self.dtype)
        if self.share:
            self._shared = value
        return value


def _unchecked_reason(layer: Layer, x: _Value, act: QuantSpec) -> str:
    """Why ``layer`` on ``x`` (quantized with ``act``) would give different numbers on a
    saturating CPU than on a VNNI one, if it fuses here; empty when it gives the same."""
    if _blocker(layer, act) is not None or x.levels is None:
        return ""  # refused (or not read from levels): computed by the reference's ops
    w_max = _max_abs_weight(layer)
    if not may_saturate(_kernel_activation(layer, act), w_max):
        return ""
    top = int(x.levels[1].max()) if x.levels[1].numel() else 0
    if top <= _shifted_max_level(act, w_max):
        return ""
    return (
        f"a fused {layer.kind} reads levels up to {top} with weights up to {w_max}: a "
        "saturating CPU computes it differently (decisions checked, numerics not)"
    )


def _layer(b: GraphBuilder, layer: Layer, x: _Value, dtype: DType, unchecked: str = "") -> _Value:
    """``post_op(compute(x, dequant(w), bias))`` with the error bound of the fused kernel."""
    op, fdt = layer.op, _float_dtype(dtype)
    w_code = f"_randint({layer.seed}, {op.weight_shape!r}, {layer.weight_max})"
    w_int = _randint(layer.seed, op.weight_shape, layer.weight_max)
    n = op.out_features
    ws_code = (
        f"_uniform({layer.seed + 1}, ({n},), {layer.weight_scale!r}, {4 * layer.weight_scale!r})"
    )
    w_scales = _uniform(layer.seed + 1, (n,), layer.weight_scale, 4 * layer.weight_scale)
    w = b.const("w", w_int, w_code)
    scales = b.const("w_scales", w_scales, ws_code)
    zps = b.const(
        "w_zps", torch.zeros(n, dtype=torch.int64), f"torch.zeros({n}, dtype=torch.int64)"
    )
    wq = b.call(qd.dequantize_per_channel.default, w, scales, zps, 0, -128, 127, torch.int8)
    if dtype == "bf16":
        wq = b.call(aten._to_copy.default, wq, dtype=torch.bfloat16)
    bias: fx.Node | None = None
    bias_value = torch.zeros(n)
    if op.bias:
        bias_value = _normal(layer.seed + 2, (n,), layer.bias_scale)
        bias = b.const(
            "bias", bias_value, f"_normal({layer.seed + 2}, ({n},), {layer.bias_scale!r})"
        )
        if dtype == "bf16":
            bias = b.call(aten._to_copy.default, bias, dtype=torch.bfloat16)
    w_dq = w_int.float() * w_scales.reshape(-1, *([1] * (w_int.dim() - 1)))
    if isinstance(op, ConvSpec):
        geometry = (list(op.stride), list(op.padding), list(op.dilation))
        if op.spelling == "conv2d":
            y = b.call(aten.conv2d.default, x.node, wq, bias, *geometry, op.groups)
        else:
            y = b.call(
                aten.convolution.default, x.node, wq, bias, *geometry, False, [0, 0], op.groups
            )
        conv = op

        def apply(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(
                inp, w, None, conv.stride, conv.padding, conv.dilation, conv.groups
            )

        bias_full = bias_value.reshape(-1, 1, 1).expand(b.values[y].shape)
    else:
        y = _linear(b, op, x.node, wq, bias, fdt)

        def apply(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(inp, w)

        bias_full = bias_value.expand(b.values[y].shape)
    result = b.values[y]
    err = oracle.compute_error(apply, x.value, x.err, w_dq, bias_full, result, fdt)
    tight = oracle.compute_error(apply, x.value, x.tight, w_dq, bias_full, result, fdt)
    out = _Value(y, result, err, tight, None, x.unchecked or unchecked)
    return _post_op(b, out, layer, dtype)


def _linear(
    b: GraphBuilder,
    op: LinearSpec,
    x: fx.Node,
    w: fx.Node,
    bias: fx.Node | None,
    fdt: torch.dtype,
) -> fx.Node:
    if op.spelling == "linear":
        return b.call(aten.linear.default, x, w, bias)
    shape = list(b.values[x].shape)
    x2d = x
    if len(shape) != 2:
        x2d = b.call(aten.view.default, x, [-1, shape[-1]])
    if op.spelling == "matmul_permute":
        wt = b.call(aten.permute.default, w, [1, 0])
    else:
        wt = b.call(aten.t.default, w)
    y = (
        b.call(aten.addmm.default, bias, x2d, wt)
        if bias is not None
        else b.call(aten.mm.default, x2d, wt)
    )
    if len(shape) != 2:
        y = b.call(aten.view.default, y, [*shape[:-1], op.out_features])
    return y


_F = torch.nn.functional

#: Each post-op as a float64 function of the pre-activation (and the layer's scalars), and where
#: it has its minimum (None: it is monotone), so that the error model maps an interval of
#: pre-activations to the exact interval of results.
_POST_OPS: dict[Unary, tuple[Callable[[torch.Tensor, Layer], torch.Tensor], float | None]] = {
    Unary.RELU: (lambda t, layer: t.clamp_min(0.0), None),
    Unary.RELU6: (lambda t, layer: t.clamp(0.0, 6.0), None),
    Unary.HARDTANH: (lambda t, layer: t.clamp(layer.post_scalars[0], layer.post_scalars[1]), None),
    Unary.TANH: (lambda t, layer: torch.tanh(t), None),
    Unary.LEAKY_RELU: (lambda t, layer: _F.leaky_relu(t, layer.post_scalars[0]), None),
    Unary.HARDSWISH: (lambda t, layer: _F.hardswish(t), -1.5),
    Unary.SILU: (lambda t, layer: _F.silu(t), -1.2784645428),
    Unary.GELU: (lambda t, layer: _F.gelu(t), -0.7517915),
    Unary.GELU_TANH: (lambda t, layer: _F.gelu(t, approximate="tanh"), -0.7522),
}


def _post_op(b: GraphBuilder, v: _Value, layer: Layer, dtype: DType) -> _Value:
    u = layer.post_op
    if u is Unary.NONE:
        return v
    if u is Unary.RELU:
        node = b.call(aten.relu.default, v.node)
    elif u is Unary.RELU6:
        node = b.call(aten.relu6.default, v.node)
    elif u is Unary.HARDTANH:
        low, high = layer.post_scalars
        node = b.call(aten.hardtanh.default, v.node, low, high)
    elif u is Unary.HARDSWISH:
        node = b.call(aten.hardswish.default, v.node)
    elif u is Unary.SILU:
        node = b.call(aten.silu.default, v.node)
    elif u is Unary.GELU:
        node = b.call(aten.gelu.default, v.node)
    elif u is Unary.GELU_TANH:
        node = b.call(aten.gelu.default, v.node, approximate="tanh")
    elif u is Unary.LEAKY_RELU:
        (slope,) = layer.post_scalars
        node = b.call(aten.leaky_relu.default, v.node, slope)
    else:
        node = b.call(aten.tanh.default, v.node)
    out = b.values[node]
    image, valley = _POST_OPS[u]
    if u is Unary.LEAKY_RELU and layer.post_scalars[0] < 0:
        valley = 0.0  # a negative slope: decreasing, then increasing

    def fn(t: torch.Tensor) -> torch.Tensor:
        return image(t, layer)

    def bound(err: torch.Tensor) -> torch.Tensor:
        return oracle.unary_error(v.value, err, out, _float_dtype(dtype), fn, valley=valley)

    return _Value(node, out, bound(v.err), bound(v.tight), None, v.unchecked)


def _input(
    b: GraphBuilder,
    name: str,
    shape: tuple[int, ...],
    q: QuantSpec,
    seed: int,
    dtype: DType,
    max_level: int | None = None,
) -> fx.Node:
    """A float input spanning ``q``'s range and one level beyond (so clamping happens), or up
    to level ``max_level`` only (data a saturating CPU computes exactly)."""
    low = (q.quant_min - q.zero_point - 1) * q.scale
    high = (q.quant_max - q.zero_point + 1) * q.scale
    if max_level is not None and max_level < q.quant_max:
        high = (max_level - q.zero_point - 0.25) * q.scale
    value = _uniform(seed, shape, low, high)
    code = f"_uniform({seed}, {shape!r}, {low!r}, {high!r})"
    if dtype == "bf16" and name != "x":
        value = value.to(torch.bfloat16)
        code += ".to(torch.bfloat16)"
    return b.placeholder(name, value, code)


def _input_max_level(spec: GraphSpec) -> int | None:
    """The largest level of the block's input that every layer reading it computes exactly on
    any CPU, where one of them :func:`may_saturate` (None: any level is)."""
    readers = [spec.main]
    if spec.residual is not None and spec.residual.layer is not None:
        readers.append(spec.residual.layer)
    act = spec.input_quant
    limits = [
        _shifted_max_level(act, _max_abs_weight(layer))
        for layer in readers
        if may_saturate(_kernel_activation(layer, act), _max_abs_weight(layer))
    ]
    return min(limits) if limits else None


# --------------------------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------------------------


def _kernel_activation(layer: Layer, act: QuantSpec) -> QuantSpec:
    """The activation range the kernel multiplies: a conv takes int8 activations shifted to
    uint8 (+128, exact; its range moves along)."""
    if layer.kind == "conv" and act.dtype == torch.int8:
        low, high = act.quant_min + 128, act.quant_max + 128
        return QuantSpec(act.scale, act.zero_point + 128, low, high, torch.uint8)
    return act


def _blocker(layer: Layer, act: QuantSpec) -> str | None:
    """Why the lowering must refuse this layer (a substring of its reason), or None."""
    if saturates(_kernel_activation(layer, act), _max_abs_weight(layer)):
        return "saturating"
    return None


def _geometry(layer: Layer, input_shape: tuple[int, ...], shapes_known: bool) -> str | None:
    """Why the lowering must refuse this conv's geometry, or None (linears: None)."""
    if not isinstance(layer.op, ConvSpec):
        return None
    return conv_geometry_refusal(layer.op, input_shape if shapes_known else None)


class _Plan:
    """Accumulates expected fusions and refusals while the graph is built.

    ``shapes_known``: whether the lowering can see the conv inputs' shapes (``meta['val']``
    upstream of them; not through the ``.tensor`` qparam overloads, see ``_other_shape_known``).
    """

    def __init__(self, shapes_known: bool) -> None:
        self.fired: dict[str, int] = dict.fromkeys(TRACKED_FUSIONS, 0)
        self.refusals: set[str] = set()
        self.shapes_known = shapes_known

    def geometry(self, layer: Layer, input_shape: tuple[int, ...]) -> str | None:
        """Why the lowering must refuse this conv's geometry, or None (linears: None)."""
        return _geometry(layer, input_shape, self.shapes_known)

    def plain(self, layer: Layer, act: QuantSpec, input_shape: tuple[int, ...]) -> None:
        """A conv/linear (with its post-op and int8 or float output) fuses unless refused."""
        reason = _blocker(layer, act) or self.geometry(layer, input_shape)
        if reason is None:
            self.fired["q" + layer.kind] += 1
        else:
            self.refusals.add(reason)


def _other_dtype_known(spec: GraphSpec, form: str) -> bool:
    """Can the lowering know the dtype of the residual's other operand?"""
    res = spec.residual
    assert res is not None
    if spec.dtype == "bf16" and res.source != "float":
        return True  # a conversion to bf16 produced it: its dtype argument says
    if res.source == "float":
        return spec.meta != "none"  # a placeholder, known from its meta['val']
    primary = form.split("+")[0]
    # Op-form dequantize ops have a known output dtype; a decomposed dequant (mul) only has
    # meta['val'] when the dequant it replaced had one.
    return not primary.startswith("decomposed") or spec.meta == "all"


def _other_shape_known(spec: GraphSpec, form: str) -> bool:
    """Can the lowering know the shape of the residual's other operand (from meta or upstream)?

    Without ``meta['val']`` on quantize/dequantize nodes (``meta="export"``), the shape is read
    upstream through them -- but not through the ``.tensor`` overloads, whose qparams are nodes.
    """
    res = spec.residual
    assert res is not None
    if spec.meta == "none":
        return False
    if spec.dtype == "bf16" and res.source != "float":
        return True  # the conversion to bf16 after the dequant has meta['val']
    tensor_form = form.split("+")[0].startswith("tensor_qparams")
    return not (tensor_form and spec.meta == "export" and res.source != "float")


def _expect_block(spec: GraphSpec, form: str, plan: _Plan) -> None:
    main, res = spec.main, spec.residual
    if res is None:
        plan.plain(main, spec.input_quant, spec.input_shape)
    else:
        _expect_binary(spec, form, plan)
        if res.source == "layer":
            assert res.layer is not None
            plan.plain(res.layer, spec.input_quant, spec.input_shape)
    if spec.consumer is not None:
        assert spec.output_quant is not None
        plan.plain(spec.consumer, spec.output_quant, main.op.output_shape(spec.input_shape))


@dataclass(frozen=True, slots=True)
class _BinaryDecision:
    """What the binary family does with ``main + other``: fuses it (``fused``), with the
    output quantize inside (``int8_output``), or refuses it (``refusal``, then ``main`` fuses
    alone with a float output)."""

    fused: bool
    int8_output: bool
    refusal: str | None


def _binary_decision(spec: GraphSpec, form: str, shapes_known: bool) -> _BinaryDecision:
    """``main + other``: the binary family fuses the add (and relu, and output quant) when
    ``main`` is its compute op (no post-op in between) and the other operand qualifies.

    With an int8 output, conv needs the other operand to be a dequantize (its int8 tensor is
    the accumulator), linear takes any float tensor; with a float output both take any float
    tensor. The other operand's dtype must be known to match at all; its shape to fuse.
    """
    main, res = spec.main, spec.residual
    assert res is not None
    dtype_known = _other_dtype_known(spec, form)
    if main.kind == "conv":
        int8_path = spec.output_quant is not None and res.source in ("dequant", "layer")
    else:
        int8_path = spec.output_quant is not None and dtype_known
    matches = res.op == "add" and main.post_op is Unary.NONE and (int8_path or dtype_known)
    reason = _blocker(main, spec.input_quant)
    if matches and reason is None:
        if not _other_shape_known(spec, form):
            reason = "is unknown"  # the added tensor's shape
        elif geometry := _geometry(main, spec.input_shape, shapes_known):
            reason = geometry
        elif (
            int8_path
            and main.kind == "conv"
            and res.quant is not None
            and spec.output_quant is not None
            and res.quant.dtype != spec.output_quant.dtype
        ):
            reason = "accumulator dtype"
    fused = matches and reason is None
    return _BinaryDecision(fused, fused and int8_path, reason if matches else None)


def _expect_binary(spec: GraphSpec, form: str, plan: _Plan) -> None:
    decision = _binary_decision(spec, form, plan.shapes_known)
    if decision.fused:
        plan.fired[f"q{spec.main.kind}_binary"] += 1
        return
    if decision.refusal is not None:
        plan.refusals.add(decision.refusal)
    plan.plain(spec.main, spec.input_quant, spec.input_shape)  # the compute op alone, float output


def _expected_promotions(spec: GraphSpec, form: str, shared_users: Sequence[int]) -> int:
    primary, _, modifier = form.partition("+")
    merged = modifier == "shared_dequants" and not primary.startswith("decomposed")
    if spec.share_dequants or merged:
        return sum(1 for users in shared_users if users > 1)
    return 0


# --------------------------------------------------------------------------------------------
# build_example
# --------------------------------------------------------------------------------------------


#: Of the elements of a float output, the fraction that must be within the bound computed as
#: if no fused int8 intermediate upstream had moved a level (every element when none could).
AGREE = 0.9


def _bound(
    v: _Value, kind: Literal["quantized", "dequantized", "float"], dtype: DType
) -> OutputBound:
    """The bound of an output ``v`` (for ``"dequantized"``: the dequantize of a fused quantize,
    whose ``levels`` give the bound; for ``"quantized"``: the fused quantize)."""
    if v.unchecked:
        return OutputBound("float", atol=math.inf, why=v.unchecked)
    if kind == "quantized":
        assert v.levels is not None
        lo, hi = v.levels
        steps = int((hi - lo).max()) if lo.numel() else 0
        return OutputBound(
            "quantized",
            steps=steps,
            interval=(lo, hi),
            why="the levels of reference +- its per-element float error bound",
        )
    if kind == "float":
        v = _kernel_rounds(v)
    moved = v.err
    flips = bool((v.err > v.tight).any())
    why = (
        "per-element error bound (int8 levels of the reference +- error)"
        if kind == "dequantized"
        else f"per-element {dtype} rounding of inputs, weights and results"
    )
    return OutputBound(
        "float",
        atol=moved + FLOAT_ATOL,
        agree=AGREE if flips else 1.0,
        agree_atol=moved - v.err + v.tight + FLOAT_ATOL,
        why=why + (" + levels moved upstream" if flips else ""),
    )


def apply_form(gm: fx.GraphModule, form: str) -> fx.GraphModule:
    """``gm`` (op form) respelled in ``form`` (``primary`` or ``primary+modifier``); the
    result may be ``gm`` itself (form ``"op"``)."""
    primary, _, modifier = form.partition("+")
    names = [n for n in (primary, modifier) if n and n != "op"]  # "op" would only copy
    return _forms.respell(gm, *names) if names else gm


def _build_graph_spec(spec: GraphSpec, form: str) -> tuple[GraphBuilder, Expected, fx.GraphModule]:
    b = GraphBuilder()
    tensor_qparams = form.split("+")[0].startswith("tensor_qparams")
    plan = _Plan(spec.meta != "none" and not (tensor_qparams and spec.meta == "export"))
    x = _input(
        b, "x", spec.input_shape, spec.input_quant, spec.seed, spec.dtype, _input_max_level(spec)
    )
    qx_val = _exact_quantize(b, x, spec.input_quant)
    qx = _QTensor(b, qx_val, spec.input_quant, spec.dtype, share=spec.share_dequants)
    main = _layer(b, spec.main, qx.dequant(), spec.dtype)
    shared_users: list[int] = []
    outputs: list[fx.Node] = []
    bounds: list[OutputBound] = []
    v = main
    res = spec.residual
    if res is not None:
        binary = _binary_decision(spec, form, plan.shapes_known)
        if not binary.fused:  # the layer's kernel returns its own (rounded) float result
            v = _kernel_rounds(v)
        other = _residual_other(b, spec, qx, tuple(main.value.shape))
        op = aten.add.Tensor if res.op == "add" else aten.sub.Tensor
        lhs, rhs = (other, v) if res.swapped else (v, other)
        node = b.call(op, lhs.node, rhs.node)
        total = b.values[node]
        # the sum's own rounding (bf16 + bf16 is rounded to bf16), on both sides unless fused
        rounds = oracle.rounding(total, total.dtype) * (1 if binary.fused else 2)
        own = oracle.FP32_COMPUTE_REL * (v.value.double().abs() + other.value.double().abs())
        v = _Value(
            node,
            total,
            v.err + other.err + own + rounds,
            v.tight + other.tight + own + rounds,
            None,
            v.unchecked or other.unchecked,
        )
        if res.relu:
            node = b.call(aten.relu.default, v.node)
            v = dataclasses.replace(v, node=node, value=b.values[node])
        if binary.fused and not binary.int8_output and spec.output_quant is not None:
            v = _kernel_rounds(v)  # a float sum, quantized after the fused op
    shared_users.append(qx.dequant_users)
    oq = spec.output_quant
    if oq is None:
        outputs.append(v.node)
        bounds.append(_bound(v, "float", spec.dtype))
    else:
        q = _fused_quantize(b, v, oq)
        qt = _QTensor(b, q, oq, spec.dtype, share=spec.share_dequants)
        if spec.returns == "quantized":
            outputs.append(q.node)
            bounds.append(_bound(q, "quantized", spec.dtype))
        elif spec.returns == "dequantized":
            dq = qt.dequant()
            outputs.append(dq.node)
            # both sides dequantize (and convert) the same levels: only moved levels differ
            moved = dataclasses.replace(
                dq, err=_dequantized_moved(q.err, dq), tight=_dequantized_moved(q.tight, dq)
            )
            bounds.append(_bound(moved, "dequantized", spec.dtype))
        if spec.consumer is not None:
            c_in = qt.dequant()
            why = _unchecked_reason(spec.consumer, q, oq)
            c = _layer(b, spec.consumer, c_in, spec.dtype, why)
            outputs.append(c.node)
            bounds.append(_bound(c, "float", spec.dtype))
        shared_users.append(qt.dequant_users)
    b.output(outputs)
    _expect_block(spec, form, plan)
    plan.fired["dequant_promotion"] = _expected_promotions(spec, form, shared_users)
    expected = Expected(
        fired=MappingProxyType(dict(plan.fired)),
        refusals=tuple(sorted(plan.refusals)),
        outputs=tuple(bounds),
    )
    return b, expected, b.module(spec.meta)


def _kernel_rounds(v: _Value) -> _Value:
    """``v`` as a fused kernel returns it: in bf16, rounded once more (the reference's own
    rounding of ``v`` is already in its bound)."""
    own = oracle.rounding(v.value.double().abs() + v.err, v.value.dtype)
    return dataclasses.replace(v, err=v.err + own, tight=v.tight + own)


def _dequantized_moved(moved: torch.Tensor, dq: _Value) -> torch.Tensor:
    """Per element, how far a returned dequantized output may move when its levels moved by
    ``moved`` (real units): a bf16 conversion after the dequantize rounds both sides' values,
    which only differ where a level moved."""
    if dq.value.dtype == torch.bfloat16:
        moved = moved + (moved > 0) * oracle.rounding(2 * dq.value.abs() + moved, torch.bfloat16)
    return moved


def _residual_other(
    b: GraphBuilder, spec: GraphSpec, qx: _QTensor, shape: tuple[int, ...]
) -> _Value:
    res = spec.residual
    assert res is not None
    if res.source == "float":
        fdt = _float_dtype(spec.dtype)
        value = _normal(spec.seed + 1, shape, res.float_scale).to(fdt)
        code = f"_normal({spec.seed + 1}, {shape!r}, {res.float_scale!r})"
        if fdt is torch.bfloat16:
            code += ".to(torch.bfloat16)"
        y = b.placeholder("y", value, code)
        return _exact(y, value)
    assert res.quant is not None
    if res.source == "dequant":
        y = _input(b, "y", shape, res.quant, spec.seed + 1, "fp32")
        return _dequantize(b, _exact_quantize(b, y, res.quant), res.quant, spec.dtype)
    assert res.layer is not None
    o = _layer(b, res.layer, qx.dequant(), spec.dtype)
    return _dequantize(b, _fused_quantize(b, o, res.quant), res.quant, spec.dtype)


def _build_uncovered(spec: UncoveredSpec) -> tuple[GraphBuilder, Expected, fx.GraphModule]:
    b = GraphBuilder()
    q = spec.quant
    x = _input(b, "x", spec.input_shape, q, spec.seed, "fp32")
    c = spec.channels
    seed = spec.seed
    if spec.kind in ("float_conv", "float_linear"):
        cin = spec.input_shape[1] if spec.kind == "float_conv" else spec.input_shape[-1]
        shape = (c, cin, 3, 3) if spec.kind == "float_conv" else (c, cin)
        w = b.const("w", _normal(seed + 3, shape, 0.2), f"_normal({seed + 3}, {shape!r}, 0.2)")
        if spec.kind == "float_conv":
            y = b.call(aten.conv2d.default, x, w, None, [1, 1], [1, 1], [1, 1], 1)
        else:
            y = b.call(aten.linear.default, x, w)
        out = b.call(aten.relu.default, y)
        b.output([out])
    else:
        qx = b.call(qd.quantize_per_tensor.default, x, *q.args())
        dx = b.call(qd.dequantize_per_tensor.default, qx, *q.args())
        if spec.kind == "avg_pool":
            y = b.call(aten.avg_pool2d.default, dx, [2, 2])
        elif spec.kind == "sigmoid":
            y = b.call(aten.sigmoid.default, dx)
        elif spec.kind == "activation_matmul":
            t = b.call(aten.transpose.int, dx, -1, -2)
            y = b.call(aten.bmm.default, dx, t)
        else:
            cin = spec.input_shape[1]
            wshape = (cin, c, 3, 3)
            w = b.const(
                "w", _randint(seed + 3, wshape, 127), f"_randint({seed + 3}, {wshape!r}, 127)"
            )
            scales = b.const("w_scales", torch.full((c,), 0.01), f"torch.full(({c},), 0.01)")
            zps = b.const(
                "w_zps", torch.zeros(c, dtype=torch.int64), f"torch.zeros({c}, dtype=torch.int64)"
            )
            wq = b.call(qd.dequantize_per_channel.default, w, scales, zps, 1, -128, 127, torch.int8)
            y = b.call(aten.conv_transpose2d.input, dx, wq)
        out_q = QuantSpec(q.scale, q.zero_point, q.quant_min, q.quant_max, q.dtype)
        qy = b.call(qd.quantize_per_tensor.default, y, *out_q.args())
        dy = b.call(qd.dequantize_per_tensor.default, qy, *out_q.args())
        b.output([dy])
    fired = dict.fromkeys(TRACKED_FUSIONS, 0)
    if spec.kind == "activation_matmul":
        fired["dequant_promotion"] = 1  # the dequant read by bmm and by transpose
    expected = Expected(
        fired=MappingProxyType(fired),
        outputs=(OutputBound("exact", why="outside the catalog: returned equivalent"),),
    )
    return b, expected, b.module(spec.meta)


def build_example(spec: GraphSpec | UncoveredSpec, form: str = "op") -> Example:
    """Build the graph ``spec`` describes, spelled in ``form``, with its expectations."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")
    if isinstance(spec, GraphSpec):
        b, expected, gm = _build_graph_spec(spec, form)
    else:
        b, expected, gm = _build_uncovered(spec)
    gm = apply_form(gm, form)
    inputs_code = "(" + "".join(f"{c}, " for c in b.inputs_code) + ")"
    return Example(
        family=spec.family,
        form=form,
        gm=gm,
        inputs=tuple(b.inputs),
        expected=expected,
        recipe=f"build_example({spec!r}, form={form!r})",
        constants_code=MappingProxyType(dict(b.constants_code)),
        inputs_code=inputs_code,
    )


# --------------------------------------------------------------------------------------------
# Example.code(): a graph as a standalone script
# --------------------------------------------------------------------------------------------


def _render(value: object) -> str:
    """A graph argument as Python source (nodes by their variable names)."""
    if isinstance(value, fx.Node):
        return f"n_{value.name}"
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(f"{_render(v)}, " for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_render(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render graph argument {value!r} ({type(value).__name__})")


def _render_target(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if getattr(operator, getattr(target, "__name__", ""), None) is target:
        return f"operator.{getattr(target, '__name__', '')}"
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module and name:
        return f"importlib.import_module({module!r}).{name}"
    raise TypeError(f"cannot render call target {target!r}")


def _render_tensor(t: torch.Tensor) -> str:
    values = t.detach().flatten().to(torch.float64 if t.is_floating_point() else torch.int64)
    body = ", ".join(_render(v) for v in values.tolist())
    return f"torch.tensor([{body}], dtype={t.dtype}).reshape({tuple(t.shape)!r})"


def _render_meta(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    try:
        shape, stride = tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride())
    except (TypeError, RuntimeError):  # symbolic sizes: leave the node without meta
        return None
    return (
        f"n_{node.name}.meta['val'] = torch.empty_strided("
        f"{shape!r}, {stride!r}, dtype={val.dtype}, device='meta')"
    )


def _fetch(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_code(
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    *,
    constants_code: Mapping[str, str] | None = None,
    inputs_code: str | None = None,
    title: str = "",
    recipe: str = "",
    expected: Expected | None = None,
    family: str = "",
    form: str = "",
) -> str:
    """Python that rebuilds ``gm`` node by node (with its ``meta['val']``) and ``inputs``.

    Tensors are written through the expressions in ``constants_code`` / ``inputs_code`` when
    given, else as literals. With ``expected``, running the script checks every property
    (``qalgebra.testing.properties.check_example``) and raises on the failing one.
    """
    constants_code = constants_code or {}
    lines = [
        f"# Reproduces a qalgebra lowering example: {title}".rstrip(": "),
    ]
    if recipe:  # a plug-in's recipe names its own module
        module = "" if recipe.startswith("qalgebra.") else "qalgebra.testing.strategies."
        lines.append(f"# rebuilt by {module}{recipe}")
    lines += [
        "import importlib",
        "import operator",
        "",
        "import torch",
        "import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed",
        "from torch import fx",
        "",
    ]
    for helper in _HELPERS:
        lines += [*inspect.getsource(helper).rstrip().splitlines(), "", ""]
    lines.append("root = torch.nn.Module()")
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        value = _fetch(gm, target)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"get_attr {target} is a {type(value).__name__}, not a tensor")
        code = constants_code.get(target) or _render_tensor(value)
        if "." in target:
            raise ValueError(f"nested attribute {target} is not supported")
        lines.append(f"root.register_buffer({target!r}, {code})")
    lines += ["", "g = fx.Graph()"]
    for node in gm.graph.nodes:
        var = f"n_{node.name}"
        if node.op in ("placeholder", "get_attr"):
            lines.append(f"{var} = g.create_node({node.op!r}, {node.target!r}, name={node.name!r})")
        elif node.op in ("call_function", "call_method"):
            target = (
                _render_target(node.target) if node.op == "call_function" else repr(node.target)
            )
            lines.append(
                f"{var} = g.create_node({node.op!r}, {target}, {_render(tuple(node.args))}, "
                f"{_render(dict(node.kwargs))}, name={node.name!r})"
            )
        elif node.op == "output":
            lines.append(f"g.output({_render(node.args[0])})")
            continue
        else:
            raise TypeError(f"cannot render a {node.op} node ({node.name})")
        meta = _render_meta(node)
        if meta:
            lines.append(meta)
    lines += ["gm = fx.GraphModule(root, g)"]
    if inputs_code is None:
        inputs_code = "(" + "".join(f"{_render_tensor(t)}, " for t in inputs) + ")"
    lines += [f"inputs = {inputs_code}", ""]
    if expected is not None:
        lines += [
            "if __name__ == '__main__':",
            "    from types import MappingProxyType",
            "",
            f"    {SCRIPT_CHECK[0]}",
            "    from qalgebra.testing.strategies import Example, Expected, OutputBound",
            "",
            f"    expected = {expected!r}",
            f"    example = Example({family!r}, {form!r}, gm, inputs, expected)",
            f"    {SCRIPT_CHECK[1]}  # raises on a failing property",
        ]
    else:
        lines += [
            "if __name__ == '__main__':",
            "    from qalgebra.lower import lower_with_report",
            "",
            "    lowered, report = lower_with_report(gm, inputs)",
            "    print(report.summary())",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

#: Activation ranges: 7-bit uint8 (what X86InductorQuantizer uses where int8 products
#: saturate), full-range uint8 and int8, 7-bit int8.
ACTIVATION_RANGES: tuple[tuple[torch.dtype, int, int], ...] = (
    (torch.uint8, 0, 127),
    (torch.uint8, 0, 255),
    (torch.int8, -128, 127),
    (torch.int8, -64, 63),
)
_SEVEN_BIT = ACTIVATION_RANGES[0]


@st.composite
def quant_specs(
    draw: st.DrawFn,
    ranges: Sequence[tuple[torch.dtype, int, int]] = (_SEVEN_BIT,),
    *,
    magnitude: float | None = None,
) -> QuantSpec:
    """Per-tensor qparams over one of ``ranges``; zero point anywhere in range (0 preferred).

    The scale is log-uniform: in ``[1e-3, 1]`` or, given the ``magnitude`` (rms) of the values
    to quantize, ``8 * magnitude / levels`` times a factor in ``[1/4, 4]``, so values use the
    range without all clamping.
    """
    dtype, qmin, qmax = draw(st.sampled_from(list(ranges)))
    zps = st.integers(qmin, qmax)
    if qmin <= 0 <= qmax:
        zps = st.just(0) | zps
    zero_point = draw(zps)
    exponent = draw(st.floats(-2.0, 2.0, allow_nan=False))
    if magnitude is None:
        scale = 10.0 ** (exponent * 0.75 - 1.5)
    else:
        scale = max(magnitude, 1e-6) * 8 / (qmax - qmin) * 2.0**exponent
    return QuantSpec(float(scale), zero_point, qmin, qmax, dtype)


@st.composite
def conv_specs(
    draw: st.DrawFn,
    in_channels: int | None = None,
    *,
    max_channels: int = 8,
    spatial: tuple[int, int] | None = None,
) -> ConvSpec:
    """A conv2d: channels, kernel, stride, padding, dilation, groups (incl. depthwise).

    With ``spatial`` (the input's height and width), the padded input fits the dilated kernel.
    """
    cin = in_channels if in_channels is not None else draw(st.integers(1, max_channels))
    divisors = [g for g in range(1, cin + 1) if cin % g == 0]
    groups = draw(st.sampled_from(divisors))
    depthwise = groups == cin
    if depthwise and draw(st.booleans()):
        cout = cin * draw(st.integers(1, 2))
    else:
        cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
    kernel, padding, dilation = [], [], []
    for axis in range(2):
        k, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        least = 0
        if spatial is not None:
            least = max(0, -(-(d * (k - 1) + 1 - spatial[axis]) // 2))
        kernel.append(k)
        dilation.append(d)
        padding.append(draw(st.integers(least, max(least, k // 2 + 1))))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return ConvSpec(
        cin,
        cout,
        (kernel[0], kernel[1]),
        stride,
        (padding[0], padding[1]),
        (dilation[0], dilation[1]),
        groups,
        bias=draw(st.booleans()),
        spelling=draw(st.sampled_from(["conv2d", "convolution"])),
    )


@st.composite
def linear_specs(
    draw: st.DrawFn, in_features: int | None = None, *, max_features: int = 32
) -> LinearSpec:
    """A linear: features, bias or not, spelled ``linear`` or ``[view] addmm|mm [view]``."""
    fin = in_features if in_features is not None else draw(st.integers(1, max_features))
    return LinearSpec(
        fin,
        draw(st.integers(1, max_features)),
        bias=draw(st.booleans()),
        spelling=draw(st.sampled_from(["linear", "matmul_permute", "matmul_t"])),
    )


def _estimate(
    op: ConvSpec | LinearSpec, x_rms: float, weight_max: int, weight_scale: float
) -> float:
    """Rough rms of the layer's output (random-sign weights): sets the output scale."""
    w_rms = weight_max / math.sqrt(3) * 2.5 * weight_scale
    return math.sqrt(op.fan_in) * x_rms * w_rms


def _rms_of(q: QuantSpec) -> float:
    low, high = q.quant_min - q.zero_point, q.quant_max - q.zero_point
    return q.scale * math.sqrt((low * low + low * high + high * high) / 3)


@st.composite
def layers(
    draw: st.DrawFn,
    op: st.SearchStrategy[ConvSpec | LinearSpec],
    *,
    unaries: Sequence[Unary],
    x_rms: float,
    weight_max: st.SearchStrategy[int] | None = None,
) -> tuple[Layer, float]:
    """A layer over ``op`` with a post-op from ``unaries``; also its estimated output rms."""
    spec = draw(op)
    w_max = draw(weight_max if weight_max is not None else st.sampled_from([127, 64, 100, 13]))
    w_scale = 10.0 ** draw(st.floats(-3.0, -1.0, allow_nan=False))
    rms = _estimate(spec, x_rms, w_max, w_scale)
    post = draw(st.sampled_from(list(unaries)))
    scalars: tuple[float, ...] = ()
    if post is Unary.HARDTANH:
        low = -draw(st.floats(0.0, 2.0)) * rms
        scalars = (float(low), float(low + draw(st.floats(0.1, 3.0)) * rms))
    elif post is Unary.LEAKY_RELU:
        scalars = (draw(st.sampled_from([0.01, 0.1, 0.2, 1.5])),)
    if post is Unary.TANH:
        out_rms = min(rms, 1.0)
    elif post is Unary.RELU6:
        out_rms = min(rms, 6.0)
    elif post is Unary.HARDTANH:
        out_rms = min(rms, max(abs(s) for s in scalars))
    else:
        out_rms = rms
    layer = Layer(
        spec,
        post,
        scalars,
        weight_max=w_max,
        weight_scale=float(w_scale),
        bias_scale=float(rms),
        seed=draw(st.integers(0, 2**16)),
    )
    return layer, out_rms


def _input_shape(draw: st.DrawFn, op: ConvSpec | LinearSpec) -> tuple[int, ...]:
    if isinstance(op, LinearSpec):
        if draw(st.booleans()):
            return (draw(st.integers(1, 4)), op.in_features)
        return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), op.in_features)
    # spatial sizes large enough for one output position
    sizes = []
    for k, p, d in zip(op.kernel, op.padding, op.dilation, strict=True):
        least = max(1, d * (k - 1) + 1 - 2 * p)
        sizes.append(draw(st.integers(least, least + 7)))
    return (draw(st.integers(1, 4)), op.in_channels, *sizes)  # 3+: a sampled self-check


_BINARY_FAMILIES = ("qconv_binary", "qlinear_binary")


@st.composite
def graph_specs(
    draw: st.DrawFn,
    family: str = "qconv",
    *,
    activation_ranges: Sequence[tuple[torch.dtype, int, int]] | None = None,
    dtypes: Sequence[DType] = ("fp32", "bf16"),
) -> GraphSpec:
    """A quantized block of ``family``: ``qconv``, ``qlinear``, ``qconv_binary``,
    ``qlinear_binary``, ``dequant_promotion`` (shared dequants around a conv or linear) or
    ``refused`` (full-range or int8 activations: refused where oneDNN would compute wrongly).
    """
    kind = {"qconv": "conv", "qconv_binary": "conv", "qlinear": "linear"}.get(family)
    if kind is None:
        kind = "linear" if family == "qlinear_binary" else draw(st.sampled_from(["conv", "linear"]))
    if activation_ranges is None:
        if family == "refused":
            activation_ranges = ACTIVATION_RANGES[1:]
        elif kind == "linear":
            activation_ranges = (_SEVEN_BIT, _SEVEN_BIT, _SEVEN_BIT, *ACTIVATION_RANGES[2:])
        else:
            activation_ranges = (_SEVEN_BIT,)
    dtype = draw(st.sampled_from(list(dtypes)))
    meta_modes: list[MetaMode] = ["export", "all"] if dtype == "bf16" else ["export", "all", "none"]
    meta = draw(st.sampled_from(meta_modes))
    input_quant = draw(quant_specs(activation_ranges))
    x_rms = _rms_of(input_quant)
    op_strategy: st.SearchStrategy[ConvSpec | LinearSpec] = (
        conv_specs() if kind == "conv" else linear_specs()
    )
    binary = family in _BINARY_FAMILIES
    unaries = [Unary.NONE] if binary else list(_CONV_UNARIES if kind == "conv" else _LINEAR_UNARIES)
    weight_max = st.sampled_from([127, 65, 64, 100, 1]) if family == "refused" else None
    main, rms = draw(layers(op_strategy, unaries=unaries, x_rms=x_rms, weight_max=weight_max))
    input_shape = _input_shape(draw, main.op)
    residual = None
    if binary or (family == "dequant_promotion" and draw(st.booleans())):
        residual, rms = draw(_residuals(main, rms, x_rms))
    share = True if family == "dequant_promotion" else draw(st.booleans())
    output_quant = None
    if draw(st.integers(0, 3)) > 0 or family == "dequant_promotion":
        out_ranges = [_SEVEN_BIT, _SEVEN_BIT, ACTIVATION_RANGES[1], ACTIVATION_RANGES[2]]
        output_quant = draw(quant_specs(out_ranges, magnitude=rms))
    consumer = None
    returns: Returns = "float"
    if output_quant is not None:
        if draw(st.booleans()) or family == "dequant_promotion":
            c_op: st.SearchStrategy[ConvSpec | LinearSpec]
            if isinstance(main.op, ConvSpec):
                out_shape = main.op.output_shape(input_shape)
                c_op = conv_specs(main.op.out_channels, spatial=(out_shape[2], out_shape[3]))
            else:
                c_op = linear_specs(main.op.out_features)
            c_unaries = _CONV_UNARIES if kind == "conv" else _LINEAR_UNARIES
            consumer, _ = draw(layers(c_op, unaries=c_unaries, x_rms=_rms_of(output_quant)))
            returns = draw(st.sampled_from(["quantized", "dequantized", "none"]))
            if family == "dequant_promotion":
                returns = "dequantized"
        else:
            returns = draw(st.sampled_from(["quantized", "dequantized"]))
    spec = GraphSpec(
        family=family,
        input_shape=input_shape,
        input_quant=input_quant,
        main=main,
        residual=residual,
        output_quant=output_quant,
        returns=returns,
        consumer=consumer,
        share_dequants=share,
        dtype=dtype,
        meta=meta,
        seed=draw(st.integers(0, 2**16)),
    )
    assume(dtype != "bf16" or _bf16_reference_reliable(spec))
    return spec


_SOURCES: tuple[Literal["dequant", "float", "layer"], ...] = ("dequant", "float", "layer")


@st.composite
def _residuals(draw: st.DrawFn, main: Layer, rms: float, x_rms: float) -> tuple[Residual, float]:
    source: Literal["dequant", "float", "layer"] = draw(st.sampled_from(_SOURCES))
    op: Literal["add", "sub"] = "sub" if draw(st.integers(0, 7)) == 0 else "add"
    quant = None
    layer = None
    other_rms = rms
    if source == "layer":
        spec = main.op
        other_op: ConvSpec | LinearSpec = (
            dataclasses.replace(
                spec, groups=1, spelling=draw(st.sampled_from(["conv2d", "convolution"]))
            )
            if isinstance(spec, ConvSpec)
            else dataclasses.replace(
                spec, spelling=draw(st.sampled_from(["linear", "matmul_permute", "matmul_t"]))
            )
        )
        unaries = _CONV_UNARIES if isinstance(spec, ConvSpec) else _LINEAR_UNARIES
        layer, other_rms = draw(layers(st.just(other_op), unaries=unaries, x_rms=x_rms))
    if source != "float":
        ranges = [_SEVEN_BIT] * 6 + [ACTIVATION_RANGES[2]]
        quant = draw(quant_specs(ranges, magnitude=other_rms))
    residual = Residual(
        source,
        op=op,
        swapped=draw(st.booleans()),
        relu=draw(st.booleans()),
        quant=quant,
        layer=layer,
        float_scale=float(rms),
    )
    return residual, math.sqrt(rms * rms + other_rms * other_rms)


@st.composite
def uncovered_specs(draw: st.DrawFn) -> UncoveredSpec:
    """A graph outside the catalog (see :class:`UncoveredSpec`)."""
    kind: UncoveredKind = draw(st.sampled_from(get_args(UncoveredKind)))
    if kind in ("float_linear", "activation_matmul", "sigmoid"):
        shape: tuple[int, ...] = (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 4)),
            draw(st.integers(1, 16)),
        )
    else:
        shape = (
            draw(st.integers(1, 2)),
            draw(st.integers(1, 4)),
            draw(st.integers(2, 8)),
            draw(st.integers(2, 8)),
        )
    return UncoveredSpec(
        kind,
        shape,
        draw(quant_specs(ACTIVATION_RANGES)),
        channels=draw(st.integers(1, 4)),
        meta=draw(st.sampled_from(["export", "all", "none"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _forms_for(spec: GraphSpec | UncoveredSpec) -> list[str]:
    if isinstance(spec, GraphSpec) and spec.dtype == "bf16":
        return list(FORMS)
    return [f for f in FORMS if not f.endswith("+fp32_before_quant")]


@st.composite
def _built(
    draw: st.DrawFn,
    specs: st.SearchStrategy[GraphSpec | UncoveredSpec],
    forms: Sequence[str] | None,
) -> Example:
    spec = draw(specs)
    allowed = _forms_for(spec)
    choices = [f for f in allowed if forms is None or f in forms or f.split("+")[0] in forms]
    choices = choices or allowed
    # primary form, then respelling: each of the few primaries is drawn often
    primary = draw(st.sampled_from(sorted({f.split("+")[0] for f in choices}, key=choices.index)))
    modifiers = [f for f in choices if f.split("+")[0] == primary]
    if primary in modifiers and draw(st.booleans()):
        return build_example(spec, primary)
    return build_example(spec, draw(st.sampled_from(modifiers)))


def _family_strategy(family: str) -> Callable[[], st.SearchStrategy[Example]]:
    def factory(forms: Sequence[str] | None = None) -> st.SearchStrategy[Example]:
        specs = uncovered_specs() if family == "uncovered" else graph_specs(family)
        return _built(specs, forms)

    return factory


FamilyFactory: TypeAlias = Callable[..., st.SearchStrategy[Any]]
"""Builds a strategy of examples (:class:`ExampleLike`); called with no argument, or with
``forms=`` (form names to draw from, None for all) when it accepts that keyword."""

_FAMILIES: dict[str, FamilyFactory] = {
    name: _family_strategy(name)
    for name in (
        "qconv",
        "qlinear",
        "qconv_binary",
        "qlinear_binary",
        "dequant_promotion",
        "refused",
        "uncovered",
    )
}
FAMILIES: Mapping[str, FamilyFactory] = MappingProxyType(_FAMILIES)
"""Every registered family by name (built-in and plug-ins once :func:`families` ran)."""
_plugins_loaded = False


def register_family(name: str, factory: FamilyFactory) -> None:
    """Add (or replace) a family: ``factory()`` returns a strategy of :class:`ExampleLike`."""
    _FAMILIES[name] = factory


def families() -> Mapping[str, FamilyFactory]:
    """:data:`FAMILIES`, after importing the plug-in modules of :data:`PLUGIN_MODULES`.

    A plug-in module either calls :func:`register_family` when imported, or defines a
    ``FAMILIES`` mapping (name -> factory) merged here; a module defining neither but drawing
    ``FamilyCase``-style cases (``graph``, ``inputs``, ``expected`` counts and ``check``) through
    ``*_cases`` strategies is adapted (see :class:`CaseExample`).
    """
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module_name in PLUGIN_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            extra = getattr(module, "FAMILIES", None)
            if isinstance(extra, Mapping):
                for name, factory in extra.items():
                    _FAMILIES.setdefault(str(name), factory)
                continue
            for attr in _CASE_STRATEGIES:
                strategy = getattr(module, attr, None)
                if callable(strategy):
                    case_forms = tuple(getattr(module, "FORMS", ("op",)))
                    family = _case_family(strategy, case_forms)
                    _FAMILIES.setdefault(attr.removesuffix("_cases"), family)
    return FAMILIES


#: ``*_cases`` strategies of FamilyCase-style plug-ins (qalgebra.testing.woq_strategies).
_CASE_STRATEGIES = ("woq_cases", "woq_concat_cases", "dynamic_fp16_cases", "int_mm_cases")


@dataclass(frozen=True, eq=False)
class CaseExample:
    """A ``FamilyCase``-style case (graph, inputs, expected counts, ``check``) as an example.

    Its outputs are checked by the case's own ``check(reference, lowered)`` (elementwise
    bounds); fusions it does not name may fire freely, and no refusal is expected.
    """

    family: str
    form: str
    case: Any

    @property
    def gm(self) -> fx.GraphModule:
        graph: fx.GraphModule = self.case.graph
        return graph

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.case.inputs)

    @functools.cached_property
    def expected(self) -> Expected:
        """Counted once: the outputs' count comes from running the graph."""
        n = len(flat_tensors(self.case.graph(*self.case.inputs)))
        bound = OutputBound("float", atol=math.inf, why="the case's own elementwise bound")
        return Expected(fired=MappingProxyType(dict(self.case.expected)), outputs=(bound,) * n)

    def check_outputs(
        self, reference: Sequence[torch.Tensor], lowered: Sequence[torch.Tensor]
    ) -> str | None:
        message: str | None = self.case.check(tuple(reference), tuple(lowered))
        return message

    def __repr__(self) -> str:
        return repr(self.case)

    def code(self) -> str:
        head = f"# {self.case!r}\n"
        try:
            return head + graph_code(self.gm, self.inputs, title=f"family {self.family}")
        except (TypeError, ValueError) as exc:
            graph = "\n".join(f"# {line}" for line in str(self.gm.graph).splitlines())
            return f"{head}# (no standalone script: {exc})\n{graph}\n"


def flat_tensors(value: object) -> list[torch.Tensor]:
    """A module's outputs, flattened (tuples and lists)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flat_tensors(v)]
    raise TypeError(f"unexpected output {type(value).__name__}")


def _case_family(
    strategy: Callable[[], st.SearchStrategy[Any]], case_forms: Sequence[str]
) -> FamilyFactory:
    family = strategy.__name__.removesuffix("_cases")
    spelled = re.compile(r"\[(" + "|".join(map(re.escape, case_forms)) + r")\]")

    def wrap(case: Any) -> CaseExample:
        found = spelled.search(str(getattr(case, "description", "")))
        return CaseExample(family, found.group(1) if found else "op", case)

    def factory() -> st.SearchStrategy[CaseExample]:
        return strategy().map(wrap)

    return factory


def _call_factory(factory: FamilyFactory, forms: Sequence[str] | None) -> st.SearchStrategy[Any]:
    if forms is not None and "forms" in inspect.signature(factory).parameters:
        return factory(forms=forms)
    return factory()


def examples(
    families: Sequence[str] | None = None, forms: Sequence[str] | None = None
) -> st.SearchStrategy[Any]:
    """Examples (:class:`ExampleLike`) of the named families (default: every registered one),
    in ``forms``.

    ``forms`` names entries of :data:`FORMS` or primary forms (``"decomposed"`` allows every
    ``decomposed+...``); None allows every form a family has.
    """
    registry = _all_families()
    names = list(registry) if families is None else list(families)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown families {unknown}; known: {', '.join(registry)}")
    return st.one_of([_call_factory(registry[n], forms) for n in names])


def _all_families() -> Mapping[str, FamilyFactory]:
    return families()
