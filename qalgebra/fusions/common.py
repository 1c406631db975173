"""Pieces the conv and linear families share: their Vars, input/weight/output patterns, checks.

Every family is ``[quantize] <- [unary] <- [binary] <- compute(dequant(x), dequant(w), bias)``;
the Vars below name the parts, so replacement code reads ``m[X_SCALE]``-style typed values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from qalgebra.combinators import (
    ChannelQParams,
    QParams,
    Unary,
    channel_qparams,
    dequantize_per_tensor,
    qparams,
    quantize_per_tensor,
    weight_dequant,
    with_dtype_convert,
    with_output_quant,
)
from qalgebra.fusions.base import Refusal, Rewriter
from qalgebra.isa import pair_sum_may_saturate
from qalgebra.match import match_node
from qalgebra.pattern import Match, Pattern, Var, any_of, call, ignored, literal

X = Var("x", fx.Node)
XQ: QParams = qparams("x")
ACT_DTYPE = Var("act_dtype", torch.dtype)
W = Var("w", torch.Tensor)
WQ: ChannelQParams = channel_qparams("w")
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
    """The dequantized weight, optionally cloned to channels_last and converted."""
    return weight_dequant(W, WQ, compute_dtype=W_DTYPE)


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


def range_clamp(
    rw: Rewriter, node: fx.Node, bounds: tuple[int, int], info: torch.iinfo, *, in_place: bool
) -> fx.Node:
    """``node`` clamped to ``bounds``, skipping a bound its dtype already enforces.

    On small tensors the op call is the cost: measured on [2, 16, 8, 8] uint8, ``clamp`` took
    6.8 us, ``clamp_max`` 3.3 us and ``clamp_max_`` 2.3 us.
    """
    low, high = bounds
    aten = torch.ops.aten
    if low <= info.min:
        return rw.call(aten.clamp_max_.default if in_place else aten.clamp_max.default, node, high)
    if high >= info.max:
        return rw.call(aten.clamp_min_.default if in_place else aten.clamp_min.default, node, low)
    return rw.call(aten.clamp_.default if in_place else aten.clamp.default, node, low, high)


def range_clamped(p: Pattern) -> Pattern:
    """``p`` or any range clamp :func:`range_clamp` puts after it (same tensor layout as ``p``)."""
    aten = torch.ops.aten
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
    out = rw.call(torch.ops.aten.reshape.default, node, shape)
    if QUANT_RANGE_KEY in node.meta:
        rw.set_meta(out, QUANT_RANGE_KEY, node.meta[QUANT_RANGE_KEY])
    return out


def check_common(m: Match, *, allowed_act: tuple[torch.dtype, ...]) -> None:
    """Refuse what oneDNN would compute wrongly or not at all; reasons reach the report."""
    _check_qparams(m, XQ, "input")
    if OQ.scale in m:
        _check_qparams(m, OQ, "output")
    act = m[XQ.dtype]
    if act not in allowed_act:
        raise Refusal(f"activation dtype {act} is not supported (expected one of {allowed_act})")
    if m[WQ.dtype] != torch.int8 or m[W].dtype != torch.int8:
        raise Refusal(f"weight dtype {m[W].dtype} is not int8")
    if m[ACT_DTYPE] not in _FLOAT_DTYPES or m[W_DTYPE] != m[ACT_DTYPE]:
        raise Refusal(
            f"compute dtypes differ or are unsupported: activation {m[ACT_DTYPE]}, "
            f"weight {m[W_DTYPE]}"
        )
    if BIAS in m and m[BIAS].dtype not in _FLOAT_DTYPES:
        raise Refusal(f"bias dtype {m[BIAS].dtype} is not a float dtype")
    if m[WQ.axis] != 0:
        raise Refusal(f"weight quantized along axis {m[WQ.axis]}, expected 0 (output channels)")
    if bool((m[WQ.zero_points] != 0).any()):
        raise Refusal("weight zero points are not all 0 (oneDNN needs symmetric weights)")
    scales = m[WQ.scales]
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise Refusal("weight scales are not all finite positive numbers")
    # Without VNNI, oneDNN turns int8 activations into uint8 by adding 128 before the same
    # saturating pair sums: their magnitude is then up to 255 whatever the quant range.
    max_act = 255 if act == torch.int8 else _max_abs_activation(m)
    if pair_sum_may_saturate(max_act, m[W]):
        raise Refusal(
            "this CPU's int8 kernels add products in saturating int16 pairs (no AVX512-VNNI/AMX): "
            f"activations up to {max_act} times weights up to "
            f"{int(m[W].to(torch.int16).abs().max())} would overflow; quantize activations to "
            "7 bits (reduce_range=True) or lower on a VNNI/AMX CPU"
        )


_PRODUCER_Q = qparams("producer")
_PRODUCER = quantize_per_tensor(ignored(), _PRODUCER_Q)


def _max_abs_activation(m: Match) -> int:
    """The largest |value| the quantized activation can hold: from its qparams or producer."""
    if XQ.quant_min in m:
        return _max_abs(m[XQ.quant_min], m[XQ.quant_max])
    recorded = m[X].meta.get(QUANT_RANGE_KEY)
    if isinstance(recorded, tuple):
        return _max_abs(*recorded)
    producer = match_node(_PRODUCER, m[X])
    if producer is not None:
        return _max_abs(producer[_PRODUCER_Q.quant_min], producer[_PRODUCER_Q.quant_max])
    info = torch.iinfo(m[XQ.dtype])
    return max(abs(info.min), abs(info.max))


def _max_abs(low: int, high: int) -> int:
    return max(abs(low), abs(high))


def _check_qparams(m: Match, qp: QParams, what: str) -> None:
    scale = m[qp.scale]
    if not (scale > 0 and scale != float("inf")):
        raise Refusal(f"{what} scale {scale!r} is not a finite positive number")
    dtype = m[qp.dtype]
    if dtype not in (torch.uint8, torch.int8):
        raise Refusal(f"{what} quantized dtype {dtype} is not uint8/int8")
    info = torch.iinfo(dtype)
    zp = m[qp.zero_point]
    if not info.min <= zp <= info.max:
        raise Refusal(f"{what} zero point {zp} is outside the range of {dtype}")
    if qp.quant_min in m and not m[qp.quant_min] <= zp <= m[qp.quant_max]:
        raise Refusal(f"{what} zero point {zp} is outside [{m[qp.quant_min]}, {m[qp.quant_max]}]")


def unary_args(m: Match) -> tuple[str, list[float], str]:
    """oneDNN's (post-op name, scalars, algorithm) for the matched unary post-op."""
    u = m[UNARY]
    return u.onednn_name, u.scalars(m.__getitem__), u.algorithm


def weight_constants(m: Match, rw: Rewriter, packed: torch.Tensor, hint: str) -> tuple[Any, ...]:
    """get_attr nodes for the packed weight, its scales and zero points, and the bias (or None)."""
    bias = rw.constant(f"{hint}_bias", m[BIAS]) if BIAS in m else None
    return (
        rw.constant(f"{hint}_packed_weight", packed),
        rw.constant(f"{hint}_w_scales", m[WQ.scales]),
        rw.constant(f"{hint}_w_zps", m[WQ.zero_points]),
        bias,
    )
