"""The quantized linear family, from one definition.

``[quant] <- [unary] <- linear(dequant(x), dequant(w), bias)`` in every spelling:

- ``aten.linear`` on 2-D or N-D input, as ``convert_pt2e`` leaves it;
- ``addmm(bias, x, w.T)`` / ``mm(x, w.T)`` on 2-D input, the transpose as ``permute`` or ``t``;
- ``view -> addmm/mm -> view`` around an N-D input, as export's decompositions leave it (through
  ``view``, ``reshape`` or ``_unsafe_view``);

fp32 or int8-mixed-bf16, int8 or float output, and every unary post-op oneDNN's qlinear accepts
(relu, gelu erf/tanh, leaky_relu, tanh, hardtanh/relu6, hardswish, silu as ``swish``; checked
against the op) -> ``onednn.qlinear_pointwise`` with the weight prepacked by
``onednn.qlinear_prepack``. Activation qparams computed at run time (dynamic quantization) go
to the ``.tensor`` overload; weights may be quantized per channel or per tensor
(:mod:`qalgebra.fusions.common`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qalgebra.combinators import Unary, with_dtype_convert, with_reshape, with_unary
from qalgebra.fusions.base import Fusion, Refusal, Rewriter
from qalgebra.fusions.common import (
    BIAS,
    BIAS_DTYPE,
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
    overload_for,
    reshaped_output,
    unary_args_enforcing_range,
    weight,
    weight_constants,
)
from qalgebra.pattern import Match, Pattern, Var, any_of, call, ignored
from qalgebra.shapes import known_shape

__all__ = ["LINEAR_ACTIVATIONS", "LINEAR_UNARIES", "QLINEAR", "linear"]

aten = torch.ops.aten
onednn = torch.ops.onednn

X_SHAPE = Var("x_2d_shape", list)
X_EXPAND = Var("x_expand", list)
OUT_SHAPE = Var("out_shape", list)

#: Activation dtypes oneDNN's qlinear takes.
LINEAR_ACTIVATIONS = (torch.uint8, torch.int8)

#: Post-ops oneDNN's qlinear accepts (checked against the op; it refuses silu and sigmoid by
#: those names: silu is spelled ``swish``).
LINEAR_UNARIES = (
    Unary.NONE,
    Unary.RELU,
    Unary.GELU,
    Unary.GELU_TANH,
    Unary.LEAKY_RELU,
    Unary.TANH,
    Unary.HARDTANH,
    Unary.RELU6,
    Unary.HARDSWISH,
    Unary.SILU,
)


def _transposed_weight() -> Pattern:
    w = weight()
    return any_of(call(aten.permute.default, w, [1, 0]), call(aten.t.default, w))


def linear() -> Pattern:
    """A linear of the dequantized activation and weight, in every spelling."""
    x = activation()
    direct = call(aten.linear.default, x, weight(), bias_or_none())
    x2d = with_reshape(x, X_SHAPE)
    w_t = _transposed_weight()
    matmul = any_of(
        call(aten.addmm.default, with_dtype_convert(BIAS, BIAS_DTYPE), x2d, w_t),
        call(aten.mm.default, x2d, w_t),
    )
    # A non-contiguous N-D input: matmul decomposes to expand -> bmm (-> view) (+ bias).
    batched = with_reshape(
        call(
            aten.bmm.default,
            with_reshape(call(aten.expand.default, x, X_EXPAND)),
            with_reshape(call(aten.expand.default, _transposed_weight(), ignored())),
        ),
        OUT_SHAPE,
    )
    with_bias = call(aten.add.Tensor, batched, with_dtype_convert(BIAS, BIAS_DTYPE))
    return any_of(direct, with_reshape(matmul, OUT_SHAPE), with_bias, batched)


def prepack_linear(m: Match) -> torch.Tensor:
    """The oneDNN-packed weight (no activation shape: symbolic shapes stay symbolic)."""
    packed: torch.Tensor = onednn.qlinear_prepack(m[W], None)
    return packed


def shape_or_empty(m: Match, var: Var[list[Any]]) -> list[Any]:
    """The reshape target a match bound, or [] when the reshape was absent."""
    return m.get(var, [])


def check_batched_input(m: Match) -> None:
    """The expand before a bmm must not broadcast the activation (qlinear would not)."""
    if X_EXPAND not in m:
        return
    shape = known_shape(m[X])
    expanded: list[Any] = m[X_EXPAND]
    if shape is None or list(shape) != expanded:
        raise Refusal(
            f"the activation of shape {shape} is expanded to {expanded} before bmm: "
            "a broadcast qlinear cannot express"
        )


def _rewrite_qlinear(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=LINEAR_ACTIVATIONS)
    check_batched_input(m)
    packed, w_scales, w_zps, bias = weight_constants(m, rw, prepack_linear(m), "qlinear")
    out_scale, out_zp, out_dtype = output_qparams(m)
    post_op, scalars, algorithm, enforced = unary_args_enforcing_range(m)
    x, xq = activation_input(m, rw, allowed_act=LINEAR_ACTIVATIONS)
    if shape_or_empty(m, X_SHAPE):
        x = rw.call(aten.reshape.default, x, m[X_SHAPE])
    y = rw.call(
        overload_for(xq, onednn.qlinear_pointwise.default, onednn.qlinear_pointwise.tensor),
        x,
        xq.scale,
        xq.zero_point,
        packed,
        w_scales,
        w_zps,
        bias,
        out_scale,
        out_zp,
        out_dtype,
        post_op,
        scalars,
        algorithm,
    )
    y = clamp_to_quant_range(m, rw, y, enforced=enforced, owned=True)
    return reshaped_output(m, rw, y, shape_or_empty(m, OUT_SHAPE))


QLINEAR = Fusion(
    name="qlinear",
    family="qlinear",
    pattern=maybe_output_quant(with_unary(linear(), UNARY, *LINEAR_UNARIES)),
    rewrite=_rewrite_qlinear,
    doc="dequant -> linear | [view] mm/addmm [view] -> [unary] -> [quant]  =>  "
    "onednn.qlinear_pointwise[.tensor] (runtime activation qparams: 2-D as Inductor, 3-D "
    "beyond it; per-tensor weights beyond Inductor/torchao)",
)
