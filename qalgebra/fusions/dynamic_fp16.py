"""Dynamic fp16 linear: an fp32 linear whose weight is rounded through fp16, from one definition.

``linear(x, w.to(fp16).to(fp32), b) [-> relu]``  =>  ``onednn.linear_dynamic_fp16(x, packed, b)``
(``onednn.linear_relu_dynamic_fp16`` with the relu), the weight packed at lowering time by
``onednn.linear_prepack_fp16``.

This is Inductor's ``_register_linear_dynamic_fp16_weight_prepack`` (torch/_inductor/fx_passes/
quantization.py), which registers 2 x 2 x 2 patterns (input >2-D or not, contiguous or not, relu
or not) for the graph torchao's ``X86InductorQuantizer`` produces with
``get_x86_inductor_linear_dynamic_fp16_config()``: the weight is
``quantized_decomposed.convert_element_type.no_fuse(no_fuse(w, float16), float32)``. One
definition here covers:

- the weight: that ``no_fuse`` pair, any other spelling of the two conversions
  (``convert_element_type``, ``_to_copy``, ``to.dtype``), or an fp16 constant converted to fp32
  (a module that stores its weight in half precision: ``F.linear(x, self.w16.float(), b)``);
- the linear: ``aten.linear`` (op form); ``addmm``/``mm`` with the weight transposed (``permute``
  or ``t``) and ``view``\\ s around them for >2-D input; ``expand -> bmm (-> add bias)`` for a
  non-contiguous >2-D input (the decomposition of ``linear``);
- with or without bias, with or without a following relu.

Facts checked against the ops (torch 2.13, docs/onednn_ops.md): ``linear_prepack_fp16`` takes an
fp32 or fp16 ``[N, K]`` weight (both pack to the same fp16 tensor; bf16 is rejected);
``linear_dynamic_fp16(x, packed, bias)`` takes fp32 ``x`` of any rank (non-contiguous too), an
optional fp32 bias, returns fp32 ``x @ w.half().float().T + b`` (the activation is not rounded to
fp16). Refused, with the reason in the report: a non-fp32 activation, a bias that is not fp32
``[N]``, a weight that is not 2-D, an ``expand`` that broadcasts the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qalgebra import emit
from qalgebra.checks import dtype_in, expand_keeps_shape, has_rank, require
from qalgebra.combinators import (
    LinearVars,
    Unary,
    constant,
    dtype_convert,
    linear,
    linear_vars,
    with_unary,
)
from qalgebra.constants import fold_constant, node_shape
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.ops import onednn, quantized_decomposed
from qalgebra.pattern import (
    Match,
    Pattern,
    PatternLike,
    Var,
    any_of,
    call,
    capture,
    dtype_of,
    literal,
    where,
)
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import tensor_meta

__all__ = ["LINEAR_DYNAMIC_FP16", "any_dtype_convert", "dynamic_fp16_linear"]

X = Var("fp16_x", fx.Node)
W = Var("fp16_w", fx.Node)
W_HALF = Var("fp16_w_half", fx.Node)
W_DTYPE = Var("fp16_w_dtype", torch.dtype)
BIAS = Var("fp16_bias", fx.Node)
#: The reshapes around a 2-D matmul, the expand before a bmm, which spelling matched.
LV: LinearVars = linear_vars("fp16")
UNARY = Var("fp16_unary", Unary)


def any_dtype_convert(x: PatternLike, dtype: PatternLike) -> Pattern:
    """A conversion in any spelling, ``quantized_decomposed.convert_element_type.no_fuse`` too."""
    return any_of(
        dtype_convert(x, dtype), call(quantized_decomposed.convert_element_type.no_fuse, x, dtype)
    )


def _fp32_weight() -> Pattern:
    """The ``[N, K]`` weight rounded through fp16, as fp32."""
    w = constant(W)
    fp16_constant = where(dtype_of(w, W_DTYPE), dtype_in(W_DTYPE, (torch.float16,)))
    half = capture(W_HALF, any_of(any_dtype_convert(w, literal(torch.float16)), fp16_constant))
    return any_dtype_convert(half, literal(torch.float32))


def dynamic_fp16_linear() -> Pattern:
    """The fp32 linear with an fp16-rounded weight in every spelling, then an optional relu."""
    bias = where(BIAS, has_rank(BIAS, 1))
    core = linear(X, LV, w=_fp32_weight(), bias=bias)
    return with_unary(core, UNARY, Unary.NONE, Unary.RELU)


#: The expand before a bmm must not broadcast the batch.
_BATCH_KEPT = expand_keeps_shape(X, LV.x_expanded, LV.x_expand)


def _rewrite(m: Match, rw: Rewriter) -> fx.Node:
    x = m[X]
    x_val = tensor_meta(x)
    if x_val is not None and x_val.dtype != torch.float32:
        raise Refusal(f"x is {x_val.dtype}: onednn.linear_dynamic_fp16 takes fp32 activations")
    half = fold_constant(m[W_HALF])
    if half is None or half.dtype != torch.float16:
        raise Refusal(f"the fp16 weight {m[W_HALF].name} could not be folded to a constant")
    if half.dim() != 2:
        raise Refusal(f"weight of shape {list(half.shape)} is not 2-D")
    n = int(half.shape[0])
    bias: fx.Node | None = None
    if BIAS in m:
        bias = m[BIAS]
        shape = node_shape(bias)
        val = tensor_meta(bias)
        folded = fold_constant(bias) if val is None else None
        dtype = val.dtype if val is not None else (folded.dtype if folded is not None else None)
        if shape is None or list(shape) != [n] or dtype != torch.float32:
            raise Refusal(f"bias {bias.name} is not an fp32 [{n}] tensor (shape {shape}, {dtype})")
    if LV.x_expanded in m:
        require(_BATCH_KEPT, m, "onednn.linear_dynamic_fp16 does not broadcast")
    packed = onednn.linear_prepack_fp16.default(half.contiguous(), None)
    x_in = x
    x_2d_shape: list[Any] = m.get(LV.x_2d_shape, [])
    if x_2d_shape:
        x_in = emit.aten.reshape.default(rw, self=x, shape=x_2d_shape)
    w = rw.constant("fp16_packed_weight", packed)
    if m[UNARY] is Unary.RELU:
        y = emit.onednn.linear_relu_dynamic_fp16.default(rw, x=x_in, w=w, bias=bias)
    else:
        y = emit.onednn.linear_dynamic_fp16.default(rw, x=x_in, w=w, bias=bias)
    out_shape: list[Any] = m.get(LV.out_shape, [])
    if out_shape:
        y = emit.aten.reshape.default(rw, self=y, shape=out_shape)
    return y


LINEAR_DYNAMIC_FP16 = Fusion(
    name="linear_dynamic_fp16",
    family="dynamic fp16 linear",
    pattern=dynamic_fp16_linear(),
    rewrite=_rewrite,
    doc="linear(x, w.to(fp16).to(fp32), b) [relu] (linear | [view] addmm/mm [view] | "
    "expand-bmm [+ b])  =>  onednn.linear_[relu_]dynamic_fp16 (weight prepacked)",
)
