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
  float and uint8 outputs; ``add`` with a uint8 ``other`` ignores its scale, so ``other`` is
  always float. ``sum`` writes the result into ``other`` (bit for bit what ``add`` returns) and
  is faster ([512, 1024] x [1024, 256], one thread: 373 us against 448 us): with a float32
  output, qalgebra sums into a contiguous clone of ``other`` (a non-contiguous one is written
  in the wrong order) detached from autograd, which ``ACCUM_CLONE_ELISION`` removes when
  ``other`` is a row-major tensor the graph made (a linear's or a layer norm's output) and
  nothing reads it afterwards.
"""

from __future__ import annotations

import torch
from torch import fx

from qalgebra import emit
from qalgebra.aliasing import observable_write
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

#: ``node.meta`` key on the clone a binary rewrite made to accumulate into.
ACCUMULATOR = "qalgebra_accumulator"

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
        accum = emit.aten.clone.default(rw, self=accum_source, memory_format=torch.channels_last)
    else:
        accum = emit.aten._to_copy.default(
            rw, self=accum_source, dtype=accum_dtype, memory_format=torch.channels_last
        )
    rw.set_meta(accum, ACCUMULATOR, True)
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
    # A float32 sum is accumulated in place, into a contiguous tensor the graph owns.
    in_place = (
        OQ.scale not in m and out_dtype == m[ACT_DTYPE] == torch.float32 and not float32_fallback
    )
    if float32_fallback:
        if m[OTHER_DTYPE] != torch.float32:
            other = emit.aten._to_copy.default(rw, self=other, dtype=torch.float32)
        if out_dtype == torch.bfloat16:
            out_dtype = torch.float32
    elif in_place and m[OTHER_DTYPE] == out_dtype:
        other = emit.aten.clone.default(rw, self=other, memory_format=torch.contiguous_format)
        rw.set_meta(other, ACCUMULATOR, True)
    elif OQ.scale not in m and m[OTHER_DTYPE] != out_dtype:  # a fresh copy: summed into
        other = emit.aten._to_copy.default(
            rw,
            self=other,
            dtype=out_dtype,
            memory_format=torch.contiguous_format if in_place else None,
        )
    if in_place:  # summed into without autograd: a tensor that requires grad cannot be
        other = emit.aten.detach.default(rw, self=other)  # resized, not even to its own size
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
        binary_post_op="sum" if in_place else "add",
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
    "onednn.qlinear_pointwise.binary[_tensor] (a float32 output summed into a tensor the graph "
    "owns, else add out of place; beyond Inductor/torchao: per-tensor weights, 3-D with runtime "
    "qparams)",
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
    if not clone.meta.get(ACCUMULATOR) or len(clone.users) != 1:
        return False
    consumer = next(iter(clone.users))
    for user in source.users:
        if user is clone:
            continue
        aliasing = str(getattr(user.target, "overloadpacket", user.target)) in _ALIASING
        if user.op != "call_function" or aliasing or not _runs_before(user, consumer):
            return False
    return True


#: The linear ops a float32 sum is accumulated by (into their ``other``).
_LINEAR_SUMS = (onednn.qlinear_pointwise.binary, onednn.qlinear_pointwise.binary_tensor)


def _summed_into_unread(m: Match) -> bool:
    """The clone is a linear's accumulator, and summing into its source instead could not be
    seen: the source is a contiguous float32 tensor the graph made (oneDNN writes a
    non-contiguous one in the wrong order), read by nothing after the linear."""
    clone, source = m[_CLONE], m[_SOURCE]
    if not clone.meta.get(ACCUMULATOR) or len(clone.users) != 1:
        return False
    linear = next(iter(clone.users))
    for step in (aten.detach.default, aten.reshape.default):  # a 3-D linear's rows: reshaped
        if linear.target == step and len(linear.users) == 1:
            linear = next(iter(linear.users))
    if linear.target not in _LINEAR_SUMS:
        return False
    val = source.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or not _contiguous(val):
        return False
    if not _made_row_major(source):
        return False
    return observable_write(linear, written=source) is None


#: Ops whose output is row-major whatever their inputs' layout. The source's ``meta["val"]``
#: alone is not enough: a rewrite carries the replaced node's value onto the op it emits, and a
#: oneDNN conv returns channels last where the float conv it replaced said contiguous.
_ROW_MAJOR = (
    onednn.qlinear_pointwise.default,
    onednn.qlinear_pointwise.tensor,
    onednn.qlinear_pointwise.binary,
    onednn.qlinear_pointwise.binary_tensor,
    aten.layer_norm.default,
)
#: Views that keep a row-major tensor row-major.
_ROW_MAJOR_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _made_row_major(node: fx.Node) -> bool:
    """``node`` is (a reshape of) the output of an op that allocates it row-major."""
    while node.op == "call_function" and node.target in _ROW_MAJOR_VIEWS:
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return False
        node = source
    return node.op == "call_function" and node.target in _ROW_MAJOR


def _contiguous(val: torch.Tensor) -> bool:
    """Row-major dense, decided on concrete sizes only (a symbolic one is not known to be)."""
    expected = 1
    for size, stride in reversed(list(zip(val.shape, val.stride(), strict=True))):
        if type(size) is not int or type(stride) is not int:
            return False
        if size != 1 and stride != expected:
            return False
        expected *= size
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
    family="binary",
    pattern=any_of(
        where(
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
        where(
            capture(
                _CLONE,
                call(aten.clone.default, _SOURCE, memory_format=torch.contiguous_format),
            ),
            satisfies(
                _summed_into_unread,
                "a linear sums into the clone, and into its source nothing would see it",
            ),
        ),
    ),
    rewrite=lambda m, rw: rw.node(m[_SOURCE]),
    exclusive=False,
    doc="the clone a binary conv or linear accumulates into, of a tensor read by nobody after  "
    "=>  that tensor",
)
