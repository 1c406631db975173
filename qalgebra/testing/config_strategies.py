"""Hypothesis strategies for the graphs other quantization configs give, with what they expect.

The default ``X86InductorQuantizer`` config quantizes activations to uint8 with constant qparams
and weights per channel. Three other configs give graphs the conv/linear families also lower
(see :mod:`qalgebra.fusions.common`); each is a family here:

=======================  ==========================================================  ==========
family                   graph                                                       fuses
=======================  ==========================================================  ==========
``dynamic_qlinear``      ``choose_qparams`` -> ``.tensor`` quantize/dequantize with  qlinear,
                         runtime scale and zero point -> 1 or 2 linears (2-D or      qlinear_
                         3-D, ``aten.linear`` or ``[view] addmm/mm [view]``, post-   binary,
                         ops), the dequant shared or not, outputs returned apart     dequant_
                         or added (+ relu)                                           promotion
``per_tensor_weight``    ``dequantize_per_tensor`` of an int8 constant weight ->     qconv,
                         conv or linear (uint8 activations, [relu], [int8 output])   qlinear
``signed_conv``          int8 activations -> conv: from a quantize read only by the  qconv
                         conv (folded into a uint8 quantize), one also returned
                         (explicit +128 shift), an int8 graph input, or a dynamic
                         (``choose_qparams``) int8 quantize
=======================  ==========================================================  ==========

Graphs are built directly with ``fx.Graph`` (milliseconds each), evaluated while they are
built, with ``meta['val']`` on every node or (``meta="export"``, what ``convert_pt2e`` leaves)
on none of the quantize/dequantize nodes. The static families are drawn in the primary forms
whose numerics are exact (:data:`STATIC_FORMS`: op, ``.tensor`` with float64 qparams,
decomposed); runtime qparams exist in op form only. Expected counts cover
:data:`~qalgebra.testing.strategies.TRACKED_FUSIONS`; saturating products are refused
(``saturating``) on CPUs whose probe says so, and a weight with a non-zero zero point is
refused (``weight zero points``).

Numerics: the fused op and the reference compute the same integer products and differ by
float rounding: ``FP32_REL * M`` with ``M`` the largest ``|x| @ |w| + |b|`` of the layer (the
post-op's Lipschitz constant times that after it), and an int8 output by ``1 + err / scale``
steps. Runtime qparams are computed by the same graph nodes on both sides. 90% of the elements
of each output must agree to the float bound (an off-by-one zero point moves them all).

>>> spec = StaticLayerSpec("signed_conv", "conv", (1, 2, 4, 4), 3, QuantSpec(0.05, -3, -128,
...     127, torch.int8), producer="quantize")
>>> ex = build_example(spec)
>>> ex.family, ex.expected.fired["qconv"] in (0, 1)
('signed_conv', True)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import torch
import torch.ao.quantization.fx._decomposed
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx

from qalgebra import isa
from qalgebra.combinators import Unary
from qalgebra.testing.oracle import FP32_COMPUTE_REL as FP32_REL
from qalgebra.testing.strategies import (
    FLOAT_ATOL,
    TRACKED_FUSIONS,
    Example,
    Expected,
    OutputBound,
    QuantSpec,
    apply_form,
    may_saturate,
    saturates,
)

__all__ = [
    "FAMILIES",
    "STATIC_FORMS",
    "DynamicLinearSpec",
    "StaticLayerSpec",
    "build_example",
    "dynamic_linear_specs",
    "per_tensor_weight_specs",
    "signed_conv_specs",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

#: Primary forms with exact numerics (``tensor_qparams_f32`` rounds the scale: not drawn).
STATIC_FORMS: tuple[str, ...] = (
    "op",
    "tensor_qparams",
    "decomposed",
    "decomposed_single_clamp",
    "decomposed_keep_zero_zp",
)
#: Runtime qparams: the ``.tensor`` op form only.
DYNAMIC_FORMS: tuple[str, ...] = ("op",)

MetaMode: TypeAlias = Literal["all", "export"]
Producer: TypeAlias = Literal["quantize", "shared", "input", "dynamic"]
Combine: TypeAlias = Literal["apart", "add", "add_relu"]

#: Post-ops of the dynamic linears, with their Lipschitz constants.
_LINEAR_POST_OPS = {Unary.NONE: 1.0, Unary.RELU: 1.0, Unary.GELU: 1.13, Unary.TANH: 1.0}
_CHOOSE_QPARAMS_EPS = 2.0**-12
#: Substrings of the refusals the lowering gives for these graphs.
SATURATING = "saturating"
WEIGHT_ZERO_POINTS = "weight zero points"


# --------------------------------------------------------------------------------------------
# Specs (frozen; repr is Python that rebuilds them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DynamicLinearSpec:
    """Linears of one dynamically quantized activation (uint8, range ``[0, quant_max]``).

    ``combine``: the linears' outputs returned apart, or added (two linears of equal
    ``out_features``), then optionally relu'd.
    """

    input_shape: tuple[int, ...]
    out_features: tuple[int, ...]
    post_ops: tuple[Unary, ...]
    bias: bool = True
    combine: Combine = "apart"
    share_dequant: bool = True
    spelling: Literal["linear", "matmul"] = "linear"
    quant_max: int = 255
    weight_max: int = 64
    meta: MetaMode = "all"
    seed: int = 0
    family: str = "dynamic_qlinear"


@dataclass(frozen=True, slots=True)
class StaticLayerSpec:
    """One conv (kernel 1 or 3, stride 1, same padding) or linear of a quantized activation.

    ``producer``: where the quantized activation comes from (``"shared"``: its quantize is
    also returned; ``"input"``: it is a graph input; ``"dynamic"``: ``choose_qparams`` over
    ``act``'s range). ``weight_zero_point`` != 0 makes the per-tensor weight asymmetric.
    """

    family: str
    kind: Literal["conv", "linear"]
    input_shape: tuple[int, ...]
    out_channels: int
    act: QuantSpec
    producer: Producer = "quantize"
    kernel: int = 3
    bias: bool = True
    relu: bool = False
    weight_per_tensor: bool = True
    weight_max: int = 64
    weight_scale: float = 0.01
    weight_zero_point: int = 0
    out_quant: QuantSpec | None = None
    meta: MetaMode = "all"
    seed: int = 0


Spec: TypeAlias = DynamicLinearSpec | StaticLayerSpec


# --------------------------------------------------------------------------------------------
# Building: nodes evaluated as they are added
# --------------------------------------------------------------------------------------------


class _Build:
    """An ``fx.Graph`` and the real value of each node (to derive bounds from)."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.module = torch.nn.Module()
        self.inputs: list[torch.Tensor] = []
        self.values: dict[fx.Node, Any] = {}

    def placeholder(self, value: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(f"x{len(self.inputs)}")
        self.inputs.append(value)
        self.values[node] = value
        return node

    def const(self, name: str, value: torch.Tensor) -> fx.Node:
        self.module.register_buffer(name, value)
        node = self.graph.get_attr(name)
        self.values[node] = value
        return node

    def call(self, target: Callable[..., Any], *args: Any) -> fx.Node:
        node = self.graph.call_function(target, args)
        real = [self.values[a] if isinstance(a, fx.Node) else a for a in args]
        self.values[node] = target(*real)
        return node

    def finish(self, outputs: Sequence[fx.Node], meta: MetaMode, form: str) -> fx.GraphModule:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        self.graph.output(tuple(outputs))
        gm = fx.GraphModule(self.module, self.graph)
        # The constants stay real tensors: the mode takes them as they are.
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*self.inputs)
        gm = apply_form(gm, form)
        if meta == "export":  # convert_pt2e leaves quantize/dequantize nodes without meta
            for node in gm.graph.nodes:
                if getattr(node.target, "namespace", None) == "quantized_decomposed":
                    node.meta.pop("val", None)
        return gm


def _seeded(seed: int, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * (high - low) + low


def _weight(seed: int, shape: tuple[int, ...], bound: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-bound, bound + 1, shape, generator=gen).to(torch.int8)


def _runtime_quant(b: _Build, x: fx.Node, qmin: int, qmax: int, dtype: torch.dtype) -> fx.Node:
    """``choose_qparams`` then the ``.tensor`` quantize, as the dynamic config exports it."""
    qparams = b.call(qd.choose_qparams.tensor, x, qmin, qmax, _CHOOSE_QPARAMS_EPS, dtype)
    scale = b.call(operator.getitem, qparams, 0)
    zero_point = b.call(operator.getitem, qparams, 1)
    return b.call(qd.quantize_per_tensor.tensor, x, scale, zero_point, qmin, qmax, dtype)


def _same_dequant(b: _Build, q: fx.Node) -> fx.Node:
    """A dequantize of ``q`` with ``q``'s own qparams (its quantize's, or the spec's)."""
    target = (
        qd.dequantize_per_tensor.tensor
        if q.target is qd.quantize_per_tensor.tensor
        else qd.dequantize_per_tensor.default
    )
    return b.call(target, q, *q.args[1:])


def _magnitude(value: torch.Tensor) -> float:
    return float(value.abs().max()) if value.numel() else 0.0


#: Outputs this small are not held to the agreement fraction (one flip would break it).
_AGREE_MIN_ELEMENTS = 30


def _agree(value: torch.Tensor) -> float | None:
    return 0.9 if value.numel() >= _AGREE_MIN_ELEMENTS else None


def _float_bound(err: float, value: torch.Tensor, why: str) -> OutputBound:
    return OutputBound(
        "float", atol=err + FLOAT_ATOL, agree=_agree(value), agree_atol=err + FLOAT_ATOL, why=why
    )


#: Why a fused layer's numbers are not checked (its decisions are).
OTHER_CPU = "fused as on a CPU whose int8 pair sums do not saturate; this one's do: decisions only"


def _computed_elsewhere(act: QuantSpec, w_max: int) -> bool:
    """Whether a layer that fuses (the probe ``int8_pairs_saturate`` says False) may compute
    other numbers here: its products may overflow int16 pairs and this CPU's kernels saturate
    them (the probe is forced). Its outputs are then left unchecked."""
    return (
        not isa.int8_pairs_saturate()
        and isa.measured("int8_pairs_saturate")
        and may_saturate(act, w_max)
    )


def _unchecked(bounds: Sequence[OutputBound]) -> tuple[OutputBound, ...]:
    return tuple(
        b if b.kind == "exact" else OutputBound("float", atol=math.inf, why=OTHER_CPU)
        for b in bounds
    )


def _fired(**counts: int) -> dict[str, int]:
    fired = dict.fromkeys(TRACKED_FUSIONS, 0)
    fired.update(counts)
    return fired


# --------------------------------------------------------------------------------------------
# Dynamic linears
# --------------------------------------------------------------------------------------------


def _dynamic_linear(
    b: _Build, spec: DynamicLinearSpec, x: fx.Node, i: int
) -> tuple[fx.Node, float]:
    """Linear ``i`` of the dequantized ``x`` (with its post-op) and its float error bound."""
    k = spec.input_shape[-1]
    n = spec.out_features[i]
    w_int8 = _weight(spec.seed + 10 + i, (n, k), spec.weight_max)
    scales = _seeded(spec.seed + 20 + i, (n,), 0.002, 0.02)
    w = b.call(
        qd.dequantize_per_channel.default,
        b.const(f"w{i}", w_int8),
        b.const(f"w{i}_scales", scales),
        b.const(f"w{i}_zps", torch.zeros(n, dtype=torch.int64)),
        0,
        -128,
        127,
        torch.int8,
    )
    bias = b.const(f"b{i}", _seeded(spec.seed + 30 + i, (n,), -1.0, 1.0)) if spec.bias else None
    if spec.spelling == "linear":
        y = b.call(aten.linear.default, x, w, bias)
    else:
        rows = math.prod(spec.input_shape[:-1])
        x2d = b.call(aten.view.default, x, [rows, k]) if len(spec.input_shape) > 2 else x
        w_t = b.call(aten.permute.default, w, [1, 0])
        mm = (
            b.call(aten.addmm.default, bias, x2d, w_t)
            if bias is not None
            else b.call(aten.mm.default, x2d, w_t)
        )
        y = mm
        if len(spec.input_shape) > 2:
            y = b.call(aten.view.default, mm, [*spec.input_shape[:-1], n])
    xd = b.values[x]
    biasv = b.values[bias] if bias is not None else None
    mag = _magnitude(F.linear(xd.abs(), (w_int8.float() * scales[:, None]).abs(), biasv))
    post = spec.post_ops[i]
    if post is not Unary.NONE:
        y = b.call(_POST_OP_CALLS[post], y)
    return y, FP32_REL * mag * _LINEAR_POST_OPS[post]


_POST_OP_CALLS: dict[Unary, Callable[..., Any]] = {
    Unary.RELU: aten.relu.default,
    Unary.GELU: aten.gelu.default,
    Unary.TANH: aten.tanh.default,
}


def _build_dynamic(spec: DynamicLinearSpec, form: str) -> tuple[fx.GraphModule, Expected, _Build]:
    b = _Build()
    x = b.placeholder(_seeded(spec.seed, spec.input_shape, -3.0, 5.0))
    q = _runtime_quant(b, x, 0, spec.quant_max, torch.uint8)
    n = len(spec.out_features)
    shared = _same_dequant(b, q) if spec.share_dequant else None
    ys = [
        _dynamic_linear(b, spec, shared if shared is not None else _same_dequant(b, q), i)
        for i in range(n)
    ]
    if spec.combine == "apart":
        outputs = [y for y, _ in ys]
        bounds = [_float_bound(err, b.values[y], "float rounding of the linear") for y, err in ys]
    else:
        total = b.call(aten.add.Tensor, ys[0][0], ys[1][0])
        if spec.combine == "add_relu":
            total = b.call(aten.relu.default, total)
        err = ys[0][1] + ys[1][1] + FP32_REL * _magnitude(b.values[total])
        bound = _float_bound(err, b.values[total], "float rounding of both linears")
        outputs, bounds = [total], [bound]
    k = spec.input_shape[-1]
    act = QuantSpec(1.0, 0, 0, spec.quant_max, torch.uint8)

    def w_max(i: int) -> int:
        weight = _weight(spec.seed + 10 + i, (spec.out_features[i], k), spec.weight_max)
        return int(weight.abs().max())

    # each linear is refused or fused on its own: by its own weights
    fusing = [i for i in range(n) if not saturates(act, w_max(i))]
    refusals = (SATURATING,) if len(fusing) < n else ()
    promotions = int(spec.share_dequant and n > 1)
    # the add fuses into a fusing linear without a post-op (the other operand: any float)
    binary = spec.combine != "apart" and any(spec.post_ops[i] == Unary.NONE for i in fusing)
    fired = _fired(
        qlinear_binary=int(binary),
        qlinear=len(fusing) - int(binary),
        dequant_promotion=promotions,
    )
    if any(_computed_elsewhere(act, w_max(i)) for i in fusing):
        bounds = list(_unchecked(bounds))
    expected = Expected(fired, refusals, outputs=tuple(bounds))
    return b.finish(outputs, spec.meta, form), expected, b


# --------------------------------------------------------------------------------------------
# Static layers: per-tensor weights, signed conv activations
# --------------------------------------------------------------------------------------------


def _quantized_activation(b: _Build, spec: StaticLayerSpec) -> tuple[fx.Node, fx.Node | None]:
    """The quantized activation, and the node to return alongside (``"shared"``) or None."""
    act = spec.act
    if spec.producer == "input":
        gen = torch.Generator().manual_seed(spec.seed)
        levels = torch.randint(act.quant_min, act.quant_max + 1, spec.input_shape, generator=gen)
        return b.placeholder(levels.to(act.dtype)), None
    low = (act.quant_min - act.zero_point - 2) * act.scale
    high = (act.quant_max - act.zero_point + 2) * act.scale
    x = b.placeholder(_seeded(spec.seed, spec.input_shape, low, high))
    if spec.producer == "dynamic":
        return _runtime_quant(b, x, act.quant_min, act.quant_max, act.dtype), None
    q = b.call(qd.quantize_per_tensor.default, x, *act.args())
    return q, (q if spec.producer == "shared" else None)


def _static_weight(b: _Build, spec: StaticLayerSpec, cin: int) -> tuple[fx.Node, torch.Tensor]:
    """The dequantized weight node and its float value."""
    k = spec.kernel
    shape = (spec.out_channels, cin, k, k) if spec.kind == "conv" else (spec.out_channels, cin)
    w_int8 = _weight(spec.seed + 1, shape, spec.weight_max)
    w = b.const("w", w_int8)
    if spec.weight_per_tensor:
        node = b.call(
            qd.dequantize_per_tensor.default,
            w,
            spec.weight_scale,
            spec.weight_zero_point,
            -128,
            127,
            torch.int8,
        )
    else:
        scales = torch.full((spec.out_channels,), spec.weight_scale)
        zps = torch.zeros(spec.out_channels, dtype=torch.int64)
        node = b.call(
            qd.dequantize_per_channel.default,
            w,
            b.const("w_scales", scales),
            b.const("w_zps", zps),
            0,
            -128,
            127,
            torch.int8,
        )
    value: torch.Tensor = b.values[node]
    return node, value


def _kernel_activation(spec: StaticLayerSpec, form: str) -> QuantSpec:
    """The activation range the kernel multiplies, as far as the graph says it (a conv's int8
    input is shifted to uint8).

    A graph input's range is stated only by the dequantize reading it; a decomposed dequantize
    is arithmetic and states none, so the lowering takes the dtype's whole range there.
    """
    act = spec.act
    if spec.producer == "input" and form.split("+")[0].startswith("decomposed"):
        info = torch.iinfo(act.dtype)
        act = QuantSpec(act.scale, act.zero_point, int(info.min), int(info.max), act.dtype)
    if spec.kind == "conv" and act.dtype == torch.int8:  # shifted to uint8, range and all
        low, high = act.quant_min + 128, act.quant_max + 128
        act = QuantSpec(act.scale, act.zero_point + 128, low, high, torch.uint8)
    return act


def _static_blocker(spec: StaticLayerSpec, form: str, w_max: int) -> str | None:
    if spec.weight_per_tensor and spec.weight_zero_point != 0:
        return WEIGHT_ZERO_POINTS
    return SATURATING if saturates(_kernel_activation(spec, form), w_max) else None


def _build_static(spec: StaticLayerSpec, form: str) -> tuple[fx.GraphModule, Expected, _Build]:
    b = _Build()
    q, returned = _quantized_activation(b, spec)
    x = (
        b.call(qd.dequantize_per_tensor.default, q, *spec.act.args())
        if spec.producer == "input"
        else _same_dequant(b, q)
    )
    cin = spec.input_shape[1] if spec.kind == "conv" else spec.input_shape[-1]
    w, wv = _static_weight(b, spec, cin)
    bias = None
    if spec.bias:
        bias = b.const("b", _seeded(spec.seed + 2, (spec.out_channels,), -1.0, 1.0))
    biasv = b.values[bias] if bias is not None else None
    xd = b.values[x]
    if spec.kind == "conv":
        pad = spec.kernel // 2
        y = b.call(aten.conv2d.default, x, w, bias, [1, 1], [pad, pad], [1, 1], 1)
        mag = _magnitude(F.conv2d(xd.abs(), wv.abs(), biasv, padding=pad))
    else:
        y = b.call(aten.linear.default, x, w, bias)
        mag = _magnitude(F.linear(xd.abs(), wv.abs(), biasv))
    if spec.relu:
        y = b.call(aten.relu.default, y)
    err = FP32_REL * mag
    oq = spec.out_quant
    if oq is None:
        out, bound = y, _float_bound(err, b.values[y], "float rounding of the layer")
    else:
        qy = b.call(qd.quantize_per_tensor.default, y, *oq.args())
        out = b.call(qd.dequantize_per_tensor.default, qy, *oq.args())
        steps = 1 + math.floor(err / oq.scale)
        rounding = FLOAT_ATOL + FP32_REL * _magnitude(b.values[out])  # of the dequantize
        bound = OutputBound(
            "float",
            atol=steps * oq.scale + rounding,
            agree=_agree(b.values[out]),
            agree_atol=rounding,
            why=f"{steps} step(s) of the output scale {oq.scale:.3g}",
        )
    outputs, bounds = [out], [bound]
    if returned is not None:
        outputs.append(returned)
        bounds.append(OutputBound("exact", why="the quantize itself, not lowered"))
    w_max = int(_weight(spec.seed + 1, tuple(wv.shape), spec.weight_max).abs().max())
    reason = _static_blocker(spec, form, w_max)
    fired = _fired(**{"q" + spec.kind: int(reason is None)})
    refusals = () if reason is None else (reason,)
    if reason is None and _computed_elsewhere(_kernel_activation(spec, form), w_max):
        bounds = list(_unchecked(bounds))
    expected = Expected(fired, refusals, outputs=tuple(bounds))
    return b.finish(outputs, spec.meta, form), expected, b


def build_example(spec: Spec, form: str = "op") -> Example:
    """The example ``spec`` describes, spelled in ``form`` (see :data:`STATIC_FORMS`); its
    ``repr`` (and the first line of ``code()``) is the expression rebuilding it."""
    if isinstance(spec, DynamicLinearSpec):
        gm, expected, b = _build_dynamic(spec, form)
    else:
        gm, expected, b = _build_static(spec, form)
    recipe = f"qalgebra.testing.config_strategies.build_example({spec!r}, {form!r})"
    return Example(spec.family, form, gm, tuple(b.inputs), expected, recipe=recipe)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_SEEDS = st.integers(0, 2**16)
_METAS: st.SearchStrategy[MetaMode] = st.sampled_from(["all", "export"])


@st.composite
def dynamic_linear_specs(draw: st.DrawFn) -> DynamicLinearSpec:
    """1 or 2 linears of one dynamically quantized activation (2-D or 3-D)."""
    k = draw(st.integers(1, 24))
    lead = draw(st.sampled_from([(draw(st.integers(1, 6)),), (2, draw(st.integers(1, 4)))]))
    n = draw(st.sampled_from([2, 1]))  # two linears first: promotion and the binary add
    combine: Combine = draw(st.sampled_from(["apart", "add", "add_relu"])) if n == 2 else "apart"
    first = draw(st.integers(1, 16))
    out = (first,) * n if combine != "apart" else tuple(draw(st.integers(1, 16)) for _ in range(n))
    post_ops = tuple(draw(st.sampled_from([Unary.NONE, *_LINEAR_POST_OPS])) for _ in range(n))
    return DynamicLinearSpec(
        input_shape=(*lead, k),
        out_features=out,
        post_ops=post_ops,
        bias=draw(st.booleans()),
        combine=combine,
        share_dequant=draw(st.booleans()),
        spelling=draw(st.sampled_from(["linear", "matmul"])),
        quant_max=draw(st.sampled_from([255, 127])),
        weight_max=draw(st.sampled_from([127, 64])),
        meta=draw(_METAS),
        seed=draw(_SEEDS),
    )


def _act_quant(draw: st.DrawFn, dtype: torch.dtype) -> QuantSpec:
    ranges = [(0, 255), (0, 127)] if dtype == torch.uint8 else [(-128, 127), (-64, 63)]
    low, high = draw(st.sampled_from(ranges))
    zero_point = draw(st.integers(low, high))
    scale = 2.0 ** draw(st.integers(-8, -2))
    return QuantSpec(scale, zero_point, low, high, dtype)


def _layer_fields(draw: st.DrawFn, kind: Literal["conv", "linear"]) -> dict[str, Any]:
    if kind == "conv":  # the geometry oneDNN's conv is exact with on every CPU tried
        shape: tuple[int, ...] = (
            draw(st.integers(1, 2)),
            draw(st.integers(1, 6)),
            draw(st.integers(3, 7)),
            draw(st.integers(3, 7)),
        )
    else:
        shape = (*draw(st.sampled_from([(3,), (2, 3)])), draw(st.integers(1, 24)))
    return {
        "input_shape": shape,
        "out_channels": draw(st.integers(1, 8)),
        "kernel": draw(st.sampled_from([1, 3])),
        "bias": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "weight_max": draw(st.sampled_from([127, 64])),
        "weight_scale": 2.0 ** draw(st.integers(-9, -5)),
        "meta": draw(_METAS),
        "seed": draw(_SEEDS),
    }


def _out_quant(draw: st.DrawFn, spec: StaticLayerSpec) -> QuantSpec | None:
    """An int8 output quant scaled to the layer's float output, or None."""
    if not draw(st.booleans()):
        return None
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    low, high = (0, 255) if dtype == torch.uint8 else (-128, 127)
    plain = build_example(spec)
    span = max(_magnitude(plain.gm(*plain.inputs)[0]), 1e-3)
    scale = span / (high - low) * 2.0 ** draw(st.integers(0, 2))
    zero_point = 0 if spec.relu or dtype == torch.int8 else (low + high + 1) // 2
    return QuantSpec(scale, zero_point, low, high, dtype)


@st.composite
def per_tensor_weight_specs(draw: st.DrawFn) -> StaticLayerSpec:
    """A conv or linear whose weight is dequantized per tensor (sometimes asymmetric)."""
    kind: Literal["conv", "linear"] = draw(st.sampled_from(["conv", "linear"]))
    spec = StaticLayerSpec(
        "per_tensor_weight",
        kind,
        act=_act_quant(draw, torch.uint8),
        weight_zero_point=draw(st.sampled_from([0, 0, 0, 3])),
        **_layer_fields(draw, kind),
    )
    return _with_out_quant(draw, spec)


@st.composite
def signed_conv_specs(draw: st.DrawFn) -> StaticLayerSpec:
    """A conv of int8 activations, from any producer; the weight per channel or per tensor."""
    producer: Producer = draw(st.sampled_from(["quantize", "shared", "input", "dynamic"]))
    spec = StaticLayerSpec(
        "signed_conv",
        "conv",
        act=_act_quant(draw, torch.int8),
        producer=producer,
        weight_per_tensor=draw(st.booleans()),
        **_layer_fields(draw, "conv"),
    )
    return _with_out_quant(draw, spec)


def _with_out_quant(draw: st.DrawFn, spec: StaticLayerSpec) -> StaticLayerSpec:
    out_quant = _out_quant(draw, spec)
    if out_quant is None:
        return spec
    return StaticLayerSpec(**{**_fields(spec), "out_quant": out_quant})


def _fields(spec: StaticLayerSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in StaticLayerSpec.__dataclass_fields__}


def _static_forms(spec: StaticLayerSpec, forms: Sequence[str] | None) -> list[str]:
    own = DYNAMIC_FORMS if spec.producer == "dynamic" else STATIC_FORMS
    allowed = [f for f in own if forms is None or f in forms or f.split("+")[0] in forms]
    return allowed or ["op"]


def _examples(
    specs: st.SearchStrategy[Spec], forms: Sequence[str] | None
) -> st.SearchStrategy[Example]:
    @st.composite
    def draw_example(draw: st.DrawFn) -> Example:
        spec = draw(specs)
        if isinstance(spec, DynamicLinearSpec):
            return build_example(spec, "op")
        return build_example(spec, draw(st.sampled_from(_static_forms(spec, forms))))

    return draw_example()


def _factory(
    specs: Callable[[], st.SearchStrategy[Any]],
) -> Callable[..., st.SearchStrategy[Example]]:
    def factory(forms: Sequence[str] | None = None) -> st.SearchStrategy[Example]:
        return _examples(specs(), forms)

    return factory


FAMILIES: Mapping[str, Callable[..., st.SearchStrategy[Example]]] = MappingProxyType(
    {
        "dynamic_qlinear": _factory(dynamic_linear_specs),
        "per_tensor_weight": _factory(per_tensor_weight_specs),
        "signed_conv": _factory(signed_conv_specs),
    }
)
"""Each family by name: ``FAMILIES[name](forms=None)`` is a strategy of examples."""
