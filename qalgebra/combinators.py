"""Combinators: build every quantized-fusion variant from one definition.

Building blocks that match **every form** a quantize/dequantize takes in a graph and bind the same
typed Vars in each (op form ``.default`` and ``.tensor``; aten-decomposed with or without the
zero-point add/sub; a single ``clamp`` or ``clamp_min`` + ``clamp_max``):

- ``quantize_per_tensor(x, qp)``, ``dequantize_per_tensor(x, qp)`` with ``qp = qparams("x")``;
  with ``qparams("x", runtime=True)`` also the ``.tensor`` op form whose scale and zero point
  are computed while the graph runs (``choose_qparams`` outputs, graph inputs);
  ``qp.read(m)`` gives replacement code a :class:`ConstantQParams` or a
  :class:`RuntimeQParams` to narrow;
- ``dequantize_per_channel(w, cp)`` and ``weight_dequant(w, cp, ...)`` for weights (optional
  ``clone(channels_last)``, bf16 convert, ``permute``; ``per_tensor=qp`` also takes a weight
  dequantized per tensor);
- ``dtype_convert(x, dtype)``: ``prims.convert_element_type``, ``aten._to_copy(dtype=)`` or
  ``aten.to.dtype``; ``reshape(x, shape)``: ``view``, ``reshape`` or ``_unsafe_view``.

Combinators that wrap a pattern:

- ``with_dtype_convert(p, dtype)``: ``p`` optionally followed by a conversion (``dtype`` binds the
  target dtype, or its default when the conversion is absent);
- ``with_reshape(p, shape)``: ``p`` optionally followed by a reshape;
- ``with_unary(p, unary, *ops)``: ``p`` followed by one of the unary post-ops ``ops`` (or none,
  when ``Unary.NONE`` is among them); ``unary`` binds which one;
- ``with_binary(p, other, op)``: ``op(p, other)`` in either operand order for commutative ops;
- ``with_output_quant(p, qp)``: ``p`` quantized per tensor (through a conversion back to float32
  in the int8-mixed-bf16 form).

>>> qp = qparams("x")
>>> qp.scale
Var('x_scale', float)
>>> p = dequantize_per_tensor(Var("x", torch.fx.Node), qp)
>>> len(p.alternatives)
2
>>> runtime = qparams("x", runtime=True)
>>> runtime.scale_node
Var('x_scale_node', torch.fx.node.Node)
>>> len(dequantize_per_tensor(Var("x", torch.fx.Node), runtime).alternatives)
3
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.ao.quantization.fx._decomposed
from torch.fx import Node

from qalgebra.checks import dtype_in
from qalgebra.errors import PatternError
from qalgebra.pattern import (
    Match,
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

__all__ = [
    "ChannelQParams",
    "ConstantQParams",
    "QParamValues",
    "QParams",
    "RuntimeQParams",
    "Unary",
    "channel_qparams",
    "clamp",
    "dequantize_per_channel",
    "dequantize_per_tensor",
    "dtype_convert",
    "qparams",
    "quantize_per_tensor",
    "reshape",
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
# Typed quantization parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConstantQParams:
    """A scale and zero point known when lowering (literals, or one-element constants)."""

    scale: float
    zero_point: int


@dataclass(frozen=True, slots=True)
class RuntimeQParams:
    """A scale and zero point computed while the graph runs: the nodes holding them.

    oneDNN's ``.tensor`` overloads take them as they are (one-element tensors).
    """

    scale: Node
    zero_point: Node


#: What :meth:`QParams.read` gives: replacement code narrows it with ``isinstance``.
QParamValues: TypeAlias = ConstantQParams | RuntimeQParams


@dataclass(frozen=True, slots=True)
class QParams:
    """The Vars of one per-tensor (de)quantization: what replacement code reads back.

    ``scale`` / ``zero_point`` bind constants. With ``scale_node`` / ``zero_point_node`` (made
    by ``qparams(..., runtime=True)``) the patterns also match qparams that are runtime
    tensors, binding those Vars instead; :meth:`read` tells the two apart for replacement code,
    typed, so that code handling only constants cannot read a runtime scale by mistake.
    """

    scale: Var[float]
    zero_point: Var[int]
    dtype: Var[torch.dtype]
    quant_min: Var[int]
    quant_max: Var[int]
    scale_node: Var[Node] | None = None
    zero_point_node: Var[Node] | None = None

    def read(self, m: Match) -> QParamValues:
        """The scale and zero point ``m`` bound: constants, or the nodes computing them."""
        node, zp_node = self.scale_node, self.zero_point_node
        if node is not None and zp_node is not None and node in m:
            return RuntimeQParams(m[node], m[zp_node])
        return ConstantQParams(m[self.scale], m[self.zero_point])


def qparams(prefix: str, *, runtime: bool = False) -> QParams:
    """``QParams`` named ``{prefix}_scale``, ``{prefix}_zp``, ``{prefix}_dtype``, ...

    ``runtime``: also match scale and zero point computed in the graph (``{prefix}_scale_node``,
    ``{prefix}_zp_node``); the replacement then reads them through :meth:`QParams.read`.
    """
    return QParams(
        Var(f"{prefix}_scale", float),
        Var(f"{prefix}_zp", int),
        Var(f"{prefix}_dtype", torch.dtype),
        Var(f"{prefix}_qmin", int),
        Var(f"{prefix}_qmax", int),
        Var(f"{prefix}_scale_node", Node) if runtime else None,
        Var(f"{prefix}_zp_node", Node) if runtime else None,
    )


@dataclass(frozen=True, slots=True)
class ChannelQParams:
    """The Vars of a per-channel weight dequantization."""

    scales: Var[torch.Tensor]
    zero_points: Var[torch.Tensor]
    axis: Var[int]
    dtype: Var[torch.dtype]


def channel_qparams(prefix: str) -> ChannelQParams:
    """``ChannelQParams`` named ``{prefix}_scales``, ``{prefix}_zps``, ..."""
    return ChannelQParams(
        Var(f"{prefix}_scales", torch.Tensor),
        Var(f"{prefix}_zps", torch.Tensor),
        Var(f"{prefix}_axis", int),
        Var(f"{prefix}_dtype", torch.dtype),
    )


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
