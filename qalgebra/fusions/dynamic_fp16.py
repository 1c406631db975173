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

from qalgebra.checks import dtype_in
from qalgebra.combinators import Unary, dtype_convert, with_reshape, with_unary
from qalgebra.fusions.base import Fusion, Refusal, Rewriter
from qalgebra.fusions.woq import (
    constant,
    fold_constant,
    has_rank,
    node_shape,
    same_dims,
    tensor_meta,
    transposed,
)
from qalgebra.pattern import (
    Match,
    Pattern,
    PatternLike,
    Var,
    any_of,
    call,
    capture,
    dtype_of,
    ignored,
    literal,
    where,
)
from qalgebra.shapes import known_shape

__all__ = ["LINEAR_DYNAMIC_FP16", "any_dtype_convert", "dynamic_fp16_linear"]

aten = torch.ops.aten
onednn = torch.ops.onednn
qd = torch.ops.quantized_decomposed

X = Var("fp16_x", fx.Node)
W = Var("fp16_w", fx.Node)
W_HALF = Var("fp16_w_half", fx.Node)
W_DTYPE = Var("fp16_w_dtype", torch.dtype)
BIAS = Var("fp16_bias", fx.Node)
X_SHAPE = Var("fp16_x_2d_shape", list)
OUT_SHAPE = Var("fp16_out_shape", list)
X_EXPANDED = Var("fp16_x_expanded", fx.Node)
UNARY = Var("fp16_unary", Unary)


def any_dtype_convert(x: PatternLike, dtype: PatternLike) -> Pattern:
    """A conversion in any spelling, ``quantized_decomposed.convert_element_type.no_fuse`` too."""
    return any_of(dtype_convert(x, dtype), call(qd.convert_element_type.no_fuse, x, dtype))


def _fp32_weight() -> Pattern:
    """The ``[N, K]`` weight rounded through fp16, as fp32."""
    w = constant(W)
    fp16_constant = where(dtype_of(w, W_DTYPE), dtype_in(W_DTYPE, (torch.float16,)))
    half = capture(W_HALF, any_of(any_dtype_convert(w, literal(torch.float16)), fp16_constant))
    return any_dtype_convert(half, literal(torch.float32))


def dynamic_fp16_linear() -> Pattern:
    """The fp32 linear with an fp16-rounded weight in every spelling, then an optional relu."""
    bias = where(BIAS, has_rank(BIAS, 1))
    w = _fp32_weight()
    direct = call(aten.linear.default, X, w, any_of(literal(None), bias))
    x2d = with_reshape(X, X_SHAPE)
    matmul = any_of(
        call(aten.addmm.default, bias, x2d, transposed(w)),
        call(aten.mm.default, x2d, transposed(w)),
    )
    x_expanded = capture(X_EXPANDED, call(aten.expand.default, X, ignored()))
    w_expanded = call(aten.expand.default, transposed(w), ignored())
    bmm = with_reshape(
        call(aten.bmm.default, with_reshape(x_expanded), with_reshape(w_expanded)), OUT_SHAPE
    )
    core = any_of(
        direct,
        with_reshape(matmul, OUT_SHAPE),
        call(aten.add.Tensor, bmm, bias),
        bmm,
    )
    return with_unary(core, UNARY, Unary.NONE, Unary.RELU)


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
    if X_EXPANDED in m:
        x_shape, expanded = known_shape(x), known_shape(m[X_EXPANDED])
        if x_shape is None or expanded is None or not same_dims(x_shape, expanded):
            raise Refusal(f"bmm input expand {expanded} is not the identity on x {x_shape}")
    packed = onednn.linear_prepack_fp16(half.contiguous(), None)
    x_in: Any = x
    x_2d_shape: list[Any] = m.get(X_SHAPE, [])
    if x_2d_shape:
        x_in = rw.call(aten.reshape.default, x, x_2d_shape)
    op = (
        onednn.linear_relu_dynamic_fp16.default
        if m[UNARY] is Unary.RELU
        else onednn.linear_dynamic_fp16.default
    )
    y = rw.call(op, x_in, rw.constant("fp16_packed_weight", packed), bias)
    out_shape: list[Any] = m.get(OUT_SHAPE, [])
    if out_shape:
        y = rw.call(aten.reshape.default, y, out_shape)
    return y


LINEAR_DYNAMIC_FP16 = Fusion(
    name="linear_dynamic_fp16",
    family="dynamic fp16 linear",
    pattern=dynamic_fp16_linear(),
    rewrite=_rewrite,
    doc="linear(x, w.to(fp16).to(fp32), b) [relu] (linear | [view] addmm/mm [view] | "
    "expand-bmm [+ b])  =>  onednn.linear_[relu_]dynamic_fp16 (weight prepacked)",
)
