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
from qalgebra.fusions.conv_guard import check_conv_kernel, trusted_input_shape
from qalgebra.ops import aten, onednn
from qalgebra.pattern import Match, Pattern, Var, any_of, call, ignored
from qalgebra.qparams import ConstantQParams, QParamValues
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape

__all__ = [
    "CONV_ACTIVATIONS",
    "CONV_UNARIES",
    "QCONV",
    "check_emitted_kernel",
    "conv",
    "conv_activation",
    "conv_geometry",
    "input_shape_hint",
]

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
    """(stride, padding, dilation, groups) of the oneDNN call, each list of the spatial rank.

    Exact normalizations keep oneDNN's AVX512 and AMX int8 convolutions off geometries they
    get wrong (docs/findings.md, bug 5): a kernel dimension of size 1 is not dilated (dilating
    one tap changes nothing; dilated width-1 kernels whose output columns read only padding
    crashed); padding as large as a window, so that some window reads only padding, is written
    into the activation instead (:func:`conv_activation`; such windows came out as garbage);
    and an output of a single column is computed from its one window, cut out of the
    activation, unpadded and unstrided (AMX computed such padded or strided columns wrongly).
    """
    stride, padding, dilation, _ = _geometry(m)
    pads = _explicit_pads(m)
    if pads is not None:
        padding = [0] * len(padding)
        if _single_column(m) is not None:
            stride[-1] = 1
    return stride, padding, dilation, m[GROUPS]


def _geometry(m: Match) -> tuple[list[int], list[int], list[int], list[int]]:
    """(stride, padding, dilation, kernel) as written, but for size-1 kernel dilations."""
    spatial = m[W].dim() - 2
    dilation = _expand(m[DILATION], spatial, "dilation")
    kernel = [int(k) for k in m[W].shape[2:]]
    return (
        _expand(m[STRIDE], spatial, "stride"),
        _expand(m[PADDING], spatial, "padding"),
        [1 if size == 1 else d for size, d in zip(kernel, dilation, strict=True)],
        kernel,
    )


def _single_column(m: Match) -> tuple[int, int] | None:
    """(left, right) padding of the width that cuts out the one window of a padded or strided
    conv whose static output has a single column (negative: a crop), else None. The shape must
    be one the graph's shapes confirm (:func:`input_shape_hint`): a stale one would cut the
    wrong window."""
    shape = input_shape_hint(m)
    stride, padding, dilation, kernel = _geometry(m)
    if shape is None or len(shape) != len(kernel) + 2:
        return None
    width, s, p = shape[-1], stride[-1], padding[-1]
    extent = dilation[-1] * (kernel[-1] - 1) + 1
    slack = width + 2 * p - extent
    if not 0 <= slack < s or (p == 0 and s == 1):
        return None  # more than one column, or nothing to cut
    return p, extent - p - width


def _explicit_pads(m: Match) -> list[tuple[int, int]] | None:
    """(before, after) of each spatial dimension to write into the activation (negative: a
    crop), with which the conv runs unpadded; None to call it as it is."""
    _, padding, dilation, kernel = _geometry(m)
    column = _single_column(m)
    window_in_padding = any(
        p >= d * (k - 1) + 1 for p, d, k in zip(padding, dilation, kernel, strict=True)
    )
    if column is None and not window_in_padding:
        return None
    pads = [(p, p) for p in padding]
    if column is not None:
        pads[-1] = column
    return pads


def conv_activation(m: Match, rw: Rewriter, x: fx.Node, xq: QParamValues) -> fx.Node:
    """The quantized activation ``x`` (quantized with ``xq``: see
    :func:`~qalgebra.fusions.common.activation_input`) as the conv is called on it: as it is, or
    padded as :func:`conv_geometry` says with the zero point (which dequantizes to 0)."""
    pads = _explicit_pads(m)
    if pads is None or all(p == (0, 0) for p in pads):
        return x
    if not isinstance(xq, ConstantQParams):
        raise Refusal(
            "this conv's padding must be written into the activation (oneDNN computes windows "
            "of padding only wrongly), which needs a zero point known when lowering"
        )
    flat = [side for pair in reversed(pads) for side in pair]  # last dimension first
    return emit.aten.constant_pad_nd.default(rw, self=x, pad=flat, value=xq.zero_point)


def check_emitted_kernel(m: Match) -> None:
    """Refuse the conv if oneDNN computes it wrongly as it is emitted: after
    :func:`conv_geometry`'s exact normalizations, on the activation :func:`conv_activation`
    pads or cuts (``qalgebra.fusions.conv_guard``). Those normalizations need a static shape;
    what they cannot mend (an unknown shape, a window between the input's edges that reads
    only padding) is refused here."""
    stride, padding, dilation, _ = _geometry(m)
    shape: tuple[object, ...] | None = trusted_input_shape(
        m[X], m.root, m[W], (stride, padding, dilation, m[GROUPS])
    )
    pads = _explicit_pads(m)
    if shape is not None and pads is not None:
        spatial = [
            n + before + after if isinstance(n, int | torch.SymInt) else None
            for n, (before, after) in zip(shape[2:], pads, strict=True)
        ]
        shape = None if None in spatial else (*shape[:2], *spatial)
    check_conv_kernel(shape, m[W], conv_geometry(m))


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
    w = m[W]
    stride, padding, dilation, _ = _geometry(m)  # as written: what the graph's shapes follow
    shape = trusted_input_shape(m[X], m.root, w, (stride, padding, dilation, m[GROUPS]))
    static = [d for d in shape if type(d) is int] if shape is not None else []
    if shape is None or len(static) != len(shape):
        return None  # unknown, stale or symbolic
    out = static_shape(m.root)  # every root (unary, quantize, residual add) keeps the shape
    if out is not None and (len(out) != len(static) or out[:2] != [static[0], w.shape[0]]):
        return None
    return static


def prepack_conv(m: Match) -> torch.Tensor:
    """The oneDNN-packed weight, laid out for the activation shape when it is static.

    A symbolic or inconsistent shape is left out (the packed weight then works for any shape,
    as Inductor does for dynamic shapes); a given shape lets oneDNN pick a faster layout and
    still accepts other batch sizes.
    """
    stride, padding, dilation, groups = conv_geometry(m)
    shape = input_shape_hint(m)
    pads = _explicit_pads(m)
    if shape is not None and pads is not None:
        for dim, (before, after) in enumerate(pads):
            shape[dim + 2] += before + after
    x_scale, x_zp = prepack_hint(m)
    return onednn.qconv_prepack.default(
        m[W], weight_quant(m).scales, x_scale, x_zp, stride, padding, dilation, groups, shape,
    )  # fmt: skip


def _rewrite_qconv(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=CONV_ACTIVATIONS)
    stride, padding, dilation, groups = conv_geometry(m)
    check_emitted_kernel(m)
    w = weight_constants(m, rw, prepack_conv(m), "qconv")
    out_scale, out_zp, out_dtype = output_qparams(m)
    attr, scalars, algorithm, enforced = unary_args_enforcing_range(m)
    x, xq = activation_input(m, rw, allowed_act=CONV_ACTIVATIONS)
    fused = emit.onednn.qconv_pointwise(  # .default, or .tensor for runtime qparams
        rw,
        qx=conv_activation(m, rw, x, xq),
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
