"""Hypothesis strategies for the weight-only and dynamic families, with the fusions each expects.

Every strategy draws a :class:`FamilyCase`: a real exported graph (``torch.export`` of a small
module written the way users write these models, optionally re-exported with CompositeImplicit
decompositions, the graph Inductor sees), its inputs, the fusions the default catalog must fire on
it (``expected``), and an elementwise numerics bound. The families:

=============================  ===============================================  ====================
strategy                       graph                                            expected fusion
=============================  ===============================================  ====================
:func:`woq_cases`              ``F.linear(x, w_int8.to(x.dtype)) * s [+ b]``;   ``woq_int8``
                               x bf16, 2-D, 3-D or transposed 3-D (bmm)
:func:`woq_concat_cases`       2-3 such linears reading the same x              ``woq_int8_concat_
                                                                                linear``
:func:`woq_refusal_cases`      1-3 such linears, fp32 (or bf16 with a K the     none; ``refused``
                               bf16 kernel cannot take)                         counts ``woq_int8``
:func:`dynamic_fp16_cases`     ``F.linear(x, w16.float(), b) [relu]``, or       ``linear_dynamic_
                               torchao's x86 dynamic-fp16 quantizer on          fp16`` (per linear)
                               ``nn.Linear`` (+ relu)
:func:`int_mm_cases`           per-token or static int8 quant of x,             ``int_mm_linear``
                               ``torch._int_mm`` with int8 ``[K, N]``,
                               ``* x_scale * w_scale [+ b]`` in fp32/bf16
=============================  ===============================================  ====================

:func:`family_cases` draws from all of them but the refusal cases: every case it draws is
lowered (``refused`` is empty), so "no refusal" can be asserted. The ``_int_mm`` weights are
7-bit (within [-64, 64]) so the fusion is exact and fires on every CPU (oneDNN saturates wider
signed products without VNNI, see ``qalgebra.fusions.int_mm``). The WOQ cases are bf16 with a K
the kernel takes on every CPU (a multiple of 16, ``qalgebra.fusions.woq.bf16_k_multiple``): the
default catalog refuses fp32 WOQ (a scalar kernel on x86) and a K no vector width takes, see
:func:`woq_refusal_cases`.

Numerics. ``FamilyCase.check`` compares the lowered module with the reference (the un-lowered
graph run eagerly) elementwise: ``|lowered - reference| <= rel_bound * magnitude``, where
``magnitude`` is the sum of the absolute values of the terms of each output element
(``|x| @ |w|.T * |s| + |b|``). Both sides compute the same products; they differ by the order of
the float accumulation (at most ``K`` roundings of the unit roundoff ``u`` each: ``2K u``) and by
the roundings of the final scale/bias steps (a few ``u`` each side; in bf16 the reference rounds
after the linear *and* after the scale, the fused kernels once). The fp16 weight rounding of the
dynamic fp16 family is in the reference itself, so it adds nothing. The ``_int_mm`` accumulation
is exact (int32) on both sides.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx, nn

from qalgebra.fusions.woq import DEFAULT_WOQ_DTYPES, bf16_k_multiple
from qalgebra.testing.forms import decompose_compute, decompose_exported

__all__ = [
    "FAMILY_FUSIONS",
    "FORMS",
    "FamilyCase",
    "HalfWeightLinear",
    "SmoothQuantLinear",
    "WoqLinears",
    "dynamic_fp16_case",
    "dynamic_fp16_cases",
    "family_cases",
    "int_mm_case",
    "int_mm_cases",
    "woq_case",
    "woq_cases",
    "woq_concat_cases",
    "woq_refusal_cases",
]

#: The graph forms a case may be drawn in: export's op form, and Inductor's decomposed form.
FORMS = ("op", "compute")

#: The fusions whose counts a case states. Other catalog entries may fire on the surrounding
#: graph (``view_as_reshape`` respells the views of the quantization code around ``_int_mm``).
FAMILY_FUSIONS = frozenset(
    {"woq_int8", "woq_int8_concat_linear", "linear_dynamic_fp16", "int_mm_linear"}
)

_U32 = 2.0**-24
_UBF16 = 2.0**-8
_UNIT_ROUNDOFF = {torch.float32: _U32, torch.bfloat16: _UBF16}


# --------------------------------------------------------------------------------------------
# The models, written the way users write them
# --------------------------------------------------------------------------------------------


class WoqLinears(nn.Module):
    """``F.linear(x, w_i.to(x.dtype)) * s_i [+ b_i]`` for each weight ``w_i`` (int8 ``[N_i, K]``).

    ``transpose_input`` transposes dims 0 and 1 of a 3-D ``x`` first (a non-contiguous input: the
    linear decomposes to ``expand -> bmm``). Several weights give a tuple of outputs that all
    read the same ``x`` (the concat-linear shape).
    """

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
        *,
        transpose_input: bool = False,
    ) -> None:
        super().__init__()
        self.count = len(weights)
        self.transpose_input = transpose_input
        self.has_bias = [b is not None for b in biases]
        for i, (w, s, b) in enumerate(zip(weights, scales, biases, strict=True)):
            self.register_buffer(f"w{i}", w)
            self.register_buffer(f"s{i}", s)
            if b is not None:
                self.register_buffer(f"b{i}", b)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self.transpose_input else x

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self._input(x)
        outs = []
        for i in range(self.count):
            y = F.linear(x, getattr(self, f"w{i}").to(x.dtype)) * getattr(self, f"s{i}")
            if self.has_bias[i]:
                y = y + getattr(self, f"b{i}")
            outs.append(y)
        return outs[0] if self.count == 1 else tuple(outs)

    def magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``|x| @ |w_i|.T * |s_i| + |b_i|`` per output, in fp32."""
        xa = self._input(x).float().abs()
        out = []
        for i in range(self.count):
            w, s = getattr(self, f"w{i}"), getattr(self, f"s{i}")
            y = F.linear(xa, w.float().abs()) * s.float().abs()
            if self.has_bias[i]:
                y = y + getattr(self, f"b{i}").float().abs()
            out.append(y)
        return tuple(out)


class HalfWeightLinear(nn.Module):
    """``F.linear(x, w16.float(), b) [-> relu]``: a linear whose weight is stored in fp16."""

    w16: torch.Tensor

    def __init__(
        self,
        weight16: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        relu: bool = False,
        transpose_input: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("w16", weight16)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.relu = relu
        self.transpose_input = transpose_input

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self.transpose_input else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._input(x), self.w16.float(), self.bias)
        return torch.relu(y) if self.relu else y

    def magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = F.linear(self._input(x).abs(), self.w16.float().abs())
        if self.bias is not None:
            y = y + self.bias.detach().abs()
        return (y,)


class SmoothQuantLinear(nn.Module):
    """Symmetric int8 quantization of ``x`` (per token, or with a static per-tensor scale),
    ``torch._int_mm`` with an int8 ``[K, N]`` weight, the int32 result converted to
    ``out_dtype`` and multiplied by the activation and weight scales [+ bias]."""

    w: torch.Tensor
    w_scale: torch.Tensor
    x_scale: torch.Tensor

    def __init__(
        self,
        weight_kn: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        out_dtype: torch.dtype = torch.float32,
        static_x_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("w", weight_kn)
        self.register_buffer("w_scale", w_scale)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.out_dtype = out_dtype
        self.static = static_x_scale is not None
        self.register_buffer("x_scale", torch.tensor([[static_x_scale or 1.0]]))

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            xs = self.x_scale
        else:
            xs = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
        xq = torch.round(x / xs).clamp(-128, 127).to(torch.int8)
        return xq, xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = self._quantize(x)
        out = self.out_dtype
        y = torch._int_mm(xq.reshape(-1, xq.shape[-1]), self.w)
        y = y.to(out) * xs.reshape(-1, 1).to(out) * self.w_scale.to(out)
        y = y.reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias.to(out)
        return y

    def magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xq, xs = self._quantize(x)
        acc = xq.reshape(-1, xq.shape[-1]).float().abs() @ self.w.float().abs()
        y = acc * xs.reshape(-1, 1).float().abs() * self.w_scale.float().abs()
        y = y.reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias.detach().float().abs()
        return (y,)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyCase:
    """A drawn graph, its inputs, the fusions it must fire and its numerics bound."""

    description: str
    graph: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    expected: Mapping[str, int]
    magnitude: tuple[torch.Tensor, ...] = field(repr=False)
    rel_bound: float
    #: Fusions that must refuse (the match is left unlowered, with a reason), and how often.
    refused: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __repr__(self) -> str:
        return (
            f"<FamilyCase {self.description}: expects {dict(self.expected)}, "
            f"refusals {dict(self.refused)}>"
        )

    def check_report(self, fired: Mapping[str, int], refused: Sequence[str]) -> str | None:
        """None when the family fusions fired (``report.fired``) and refused (the fusion name of
        each ``report.refused`` entry) exactly as expected, else what differs."""
        got_fired = {k: v for k, v in fired.items() if k in FAMILY_FUSIONS and v}
        got_refused: dict[str, int] = {}
        for name in refused:
            if name in FAMILY_FUSIONS:
                got_refused[name] = got_refused.get(name, 0) + 1
        if got_fired != dict(self.expected) or got_refused != dict(self.refused):
            return (
                f"fired {got_fired}, refused {got_refused}; expected fired "
                f"{dict(self.expected)}, refused {dict(self.refused)}"
            )
        return None

    def check(self, reference: object, lowered: object) -> str | None:
        """None when ``lowered`` agrees with ``reference`` within the bound, else why not."""
        refs = reference if isinstance(reference, tuple) else (reference,)
        lows = lowered if isinstance(lowered, tuple) else (lowered,)
        if len(refs) != len(lows) or len(refs) != len(self.magnitude):
            return f"{len(lows)} outputs, expected {len(refs)}"
        for i, (r, lo, mag) in enumerate(zip(refs, lows, self.magnitude, strict=True)):
            if not isinstance(r, torch.Tensor) or not isinstance(lo, torch.Tensor):
                return f"output {i} is not a tensor"
            if lo.shape != r.shape or lo.dtype != r.dtype:
                return f"output {i}: {lo.dtype}{list(lo.shape)}, expected {r.dtype}{list(r.shape)}"
            diff = (lo.detach().float() - r.detach().float()).abs()
            bound = self.rel_bound * mag.float() + 1e-30
            worst = float((diff / bound).max()) if diff.numel() else 0.0
            if worst > 1.0:
                return (
                    f"output {i}: max |diff| {float(diff.max()):.3g} exceeds the bound "
                    f"({worst:.2f}x of rel_bound {self.rel_bound:.3g} * magnitude)"
                )
        return None


def _in_form(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], form: str) -> fx.GraphModule:
    if form == "compute":
        return decompose_compute(gm, inputs)
    if form != "op":
        raise ValueError(f"unknown form {form!r}, expected one of {FORMS}")
    return gm


def _exported(model: nn.Module, inputs: tuple[torch.Tensor, ...], form: str) -> fx.GraphModule:
    """The model exported in ``form``; "compute" decomposes the one export (the same graph as
    :func:`_in_form` of its module, without exporting that module again)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}, expected one of {FORMS}")
    ep = torch.export.export(model, inputs)
    if form == "compute":
        return decompose_exported(ep)
    gm = ep.module()
    assert isinstance(gm, fx.GraphModule)
    return gm


#: Exported graphs by :func:`_structure`: a model's tensors are its weights, not its graph.
_EXPORTS: OrderedDict[Hashable, fx.GraphModule] = OrderedDict()
_EXPORTS_MAX = 512


def _structure(model: nn.Module, inputs: tuple[torch.Tensor, ...], form: str) -> Hashable:
    """What export's graph depends on: the classes, plain attributes (flags, counts, dtypes) of
    the module and its submodules, the shape and dtype of every parameter, buffer and input,
    and the form -- not the values."""
    plain = (bool, int, float, str, torch.dtype, list)
    attrs = tuple(
        (prefix, type(module), name, tuple(value) if isinstance(value, list) else value)
        for prefix, module in model.named_modules()
        for name, value in sorted(vars(module).items())
        if not name.startswith("_") and isinstance(value, plain)
    )
    tensors = tuple(
        (name, type(t).__name__, tuple(t.shape), t.dtype, t.stride())
        for name, t in (*model.named_parameters(), *model.named_buffers())
    )
    shapes = tuple((tuple(x.shape), x.dtype, x.stride()) for x in inputs)
    return attrs, tensors, shapes, form


def _weights_only(gm: fx.GraphModule, model: nn.Module) -> bool:
    """Every tensor ``gm`` reads is one of the model's parameters or buffers, by name."""
    names = set(model.state_dict())
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return read <= names and set(gm.state_dict()) == names


_Build: TypeAlias = Callable[[nn.Module, tuple[torch.Tensor, ...], str], fx.GraphModule]


def _export(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], form: str, build: _Build | None = None
) -> fx.GraphModule:
    """``build`` (default :func:`_exported`), once per :func:`_structure`: a model like one
    built before gets a copy of that graph with its own tensors (tests/test_forms.py: equal to
    a fresh build)."""
    build = build or _exported
    key = (build, _structure(model, inputs, form))
    template = _EXPORTS.get(key)
    if template is None:
        gm = build(model, inputs, form)
        if _weights_only(gm, model):
            _EXPORTS[key] = copy.deepcopy(gm)
            if len(_EXPORTS) > _EXPORTS_MAX:
                _EXPORTS.popitem(last=False)
        return gm
    _EXPORTS.move_to_end(key)
    gm = copy.deepcopy(template)
    with torch.no_grad():
        gm.load_state_dict(model.state_dict(), strict=True)
    return gm


def _input(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen).to(dtype)


def _x_shape(k: int, rows: int, rank: int, transpose: bool) -> list[int]:
    if rank == 2:
        return [rows, k]
    batch, seq = rows, max(1, rows - 1)
    return [seq, batch, k] if transpose else [batch, seq, k]


def woq_case(
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    k: int = 16,
    out_features: Sequence[int] = (8,),
    rows: int = 4,
    rank: int = 2,
    transpose_input: bool = False,
    bias: bool = False,
    form: str = "op",
) -> FamilyCase:
    """WOQ linear(s) reading one x; several ``out_features`` give the concat-linear shape."""
    gen = torch.Generator().manual_seed(seed)
    weights = [
        torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8) for n in out_features
    ]
    scales = [(torch.rand(n, generator=gen) * 0.02 + 1e-3).to(dtype) for n in out_features]
    biases = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in out_features]
    transpose = transpose_input and rank == 3
    model = WoqLinears(weights, scales, biases, transpose_input=transpose).eval()
    x = _input(gen, _x_shape(k, rows, rank, transpose), dtype)
    inputs = (x,)
    u = _UNIT_ROUNDOFF[dtype]
    name = "woq_int8_concat_linear" if len(out_features) > 1 else "woq_int8"
    lowered = dtype in DEFAULT_WOQ_DTYPES and (
        dtype != torch.bfloat16 or k % bf16_k_multiple() == 0
    )
    return FamilyCase(
        description=(
            f"woq {dtype} x{list(x.shape)}{' transposed' if transpose else ''} "
            f"N={list(out_features)}{' +bias' if bias else ''} [{form}] seed={seed}"
        ),
        graph=_export(model, inputs, form),
        inputs=inputs,
        expected=MappingProxyType({name: 1} if lowered else {}),
        refused=MappingProxyType({} if lowered else {"woq_int8": len(out_features)}),
        magnitude=model.magnitude(x),
        rel_bound=(2 * k + 6) * _U32 + 6 * u,
    )


def dynamic_fp16_case(
    *,
    seed: int,
    k: int = 16,
    n: int = 8,
    rows: int = 4,
    rank: int = 2,
    transpose_input: bool = False,
    bias: bool = True,
    relu: bool = False,
    flow: str = "fp16_weight",
    form: str = "op",
) -> FamilyCase:
    """An fp32 linear with an fp16-rounded weight: a module storing an fp16 weight
    (``flow="fp16_weight"``), or ``nn.Linear`` quantized by torchao's X86InductorQuantizer with
    its dynamic fp16 config (``flow="x86_quantizer"``: ``convert_element_type.no_fuse`` pairs)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    transpose = transpose_input and rank == 3
    x = _input(gen, _x_shape(k, rows, rank, transpose), torch.float32)
    inputs = (x,)
    reference = HalfWeightLinear(weight.half(), b, relu=relu, transpose_input=transpose).eval()
    if flow == "fp16_weight":
        graph = _export(reference, inputs, form)
    elif flow == "x86_quantizer":
        model = _float_linear(weight, b, relu, transpose)
        graph = _export(model, inputs, form, build=_x86_dynamic_fp16)
    else:
        raise ValueError(f"unknown flow {flow!r}")
    return FamilyCase(
        description=(
            f"dynamic fp16 ({flow}) x{list(x.shape)}{' transposed' if transpose else ''} N={n}"
            f"{' +bias' if bias else ''}{' relu' if relu else ''} [{form}] seed={seed}"
        ),
        graph=graph,
        inputs=inputs,
        expected=MappingProxyType({"linear_dynamic_fp16": 1}),
        magnitude=reference.magnitude(x),
        rel_bound=(2 * k + 6) * _U32,
    )


class _FloatLinear(nn.Module):
    def __init__(self, linear: nn.Linear, relu: bool, transpose_input: bool) -> None:
        super().__init__()
        self.linear = linear
        self.relu = relu
        self.transpose_input = transpose_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.transpose(0, 1) if self.transpose_input else x)
        return torch.relu(y) if self.relu else y


def _float_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, transpose: bool
) -> _FloatLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None and linear.bias is not None:
            linear.bias.copy_(bias)
    return _FloatLinear(linear, relu, transpose).eval()


def _x86_dynamic_fp16(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], form: str
) -> fx.GraphModule:
    """``model`` quantized by torchao's X86InductorQuantizer (dynamic fp16), in ``form``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_x86_inductor_linear_dynamic_fp16_config())
    exported = torch.export.export(copy.deepcopy(model), inputs).module()
    with torch.no_grad():
        prepared = prepare_pt2e(exported, quantizer)
        prepared(*inputs)
        converted = convert_pt2e(prepared)
    assert isinstance(converted, fx.GraphModule)
    return _in_form(converted, inputs, form)


def int_mm_case(
    *,
    seed: int,
    k: int = 32,
    n: int = 16,
    rows: int = 8,
    rank: int = 2,
    bias: bool = False,
    out_dtype: torch.dtype = torch.float32,
    static_x_scale: bool = False,
    weight_max: int = 64,
    form: str = "op",
) -> FamilyCase:
    """A smooth-quant style ``_int_mm`` linear; ``weight_max`` bounds the int8 weights."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-weight_max, weight_max + 1, (k, n), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    x = _input(gen, _x_shape(k, rows, rank, False), torch.float32)
    static = float(x.abs().max()) / 127 if static_x_scale else None
    model = SmoothQuantLinear(w, w_scale, b, out_dtype=out_dtype, static_x_scale=static).eval()
    inputs = (x,)
    return FamilyCase(
        description=(
            f"int_mm x{list(x.shape)} N={n} {'static' if static_x_scale else 'per-token'} "
            f"-> {out_dtype}{' +bias' if bias else ''} |w|<={weight_max} [{form}] seed={seed}"
        ),
        graph=_export(model, inputs, form),
        inputs=inputs,
        expected=MappingProxyType({"int_mm_linear": 1}),
        magnitude=model.magnitude(x),
        rel_bound=8 * _UNIT_ROUNDOFF[out_dtype] + 8 * _U32,
    )


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_seeds = st.integers(0, 2**31 - 1)
_forms = st.sampled_from(FORMS)
_ranks = st.sampled_from((2, 3))
_dtypes = st.sampled_from((torch.float32, torch.bfloat16))


#: A K every vector width of the bf16 kernel takes (AVX2: 8, AVX512: 16), so the same cases
#: fuse and run on every CPU.
_EVERY_WIDTH = 16
#: A K no vector width takes: refused on every CPU.
_ANY_WIDTH = 8


def _lowerable_k() -> st.SearchStrategy[int]:
    """A K the bf16 kernel takes on every CPU: a multiple of 16."""
    return st.integers(1, 4).map(lambda i: i * _EVERY_WIDTH)


@st.composite
def woq_cases(draw: st.DrawFn) -> FamilyCase:
    """One WOQ linear the default catalog lowers: bf16, 2-D/3-D/transposed 3-D x, bias or not,
    random scales. (fp32 and other K: :func:`woq_refusal_cases`.)"""
    return woq_case(
        seed=draw(_seeds),
        dtype=torch.bfloat16,
        k=draw(_lowerable_k()),
        out_features=(draw(st.integers(1, 24)),),
        rows=draw(st.integers(1, 6)),
        rank=draw(_ranks),
        transpose_input=draw(st.booleans()),
        bias=draw(st.booleans()),
        form=draw(_forms),
    )


@st.composite
def woq_concat_cases(draw: st.DrawFn) -> FamilyCase:
    """Two or three bf16 WOQ linears reading the same x (one concat-linear fusion expected)."""
    return woq_case(
        seed=draw(_seeds),
        dtype=torch.bfloat16,
        k=draw(_lowerable_k()),
        out_features=tuple(draw(st.lists(st.integers(1, 16), min_size=2, max_size=3))),
        rows=draw(st.integers(1, 6)),
        rank=draw(_ranks),
        transpose_input=draw(st.booleans()),
        bias=draw(st.booleans()),
        form=draw(_forms),
    )


@st.composite
def woq_refusal_cases(draw: st.DrawFn) -> FamilyCase:
    """One or more WOQ linears the default catalog must refuse, each with a reason: fp32
    activations (the kernel's scalar fallback), or bf16 with a K the vectorized kernel cannot
    take on any CPU (not a multiple of 8). ``case.refused`` counts them; nothing fires and the
    outputs are the reference's."""
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16)))
    any_k = st.integers(1, 48)
    k = draw(any_k if dtype == torch.float32 else any_k.filter(lambda v: v % _ANY_WIDTH != 0))
    return woq_case(
        seed=draw(_seeds),
        dtype=dtype,
        k=k,
        out_features=tuple(draw(st.lists(st.integers(1, 16), min_size=1, max_size=3))),
        rows=draw(st.integers(1, 6)),
        rank=draw(_ranks),
        transpose_input=draw(st.booleans()),
        bias=draw(st.booleans()),
        form=draw(_forms),
    )


@st.composite
def dynamic_fp16_cases(draw: st.DrawFn) -> FamilyCase:
    """An fp32 linear with an fp16 weight (either flow), 2-D/3-D x, bias or not, relu or not."""
    return dynamic_fp16_case(
        seed=draw(_seeds),
        k=draw(st.integers(1, 48)),
        n=draw(st.integers(1, 24)),
        rows=draw(st.integers(1, 6)),
        rank=draw(_ranks),
        transpose_input=draw(st.booleans()),
        bias=draw(st.booleans()),
        relu=draw(st.booleans()),
        flow=draw(st.sampled_from(("fp16_weight", "x86_quantizer"))),
        form=draw(_forms),
    )


@st.composite
def int_mm_cases(draw: st.DrawFn) -> FamilyCase:
    """A ``_int_mm`` linear: per-token or static x scale, fp32/bf16 output, bias or not."""
    return int_mm_case(
        seed=draw(_seeds),
        k=draw(st.integers(1, 64)),
        n=draw(st.integers(1, 24)),
        rows=draw(st.integers(1, 8)),
        rank=draw(_ranks),
        bias=draw(st.booleans()),
        out_dtype=draw(_dtypes),
        static_x_scale=draw(st.booleans()),
        form=draw(_forms),
    )


def family_cases() -> st.SearchStrategy[FamilyCase]:
    """Any of the four families."""
    return st.one_of(woq_cases(), woq_concat_cases(), dynamic_fp16_cases(), int_mm_cases())
