"""Pieces the conv and linear families share: their Vars, input/weight/output patterns, checks.

Every family is ``[quantize] <- [unary] <- [binary] <- compute(dequant(x), dequant(w), bias)``;
the Vars below name the parts, so replacement code reads ``m[X_SCALE]``-style typed values.

Beyond the graphs Inductor's and torchao's lowerings take, one definition also covers:

- **runtime activation qparams** (dynamic quantization: ``choose_qparams`` -> ``.tensor``
  quantize/dequantize): :func:`activation_input` hands the rewrite a ``RuntimeQParams`` and the
  fused op is emitted by its packet, which picks the ``.tensor`` overload for a node's scale
  (:mod:`qalgebra.emit`);
- **per-tensor weights** (a per-tensor weight observer): :func:`weight_quant` expands the one
  scale per output channel, which is what oneDNN's per-channel weight scales then compute;
- **signed int8 activations into ops that take uint8 only** (conv): ``dequant(x_s8, s, zp) ==
  dequant(x_s8 + 128 as uint8, s, zp + 128)`` exactly, so :func:`activation_input` shifts them,
  folding the shift into the producing quantize when nothing else reads it (the quantize then
  yields uint8 with its zero point and range moved by 128), else with an explicit shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qalgebra import emit
from qalgebra.combinators import (
    Unary,
    dequantize_per_tensor,
    quantize_per_tensor,
    weight_dequant,
    with_dtype_convert,
    with_output_quant,
)
from qalgebra.errors import Refusal
from qalgebra.isa import pair_sum_may_saturate
from qalgebra.match import match_node
from qalgebra.ops import aten
from qalgebra.pattern import Match, Pattern, Var, any_of, call, capture, ignored, literal
from qalgebra.qparams import (
    ChannelQParams,
    ConstantQParams,
    QParams,
    QParamValues,
    RuntimeQParams,
    channel_qparams,
    qparams,
)
from qalgebra.rewriter import Rewriter

X = Var("x", fx.Node)
#: The activation's qparams: constants, or runtime tensors (read them with ``XQ.read(m)``).
XQ: QParams = qparams("x", runtime=True)
ACT_DTYPE = Var("act_dtype", torch.dtype)
W = Var("w", torch.Tensor)
WQ: ChannelQParams = channel_qparams("w")
#: A weight dequantized per tensor (read both kinds through :func:`weight_quant`).
WQ_TENSOR: QParams = qparams("w_tensor")
W_DTYPE = Var("w_compute_dtype", torch.dtype)
BIAS = Var("bias", torch.Tensor)
BIAS_DTYPE = Var("bias_dtype", torch.dtype)
OQ: QParams = qparams("out")
OUT_CONVERT = Var("out_convert_dtype", torch.dtype)
UNARY = Var("unary", Unary)
OTHER = Var("other", fx.Node)
OTHER_Q: QParams = qparams("other")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16)

#: meta key of a fused node's int8 output range (quant_min, quant_max), read by later fusions.
QUANT_RANGE_KEY = "qalgebra_quant_range"


def activation() -> Pattern:
    """The dequantized activation, optionally converted to bf16 (int8-mixed-bf16)."""
    return with_dtype_convert(dequantize_per_tensor(X, XQ), ACT_DTYPE)


def weight() -> Pattern:
    """The weight dequantized per channel or per tensor, optionally cloned to channels_last and
    converted."""
    return weight_dequant(W, WQ, per_tensor=WQ_TENSOR, compute_dtype=W_DTYPE)


@dataclass(frozen=True, slots=True)
class WeightQuant:
    """The weight's quantization as oneDNN takes it: a scale and zero point per output channel."""

    scales: torch.Tensor
    zero_points: torch.Tensor
    axis: int
    dtype: torch.dtype


def weight_quant(m: Match) -> WeightQuant:
    """The matched weight's quantization, a per-tensor one expanded to every output channel.

    The per-tensor dequantize multiplies the float32 weight by its scale rounded to float32;
    oneDNN multiplies by float32 per-channel scales: the same products.
    """
    if WQ.scales in m:
        return WeightQuant(m[WQ.scales], m[WQ.zero_points], m[WQ.axis], m[WQ.dtype])
    channels = int(m[W].shape[0]) if m[W].dim() else 1
    return WeightQuant(
        torch.full((channels,), m[WQ_TENSOR.scale], dtype=torch.float32),
        torch.full((channels,), m[WQ_TENSOR.zero_point], dtype=torch.int64),
        0,
        m[WQ_TENSOR.dtype],
    )


def bias_or_none() -> Pattern:
    """A constant bias (optionally converted to the compute dtype) or None."""
    return any_of(literal(None), with_dtype_convert(BIAS, BIAS_DTYPE))


def maybe_output_quant(p: Pattern) -> Pattern:
    """``p`` quantized per tensor (tried first: the larger match) or ``p`` with float output."""
    return any_of(with_output_quant(p, OQ), p)


def output_qparams(m: Match) -> tuple[float, int, torch.dtype]:
    """(scale, zero point, dtype) of the fused op's output: the quant's, or float identity."""
    if OQ.scale in m:
        return m[OQ.scale], m[OQ.zero_point], m[OQ.dtype]
    return 1.0, 0, m[ACT_DTYPE]


def _narrow_quant_range(m: Match) -> tuple[int, int] | None:
    """The output quant's (quant_min, quant_max) when narrower than its dtype's range."""
    if OQ.scale not in m:
        return None
    low, high = m[OQ.quant_min], m[OQ.quant_max]
    info = torch.iinfo(m[OQ.dtype])
    return None if (low, high) == (info.min, info.max) else (low, high)


#: The float interval each clamping post-op keeps (as oneDNN's hardtanh).
_CLAMPS = {
    Unary.NONE: (-math.inf, math.inf),
    Unary.RELU: (0.0, math.inf),
    Unary.RELU6: (0.0, 6.0),
}


def unary_args_enforcing_range(m: Match) -> tuple[str, list[float], str, bool]:
    """``unary_args``, folding a narrow output quant range into a hardtanh post-op if it can.

    With none / relu / relu6 / hardtanh, clamping the float result to the quant range,
    ``[(qmin - zp) * scale, (qmax - zp) * scale]``, and intersecting it with the post-op's own
    interval gives the same int8 result as clamping after quantization, without an extra pass
    over the output. The flag says whether the range is enforced that way.
    """
    name, scalars, algorithm = unary_args(m)
    narrow = _narrow_quant_range(m)
    u = m[UNARY]
    if narrow is None or (u not in _CLAMPS and u is not Unary.HARDTANH):
        return name, scalars, algorithm, False
    low, high = _CLAMPS[u] if u in _CLAMPS else (scalars[0], scalars[1])
    scale, zp = m[OQ.scale], m[OQ.zero_point]
    low, high = max(low, (narrow[0] - zp) * scale), min(high, (narrow[1] - zp) * scale)
    if not low <= high:
        return name, scalars, algorithm, False
    return "hardtanh", [low, high], "", True


def clamp_to_quant_range(
    m: Match, rw: Rewriter, node: fx.Node, *, enforced: bool = False, owned: bool = False
) -> fx.Node:
    """oneDNN's int8 outputs span the whole dtype; clamp when the quant's range is narrower.

    A ``reduce_range`` quantize clamps to [0, 127], which the fused op cannot express: without
    this clamp a value that rounds to 128 would come out as 128 instead of 127. ``enforced``:
    the fused op's post-op already keeps the result in range (``unary_args_enforcing_range``).
    ``owned``: ``node`` is a tensor the fused op just wrote and only this clamp reads, so it is
    clamped in place (no new tensor).
    """
    if OQ.scale not in m:
        return node
    low, high = m[OQ.quant_min], m[OQ.quant_max]
    if _narrow_quant_range(m) is not None and not enforced:
        node = range_clamp(rw, node, (low, high), torch.iinfo(m[OQ.dtype]), in_place=owned)
    rw.set_meta(node, QUANT_RANGE_KEY, (low, high))
    return node


def output_quantize(m: Match, rw: Rewriter, x: fx.Node, scale: float | None = None) -> fx.Node:
    """``x`` quantized with the matched output quant (op form), ``scale`` in place of its scale
    when given; its range is recorded for later fusions."""
    out = emit.quantized_decomposed.quantize_per_tensor.default(
        rw,
        input=x,
        scale=m[OQ.scale] if scale is None else scale,
        zero_point=m[OQ.zero_point],
        quant_min=m[OQ.quant_min],
        quant_max=m[OQ.quant_max],
        dtype=m[OQ.dtype],
    )
    rw.set_meta(out, QUANT_RANGE_KEY, (m[OQ.quant_min], m[OQ.quant_max]))
    return out


def range_clamp(
    rw: Rewriter, node: fx.Node, bounds: tuple[int, int], info: torch.iinfo, *, in_place: bool
) -> fx.Node:
    """``node`` clamped to ``bounds``, skipping a bound its dtype already enforces.

    On small tensors the op call is the cost: measured on [2, 16, 8, 8] uint8, ``clamp`` took
    6.8 us, ``clamp_max`` 3.3 us and ``clamp_max_`` 2.3 us.
    """
    low, high = bounds
    ops = emit.aten
    if low <= info.min:
        if in_place:
            return ops.clamp_max_.default(rw, self=node, max=high)
        return ops.clamp_max.default(rw, self=node, max=high)
    if high >= info.max:
        if in_place:
            return ops.clamp_min_.default(rw, self=node, min=low)
        return ops.clamp_min.default(rw, self=node, min=low)
    if in_place:
        return ops.clamp_.default(rw, self=node, min=low, max=high)
    return ops.clamp.default(rw, self=node, min=low, max=high)


def range_clamped(p: Pattern) -> Pattern:
    """``p`` or any range clamp :func:`range_clamp` puts after it (same tensor layout as ``p``)."""
    one_bound = (
        aten.clamp_max_.default,
        aten.clamp_max.default,
        aten.clamp_min_.default,
        aten.clamp_min.default,
    )
    two_bounds = (aten.clamp_.default, aten.clamp.default)
    return any_of(p, call(one_bound, p, ignored()), call(two_bounds, p, ignored(), ignored()))


def reshaped_output(m: Match, rw: Rewriter, node: fx.Node, shape: list[Any]) -> fx.Node:
    """``node`` reshaped to ``shape`` (when given), keeping its recorded int8 output range."""
    if not shape:
        return node
    out = emit.aten.reshape.default(rw, self=node, shape=shape)
    if QUANT_RANGE_KEY in node.meta:
        rw.set_meta(out, QUANT_RANGE_KEY, node.meta[QUANT_RANGE_KEY])
    return out


def shifted_to_uint8(m: Match, allowed_act: tuple[torch.dtype, ...]) -> bool:
    """Whether the int8 activation goes to an op taking uint8 only, shifted by +128."""
    return m[XQ.dtype] == torch.int8 and allowed_act == (torch.uint8,)


def check_common(m: Match, *, allowed_act: tuple[torch.dtype, ...]) -> None:
    """Refuse what oneDNN would compute wrongly or not at all; reasons reach the report.

    ``allowed_act``: the activation dtypes the op takes. An op taking only uint8 also gets int8
    activations, shifted (:func:`activation_input`): the rewrite must pass its input through
    :func:`activation_input`.
    """
    _check_qparams(m, XQ, "input")
    if OQ.scale in m:
        _check_qparams(m, OQ, "output")
    act = m[XQ.dtype]
    if act not in allowed_act and not shifted_to_uint8(m, allowed_act):
        raise Refusal(f"activation dtype {act} is not supported (expected one of {allowed_act})")
    wq = weight_quant(m)
    if wq.dtype != torch.int8 or m[W].dtype != torch.int8:
        raise Refusal(f"weight dtype {m[W].dtype} is not int8")
    if m[ACT_DTYPE] not in _FLOAT_DTYPES or m[W_DTYPE] != m[ACT_DTYPE]:
        raise Refusal(
            f"compute dtypes differ or are unsupported: activation {m[ACT_DTYPE]}, "
            f"weight {m[W_DTYPE]}"
        )
    if BIAS in m and m[BIAS].dtype not in _FLOAT_DTYPES:
        raise Refusal(f"bias dtype {m[BIAS].dtype} is not a float dtype")
    if wq.axis != 0:
        raise Refusal(f"weight quantized along axis {wq.axis}, expected 0 (output channels)")
    if bool((wq.zero_points != 0).any()):
        raise Refusal("weight zero points are not all 0 (oneDNN needs symmetric weights)")
    scales = wq.scales
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise Refusal("weight scales are not all finite positive numbers")
    # Without VNNI, oneDNN turns int8 activations into uint8 by adding 128 before the same
    # saturating pair sums: their magnitude is then up to 255 whatever the quant range. Shifted
    # here instead, they reach their own range plus 128.
    low, high = _activation_range(m)
    if shifted_to_uint8(m, allowed_act):
        max_act = _max_abs(low + 128, high + 128)
    else:
        max_act = 255 if act == torch.int8 else _max_abs(low, high)
    if pair_sum_may_saturate(max_act, m[W]):
        shifted = " (int8 shifted to uint8)" if shifted_to_uint8(m, allowed_act) else ""
        raise Refusal(
            "this CPU's int8 kernels add products in saturating int16 pairs (no AVX512-VNNI/AMX): "
            f"activations up to {max_act}{shifted} times weights up to "
            f"{int(m[W].to(torch.int16).abs().max())} would overflow; quantize activations to "
            "7-bit uint8 (reduce_range=True) or lower on a VNNI/AMX CPU",
            cause="probe:int8_pairs_saturate",
        )


_PRODUCER_Q = qparams("producer", runtime=True)
_PRODUCER_INPUT = Var("producer_input", fx.Node)
_PRODUCER = quantize_per_tensor(capture(_PRODUCER_INPUT, ignored()), _PRODUCER_Q)


def _activation_range(m: Match) -> tuple[int, int]:
    """The levels the quantized activation can hold: from its qparams or producer."""
    if XQ.quant_min in m:
        return m[XQ.quant_min], m[XQ.quant_max]
    recorded = m[X].meta.get(QUANT_RANGE_KEY)
    if isinstance(recorded, tuple):
        low, high = recorded
        return int(low), int(high)
    producer = match_node(_PRODUCER, m[X])
    if producer is not None:
        return producer[_PRODUCER_Q.quant_min], producer[_PRODUCER_Q.quant_max]
    info = torch.iinfo(m[XQ.dtype])
    return int(info.min), int(info.max)


def _max_abs(low: int, high: int) -> int:
    return max(abs(low), abs(high))


def _check_qparams(m: Match, qp: QParams, what: str) -> None:
    dtype = m[qp.dtype]
    if dtype not in (torch.uint8, torch.int8):
        raise Refusal(f"{what} quantized dtype {dtype} is not uint8/int8")
    values = qp.read(m)
    if isinstance(values, RuntimeQParams):
        return  # known when the graph runs; oneDNN then computes with them as dequantize does
    scale = values.scale
    if not (scale > 0 and scale != float("inf")):
        raise Refusal(f"{what} scale {scale!r} is not a finite positive number")
    info = torch.iinfo(dtype)
    zp = values.zero_point
    if not info.min <= zp <= info.max:
        raise Refusal(f"{what} zero point {zp} is outside the range of {dtype}")
    if qp.quant_min in m and not m[qp.quant_min] <= zp <= m[qp.quant_max]:
        raise Refusal(f"{what} zero point {zp} is outside [{m[qp.quant_min]}, {m[qp.quant_max]}]")


def unary_args(m: Match) -> tuple[str, list[float], str]:
    """oneDNN's (post-op name, scalars, algorithm) for the matched unary post-op."""
    u = m[UNARY]
    return u.onednn_name, u.scalars(m.__getitem__), u.algorithm


@dataclass(frozen=True, slots=True)
class WeightNodes:
    """The get_attr nodes a fused op reads its weight from."""

    packed: fx.Node
    scales: fx.Node
    zero_points: fx.Node
    bias: fx.Node | None


def weight_constants(m: Match, rw: Rewriter, packed: torch.Tensor, hint: str) -> WeightNodes:
    """get_attr nodes for the packed weight, its scales and zero points, and the bias (or None)."""
    bias = rw.constant(f"{hint}_bias", m[BIAS]) if BIAS in m else None
    wq = weight_quant(m)
    return WeightNodes(
        rw.constant(f"{hint}_packed_weight", packed),
        rw.constant(f"{hint}_w_scales", wq.scales),
        rw.constant(f"{hint}_w_zps", wq.zero_points),
        bias,
    )


# --------------------------------------------------------------------------------------------
# The activation as the fused op takes it
# --------------------------------------------------------------------------------------------


def prepack_hint(m: Match) -> tuple[float, int]:
    """The activation (scale, zero point) a weight prepack takes as a layout hint: the constant
    ones, or (1.0, 0) for runtime qparams (the hint does not change the results)."""
    q = XQ.read(m)
    return (q.scale, q.zero_point) if isinstance(q, ConstantQParams) else (1.0, 0)


def activation_input(
    m: Match, rw: Rewriter, *, allowed_act: tuple[torch.dtype, ...]
) -> tuple[fx.Node, QParamValues]:
    """The quantized activation and its qparams, as an op taking ``allowed_act`` needs them.

    An int8 activation for an op taking uint8 only (see :func:`shifted_to_uint8`) is shifted
    by +128 with its zero point: exact, since ``(q + 128) - (zp + 128) == q - zp``.
    """
    x, q = m[X], XQ.read(m)
    if not shifted_to_uint8(m, allowed_act):
        return x, q
    shifted_q = _plus_128(q, rw)
    shifted = _folded_shift(m, rw, q, shifted_q)
    if shifted is None:
        as_bytes = emit.aten.view.dtype(rw, self=x, dtype=torch.uint8)
        shifted = emit.aten.bitwise_xor.Scalar(rw, self=as_bytes, other=128)  # the sign bit
    return shifted, shifted_q


def _plus_128(q: QParamValues, rw: Rewriter) -> QParamValues:
    """``q`` with its zero point moved by 128 (a node adding it, for a runtime zero point)."""
    if isinstance(q, RuntimeQParams):
        return RuntimeQParams(q.scale, emit.aten.add.Scalar(rw, self=q.zero_point, other=128))
    return ConstantQParams(q.scale, q.zero_point + 128)


def _folded_shift(
    m: Match,
    rw: Rewriter,
    q: QParamValues,
    shifted_q: QParamValues,
) -> fx.Node | None:
    """The producing quantize redone to uint8 with zero point and range + 128, when only this
    match reads the int8 tensor (the int8 quantize then dies); else None.

    ``q`` / ``shifted_q``: the dequantize's qparams before and after the shift, reused when the
    quantize has the same ones (a runtime zero point is then moved once).
    """
    x = m[X]
    inside = set(m.nodes)
    if rw.node(x) is not x or not all(u in inside for u in x.users):
        return None
    producer = match_node(_PRODUCER, x)
    if producer is None or producer[_PRODUCER_Q.dtype] != torch.int8:
        return None
    produced = _PRODUCER_Q.read(producer)
    folded_q = shifted_q if produced == q else _plus_128(produced, rw)
    low, high = producer[_PRODUCER_Q.quant_min] + 128, producer[_PRODUCER_Q.quant_max] + 128
    folded = emit.quantized_decomposed.quantize_per_tensor(  # .default, or .tensor for nodes
        rw,
        input=producer[_PRODUCER_INPUT],
        scale=folded_q.scale,
        zero_point=folded_q.zero_point,
        quant_min=low,
        quant_max=high,
        dtype=torch.uint8,
    )
    rw.set_meta(folded, QUANT_RANGE_KEY, (low, high))
    return folded
