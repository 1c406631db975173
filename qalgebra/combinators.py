"""Combinators: build every quantized-fusion variant from one definition.

Building blocks that match **every form** a quantize/dequantize takes in a graph and bind the same
typed Vars (:mod:`qalgebra.qparams`) in each (op form ``.default`` and ``.tensor``; aten-decomposed
with or without the zero-point add/sub; a single ``clamp`` or ``clamp_min`` + ``clamp_max``):

- ``quantize_per_tensor(x, qp)``, ``dequantize_per_tensor(x, qp)`` with ``qp = qparams("x")``;
  with ``qparams("x", runtime=True)`` also the ``.tensor`` op form whose scale and zero point
  are computed while the graph runs (``choose_qparams`` outputs, graph inputs);
  ``qp.read(m)`` gives replacement code a ``ConstantQParams`` or a ``RuntimeQParams`` to narrow;
- ``dequantize_per_channel(w, cp)`` and ``weight_dequant(w, cp, ...)`` for weights (optional
  ``clone(channels_last)``, bf16 convert, ``permute``; ``per_tensor=qp`` also takes a weight
  dequantized per tensor);
- ``dtype_convert(x, dtype)``: ``prims.convert_element_type``, ``aten._to_copy(dtype=)`` or
  ``aten.to.dtype``; ``reshape(x, shape)``: ``view``, ``reshape`` or ``_unsafe_view``;
  ``transposed(w)``: ``permute(w, [1, 0])`` or ``t(w)``;
- ``linear(x, lv, w=..., bias=...)``: ``x @ w.T (+ bias)`` in every spelling export and the
  decompositions leave (``linear``; ``[view] addmm/mm [view]``; ``expand -> bmm [-> add]``),
  ``lv = linear_vars("...")`` binding the reshapes and which spelling matched;
- ``constant(var)``: a node computed from module constants only (:mod:`qalgebra.constants`).

Combinators that wrap a pattern:

- ``with_dtype_convert(p, dtype)``: ``p`` optionally followed by a conversion (``dtype`` binds the
  target dtype, or its default when the conversion is absent);
- ``with_reshape(p, shape)``: ``p`` optionally followed by a reshape;
- ``with_unary(p, unary, *ops)``: ``p`` followed by one of the unary post-ops ``ops`` (or none,
  when ``Unary.NONE`` is among them); ``unary`` binds which one;
- ``with_binary(p, other, op)``: ``op(p, other)`` in either operand order for commutative ops;
- ``with_output_quant(p, qp)``: ``p`` quantized per tensor (through a conversion back to float32
  in the int8-mixed-bf16 form).

>>> from qalgebra.qparams import qparams
>>> qp = qparams("x")
>>> p = dequantize_per_tensor(Var("x", torch.fx.Node), qp)
>>> len(p.alternatives)
2
>>> runtime = qparams("x", runtime=True)
>>> len(dequantize_per_tensor(Var("x", torch.fx.Node), runtime).alternatives)
3
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed
from torch._ops import OpOverload
from torch.fx import Node

from qalgebra.checks import constant_node, dtype_in
from qalgebra.errors import PatternError
from qalgebra.pattern import (
    Pattern,
    PatternLike,
    Var,
    any_of,
    call,
    capture,
    dtype_of,
    ignored,
    literal,
    optional,
    reciprocal,
    tag,
    where,
)
from qalgebra.qparams import ChannelQParams, QParams

__all__ = [
    "LinearForm",
    "LinearVars",
    "Unary",
    "clamp",
    "constant",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "dtype_convert",
    "linear",
    "linear_vars",
    "quantize_per_tensor",
    "reshape",
    "transposed",
    "weight_dequant",
    "with_binary",
    "with_dtype_convert",
    "with_output_quant",
    "with_reshape",
    "with_unary",
]

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed


# --------------------------------------------------------------------------------------------
# Spellings
# --------------------------------------------------------------------------------------------


def dtype_convert(x: PatternLike, dtype: PatternLike) -> Pattern:
    """A dtype conversion in any spelling: convert_element_type, _to_copy(dtype=), to.dtype."""
    return any_of(
        call(prims.convert_element_type.default, x, dtype),
        call(
            aten._to_copy.default,
            x,
            dtype=dtype,
            layout=ignored(),
            device=ignored(),
            pin_memory=ignored(),
            memory_format=ignored(),
        ),
        call(aten.to.dtype, x, dtype, memory_format=ignored()),
    )


def reshape(x: PatternLike, shape: PatternLike) -> Pattern:
    """A reshape in any spelling: view, reshape or _unsafe_view."""
    return call((aten.view.default, aten.reshape.default, aten._unsafe_view.default), x, shape)


def transposed(p: PatternLike) -> Pattern:
    """A 2-D transpose in either spelling: ``permute(p, [1, 0])`` or ``t(p)``."""
    return any_of(call(aten.permute.default, p, [1, 0]), call(aten.t.default, p))


def constant(var: Var[Node]) -> Pattern:
    """Any node computed from module constants only (a ``get_attr`` tensor, possibly viewed or
    converted: :func:`qalgebra.constants.is_constant`), bound to ``var``."""
    return where(var, constant_node(var))


def clamp(x: PatternLike, low: PatternLike, high: PatternLike) -> Pattern:
    """``clamp_max(clamp_min(x, low), high)`` or a single ``clamp(x, low, high)``."""
    return any_of(
        call(aten.clamp_max.default, call(aten.clamp_min.default, x, low), high),
        call(aten.clamp.default, x, low, high),
    )


# --------------------------------------------------------------------------------------------
# Quantize / dequantize in every form
# --------------------------------------------------------------------------------------------


#: The dtypes quantized_decomposed quantizes to.
_QUANTIZED_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.uint16,
    torch.int16,
    torch.int32,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
)


def _op_form(op: torch._ops.OpOverloadPacket[..., Any], x: PatternLike, qp: QParams) -> Pattern:
    """``op.default`` or ``op.tensor`` with constant qparams; runtime ones when ``qp`` allows.

    Constants first: a one-element ``get_attr`` scale binds as a float. The runtime alternative
    takes any other nodes (both of them, in the ``.tensor`` overload).
    """
    constant = call(
        (op.default, op.tensor), x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype
    )
    if qp.scale_node is None or qp.zero_point_node is None:
        return constant
    runtime = call(
        op.tensor, x, qp.scale_node, qp.zero_point_node, qp.quant_min, qp.quant_max, qp.dtype
    )
    return any_of(constant, runtime)


def dequantize_per_tensor(x: PatternLike, qp: QParams) -> Pattern:
    """A per-tensor dequantize of ``x`` in op form (scalar or tensor qparams) or decomposed.

    Decomposed: ``mul(sub(convert(x, float32), zp), scale)``, the ``sub`` absent when zp == 0;
    the dtype is read from ``x`` (its meta, or the conversion that produced it). Only the op
    form names quant_min/quant_max, so only it binds them. Runtime qparams (``qp`` made with
    ``runtime=True``) are matched in op form only: no flow decomposes the ``.tensor`` overloads.
    """
    op_form = _op_form(qd.dequantize_per_tensor, x, qp)
    # Only a quantized dtype: else a bf16 -> fp32 conversion followed by the `mul(x, 1/scale)` of
    # a decomposed quantize would read as a dequantize of bf16 with scale 1/scale.
    to_float = where(
        dtype_convert(dtype_of(x, qp.dtype), literal(torch.float32)),
        dtype_in(qp.dtype, _QUANTIZED_DTYPES),
    )
    shifted = optional(
        call(aten.sub.Tensor, to_float, qp.zero_point), through=0, defaults={qp.zero_point: 0}
    )
    return any_of(op_form, call(aten.mul.Tensor, shifted, qp.scale))


def quantize_per_tensor(x: PatternLike, qp: QParams) -> Pattern:
    """A per-tensor quantize of ``x`` in op form (scalar or tensor qparams) or decomposed.

    Decomposed: ``convert(clamp(add(round(mul(x, 1/scale)), zp), qmin, qmax), dtype)``, the
    ``add`` absent when zp == 0, the clamp single or split in two.
    """
    op_form = _op_form(qd.quantize_per_tensor, x, qp)
    rounded = call(aten.round.default, call(aten.mul.Tensor, x, reciprocal(qp.scale)))
    shifted = optional(
        call(aten.add.Tensor, rounded, qp.zero_point), through=0, defaults={qp.zero_point: 0}
    )
    decomposed = dtype_convert(clamp(shifted, qp.quant_min, qp.quant_max), qp.dtype)
    return any_of(op_form, decomposed)


def dequantize_per_channel(w: PatternLike, cp: ChannelQParams) -> Pattern:
    """``quantized_decomposed.dequantize_per_channel`` of a weight."""
    return call(
        qd.dequantize_per_channel.default,
        w,
        cp.scales,
        cp.zero_points,
        cp.axis,
        ignored(),
        ignored(),
        cp.dtype,
    )


def weight_dequant(
    w: PatternLike,
    cp: ChannelQParams,
    *,
    per_tensor: QParams | None = None,
    compute_dtype: Var[torch.dtype] | None = None,
    permuted: Var[list[Any]] | None = None,
) -> Pattern:
    """A weight's dequant, optionally then ``clone(channels_last)``, a conversion, a permute.

    The dequant is per channel (binding ``cp``) or, with ``per_tensor``, also per tensor in any
    form (binding ``per_tensor``'s constants: a weight observer that is per tensor).
    ``compute_dtype`` binds the dtype of an optional conversion (float32 when absent);
    ``permuted`` binds the dims of an optional permute (linear weights; ``[]`` when absent).
    """
    p: Pattern = dequantize_per_channel(w, cp)
    if per_tensor is not None:
        p = any_of(p, dequantize_per_tensor(w, per_tensor))
    p = optional(call(aten.clone.default, p, memory_format=literal(torch.channels_last)))
    if compute_dtype is not None:
        p = with_dtype_convert(p, compute_dtype)
    if permuted is not None:
        p = optional(call(aten.permute.default, p, permuted), through=0, defaults={permuted: []})
    return p


# --------------------------------------------------------------------------------------------
# Wrapping combinators
# --------------------------------------------------------------------------------------------


def with_dtype_convert(
    p: PatternLike, dtype: Var[torch.dtype] | torch.dtype, *, default: torch.dtype = torch.float32
) -> Pattern:
    """``p``, optionally converted; a Var ``dtype`` binds ``default`` when not converted."""
    if isinstance(dtype, Var):
        return optional(dtype_convert(p, dtype), through=0, defaults={dtype: default})
    return optional(dtype_convert(p, literal(dtype)), through=0)


def with_reshape(p: PatternLike, shape: Var[list[Any]] | None = None) -> Pattern:
    """``p``, optionally reshaped (view, reshape or _unsafe_view); ``shape`` binds [] if absent."""
    if shape is None:
        return optional(reshape(p, ignored()), through=0)
    return optional(reshape(p, shape), through=0, defaults={shape: []})


class Unary(enum.Enum):
    """Unary post-ops by their oneDNN names; each knows its graph spelling and its scalars."""

    NONE = "none"
    RELU = "relu"
    HARDTANH = "hardtanh"
    RELU6 = "relu6"
    HARDSWISH = "hardswish"
    SILU = "swish"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    LEAKY_RELU = "leaky_relu"
    TANH = "tanh"

    def __repr__(self) -> str:
        return f"Unary.{self.name}"

    @property
    def onednn_name(self) -> str:
        """The post-op name oneDNN's ``attr`` / ``post_op_name`` argument takes."""
        return {Unary.GELU_TANH: "gelu", Unary.RELU6: "hardtanh"}.get(self, self.value)

    @property
    def algorithm(self) -> str:
        """The ``algorithm`` argument (gelu's approximation), else ``""``."""
        return {Unary.GELU: "none", Unary.GELU_TANH: "tanh"}.get(self, "")

    @property
    def scalar_vars(self) -> tuple[Var[float], ...]:
        """The Vars holding the post-op's scalars, in oneDNN order."""
        if self is Unary.HARDTANH:
            return (HARDTANH_MIN, HARDTANH_MAX)
        if self is Unary.LEAKY_RELU:
            return (LEAKY_SLOPE,)
        return ()

    def scalars(self, bound: Callable[[Var[float]], float]) -> list[float]:
        """oneDNN's scalars for this post-op; ``bound`` reads a scalar Var from the match."""
        if self is Unary.RELU6:
            return [0.0, 6.0]
        return [bound(v) for v in self.scalar_vars]

    def applied_to(self, x: PatternLike) -> Pattern:
        """The post-op's graph spelling applied to ``x``."""
        if self is Unary.NONE:
            raise ValueError("Unary.NONE has no graph spelling")
        return _UNARY_SPELLING[self](x)


HARDTANH_MIN = Var("hardtanh_min", float)
HARDTANH_MAX = Var("hardtanh_max", float)
LEAKY_SLOPE = Var("leaky_relu_slope", float)

#: The post-op's input when a decomposed spelling reads it twice (captured once, then reused).
UNARY_INPUT = Var("unary_input", Node)


def _relu6_decomposed(t: PatternLike) -> Pattern:
    """``clamp(t, 0, 6)`` as one clamp, two (``clamp(clamp(t, 0), None, 6)``) or a hardtanh."""
    return any_of(
        clamp(t, 0, 6),
        call(aten.clamp.default, call(aten.clamp.default, t, 0), None, 6),
        call(aten.hardtanh.default, t, 0, 6),
    )


def _hardswish_decomposed(x: PatternLike) -> Pattern:
    """``x * relu6(x + 3) / 6``: what ``run_decompositions()`` makes of hardswish."""
    shifted = call(aten.add.Tensor, UNARY_INPUT, 3)
    return call(
        aten.div.Tensor,
        call(aten.mul.Tensor, capture(UNARY_INPUT, x), _relu6_decomposed(shifted)),
        6,
    )


def _silu_decomposed(x: PatternLike) -> Pattern:
    """``x * sigmoid(x)``: what ``run_decompositions()`` makes of silu."""
    return call(aten.mul.Tensor, capture(UNARY_INPUT, x), call(aten.sigmoid.default, UNARY_INPUT))


_UNARY_SPELLING: dict[Unary, Callable[[PatternLike], Pattern]] = {
    Unary.RELU: lambda x: call(aten.relu.default, x),
    Unary.HARDTANH: lambda x: call(aten.hardtanh.default, x, HARDTANH_MIN, HARDTANH_MAX),
    Unary.RELU6: lambda x: call(aten.relu6.default, x),
    Unary.HARDSWISH: lambda x: any_of(call(aten.hardswish.default, x), _hardswish_decomposed(x)),
    Unary.SILU: lambda x: any_of(call(aten.silu.default, x), _silu_decomposed(x)),
    Unary.GELU: lambda x: call(aten.gelu.default, x, approximate="none"),
    Unary.GELU_TANH: lambda x: call(aten.gelu.default, x, approximate="tanh"),
    Unary.LEAKY_RELU: lambda x: call(aten.leaky_relu.default, x, LEAKY_SLOPE),
    Unary.TANH: lambda x: call(aten.tanh.default, x),
}


def with_unary(p: PatternLike, unary: Var[Unary], *ops: Unary) -> Pattern:
    """``p`` followed by one of ``ops``; ``unary`` binds which. ``Unary.NONE`` allows none.

    Ordered alternatives, the post-ops first: a post-op is preferred over stopping before it.
    (Not ``optional``: decomposed spellings such as ``x * sigmoid(x)`` do not read ``p`` at one
    fixed argument.)
    """
    if not ops:
        raise PatternError("with_unary: expected at least one Unary")
    spelled = [tag(op.applied_to(p), unary, op) for op in ops if op is not Unary.NONE]
    if Unary.NONE in ops:
        spelled.append(tag(p, unary, Unary.NONE))
    return any_of(*spelled)


def with_binary(
    p: PatternLike, other: PatternLike, op: torch._ops.OpOverload[..., Any] = aten.add.Tensor
) -> Pattern:
    """``op(p, other)``; commutative ops (add, mul) also match ``op(other, p)``."""
    return call(op, p, other)


def with_output_quant(p: PatternLike, qp: QParams) -> Pattern:
    """``p`` quantized per tensor, through an optional conversion back to float32 (bf16 form)."""
    return quantize_per_tensor(with_dtype_convert(p, torch.float32), qp)


# --------------------------------------------------------------------------------------------
# A linear in every spelling
# --------------------------------------------------------------------------------------------


class LinearForm(enum.Enum):
    """Which spelling of a linear matched (see :func:`linear`)."""

    LINEAR = "linear"
    MM = "mm"
    BMM = "bmm"

    def __repr__(self) -> str:
        return f"LinearForm.{self.name}"


@dataclass(frozen=True, slots=True)
class LinearVars:
    """The Vars a :func:`linear` binds besides its operands' own.

    ``x_2d_shape``: the reshape of ``x`` to 2-D before ``mm`` (``[]`` when absent);
    ``out_shape``: the reshape of the result back to N-D (``[]`` when absent);
    ``x_expanded`` / ``x_expand``: the ``expand`` of ``x`` before a ``bmm`` and its sizes (check
    with :func:`qalgebra.checks.expand_keeps_shape` that it does not broadcast the batch);
    ``form``: which spelling matched.
    """

    x_2d_shape: Var[list[Any]]
    out_shape: Var[list[Any]]
    x_expanded: Var[Node]
    x_expand: Var[list[Any]]
    form: Var[LinearForm]


def linear_vars(prefix: str = "") -> LinearVars:
    """``LinearVars`` named ``{prefix}_x_2d_shape``, ``{prefix}_out_shape``, ... (no prefix:
    ``x_2d_shape``, ...)."""
    p = f"{prefix}_" if prefix else ""
    return LinearVars(
        Var(f"{p}x_2d_shape", list),
        Var(f"{p}out_shape", list),
        Var(f"{p}x_expanded", Node),
        Var(f"{p}x_expand", list),
        Var(f"{p}linear_form", LinearForm),
    )


def linear(
    x: PatternLike,
    lv: LinearVars,
    *,
    w: PatternLike | None = None,
    w_t: PatternLike | None = None,
    bias: PatternLike | None = None,
    forms: tuple[LinearForm, ...] = tuple(LinearForm),
    matmul: OpOverload[..., Any] = aten.mm.default,
    reshape_out: bool = True,
) -> Pattern:
    """``x @ w.T (+ bias)`` in every spelling ``torch.export`` and its decompositions leave.

    - ``LinearForm.LINEAR``: ``aten.linear(x, w, bias)`` (``bias`` or None);
    - ``LinearForm.MM``: ``[view] addmm(bias, [view] x, w_t) | mm([view] x, w_t) [view]`` -- the
      views around an N-D ``x``, through ``view``, ``reshape`` or ``_unsafe_view``;
    - ``LinearForm.BMM``: ``[view] bmm([view] expand(x), [view] expand(w_t)) [view] [+ bias]``,
      what the decomposition gives for a non-contiguous N-D ``x``.

    ``w`` is the ``[N, K]`` weight, ``w_t`` the ``[K, N]`` operand of the matmul (by default
    ``w`` transposed, as ``permute`` or ``t``); ``bias`` None matches the unbiased spellings only;
    ``matmul`` is the 2-D product (``aten._int_mm`` for int8 operands: no ``addmm`` then);
    ``reshape_out=False`` leaves the reshape after it to the caller (``lv.out_shape`` unbound).
    """
    if LinearForm.LINEAR in forms and w is None:
        raise PatternError("linear: LinearForm.LINEAR needs the weight w")
    if w_t is None:
        if w is None:
            raise PatternError("linear: expected the weight w or its transpose w_t")
        w_t = transposed(w)
    if not forms:
        raise PatternError("linear: expected at least one LinearForm")
    spelled: list[Pattern] = []
    if LinearForm.LINEAR in forms:
        direct = (
            call(aten.linear.default, x, w)
            if bias is None
            else call(aten.linear.default, x, w, any_of(literal(None), bias))
        )
        spelled.append(tag(direct, lv.form, LinearForm.LINEAR))
    if LinearForm.MM in forms:
        x2d = with_reshape(x, lv.x_2d_shape)
        product: Pattern = call(matmul, x2d, w_t)
        if bias is not None and matmul is aten.mm.default:
            product = any_of(call(aten.addmm.default, bias, x2d, w_t), product)
        spelled.append(tag(_reshaped(product, lv, reshape_out), lv.form, LinearForm.MM))
    if LinearForm.BMM in forms:
        x_expanded = capture(lv.x_expanded, call(aten.expand.default, x, lv.x_expand))
        w_expanded = call(aten.expand.default, w_t, ignored())
        batched = _reshaped(
            call(aten.bmm.default, with_reshape(x_expanded), with_reshape(w_expanded)),
            lv,
            reshape_out,
        )
        if bias is not None:
            spelled.append(tag(call(aten.add.Tensor, batched, bias), lv.form, LinearForm.BMM))
        spelled.append(tag(batched, lv.form, LinearForm.BMM))
    return any_of(*spelled)


def _reshaped(p: Pattern, lv: LinearVars, reshape_out: bool) -> Pattern:
    return with_reshape(p, lv.out_shape) if reshape_out else p
