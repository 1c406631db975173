"""Binary (residual add) variants of the conv and linear families, from one definition.

``[quant] <- [relu] <- add(compute, other)`` with ``other`` in either operand order. With an int8
output, ``other`` must be a dequantized tensor; with a float output it may be any tensor.

What oneDNN does, checked against the ops (see tests/test_lower.py):

- ``qconv2d_pointwise.binary`` accepts only ``sum``, which writes the result **into** the
  accumulator, requires it channels_last-contiguous and of the output dtype. qalgebra therefore
  accumulates into a ``clone(memory_format=channels_last)`` the lowered graph makes itself, never
  into a caller's tensor or one read later; ``ACCUM_CLONE_ELISION`` removes the clone when the
  accumulator is a oneDNN conv output that nothing reads afterwards.
- ``qlinear_pointwise.binary`` with ``add`` and a float ``other`` is out of place and exact for
  float and uint8 outputs; ``sum`` is in place and ``add`` with a uint8 ``other`` ignores its
  scale, so qalgebra only emits ``add`` with a float ``other``.
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra import emit
from qalgebra.checks import satisfies
from qalgebra.combinators import (
    Unary,
    dequantize_per_tensor,
    with_binary,
    with_dtype_convert,
    with_output_quant,
    with_unary,
)
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import (
    ACT_DTYPE,
    OQ,
    OTHER,
    OTHER_Q,
    UNARY,
    W,
    activation_input,
    check_common,
    clamp_to_quant_range,
    output_qparams,
    range_clamped,
    reshaped_output,
    unary_args,
    weight_constants,
    weight_quant,
)
from qalgebra.fusions.conv import (
    CONV_ACTIVATIONS,
    check_emitted_kernel,
    conv,
    conv_activation,
    conv_geometry,
    prepack_conv,
)
from qalgebra.fusions.linear import (
    LINEAR_ACTIVATIONS,
    LV,
    check_batched_input,
    dequant_linear,
    prepack_linear,
    shape_or_empty,
)
from qalgebra.isa import qconv_binary_emits_bf16, qlinear_binary_emits_bf16
from qalgebra.ops import aten, onednn
from qalgebra.pattern import Match, Pattern, Var, any_call, any_of, call, capture, dtype_of, where
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape

__all__ = ["ACCUM_CLONE_ELISION", "QCONV_BINARY", "QLINEAR_BINARY"]

OTHER_X = Var("other_x", fx.Node)
OTHER_DTYPE = Var("other_compute_dtype", torch.dtype)
BINARY_UNARIES = (Unary.NONE, Unary.RELU)


_NOT_CONSTANT = satisfies(
    lambda m: m[OTHER].op != "get_attr",
    "the added tensor is not a constant (a bias is no residual)",
)


def with_residual(core: Pattern, *, int8_output_needs_quantized_other: bool) -> Pattern:
    """``core + other`` then optional relu; the int8-output variant is tried first.

    With ``int8_output_needs_quantized_other`` (conv: its accumulator must be the int8 tensor),
    the int8-output variant requires ``other`` to be a dequantize; otherwise (linear) ``other``
    may be any float tensor in both variants.
    """
    any_other = where(dtype_of(OTHER, OTHER_DTYPE), _NOT_CONSTANT)
    quantized_other = capture(
        OTHER, with_dtype_convert(dequantize_per_tensor(OTHER_X, OTHER_Q), OTHER_DTYPE)
    )
    int8_other = quantized_other if int8_output_needs_quantized_other else any_other
    int8_out = with_output_quant(
        with_unary(with_binary(core, int8_other), UNARY, *BINARY_UNARIES), OQ
    )
    float_out = with_unary(with_binary(core, any_other), UNARY, *BINARY_UNARIES)
    return any_of(int8_out, float_out)


def _sum_dtype(m: Match) -> torch.dtype:
    """The dtype of ``compute + other``: bf16 + fp32 promotes to fp32, as eager does."""
    return torch.promote_types(m[ACT_DTYPE], m[OTHER_DTYPE])


def _check_other(m: Match) -> None:
    other = known_shape(m[OTHER])
    if other is None:
        raise Refusal(f"the shape of the added tensor {m[OTHER].name} is unknown (no meta['val'])")
    result = known_shape(m.root)
    if result is not None and other != result:
        raise Refusal(
            f"the added tensor has shape {list(other)}, the result {list(result)}: "
            "oneDNN's binary post-op does not broadcast"
        )
    if m[OTHER_DTYPE] not in (torch.float32, torch.bfloat16):
        raise Refusal(f"the added tensor is {m[OTHER_DTYPE]}, not float32 or bfloat16")


def _output(m: Match) -> tuple[float, int, torch.dtype]:
    """Output (scale, zero point, dtype): the quant's, or the dtype of the float sum."""
    return output_qparams(m) if OQ.scale in m else (1.0, 0, _sum_dtype(m))


def _rewrite_qconv_binary(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=CONV_ACTIVATIONS)
    if m[W].dim() != 4:
        raise Refusal("oneDNN's quantized conv binary post-op exists for conv2d only")
    _check_other(m)
    stride, padding, dilation, groups = conv_geometry(m)
    check_emitted_kernel(m)
    out_scale, out_zp, out_dtype = _output(m)
    if OQ.scale in m:
        if m[OTHER_Q.dtype] != out_dtype:
            raise Refusal(f"accumulator dtype {m[OTHER_Q.dtype]} differs from output {out_dtype}")
        accum_source, accum_scale, accum_zp = m[OTHER_X], m[OTHER_Q.scale], m[OTHER_Q.zero_point]
        accum_dtype = out_dtype
    else:
        accum_source, accum_scale, accum_zp = m[OTHER], 1.0, 0
        accum_dtype = out_dtype
        if out_dtype == torch.bfloat16 and not qconv_binary_emits_bf16():
            out_dtype = accum_dtype = torch.float32
    w = weight_constants(m, rw, prepack_conv(m), "qconv_binary")
    # The sum is written into the accumulator: always a fresh channels_last tensor the graph
    # owns (ACCUM_CLONE_ELISION drops the copy when that is provably unobservable).
    if OQ.scale in m or m[OTHER_DTYPE] == accum_dtype:
        accum = emit.aten.clone.default(
            rw, self=accum_source, memory_format=torch.channels_last
        )
    else:
        accum = emit.aten._to_copy.default(
            rw, self=accum_source, dtype=accum_dtype, memory_format=torch.channels_last
        )
    rw.set_meta(accum, "qalgebra_accumulator", True)
    unary, scalars, algorithm = unary_args(m)
    x, xq = activation_input(m, rw, allowed_act=CONV_ACTIVATIONS)
    fused = emit.onednn.qconv2d_pointwise(  # .binary, or .binary_tensor for runtime qparams
        rw,
        qx=conv_activation(m, rw, x, xq),
        x_scale=xq.scale,
        x_zero_point=xq.zero_point,
        qw=w.packed,
        w_scale=w.scales,
        w_zero_point=w.zero_points,
        qaccum=accum,
        bias=w.bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        output_scale=out_scale,
        output_zero_point=out_zp,
        output_dtype=out_dtype,
        accum_scale=accum_scale,
        accum_zero_point=accum_zp,
        binary_attr="sum",
        alpha=1.0,
        unary_attr=unary,
        unary_scalars=scalars,
        unary_algorithm=algorithm,
    )
    if OQ.scale not in m and out_dtype != _sum_dtype(m):
        fused = emit.aten._to_copy.default(rw, self=fused, dtype=_sum_dtype(m))
    return clamp_to_quant_range(m, rw, fused, owned=True)  # the accumulator, or a new tensor


def _rewrite_qlinear_binary(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=LINEAR_ACTIVATIONS)
    check_batched_input(m)
    _check_other(m)
    out_scale, out_zp, out_dtype = _output(m)
    other = m[OTHER]
    # This CPU's oneDNN may not emit bf16 from the binary qlinear: add in float32, convert after.
    float32_fallback = (
        torch.bfloat16 in (out_dtype, m[OTHER_DTYPE]) and not qlinear_binary_emits_bf16()
    )
    if float32_fallback:
        if m[OTHER_DTYPE] != torch.float32:
            other = emit.aten._to_copy.default(rw, self=other, dtype=torch.float32)
        if out_dtype == torch.bfloat16:
            out_dtype = torch.float32
    elif OQ.scale not in m and m[OTHER_DTYPE] != out_dtype:
        other = emit.aten._to_copy.default(rw, self=other, dtype=out_dtype)
    w = weight_constants(m, rw, prepack_linear(m), "qlinear_binary")
    unary, scalars, algorithm = unary_args(m)
    x, xq = activation_input(m, rw, allowed_act=LINEAR_ACTIVATIONS)
    x_2d_shape = shape_or_empty(m, LV.x_2d_shape)
    if x_2d_shape:
        x = emit.aten.reshape.default(rw, self=x, shape=x_2d_shape)
        n = int(weight_quant(m).scales.shape[0])
        other = emit.aten.reshape.default(rw, self=other, shape=[-1, n])
    y = emit.onednn.qlinear_pointwise(  # .binary, or .binary_tensor for runtime qparams
        rw,
        qx=x,
        x_scale=xq.scale,
        x_zero_point=xq.zero_point,
        qw=w.packed,
        w_scale=w.scales,
        w_zero_point=w.zero_points,
        other=other,
        bias=w.bias,
        output_scale=out_scale,
        output_zero_point=out_zp,
        output_dtype=out_dtype,
        other_scale=1.0,
        other_zp=0,
        binary_post_op="add",
        binary_alpha=1.0,
        unary_post_op=unary,
        unary_post_op_args=scalars,
        unary_post_op_algorithm=algorithm,
    )
    if OQ.scale not in m and out_dtype != _sum_dtype(m):
        y = emit.aten._to_copy.default(rw, self=y, dtype=_sum_dtype(m))
    y = clamp_to_quant_range(m, rw, y, owned=True)
    return reshaped_output(m, rw, y, shape_or_empty(m, LV.out_shape))


QCONV_BINARY = Fusion(
    name="qconv_binary",
    family="qconv binary",
    pattern=with_residual(conv(), int8_output_needs_quantized_other=True),
    rewrite=_rewrite_qconv_binary,
    doc="dequant -> conv -> add(., other) -> [relu] -> [quant]  =>  "
    "onednn.qconv2d_pointwise.binary[_tensor] (sum into a tensor the graph owns; beyond "
    "Inductor/torchao: runtime qparams, per-tensor weights, int8 activations shifted)",
)

QLINEAR_BINARY = Fusion(
    name="qlinear_binary",
    family="qlinear binary",
    pattern=with_residual(dequant_linear(), int8_output_needs_quantized_other=False),
    rewrite=_rewrite_qlinear_binary,
    doc="dequant -> linear -> add(., other) -> [relu] -> [quant]  =>  "
    "onednn.qlinear_pointwise.binary[_tensor] (add, out of place; beyond Inductor/torchao: "
    "per-tensor weights, 3-D with runtime qparams)",
)


# --------------------------------------------------------------------------------------------
# Accumulator clone elision
# --------------------------------------------------------------------------------------------

_CLONE = Var("accum_clone", fx.Node)
_SOURCE = Var("accum_source", fx.Node)
#: oneDNN conv outputs are channels_last.
_FUSED_CONV = any_call((onednn.qconv_pointwise.default, onednn.qconv2d_pointwise.binary))
#: A fused conv's output, or the range clamp after it (elementwise: a fresh channels_last tensor).
_CONV_OUTPUT = range_clamped(_FUSED_CONV)
#: Ops whose output may share storage with their input: a reader through one of them could
#: see the in-place accumulation later, so the clone stays.
_ALIASING = frozenset(
    str(p)
    for p in (
        aten.view,
        aten.reshape,
        aten._unsafe_view,
        aten.permute,
        aten.expand,
        aten.slice,
        aten.select,
        aten.t,
        aten.transpose,
        aten.squeeze,
        aten.unsqueeze,
        aten.as_strided,
        aten.alias,
        aten.detach,
        aten.flatten,
        aten.unflatten,
        aten.narrow,
        aten.split,
        aten.chunk,
        aten.unbind,
    )
)


def _last_reader(m: Match) -> bool:
    clone, source = m[_CLONE], m[_SOURCE]
    if not clone.meta.get("qalgebra_accumulator") or len(clone.users) != 1:
        return False
    consumer = next(iter(clone.users))
    for user in source.users:
        if user is clone:
            continue
        aliasing = str(getattr(user.target, "overloadpacket", user.target)) in _ALIASING
        if user.op != "call_function" or aliasing or not _runs_before(user, consumer):
            return False
    return True


def _runs_before(first: fx.Node, then: fx.Node) -> bool:
    """Whether ``first`` comes before ``then`` in their graph: a walk from ``first``, short when
    they are close (an index of the whole graph per match made the elision quadratic)."""
    node = first.next
    while node.op != "root":
        if node is then:
            return True
        node = node.next
    return False


ACCUM_CLONE_ELISION = Fusion(
    name="accum_clone_elision",
    family="qconv binary",
    pattern=where(
        capture(
            _CLONE,
            call(
                aten.clone.default,
                capture(_SOURCE, _CONV_OUTPUT),
                memory_format=torch.channels_last,
            ),
        ),
        satisfies(_last_reader, "the accumulator is a oneDNN conv output nothing reads later"),
    ),
    rewrite=lambda m, rw: rw.node(m[_SOURCE]),
    exclusive=False,
    doc="clone(channels_last) of a oneDNN conv output read by nobody after  =>  the output",
)
