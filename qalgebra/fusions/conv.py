"""The quantized convolution family, from one definition.

``[quant] <- [unary] <- conv(dequant(x), dequant(w), bias)`` in every spelling (``conv1d/2d/3d``
as ``convert_pt2e`` leaves them, ``aten.convolution`` as decompositions leave them), fp32 or
int8-mixed-bf16, int8 or float output, post-ops none / relu / hardtanh (relu6) / hardswish / silu
-- the ones oneDNN's quantized conv accepts -- lowers to ``onednn.qconv_pointwise`` with the
weight prepacked by ``onednn.qconv_prepack`` at lowering time. Beyond Inductor and torchao:
runtime activation qparams (``.tensor``), per-tensor weights, and int8 activations shifted to
the uint8 the op takes (:mod:`qalgebra.fusions.common`).

The binary (residual add) variant lives in :mod:`qalgebra.fusions.binary`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qalgebra import emit
from qalgebra.combinators import Unary, with_unary
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import (
    UNARY,
    W,
    X,
    activation,
    activation_input,
    bias_or_none,
    check_common,
    clamp_to_quant_range,
    maybe_output_quant,
    output_qparams,
    prepack_hint,
    unary_args_enforcing_range,
    weight,
    weight_constants,
    weight_quant,
)
from qalgebra.ops import aten, onednn
from qalgebra.pattern import Match, Pattern, Var, any_of, call, ignored
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape

__all__ = ["CONV_ACTIVATIONS", "CONV_UNARIES", "QCONV", "conv", "conv_geometry", "input_shape_hint"]

STRIDE = Var("stride", list)
PADDING = Var("padding", list)
DILATION = Var("dilation", list)
GROUPS = Var("groups", int)

#: Activation dtypes oneDNN's quantized conv takes (int8 ones are shifted to uint8, exactly:
#: ``common.activation_input``).
CONV_ACTIVATIONS = (torch.uint8,)

#: Post-ops oneDNN's quantized conv accepts (checked against the op: gelu, leaky_relu and tanh
#: are refused by ``onednn.qconv_pointwise``).
CONV_UNARIES = (
    Unary.NONE,
    Unary.RELU,
    Unary.HARDTANH,
    Unary.RELU6,
    Unary.HARDSWISH,
    Unary.SILU,
)


def conv() -> Pattern:
    """A convolution of the dequantized activation and weight, in either spelling."""
    x, w, b = activation(), weight(), bias_or_none()
    return any_of(
        call(
            (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default),
            x,
            w,
            b,
            STRIDE,
            PADDING,
            DILATION,
            GROUPS,
        ),
        call(
            aten.convolution.default, x, w, b, STRIDE, PADDING, DILATION, False, ignored(), GROUPS
        ),
    )


def conv_geometry(m: Match) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups), each list expanded to the spatial rank."""
    spatial = m[W].dim() - 2
    return (
        _expand(m[STRIDE], spatial, "stride"),
        _expand(m[PADDING], spatial, "padding"),
        _expand(m[DILATION], spatial, "dilation"),
        m[GROUPS],
    )


def _expand(values: list[Any], n: int, what: str) -> list[int]:
    if not all(isinstance(v, int) for v in values):
        raise Refusal(f"{what} {values} is not a list of constant ints")
    if len(values) == 1:
        return [int(values[0])] * n
    if len(values) != n:
        raise Refusal(f"{what} {values} does not have {n} entries")
    return [int(v) for v in values]


def static_shape(node: fx.Node) -> list[int] | None:
    """The node's shape when every dimension is a concrete int (no symbolic size), else None."""
    shape = known_shape(node)
    if shape is None:
        return None
    dims = [d for d in shape if type(d) is int]
    return dims if len(dims) == len(shape) else None


def input_shape_hint(m: Match) -> list[int] | None:
    """The activation's static shape, when it fits the weight and the conv's result, else None.

    ``meta['val']`` can be stale: torchao's ``move_exported_model_to_eval`` swaps batch norms by
    subgraph rewriting and leaves the pattern's example shape (``[1, 1, 3, 3]``) on the new
    nodes, and ``qconv_prepack`` fails for a shape that contradicts the weight (Inductor and
    torchao re-export first, so their shapes are fresh). A shape is only a layout hint.
    """
    shape = static_shape(m[X])
    w = m[W]
    stride, padding, dilation, groups = conv_geometry(m)
    if shape is None or len(shape) != w.dim() or shape[1] != w.shape[1] * groups:
        return None
    out = static_shape(m.root)  # every root (unary, quantize, residual add) keeps the shape
    if out is None:
        return shape
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(shape[2:], padding, dilation, w.shape[2:], stride, strict=True)
    ]
    return shape if out == [shape[0], w.shape[0], *spatial] else None


def prepack_conv(m: Match) -> torch.Tensor:
    """The oneDNN-packed weight, laid out for the activation shape when it is static.

    A symbolic or inconsistent shape is left out (the packed weight then works for any shape,
    as Inductor does for dynamic shapes); a given shape lets oneDNN pick a faster layout and
    still accepts other batch sizes.
    """
    stride, padding, dilation, groups = conv_geometry(m)
    x_scale, x_zp = prepack_hint(m)
    return onednn.qconv_prepack.default(
        m[W], weight_quant(m).scales, x_scale, x_zp, stride, padding, dilation, groups,
        input_shape_hint(m),
    )  # fmt: skip


def _rewrite_qconv(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=CONV_ACTIVATIONS)
    stride, padding, dilation, groups = conv_geometry(m)
    w = weight_constants(m, rw, prepack_conv(m), "qconv")
    out_scale, out_zp, out_dtype = output_qparams(m)
    attr, scalars, algorithm, enforced = unary_args_enforcing_range(m)
    x, xq = activation_input(m, rw, allowed_act=CONV_ACTIVATIONS)
    fused = emit.onednn.qconv_pointwise(  # .default, or .tensor for runtime qparams
        rw,
        qx=x,
        x_scale=xq.scale,
        x_zero_point=xq.zero_point,
        qw=w.packed,
        w_scale=w.scales,
        w_zero_point=w.zero_points,
        bias=w.bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        output_scale=out_scale,
        output_zero_point=out_zp,
        output_dtype=out_dtype,
        attr=attr,
        scalars=scalars,
        algorithm=algorithm,
    )
    return clamp_to_quant_range(m, rw, fused, enforced=enforced, owned=True)


QCONV = Fusion(
    name="qconv",
    family="qconv",
    pattern=maybe_output_quant(with_unary(conv(), UNARY, *CONV_UNARIES)),
    rewrite=_rewrite_qconv,
    doc="dequant -> conv -> [unary] -> [quant]  =>  onednn.qconv_pointwise[.tensor] (beyond "
    "Inductor/torchao: runtime activation qparams, per-tensor weights, int8 activations "
    "shifted to uint8)",
)
