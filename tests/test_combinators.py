"""The combinators: every (de)quantize form found exactly once with the same bindings, every
spelling of a conversion / reshape, every unary post-op, binary operand orders, weights."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from graphs import (
    CONVERT_SPELLINGS,
    DEQUANT_FORMS,
    QP,
    QUANT_FORMS,
    RESHAPE_SPELLINGS,
    ChannelQP,
    ConvertSpelling,
    DequantForm,
    GraphBuilder,
    QuantForm,
    ReshapeSpelling,
    convert,
    dequantize,
    dequantize_weight,
    getitem,
    quantize,
    reshape,
)
from torch import fx
from torch._ops import OpOverload

from qalgebra import Match, Pattern, PatternError, Var, call
from qalgebra.combinators import (
    HARDTANH_MAX,
    HARDTANH_MIN,
    LEAKY_SLOPE,
    Unary,
    clamp,
    dequantize_per_channel,
    dequantize_per_tensor,
    dtype_convert,
    quantize_per_tensor,
    weight_dequant,
    with_binary,
    with_dtype_convert,
    with_output_quant,
    with_reshape,
    with_unary,
)
from qalgebra.combinators import reshape as reshape_pattern
from qalgebra.match import find_matches, match_node
from qalgebra.qparams import ConstantQParams, QParams, RuntimeQParams, channel_qparams, qparams

aten = torch.ops.aten

X = Var("x", fx.Node)
Y = Var("y", fx.Node)
QPV = qparams("x")

#: Scales exactly representable in float32 (the .tensor form stores them in a float32 tensor).
PARAMS = [
    QP(scale=0.0234375, zero_point=84),
    QP(scale=0.5, zero_point=0),
    QP(scale=0.0078125, zero_point=-3, quant_min=-128, quant_max=127, dtype=torch.int8),
]


def _one(pattern: Pattern, gm: fx.GraphModule) -> Match:
    ms = find_matches(pattern, gm)
    assert len(ms) == 1, ms
    return ms[0]


def test_qparams_names() -> None:
    qp = qparams("out")
    assert [v.name for v in (qp.scale, qp.zero_point, qp.dtype, qp.quant_min, qp.quant_max)] == [
        "out_scale", "out_zp", "out_dtype", "out_qmin", "out_qmax",
    ]
    assert (qp.scale.type, qp.zero_point.type, qp.dtype.type) == (float, int, torch.dtype)
    cp = channel_qparams("w")
    assert [v.name for v in (cp.scales, cp.zero_points, cp.axis, cp.dtype)] == [
        "w_scales", "w_zps", "w_axis", "w_dtype",
    ]
    assert qparams("out") == qp  # plain values


# --------------------------------------------------------------------------------------------
# quantize_per_tensor / dequantize_per_tensor in every form
# --------------------------------------------------------------------------------------------


def _check_qparams(m: Match, qp: QParams, expected: QP, *, exact_scale: bool) -> None:
    if exact_scale:
        assert m[qp.scale] == expected.scale
    else:  # the decomposed quantize multiplies by 1/scale: the pattern binds 1/(1/scale)
        assert math.isclose(m[qp.scale], expected.scale, rel_tol=1e-12)
    assert type(m[qp.scale]) is float
    assert m[qp.zero_point] == expected.zero_point
    assert type(m[qp.zero_point]) is int
    assert m[qp.dtype] is expected.dtype


@pytest.mark.parametrize("params", PARAMS, ids=lambda qp: f"zp{qp.zero_point}-{qp.dtype}")
@pytest.mark.parametrize("form", QUANT_FORMS)
def test_quantize_every_form_found_once_with_the_same_bindings(
    form: QuantForm, params: QP
) -> None:
    b = GraphBuilder()
    x = b.input()
    q = quantize(b, x, params, form)
    dequantize(b, q, params)
    gm = b.module()
    m = _one(quantize_per_tensor(X, QPV), gm)
    assert m.root is q
    assert m[X] is x
    _check_qparams(m, QPV, params, exact_scale=not form.startswith("decomposed"))
    assert (m[QPV.quant_min], m[QPV.quant_max]) == (params.quant_min, params.quant_max)
    if form.startswith("decomposed"):
        has_add = params.zero_point != 0
        assert len(m.nodes) == (6 if has_add else 5) - (form == "decomposed_clamp")


@pytest.mark.parametrize("params", PARAMS, ids=lambda qp: f"zp{qp.zero_point}-{qp.dtype}")
@pytest.mark.parametrize("form", DEQUANT_FORMS)
def test_dequantize_every_form_found_once_with_the_same_bindings(
    form: DequantForm, params: QP
) -> None:
    b = GraphBuilder()
    x = b.input()
    q = quantize(b, x, params)
    d = dequantize(b, q, params, form)
    b.op(aten.relu.default, d)
    gm = b.module()
    m = _one(dequantize_per_tensor(X, QPV), gm)
    assert m.root is d
    assert m[X] is q
    _check_qparams(m, QPV, params, exact_scale=True)
    if form != "decomposed":
        assert (m[QPV.quant_min], m[QPV.quant_max]) == (params.quant_min, params.quant_max)
    else:
        assert len(m.nodes) == (3 if params.zero_point != 0 else 2)


@pytest.mark.parametrize("spelling", CONVERT_SPELLINGS)
def test_decomposed_forms_with_every_conversion_spelling(spelling: ConvertSpelling) -> None:
    params = PARAMS[0]
    b = GraphBuilder()
    x = b.input()
    q = quantize(b, x, params, "decomposed", spelling=spelling)
    d = dequantize(b, q, params, "decomposed", spelling=spelling)
    gm = b.module()
    mq = _one(quantize_per_tensor(X, QPV), gm)
    md = _one(dequantize_per_tensor(Y, QPV), gm)
    assert (mq.root, md.root, md[Y]) == (q, d, q)
    _check_qparams(mq, QPV, params, exact_scale=False)
    _check_qparams(md, QPV, params, exact_scale=True)


@pytest.mark.parametrize("zp", [0, 84])
def test_zero_point_add_and_sub_kept_even_when_zero(zp: int) -> None:
    params = replace(PARAMS[0], zero_point=zp)
    b = GraphBuilder()
    x = b.input()
    q = quantize(b, x, params, "decomposed", zp_add=True)
    d = dequantize(b, q, params, "decomposed", zp_sub=True)
    gm = b.module()
    mq = _one(quantize_per_tensor(X, QPV), gm)
    md = _one(dequantize_per_tensor(X, QPV), gm)
    assert (mq.root, md.root) == (q, d)
    assert mq[QPV.zero_point] == md[QPV.zero_point] == zp
    assert len(mq.nodes) == 6 and len(md.nodes) == 3


@pytest.mark.parametrize("qform", QUANT_FORMS)
@pytest.mark.parametrize("dform", DEQUANT_FORMS)
def test_int8_mixed_bf16_found_once(qform: QuantForm, dform: DequantForm) -> None:
    # bf16 input -> fp32 -> quant -> dequant -> bf16: the conversions around must not make a
    # second (fake) dequant out of `convert(bf16 -> fp32)` and the quant's `mul(x, 1/scale)`.
    params = PARAMS[0]
    b = GraphBuilder()
    x = b.input(dtype=torch.bfloat16)
    fp32 = convert(b, x, torch.float32)
    q = quantize(b, fp32, params, qform)
    d = dequantize(b, q, params, dform)
    out = convert(b, d, torch.bfloat16)
    gm = b.module()
    mq = _one(quantize_per_tensor(X, QPV), gm)
    md = _one(dequantize_per_tensor(X, QPV), gm)
    assert (mq.root, mq[X]) == (q, fp32)
    assert (md.root, md[X]) == (d, q)
    _check_qparams(mq, QPV, params, exact_scale=not qform.startswith("decomposed"))
    _check_qparams(md, QPV, params, exact_scale=True)
    bf16 = Var("compute", torch.dtype)
    m = _one(with_dtype_convert(dequantize_per_tensor(Y, QPV), bf16), gm)
    assert (m.root, m[bf16], m[Y]) == (out, torch.bfloat16, q)
    m = _one(with_output_quant(X, QPV), gm)
    assert (m.root, m[X]) == (q, x)  # through the fp32 conversion


def test_decomposed_dequant_of_a_quant_without_meta() -> None:
    # No meta['val'] anywhere: the dequant reads the dtype from the quant's final conversion.
    params = PARAMS[2]
    b = GraphBuilder()
    x = b.input(meta=False)
    q = quantize(b, x, params, "decomposed", meta=False)
    d = dequantize(b, q, params, "decomposed", meta=False)
    gm = b.module()
    assert all("val" not in n.meta for n in gm.graph.nodes)
    md = _one(dequantize_per_tensor(X, QPV), gm)
    assert (md.root, md[X]) == (d, q)
    _check_qparams(md, QPV, params, exact_scale=True)
    mq = _one(quantize_per_tensor(X, QPV), gm)
    _check_qparams(mq, QPV, params, exact_scale=False)


def test_decomposed_dequant_needs_a_quantized_input_dtype() -> None:
    b = GraphBuilder()
    x = b.input(dtype=torch.float16)
    d = dequantize(b, x, PARAMS[0], "decomposed")
    assert match_node(dequantize_per_tensor(X, QPV), d) is None
    b2 = GraphBuilder()
    d2 = dequantize(b2, b2.input(dtype=torch.uint8), PARAMS[0], "decomposed")
    assert match_node(dequantize_per_tensor(X, QPV), d2) is not None


def test_decomposed_quantize_with_an_unrepresentable_scale() -> None:
    scale = 0.02212127298116684  # seed 000: the graph multiplies by 45.20535508292672
    params = replace(PARAMS[0], scale=scale)
    b = GraphBuilder()
    q = quantize(b, b.input(), params, "decomposed")
    gm = b.module()
    m = _one(quantize_per_tensor(X, QPV), gm)
    (mul,) = (n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    assert mul.args[1] == 1.0 / scale and m[X] is mul.args[0] and m.root is q
    assert math.isclose(m[QPV.scale], scale, rel_tol=1e-12)


def test_quant_and_dequant_do_not_match_each_other() -> None:
    for form in QUANT_FORMS:
        b = GraphBuilder()
        quantize(b, b.input(), PARAMS[0], form)
        assert find_matches(dequantize_per_tensor(X, QPV), b.module()) == []
    for dform in DEQUANT_FORMS:
        b = GraphBuilder()
        dequantize(b, b.input(dtype=torch.uint8), PARAMS[0], dform)
        assert find_matches(quantize_per_tensor(X, QPV), b.module()) == []


def test_quantize_rejects_a_different_scale_argument_shape() -> None:
    b = GraphBuilder()
    x = b.input()
    other = b.input("other")
    y = b.op(aten.mul.Tensor, x, other)  # mul by a tensor: no 1/scale to read
    y = b.op(aten.round.default, y)
    y = b.op(aten.clamp.default, y, 0, 255)
    q = convert(b, y, torch.uint8)
    assert match_node(quantize_per_tensor(X, QPV), q) is None


# --------------------------------------------------------------------------------------------
# Spellings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", CONVERT_SPELLINGS)
def test_dtype_convert_spellings(spelling: ConvertSpelling) -> None:
    b = GraphBuilder()
    x = b.input()
    c = convert(b, x, torch.bfloat16, spelling)
    dt = Var("dt", torch.dtype)
    m = match_node(dtype_convert(X, dt), c)
    assert m is not None and (m[X], m[dt]) == (x, torch.bfloat16)
    assert match_node(dtype_convert(X, torch.float16), c) is None


def test_dtype_convert_refuses_other_copy_arguments() -> None:
    b = GraphBuilder()
    x = b.input()
    c = b.op(aten.to.dtype, x, torch.bfloat16, False, True)  # copy=True
    assert match_node(dtype_convert(X, torch.bfloat16), c) is None


@pytest.mark.parametrize("spelling", RESHAPE_SPELLINGS)
def test_reshape_spellings(spelling: ReshapeSpelling) -> None:
    b = GraphBuilder()
    x = b.input()
    r = reshape(b, x, [3, 2], spelling)
    shape = Var("shape", list)
    m = match_node(reshape_pattern(X, shape), r)
    assert m is not None and (m[X], m[shape]) == (x, [3, 2])


def test_clamp_single_or_split() -> None:
    b = GraphBuilder()
    x = b.input()
    single = b.op(aten.clamp.default, x, 0, 255)
    split = b.op(aten.clamp_max.default, b.op(aten.clamp_min.default, x, 0), 255)
    lo, hi = Var("lo", int), Var("hi", int)
    for node in (single, split):
        m = match_node(clamp(X, lo, hi), node)
        assert m is not None and (m[X], m[lo], m[hi]) == (x, 0, 255)
    only_min = b.op(aten.clamp_min.default, x, 0)
    assert match_node(clamp(X, lo, hi), only_min) is None


# --------------------------------------------------------------------------------------------
# with_dtype_convert, with_reshape
# --------------------------------------------------------------------------------------------


def test_with_dtype_convert_present_and_absent() -> None:
    dt = Var("dt", torch.dtype)
    p = with_dtype_convert(call(aten.relu.default, X), dt)
    b = GraphBuilder()
    x = b.input()
    r = b.op(aten.relu.default, x)
    c = convert(b, r, torch.bfloat16, "to_copy")
    gm = b.module()
    m = _one(p, gm)
    assert (m.root, m[dt], m.nodes) == (c, torch.bfloat16, (r, c))
    b2 = GraphBuilder()
    r2 = b2.op(aten.relu.default, b2.input())
    m = _one(p, b2.module())
    assert (m.root, m[dt]) == (r2, torch.float32)  # the default
    bf16_default = with_dtype_convert(call(aten.relu.default, X), dt, default=torch.bfloat16)
    m = _one(bf16_default, b2.module())
    assert m[dt] is torch.bfloat16
    fixed = with_dtype_convert(call(aten.relu.default, X), torch.float16)
    assert match_node(fixed, c) is None  # converts to bf16, not fp16 ...
    assert match_node(fixed, r) is not None  # ... but the relu alone still matches


@pytest.mark.parametrize("spelling", RESHAPE_SPELLINGS)
def test_with_reshape_every_spelling(spelling: ReshapeSpelling) -> None:
    shape = Var("shape", list)
    p = with_reshape(call(aten.relu.default, X), shape)
    b = GraphBuilder()
    r = b.op(aten.relu.default, b.input())
    v = reshape(b, r, [6], spelling)
    m = _one(p, b.module())
    assert (m.root, m[shape]) == (v, [6])
    assert match_node(with_reshape(call(aten.relu.default, X)), v) is not None


def test_with_reshape_absent_binds_an_empty_list() -> None:
    shape = Var("shape", list)
    b = GraphBuilder()
    r = b.op(aten.relu.default, b.input())
    m = match_node(with_reshape(call(aten.relu.default, X), shape), r)
    assert m is not None
    assert m[shape] == [] and isinstance(m[shape], list)


# --------------------------------------------------------------------------------------------
# with_unary, with_binary
# --------------------------------------------------------------------------------------------

UNARY_GRAPH = {
    Unary.RELU: lambda b, x: b.op(aten.relu.default, x),
    Unary.HARDTANH: lambda b, x: b.op(aten.hardtanh.default, x, 0.0, 6.0),
    Unary.RELU6: lambda b, x: b.op(aten.relu6.default, x),
    Unary.HARDSWISH: lambda b, x: b.op(aten.hardswish.default, x),
    Unary.SILU: lambda b, x: b.op(aten.silu.default, x),
    Unary.GELU: lambda b, x: b.op(aten.gelu.default, x),
    Unary.GELU_TANH: lambda b, x: b.op(aten.gelu.default, x, approximate="tanh"),
    Unary.LEAKY_RELU: lambda b, x: b.op(aten.leaky_relu.default, x, 0.125),
    Unary.TANH: lambda b, x: b.op(aten.tanh.default, x),
}
UNARY = Var("unary", Unary)
ALL_UNARY = tuple(Unary)


def test_every_unary_has_a_graph_spelling() -> None:
    assert set(UNARY_GRAPH) == set(Unary) - {Unary.NONE}


@pytest.mark.parametrize("op", list(UNARY_GRAPH), ids=lambda u: u.name)
def test_with_unary_each_post_op(op: Unary) -> None:
    base = call(aten.neg.default, X)
    b = GraphBuilder()
    x = b.input()
    n = b.op(aten.neg.default, x)
    post = UNARY_GRAPH[op](b, n)
    gm = b.module()
    m = _one(with_unary(base, UNARY, *ALL_UNARY), gm)
    assert (m.root, m[UNARY], m[X]) == (post, op, x)
    if op is Unary.HARDTANH:
        assert (m[HARDTANH_MIN], m[HARDTANH_MAX]) == (0.0, 6.0)
    if op is Unary.LEAKY_RELU:
        assert m[LEAKY_SLOPE] == 0.125
    # Only this op allowed: found; only the others: the bare neg is not enough.
    assert _one(with_unary(base, UNARY, op), gm)[UNARY] is op
    others = [u for u in UNARY_GRAPH if u is not op]
    assert find_matches(with_unary(base, UNARY, *others), gm) == []


def test_with_unary_none() -> None:
    base = call(aten.neg.default, X)
    b = GraphBuilder()
    n = b.op(aten.neg.default, b.input())
    gm = b.module()
    m = _one(with_unary(base, UNARY, Unary.NONE), gm)
    assert (m.root, m[UNARY]) == (n, Unary.NONE)
    m = _one(with_unary(base, UNARY, Unary.NONE, Unary.RELU, Unary.HARDTANH), gm)
    assert (m.root, m[UNARY]) == (n, Unary.NONE)
    # No post-op fired, so no post-op scalar is bound (as when relu fires).
    assert HARDTANH_MIN not in m and HARDTANH_MAX not in m
    assert find_matches(with_unary(base, UNARY, Unary.RELU), gm) == []
    with pytest.raises(PatternError, match="at least one Unary"):
        with_unary(base, UNARY)


def test_with_unary_gelu_tells_the_approximations_apart() -> None:
    b = GraphBuilder()
    g = b.op(aten.gelu.default, b.op(aten.neg.default, b.input()), approximate="tanh")
    p = with_unary(call(aten.neg.default, X), UNARY, Unary.GELU, Unary.GELU_TANH)
    m = match_node(p, g)
    assert m is not None and m[UNARY] is Unary.GELU_TANH
    assert match_node(with_unary(call(aten.neg.default, X), UNARY, Unary.GELU), g) is None


def test_unary_metadata() -> None:
    assert Unary.SILU.onednn_name == "swish"
    assert Unary.GELU_TANH.onednn_name == "gelu"
    assert (Unary.GELU.algorithm, Unary.GELU_TANH.algorithm, Unary.RELU.algorithm) == (
        "none", "tanh", ""
    )
    assert Unary.HARDTANH.scalar_vars == (HARDTANH_MIN, HARDTANH_MAX)
    assert Unary.LEAKY_RELU.scalar_vars == (LEAKY_SLOPE,)
    assert Unary.RELU.scalar_vars == ()
    bound = {HARDTANH_MIN: -1.0, HARDTANH_MAX: 1.0, LEAKY_SLOPE: 0.5}.__getitem__
    assert Unary.HARDTANH.scalars(bound) == [-1.0, 1.0]
    assert Unary.LEAKY_RELU.scalars(bound) == [0.5]
    assert Unary.RELU6.scalars(bound) == [0.0, 6.0]
    assert Unary.RELU6.onednn_name == "hardtanh"
    assert Unary.RELU.scalars(bound) == []
    with pytest.raises(ValueError, match="no graph spelling"):
        Unary.NONE.applied_to(X)


@pytest.mark.parametrize("target", [aten.add.Tensor, aten.mul.Tensor])
def test_with_binary_both_operand_orders(target: OpOverload[..., Any]) -> None:
    p = with_binary(call(aten.neg.default, X), Y, target)
    for swap in (False, True):
        b = GraphBuilder()
        x, other = b.input(), b.input("other")
        n = b.op(aten.neg.default, x)
        s = b.op(target, *((other, n) if swap else (n, other)))
        m = _one(p, b.module())
        assert (m.root, m[X], m[Y]) == (s, x, other)


def test_with_binary_keeps_the_order_of_a_non_commutative_op() -> None:
    p = with_binary(call(aten.neg.default, X), Y, aten.sub.Tensor)
    b = GraphBuilder()
    x, other = b.input(), b.input("other")
    n = b.op(aten.neg.default, x)
    kept = b.op(aten.sub.Tensor, n, other)
    swapped = b.op(aten.sub.Tensor, other, n)
    assert match_node(p, kept) is not None
    assert match_node(p, swapped) is None


def test_with_binary_defaults_to_add() -> None:
    b = GraphBuilder()
    x, other = b.input(), b.input("other")
    s = b.op(aten.add.Tensor, other, b.op(aten.neg.default, x))
    m = match_node(with_binary(call(aten.neg.default, X), Y), s)
    assert m is not None and m[Y] is other
    product = b.op(aten.mul.Tensor, s, s)
    assert match_node(with_binary(call(aten.neg.default, X), Y), product) is None


def test_with_output_quant_direct() -> None:
    params = PARAMS[0]
    for form in QUANT_FORMS:
        b = GraphBuilder()
        n = b.op(aten.neg.default, b.input())
        q = quantize(b, n, params, form)
        m = _one(with_output_quant(call(aten.neg.default, X), QPV), b.module())
        assert m.root is q
        assert m[QPV.zero_point] == params.zero_point


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

CP = channel_qparams("w")
W = Var("w", fx.Node)


def _check_weight(m: Match, w: fx.Node, cp: ChannelQP) -> None:
    assert m[W] is w
    assert torch.equal(m[CP.scales], torch.tensor(cp.scales))
    assert torch.equal(m[CP.zero_points], torch.tensor(cp.zero_points))
    assert m[CP.axis] == cp.axis
    assert m[CP.dtype] is cp.dtype


def test_dequantize_per_channel() -> None:
    b = GraphBuilder()
    w, d = dequantize_weight(b)
    m = _one(dequantize_per_channel(W, CP), b.module())
    assert m.root is d
    _check_weight(m, w, ChannelQP())


@pytest.mark.parametrize("clone", [False, True])
@pytest.mark.parametrize("to_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("permute", [None, [1, 0, 2, 3]])
def test_weight_dequant_variants(
    clone: bool, to_dtype: torch.dtype | None, permute: list[int] | None
) -> None:
    compute, perm = Var("compute", torch.dtype), Var("perm", list)
    b = GraphBuilder()
    w, out = dequantize_weight(b, (4, 3, 1, 1), clone=clone, to_dtype=to_dtype, permute=permute)
    gm = b.module()
    m = _one(weight_dequant(W, CP, compute_dtype=compute, permuted=perm), gm)
    assert m.root is out
    _check_weight(m, w, ChannelQP())
    assert m[compute] is (to_dtype or torch.float32)
    assert m[perm] == (permute or [])
    assert len(m.nodes) == 1 + clone + (to_dtype is not None) + (permute is not None)
    # Without the optional Vars, a permute or a conversion is not part of the weight.
    plain = find_matches(weight_dequant(W, CP), gm)
    assert len(plain) == 1
    assert len(plain[0].nodes) == 1 + clone


def test_weight_dequant_refuses_a_clone_to_another_layout() -> None:
    b = GraphBuilder()
    _, d = dequantize_weight(b, (4, 3, 1, 1))
    c = b.op(aten.clone.default, d, memory_format=torch.contiguous_format)
    assert match_node(weight_dequant(W, CP), c) is None


@pytest.mark.parametrize("form", ["op_default", "decomposed"])
def test_weight_dequant_per_tensor(form: DequantForm) -> None:
    wq = qparams("w_tensor")
    b = GraphBuilder()
    w = b.const(torch.zeros((4, 3), dtype=torch.int8))
    params = QP(scale=0.125, zero_point=0, quant_min=-128, quant_max=127, dtype=torch.int8)
    d = dequantize(b, w, params, form)
    gm = b.module()
    m = _one(weight_dequant(W, CP, per_tensor=wq), gm)
    assert m.root is d and m[W] is w
    assert (m[wq.scale], m[wq.zero_point], m[wq.dtype]) == (0.125, 0, torch.int8)
    assert CP.scales not in m
    assert find_matches(weight_dequant(W, CP), gm) == []  # per channel only


# --------------------------------------------------------------------------------------------
# Runtime qparams
# --------------------------------------------------------------------------------------------

RUNTIME = qparams("x", runtime=True)


def _runtime_qdq(b: GraphBuilder) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node]:
    """(x, scale, zero point, quantize, dequantize): qparams computed by ``choose_qparams``."""
    x = b.input()
    chosen = b.op(torch.ops.quantized_decomposed.choose_qparams.tensor, x, 0, 255, 1e-5,
                  torch.uint8, meta=False)  # fmt: skip
    scale, zp = getitem(b, chosen, 0), getitem(b, chosen, 1)
    qd = torch.ops.quantized_decomposed
    q = b.op(qd.quantize_per_tensor.tensor, x, scale, zp, 0, 255, torch.uint8, meta=False)
    d = b.op(qd.dequantize_per_tensor.tensor, q, scale, zp, 0, 255, torch.uint8, meta=False)
    return x, scale, zp, q, d


def test_runtime_qparams_names() -> None:
    assert RUNTIME.scale_node is not None and RUNTIME.zero_point_node is not None
    assert (RUNTIME.scale_node.name, RUNTIME.zero_point_node.name) == ("x_scale_node", "x_zp_node")
    assert RUNTIME.scale == qparams("x").scale  # the constant Vars are the same
    assert qparams("x").scale_node is None


def test_runtime_qparams_bind_the_nodes_computing_them() -> None:
    b = GraphBuilder()
    x, scale, zp, q, d = _runtime_qdq(b)
    b.op(aten.relu.default, d)
    gm = b.module()
    m = _one(dequantize_per_tensor(X, RUNTIME), gm)
    assert m.root is d and m[X] is q
    assert RUNTIME.read(m) == RuntimeQParams(scale, zp)
    assert RUNTIME.scale not in m and (m[RUNTIME.quant_min], m[RUNTIME.dtype]) == (0, torch.uint8)
    mq = match_node(quantize_per_tensor(Y, RUNTIME), q)
    assert mq is not None and mq[Y] is x and RUNTIME.read(mq) == RuntimeQParams(scale, zp)
    # Constant-only qparams do not match: their replacement code could not read a node.
    assert find_matches(dequantize_per_tensor(X, QPV), gm) == []
    assert match_node(quantize_per_tensor(Y, QPV), q) is None


@pytest.mark.parametrize("form", ["op_default", "op_tensor"])
def test_runtime_qparams_read_constants_as_constants(form: DequantForm) -> None:
    # A one-element get_attr scale is a constant: the constant alternative binds it first.
    b = GraphBuilder()
    q = quantize(b, b.input(), PARAMS[0])
    d = dequantize(b, q, PARAMS[0], form)
    m = _one(dequantize_per_tensor(X, RUNTIME), b.module())
    assert m.root is d
    assert RUNTIME.read(m) == ConstantQParams(PARAMS[0].scale, PARAMS[0].zero_point)
    assert RUNTIME.scale_node is not None and RUNTIME.scale_node not in m
