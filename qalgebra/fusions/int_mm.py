"""Smooth-quant / dynamic int8 ``_int_mm`` linears, from one definition.

``_int_mm(a_int8, w_int8[K, N]) -> to(dtype) * x_scale * w_scale [+ bias]``  =>
``onednn.qlinear_pointwise`` with the weight prepacked by ``onednn.qlinear_prepack``, as
Inductor lowers it (``_register_smooth_quant_int_mm_pattern`` in torch/_inductor/fx_passes/
quantization.py):

- a per-tensor activation scale (one element) goes into the op: ``qlinear_pointwise.tensor(a,
  x_scale, x_zp=0, packed, w_scale, w_zp, bias, 1.0, 0, dtype, "none", [], "")``;
- a per-token activation scale (``[M, 1]``) cannot (oneDNN takes one activation scale), so the op
  runs with ``x_scale = 1.0`` (``qlinear_pointwise.default``), then the result is multiplied by
  the scale and the bias added.

Inductor registers six patterns for this (bias or not, ``expand`` on the activation scale or not,
activation reshape and outer reshapes or not); one definition here covers them, and also the
graph torchao's ``Int8DynamicActivationInt8WeightConfig`` exports (after
``unwrap_tensor_subclass``): ``mul(to(mul(to(_int_mm(reshape(a), t(w)), f32), x_scale), dtype),
flatten(w_scale))``. Both ``mul``\\ s commute and either scale may come first: the weight scale is
told apart by being a constant with one value per output channel (or one value), the activation
scale by its shape (one element, or ``[M, 1]``). The weight is any constant int8 ``[K, N]``
(through views, e.g. torchao's ``t``), prepacked as ``[N, K]``.

Facts checked against the ops (torch 2.13): ``_int_mm`` takes int8 ``[M, K]`` x int8 ``[K, N]``
and returns int32; ``qlinear_pointwise`` accepts int8 (signed) activations and ``w_scale`` must be
fp32; the ``.tensor`` overload takes a one-element ``x_scale`` tensor (fp32, bf16 or fp64,
``[]`` or ``[1, 1]``). **On CPUs without VNNI/AMX, oneDNN shifts signed activations by +128 and
adds pairs of products in saturating int16**: exact when ``2 * 255 * max|w| <= 32767`` (weights
within [-64, 64]), wrong by up to 4e6 on a ``[33, 256] x [256, 48]`` product otherwise (measured
on this AVX2 machine). Such matches are refused with that reason (``qalgebra.isa``); torchao's
symmetric int8 weights span [-127, 127], so on AVX2 only 7-bit weights lower.

Refused, with the reason in the report: a non-int8 activation or weight, scales whose roles cannot
be told apart, a weight scale that is not per output channel, an output dtype other than fp32 or
bf16, a bias that is not ``[N]``, the saturation above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qalgebra import emit
from qalgebra.checks import has_rank
from qalgebra.combinators import (
    LinearForm,
    LinearVars,
    constant,
    dtype_convert,
    linear,
    linear_vars,
    with_reshape,
)
from qalgebra.constants import fold_constant, node_shape
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.isa import pair_sum_may_saturate
from qalgebra.ops import aten, onednn
from qalgebra.pattern import (
    Match,
    Pattern,
    PatternLike,
    Var,
    any_of,
    call,
    ignored,
    optional,
    where,
)
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape, tensor_meta

__all__ = ["INT_MM", "int_mm_linear"]

A = Var("int_mm_a", fx.Node)
B = Var("int_mm_b", fx.Node)
#: The reshape of the activation to 2-D (the output reshapes come after the scaling).
LV: LinearVars = linear_vars("int_mm")
ACC_DTYPE = Var("int_mm_acc_dtype", torch.dtype)
SCALE_1 = Var("int_mm_scale_1", fx.Node)
SCALE_2 = Var("int_mm_scale_2", fx.Node)
BIAS = Var("int_mm_bias", fx.Node)
SHAPE_1 = Var("int_mm_shape_1", list)
SHAPE_2 = Var("int_mm_shape_2", list)
SHAPE_3 = Var("int_mm_shape_3", list)

#: Output dtypes qlinear_pointwise produces with a float output.
_OUT_DTYPES = (torch.float32, torch.bfloat16)
#: A signed activation level after oneDNN's +128 shift on saturating CPUs.
_SHIFTED_MAX = 255


def _maybe_expanded(s: PatternLike) -> Pattern:
    return optional(call(aten.expand.default, s, ignored()), through=0)


def int_mm_linear() -> Pattern:
    """``_int_mm`` -> convert -> mul(scale) -> [convert] -> mul(scale) -> [+ bias], reshapes."""
    mm = linear(
        A,
        LV,
        w_t=constant(B),
        forms=(LinearForm.MM,),
        matmul=aten._int_mm.default,
        reshape_out=False,
    )
    first = call(aten.mul.Tensor, dtype_convert(mm, ACC_DTYPE), _maybe_expanded(SCALE_1))
    second = call(
        aten.mul.Tensor,
        optional(dtype_convert(first, ignored()), through=0),
        _maybe_expanded(SCALE_2),
    )
    core = with_reshape(second, SHAPE_1)
    biased = any_of(call(aten.add.Tensor, core, where(BIAS, has_rank(BIAS, 1))), core)
    return with_reshape(with_reshape(biased, SHAPE_2), SHAPE_3)


@dataclass(frozen=True, slots=True)
class _Scales:
    w_scale: torch.Tensor  # fp32 [N]
    x_scale: fx.Node
    per_tensor: bool


def _as_weight_scale(node: fx.Node, n: int) -> torch.Tensor | None:
    s = fold_constant(node)
    if s is None or not s.is_floating_point():
        return None
    shape = list(s.shape)
    if s.numel() == 1:
        return s.reshape(1).expand(n).to(torch.float32).contiguous()
    if shape and shape[-1] == n and all(d == 1 for d in shape[:-1]) and len(shape) <= 2:
        return s.reshape(n).to(torch.float32).contiguous()
    return None


def _activation_scale_kind(node: fx.Node) -> bool | None:
    """True for one element (per tensor), False for ``[M, 1]`` (per token), else None."""
    shape = node_shape(node)
    if shape is None:
        return None
    if all(isinstance(d, int) and d == 1 for d in shape):
        return True
    if len(shape) == 2 and shape[1] == 1:
        return False
    return None


def _scales(m: Match, n: int) -> _Scales:
    s1, s2 = m[SCALE_1], m[SCALE_2]
    for w_node, x_node in ((s2, s1), (s1, s2)):
        w_scale = _as_weight_scale(w_node, n)
        kind = _activation_scale_kind(x_node)
        if w_scale is not None and kind is not None:
            return _Scales(w_scale, x_node, kind)
    raise Refusal(
        f"cannot tell the weight scale (a constant, one per output channel: [{n}]) from the "
        f"activation scale (one element or [M, 1]): {s1.name} has shape {node_shape(s1)}, "
        f"{s2.name} has shape {node_shape(s2)}"
    )


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = tensor_meta(node)
    return val.dtype if val is not None else None


def _rewrite(m: Match, rw: Rewriter) -> fx.Node:
    a = m[A]
    a_dtype = _dtype(a)
    if a_dtype is not None and a_dtype != torch.int8:
        raise Refusal(f"activation dtype {a_dtype} is not int8")
    b = fold_constant(m[B])
    if b is None or b.dtype != torch.int8 or b.dim() != 2:
        described = "not a constant" if b is None else f"{b.dtype} {list(b.shape)}"
        raise Refusal(f"weight {m[B].name} is not a constant int8 [K, N] tensor ({described})")
    k, n = int(b.shape[0]), int(b.shape[1])
    weight = b.t().contiguous()  # [N, K], what qlinear_prepack takes
    if pair_sum_may_saturate(_SHIFTED_MAX, weight):
        raise Refusal(
            "this CPU's int8 kernels shift signed activations to 0..255 and add products in "
            "saturating int16 pairs (no AVX512-VNNI/AMX): weights up to "
            f"{int(weight.to(torch.int16).abs().max())} would overflow (at most 64 is exact); "
            "lower on a VNNI/AMX CPU or quantize weights to 7 bits"
        )
    scales = _scales(m, n)
    acc_dtype = m[ACC_DTYPE]
    out_dtype = _dtype(m.root) or acc_dtype
    if out_dtype not in _OUT_DTYPES or acc_dtype not in _OUT_DTYPES:
        raise Refusal(f"output dtype {out_dtype} (accumulated as {acc_dtype}) is not fp32/bf16")
    bias: fx.Node | None = None
    if BIAS in m:
        bias = m[BIAS]
        shape = node_shape(bias)
        if shape is None or list(shape) != [n]:
            raise Refusal(f"bias {bias.name} of shape {shape} is not [{n}]")
    packed = onednn.qlinear_prepack.default(weight, None)
    a_shape = known_shape(a)
    a2d = a
    if a_shape is None or len(a_shape) != 2:
        a2d = emit.aten.reshape.default(rw, self=a, shape=[-1, k])
    packed_node = rw.constant("int_mm_packed_weight", packed)
    w_scale = rw.constant("int_mm_w_scale", scales.w_scale)
    w_zp = rw.constant("int_mm_w_zp", torch.zeros(n, dtype=torch.int64))
    bias_dtype = _dtype(bias) if bias is not None else None
    if scales.per_tensor:
        fuse_bias = bias is not None and bias_dtype == out_dtype
        x_zp = rw.constant("int_mm_x_zp", torch.zeros((), dtype=torch.int64))
        y = emit.onednn.qlinear_pointwise.tensor(
            rw,
            qx=a2d,
            x_scale=scales.x_scale,
            x_zero_point=x_zp,
            qw=packed_node,
            w_scale=w_scale,
            w_zero_point=w_zp,
            bias=bias if fuse_bias else None,
            output_scale=1.0,
            output_zero_point=0,
            output_dtype=out_dtype,
            post_op_name="none",
            post_op_args=[],
            post_op_algorithm="",
        )
        if bias is not None and not fuse_bias:
            y = emit.aten.add.Tensor(rw, self=y, other=bias)
    else:
        y = emit.onednn.qlinear_pointwise.default(
            rw,
            qx=a2d,
            x_scale=1.0,
            x_zero_point=0,
            qw=packed_node,
            w_scale=w_scale,
            w_zero_point=w_zp,
            bias=None,
            output_scale=1.0,
            output_zero_point=0,
            output_dtype=acc_dtype,
            post_op_name="none",
            post_op_args=[],
            post_op_algorithm="",
        )
        y = emit.aten.mul.Tensor(rw, self=y, other=scales.x_scale)
        if bias is not None:
            y = emit.aten.add.Tensor(rw, self=y, other=bias)
    result_dtype = _result_dtype(
        out_dtype if scales.per_tensor else acc_dtype,
        None if scales.per_tensor else _dtype(scales.x_scale),
        None if scales.per_tensor and bias_dtype == out_dtype else bias_dtype,
    )
    if result_dtype != out_dtype:
        y = emit.prims.convert_element_type.default(rw, a=y, dtype=out_dtype)
    out_shape: list[Any] = m.get(SHAPE_3, []) or m.get(SHAPE_2, []) or m.get(SHAPE_1, [])
    if out_shape:
        y = emit.aten.reshape.default(rw, self=y, shape=out_shape)
    return y


def _result_dtype(start: torch.dtype, *operands: torch.dtype | None) -> torch.dtype:
    """The dtype after multiplying/adding tensors of ``operands`` dtypes (None: unknown, none)."""
    dtype = start
    for other in operands:
        if other is not None:
            dtype = torch.promote_types(dtype, other)
    return dtype


INT_MM = Fusion(
    name="int_mm_linear",
    family="smooth-quant int_mm",
    pattern=int_mm_linear(),
    rewrite=_rewrite,
    doc="_int_mm(a, w) -> to -> * x_scale -> * w_scale [+ b] (views, either scale first)  =>  "
    "onednn.qlinear_pointwise[.tensor] (weight prepacked)",
)
