"""The quantized linear family, from one definition.

``[quant] <- [unary] <- linear(dequant(x), dequant(w), bias)`` in every spelling
(:func:`qalgebra.combinators.linear`):

- ``aten.linear`` on 2-D or N-D input, as ``convert_pt2e`` leaves it;
- ``addmm(bias, x, w.T)`` / ``mm(x, w.T)`` on 2-D input, the transpose as ``permute`` or ``t``;
- ``view -> addmm/mm -> view`` around an N-D input, as export's decompositions leave it (through
  ``view``, ``reshape`` or ``_unsafe_view``), and ``expand -> bmm [-> add bias]`` for a
  non-contiguous one;

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

from qalgebra import emit
from qalgebra.checks import expand_keeps_shape, require
from qalgebra.combinators import (
    LinearVars,
    Unary,
    linear,
    linear_vars,
    with_dtype_convert,
    with_unary,
)
from qalgebra.fusion import Fusion
from qalgebra.fusions.common import (
    BIAS,
    BIAS_DTYPE,
    UNARY,
    W,
    X,
    activation,
    activation_input,
    check_common,
    clamp_to_quant_range,
    maybe_output_quant,
    output_qparams,
    reshaped_output,
    unary_args_enforcing_range,
    weight,
    weight_constants,
)
from qalgebra.ops import onednn
from qalgebra.pattern import Match, Pattern, Var
from qalgebra.rewriter import Rewriter

__all__ = ["LINEAR_ACTIVATIONS", "LINEAR_UNARIES", "LV", "QLINEAR", "dequant_linear"]

#: The reshapes around a 2-D matmul, the expand before a bmm, which spelling matched.
LV: LinearVars = linear_vars()

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


def dequant_linear() -> Pattern:
    """A linear of the dequantized activation and weight, in every spelling."""
    return linear(activation(), LV, w=weight(), bias=with_dtype_convert(BIAS, BIAS_DTYPE))


def prepack_linear(m: Match) -> torch.Tensor:
    """The oneDNN-packed weight (no activation shape: symbolic shapes stay symbolic)."""
    return onednn.qlinear_prepack.default(m[W], None)


def shape_or_empty(m: Match, var: Var[list[Any]]) -> list[Any]:
    """The reshape target a match bound, or [] when the reshape was absent."""
    return m.get(var, [])


#: The expand before a bmm must not broadcast the activation (qlinear would not).
BATCH_KEPT = expand_keeps_shape(X, LV.x_expanded, LV.x_expand)


def check_batched_input(m: Match) -> None:
    """Refuse a bmm spelling whose expand broadcasts the activation: qlinear cannot express it."""
    if LV.x_expanded in m:
        require(BATCH_KEPT, m, "qlinear does not broadcast")


def _rewrite_qlinear(m: Match, rw: Rewriter) -> fx.Node:
    check_common(m, allowed_act=LINEAR_ACTIVATIONS)
    check_batched_input(m)
    w = weight_constants(m, rw, prepack_linear(m), "qlinear")
    out_scale, out_zp, out_dtype = output_qparams(m)
    post_op, scalars, algorithm, enforced = unary_args_enforcing_range(m)
    x, xq = activation_input(m, rw, allowed_act=LINEAR_ACTIVATIONS)
    x_2d_shape = shape_or_empty(m, LV.x_2d_shape)
    if x_2d_shape:
        x = emit.aten.reshape.default(rw, self=x, shape=x_2d_shape)
    y = emit.onednn.qlinear_pointwise(  # .default, or .tensor for runtime qparams
        rw,
        qx=x,
        x_scale=xq.scale,
        x_zero_point=xq.zero_point,
        qw=w.packed,
        w_scale=w.scales,
        w_zero_point=w.zero_points,
        bias=w.bias,
        output_scale=out_scale,
        output_zero_point=out_zp,
        output_dtype=out_dtype,
        post_op_name=post_op,
        post_op_args=scalars,
        post_op_algorithm=algorithm,
    )
    y = clamp_to_quant_range(m, rw, y, enforced=enforced, owned=True)
    return reshaped_output(m, rw, y, shape_or_empty(m, LV.out_shape))


QLINEAR = Fusion(
    name="qlinear",
    family="qlinear",
    pattern=maybe_output_quant(with_unary(dequant_linear(), UNARY, *LINEAR_UNARIES)),
    rewrite=_rewrite_qlinear,
    doc="dequant -> linear | [view] mm/addmm [view] -> [unary] -> [quant]  =>  "
    "onednn.qlinear_pointwise[.tensor] (runtime activation qparams: 2-D as Inductor, 3-D "
    "beyond it; per-tensor weights beyond Inductor/torchao)",
)
