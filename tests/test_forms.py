"""The form rewrites on real torchao graphs: the right ops appear and disappear, the input module is
untouched, and the outputs are what the oracle accepts (bit-exact where the form promises it)."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import fx

from qalgebra.testing import forms, strategies
from qalgebra.testing import pointwise_strategies as pointwise
from qalgebra.testing import woq_strategies as woq
from qalgebra.testing.models import MODELS, build
from qalgebra.testing.oracle import Comparison, compare_outputs, output_quant_steps
from qalgebra.testing.quantize import quantize_pt2e

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed

Q = qd.quantize_per_tensor.default
DQ = qd.dequantize_per_tensor.default
PER_TENSOR_DEFAULT = (Q, DQ)
CONVERSIONS = {
    "prims": prims.convert_element_type.default,
    "to_copy": aten._to_copy.default,
    "to_dtype": aten.to.dtype,
}
VIEWS = {
    "view": aten.view.default,
    "reshape": aten.reshape.default,
    "unsafe_view": aten._unsafe_view.default,
}

# conv binary (+ relu), 3-D linear with gelu(tanh), and max_pool2d / cat with a dequantized output
MODEL_NAMES = ("conv_add_conv_rhs_relu", "linear3d_gelu_tanh", "maxpool_variants")


@functools.cache
def quantized(name: str, variant: str = "fp32") -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = MODELS[name]()
    gm = quantize_pt2e(
        model,
        inputs,
        bf16=variant == "bf16",
        dynamic_batch=variant == "dynamic",
        reduce_range=True,
    )
    return gm, inputs


def histogram(gm: fx.GraphModule) -> collections.Counter[object]:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


Snapshot = tuple[str, list[tuple[str, object, dict[str, object]]], dict[str, torch.Tensor]]


def snapshot(gm: fx.GraphModule) -> Snapshot:
    """Everything a form could disturb: code, nodes (with their meta dicts), tensors."""
    nodes = [(n.name, n.target, dict(n.meta)) for n in gm.graph.nodes]
    tensors = {k: v.clone() for k, v in gm.state_dict().items()}
    return gm.code, nodes, tensors


def assert_untouched(gm: fx.GraphModule, before: Snapshot) -> None:
    code, nodes, tensors = before
    assert gm.code == code
    assert [(n.name, n.target) for n in gm.graph.nodes] == [(n, t) for n, t, _ in nodes]
    for node, (_, _, meta) in zip(gm.graph.nodes, nodes, strict=True):
        assert node.meta.keys() == meta.keys(), f"meta of {node.name} changed"
    state = gm.state_dict()
    assert state.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), f"{key} was modified"


def compare(
    reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[torch.Tensor]
) -> Comparison:
    with torch.no_grad():
        expected, actual = reference(*inputs), candidate(*inputs)
    return compare_outputs(expected, actual, quant_step=output_quant_steps(reference)[0])


def assert_bit_exact(
    reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[torch.Tensor]
) -> None:
    result = compare(reference, candidate, inputs)
    assert result.ok and result.max_abs_diff == 0, result.message


# ---------------------------------------------------------------------------------------------
# every form: input untouched, a new module, numerics


@pytest.mark.parametrize("form", sorted(forms.FORMS))
def test_every_form_returns_a_new_module_and_leaves_the_input_untouched(form: str) -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu")
    before = snapshot(gm)
    new = forms.FORMS[form](gm)
    assert new is not gm and new.graph is not gm.graph
    assert_untouched(gm, before)
    new.graph.lint()
    result = compare(gm, new, inputs)
    assert result.ok, result.message
    assert_untouched(gm, before)  # running the new module does not write into the old one


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(
    "form",
    [
        "tensor_qparams",
        "decomposed",
        "decomposed_single_clamp",
        "decomposed_keep_zero_zp",
        "shared_dequants",
        "dtype_to_dtype",
    ],
)
def test_exact_forms_are_bit_exact_on_registry_models(name: str, form: str) -> None:
    gm, inputs = quantized(name)
    assert_bit_exact(gm, forms.FORMS[form](gm), inputs)


def test_forms_reject_what_is_not_a_graph_module() -> None:
    model, _ = build("linear_relu")
    with pytest.raises(TypeError, match=r"expected a torch\.fx\.GraphModule, got LinearUnary"):
        forms.to_decomposed(model)  # type: ignore[arg-type]
    gm, _ = quantized("linear3d_gelu_tanh")
    with pytest.raises(ValueError, match="spelling must be one of"):
        forms.with_dtype_spelling(gm, "cast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# (a) tensor qparams


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_to_tensor_qparams_swaps_overloads_and_reads_qparams_from_buffers(name: str) -> None:
    gm, inputs = quantized(name)
    old = histogram(gm)
    new = forms.to_tensor_qparams(gm)
    hist = histogram(new)
    assert hist[Q] == hist[DQ] == 0
    assert hist[qd.quantize_per_tensor.tensor] == old[Q]
    assert hist[qd.dequantize_per_tensor.tensor] == old[DQ]
    assert hist[qd.dequantize_per_channel.default] == old[qd.dequantize_per_channel.default]
    for node in new.graph.nodes:
        if node.target in (qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor):
            scale, zero_point = (getattr(new, a.target) for a in node.args[1:3])
            assert scale.dtype == torch.float64 and scale.shape == (1,)
            assert zero_point.dtype == torch.int64 and zero_point.shape == (1,)
            assert node.meta["val"].dtype in (torch.uint8, torch.float32)
    assert_bit_exact(gm, new, inputs)


def test_to_tensor_qparams_with_float32_scales_is_within_one_step() -> None:
    gm, inputs = quantized("maxpool_variants")
    new = forms.to_tensor_qparams(gm, scale_dtype=torch.float32)
    scales = [t for k, t in new.named_buffers() if k.startswith("_qalgebra_scale_")]
    assert scales and all(t.dtype == torch.float32 for t in scales)
    result = compare(gm, new, inputs)
    assert result.ok and result.max_steps <= 1, result.message


# ---------------------------------------------------------------------------------------------
# (b) decomposed


def test_the_models_exercise_zero_and_nonzero_zero_points() -> None:
    gm, _ = quantized("conv_add_conv_rhs_relu")
    zero_points = {int(n.args[2]) for n in gm.graph.nodes if n.target is Q}
    assert 0 in zero_points and len(zero_points) > 1  # relu outputs get zp 0, the others not


def _decomposed_quant_chain(convert: fx.Node) -> list[object]:
    """The targets from a quantize's final convert back to its mul: [convert, clamp_max, ...]."""
    chain: list[object] = []
    node: object = convert
    while isinstance(node, fx.Node) and node.op == "call_function":
        chain.append(node.target)
        if node.target is aten.mul.Tensor:
            break
        node = node.args[0]
    return chain


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("single_clamp", [False, True])
@pytest.mark.parametrize("drop_zero_zp", [True, False])
def test_to_decomposed_spells_quant_and_dequant_as_inductor_does(
    name: str, single_clamp: bool, drop_zero_zp: bool
) -> None:
    gm, inputs = quantized(name)
    quant_zps = [int(n.args[2]) for n in gm.graph.nodes if n.target is Q]
    dequant_zps = [int(n.args[2]) for n in gm.graph.nodes if n.target is DQ]
    new = forms.to_decomposed(gm, single_clamp=single_clamp, drop_zero_zp=drop_zero_zp)
    hist = histogram(new)
    assert hist[Q] == hist[DQ] == 0
    assert (
        hist[qd.dequantize_per_channel.default] == histogram(gm)[qd.dequantize_per_channel.default]
    )
    assert hist[aten.round.default] == len(quant_zps)

    quant_ends = [
        n
        for n in new.graph.nodes
        if n.target is prims.convert_element_type.default and n.args[1] == torch.uint8
    ]
    chains = sorted((_decomposed_quant_chain(n) for n in quant_ends), key=len)
    clamp = (
        [aten.clamp.default] if single_clamp else [aten.clamp_max.default, aten.clamp_min.default]
    )
    with_add = [
        prims.convert_element_type.default,
        *clamp,
        aten.add.Tensor,
        aten.round.default,
        aten.mul.Tensor,
    ]
    without_add = [t for t in with_add if t is not aten.add.Tensor]
    expected = sorted(
        (without_add if zp == 0 and drop_zero_zp else with_add for zp in quant_zps), key=len
    )
    assert chains == expected

    subs = sum(
        1
        for n in new.graph.nodes
        if n.target is aten.sub.Tensor
        and isinstance(n.args[0], fx.Node)
        and n.args[0].target is prims.convert_element_type.default
    )
    assert subs == sum(1 for zp in dequant_zps if zp != 0 or not drop_zero_zp)
    assert all("val" in n.meta for n in new.graph.nodes if n.op == "call_function")
    assert_bit_exact(gm, new, inputs)


def test_to_decomposed_upcasts_a_bf16_quantize_input_first() -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu", "bf16")
    new = forms.to_decomposed(gm)
    for node in new.graph.nodes:
        if node.target is aten.round.default:
            mul = node.args[0]
            assert mul.target is aten.mul.Tensor
            assert mul.args[0].meta["val"].dtype == torch.float32
    assert_bit_exact(gm, new, inputs)


# ---------------------------------------------------------------------------------------------
# the bf16 and dynamic-batch forms of the quantize helper


def test_bf16_form_converts_after_every_dequantize_and_feeds_bf16_into_quantize() -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu", "bf16")
    to_bf16 = [
        n
        for n in gm.graph.nodes
        if n.target is aten._to_copy.default and n.kwargs.get("dtype") is torch.bfloat16
    ]
    sources = collections.Counter(
        n.args[0].target if n.args[0].op == "call_function" else n.args[0].op for n in to_bf16
    )
    # 3 convs: 3 weight dequants, 3 activation dequants (the add's operand is not converted),
    # 3 biases read by get_attr
    assert sources == {qd.dequantize_per_channel.default: 3, DQ: 3, "get_attr": 3}
    conv_inputs = [n.args[0].meta["val"].dtype for n in gm.graph.nodes if n.target is Q]
    assert torch.bfloat16 in conv_inputs  # no explicit conversion back to fp32 before quantize
    with torch.no_grad():
        assert gm(*inputs).dtype == torch.bfloat16

    explicit = forms.with_fp32_before_quant(gm)
    for node in explicit.graph.nodes:
        if node.target is Q:
            assert node.args[0].meta["val"].dtype == torch.float32
    assert_bit_exact(gm, explicit, inputs)


def test_dynamic_batch_form_keeps_the_batch_symbolic_through_every_form() -> None:
    gm, inputs = quantized("linear3d_gelu_tanh", "dynamic")
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert isinstance(x.meta["val"].shape[0], torch.SymInt)
    bigger = (torch.randn(5, *inputs[0].shape[1:]),)
    for name in ("tensor_qparams", "decomposed", "shared_dequants"):
        new = forms.FORMS[name](gm)
        assert_bit_exact(gm, new, bigger)
        out = next(n for n in new.graph.nodes if n.op == "output").args[0][0]
        assert isinstance(out.meta["val"].shape[0], torch.SymInt)


# ---------------------------------------------------------------------------------------------
# (c) dtype spelling, (d) view spelling


@pytest.mark.parametrize("spelling", forms.DTYPE_SPELLINGS)
def test_with_dtype_spelling_respells_every_conversion(spelling: forms.DtypeSpelling) -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu", "bf16")
    total = sum(histogram(gm)[t] for t in CONVERSIONS.values())
    assert total == 9
    new = forms.with_dtype_spelling(gm, spelling)
    hist = histogram(new)
    assert {s: hist[t] for s, t in CONVERSIONS.items()} == {
        s: (total if s == spelling else 0) for s in CONVERSIONS
    }
    assert_bit_exact(gm, new, inputs)


def test_with_dtype_spelling_also_respells_the_decomposed_converts() -> None:
    gm, inputs = quantized("linear3d_gelu_tanh")
    decomposed = forms.to_decomposed(gm)
    converts = histogram(decomposed)[prims.convert_element_type.default]
    new = forms.with_dtype_spelling(decomposed, "to_dtype")
    assert histogram(new)[aten.to.dtype] == converts > 0
    assert_bit_exact(gm, new, inputs)


@functools.cache
def decomposed_compute(name: str) -> fx.GraphModule:
    gm, inputs = quantized(name, "dynamic")
    return forms.decompose_compute(gm, inputs, dynamic_batch=True)


@pytest.mark.parametrize("spelling", forms.VIEW_SPELLINGS)
def test_with_view_spelling_respells_the_views_around_a_3d_linear(
    spelling: forms.ViewSpelling,
) -> None:
    gm, inputs = quantized("linear3d_gelu_tanh", "dynamic")
    compute = decomposed_compute("linear3d_gelu_tanh")
    views = sum(histogram(compute)[t] for t in VIEWS.values())
    assert views == 4  # view -> addmm -> view around each of the two linears
    new = forms.with_view_spelling(compute, spelling)
    hist = histogram(new)
    assert {s: hist[t] for s, t in VIEWS.items()} == {
        s: (views if s == spelling else 0) for s in VIEWS
    }
    assert_bit_exact(gm, new, (torch.randn(3, *inputs[0].shape[1:]),))


# ---------------------------------------------------------------------------------------------
# the other forms


def test_decompose_compute_gives_the_graph_inductor_sees() -> None:
    gm, inputs = quantized("linear3d_gelu_tanh", "dynamic")
    compute = decomposed_compute("linear3d_gelu_tanh")
    hist = histogram(compute)
    assert hist[aten.linear.default] == 0 and hist[aten.t.default] == 0
    assert hist[aten.addmm.default] == 2 and hist[aten.permute.default] == 2
    assert hist[aten.sym_size.int] >= 1  # the symbolic batch feeds the views
    assert hist[Q] == histogram(gm)[Q]
    for node in compute.graph.nodes:
        if node.target is aten.permute.default:
            assert node.args[0].target is qd.dequantize_per_channel.default
            assert node.args[1] == [1, 0]
    assert_bit_exact(gm, compute, inputs)


def test_decompose_compute_turns_conv_and_max_pool_into_their_aten_spellings() -> None:
    gm, inputs = quantized("maxpool_variants")
    compute = forms.decompose_compute(gm, inputs)
    hist = histogram(compute)
    assert hist[aten.conv2d.default] == 0 and hist[aten.convolution.default] == 5
    assert hist[aten.max_pool2d.default] == 0 and hist[aten.max_pool2d_with_indices.default] == 4
    assert_bit_exact(gm, compute, inputs)


def node_table(gm: fx.GraphModule) -> list[tuple[object, ...]]:
    """Each node's name, target, arguments and meta value (shape, dtype, strides)."""
    rows: list[tuple[object, ...]] = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        meta = None
        if isinstance(val, torch.Tensor):
            meta = (tuple(val.shape), val.dtype, val.stride())
        rows.append((n.name, n.op, str(n.target), str(n.args), str(n.kwargs), meta))
    return rows


class Upsample(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.nn.functional.linear(y, torch.ones(3, 8))


@pytest.mark.parametrize(
    ("name", "variant"),
    [*((n, "fp32") for n in MODEL_NAMES), ("linear3d_gelu_tanh", "dynamic"), ("inception", "bf16")],
)
def test_decomposition_shortcut_gives_the_public_routes_program(name: str, variant: str) -> None:
    """decompose_compute skips the public route's override of every CIA op; same program."""
    gm, inputs = quantized(name, variant)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in inputs) if variant == "dynamic" else None
    ep = torch.export.export(gm, inputs, dynamic_shapes=dynamic, strict=False)
    public = ep.run_decompositions(forms._cia_decompositions())
    ours = forms._run_cia_decompositions(ep)
    assert ours.graph_module.code == public.graph_module.code
    assert node_table(ours.graph_module) == node_table(public.graph_module)
    assert ours.graph_signature == public.graph_signature


def test_decomposition_shortcut_keeps_what_the_public_route_preserves() -> None:
    """upsample_nearest2d.vec is a CIA op torch's table preserves: the shortcut keeps it too."""
    vec = aten.upsample_nearest2d.vec
    cia, _ = forms._decomposition_split(forms._registry_size())
    assert vec in cia  # overridden (preserved), not left to its own kernel
    inputs = (torch.randn(1, 2, 2, 4),)
    ep = torch.export.export(Upsample(), inputs)
    public = ep.run_decompositions(forms._cia_decompositions()).module()
    ours = forms.decompose_exported(ep)
    assert histogram(public)[vec] == histogram(ours)[vec] == 1
    assert histogram(ours)[aten.linear.default] == 0
    torch.testing.assert_close(ours(*inputs), Upsample()(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    [
        functools.partial(woq.woq_case, dtype=torch.bfloat16, k=32, rank=3, transpose_input=True),
        functools.partial(woq.woq_case, dtype=torch.bfloat16, out_features=(3, 5), rows=1),
        functools.partial(woq.int_mm_case, rank=3, bias=True, out_dtype=torch.bfloat16),
        functools.partial(woq.dynamic_fp16_case, rank=3, transpose_input=True, relu=True),
    ],
)
def test_woq_compute_form_is_decompose_compute_of_the_op_form(
    case: Callable[..., woq.FamilyCase],
) -> None:
    """The plug-in families decompose their one export: the graph decompose_compute gives."""
    op = case(seed=5, form="op")
    compute = case(seed=5, form="compute")
    expected = forms.decompose_compute(op.graph, op.inputs)
    assert compute.graph.code == expected.code
    assert node_table(compute.graph) == node_table(expected)
    assert histogram(compute.graph)[aten.linear.default] == 0


def smooth_quant(seed: int, bias: bool) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-64, 65, (24, 8), generator=gen, dtype=torch.int8)
    b = torch.randn(8, generator=gen) if bias else None
    return woq.SmoothQuantLinear(w, torch.rand(8, generator=gen) + 0.01, b).eval()


def float_linear(seed: int, bias: bool) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(8, generator=gen) if bias else None
    return woq._float_linear(torch.randn(8, 24, generator=gen), b, relu=True, transpose=False)


@pytest.mark.parametrize("form", woq.FORMS)
@pytest.mark.parametrize(
    ("model", "build"),
    [(smooth_quant, woq._exported), (float_linear, woq._x86_dynamic_fp16)],
    ids=["export", "x86_quantizer"],
)
def test_woq_graphs_are_reused_per_structure_with_the_models_own_tensors(
    form: str, model: Callable[[int, bool], torch.nn.Module], build: woq._Build
) -> None:
    """A model like one built before gets that graph, with its own weights: what a fresh
    build of it gives (graph, tensors, outputs); a different structure is built anew."""
    x = (torch.randn(2, 3, 24),)
    woq._export(model(1, True), x, form, build)
    cached = len(woq._EXPORTS)
    second = model(2, True)
    reused = woq._export(second, x, form, build)
    assert len(woq._EXPORTS) == cached  # served from the cache
    fresh = build(second, x, form)
    assert reused.code == fresh.code
    assert node_table(reused) == node_table(fresh)
    state = fresh.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in reused.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(reused(*x), fresh(*x), rtol=0, atol=0)
    again = woq._export(model(3, True), x, form, build)
    storages = {t.untyped_storage().data_ptr() for t in reused.state_dict().values()}
    assert not {t.untyped_storage().data_ptr() for t in again.state_dict().values()} & storages
    woq._export(model(2, False), x, form, build)
    assert len(woq._EXPORTS) == cached + 1  # no bias: another graph


def assert_same_module(got: fx.GraphModule, expected: fx.GraphModule) -> None:
    assert got.code == expected.code
    assert node_table(got) == node_table(expected)
    assert [sorted(n.meta) for n in got.graph.nodes] == [
        sorted(n.meta) for n in expected.graph.nodes
    ]
    mine, theirs = got.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("name", ["conv_add_conv_rhs_relu", "linear3d_gelu_tanh"])
@pytest.mark.parametrize("form", strategies.FORMS)
def test_respell_is_the_composition_of_the_forms(name: str, form: str) -> None:
    """One copy for a primary form and a respelling: the module composing them gives."""
    gm, _ = quantized(name, "bf16")
    before = snapshot(gm)
    names = form.split("+")
    composed = gm
    for n in names:
        composed = forms.FORMS[n](composed)
    new = forms.respell(gm, *names)
    assert new is not gm and new.graph is not gm.graph
    assert_same_module(new, composed)
    assert_untouched(gm, before)


@pytest.mark.parametrize("form", pointwise.FORMS)
def test_pointwise_examples_are_spelled_as_the_forms_compose(form: str) -> None:
    """The pointwise builder respells its graph once: what composing the forms gives."""
    q = strategies.QuantSpec(0.05, 3, 0, 255, torch.uint8)
    moves = (pointwise.Move("view", (2, 12, 4)), pointwise.Move("transpose", (1, 2)))
    spec = pointwise.MovementSpec((2, 3, 4, 4), moves, "dequant", q, q, also_read=True)
    example = pointwise.build_example(spec, form)
    gm, _ = pointwise._build_movement(spec)
    composed = forms.with_meta(gm)
    for n in form.split("+"):
        composed = forms.FORMS[n](composed)
    assert_same_module(example.gm, composed)
    assert all(
        isinstance(n.meta.get("val"), torch.Tensor)
        for n in example.gm.graph.nodes
        if n.op not in ("output",)
    )


@pytest.mark.parametrize("form", strategies.FORMS)
def test_drawn_graphs_are_spelled_as_the_forms_compose(form: str) -> None:
    """strategies.build_example respells its op-form graph once: the forms composed."""
    q = strategies.QuantSpec(0.02, 3, 0, 127, torch.uint8)
    conv = strategies.Layer(strategies.ConvSpec(4, 6, (3, 3), padding=(1, 1)))
    spec = strategies.GraphSpec(
        "qconv", (1, 4, 5, 5), q, conv, output_quant=q, returns="dequantized",
        consumer=strategies.Layer(strategies.LinearSpec(5, 3)), dtype="bf16", meta="all",
    )  # fmt: skip
    composed = strategies.build_example(spec, "op").gm
    for n in form.split("+"):
        composed = forms.FORMS[n](composed)
    assert_same_module(strategies.build_example(spec, form).gm, composed)


def test_respell_rejects_unknown_forms() -> None:
    gm, _ = quantized("conv_add_conv_rhs_relu")
    with pytest.raises(KeyError, match="unknown forms"):
        forms.respell(gm, "decomposed", "no_such_form")


def test_share_dequants_merges_the_per_user_copies_convert_pt2e_makes() -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu")
    new = forms.share_dequants(gm)
    (x_quant,) = [n for n in new.graph.nodes if n.target is Q and n.args[0].op == "placeholder"]
    (dequant,) = x_quant.users
    assert len(dequant.users) == 2  # both convs read the one dequantize
    assert histogram(new)[DQ] == histogram(gm)[DQ] - 1
    assert_bit_exact(gm, new, inputs)


def test_with_weight_clone_clones_conv_weights_to_channels_last() -> None:
    gm, inputs = quantized("maxpool_variants")
    new = forms.with_weight_clone(gm)
    clones = [n for n in new.graph.nodes if n.target is aten.clone.default]
    assert len(clones) == 5
    for clone in clones:
        assert clone.kwargs == {"memory_format": torch.channels_last}
        assert clone.args[0].target is qd.dequantize_per_channel.default
        assert all(u.target is aten.conv2d.default for u in clone.users)
    result = compare(gm, new, inputs)  # channels-last conv: float rounding, within one step
    assert result.ok and result.max_steps <= 1, result.message


def test_with_meta_fills_in_what_convert_pt2e_leaves_out() -> None:
    gm, _ = quantized("linear3d_gelu_tanh")
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    assert missing  # convert_pt2e's quantize/dequantize nodes carry no meta["val"]
    new = forms.with_meta(gm)
    dtypes = {
        n.target: n.meta["val"].dtype for n in new.graph.nodes if n.target in PER_TENSOR_DEFAULT
    }
    assert dtypes == {Q: torch.uint8, DQ: torch.float32}
    assert [
        n.name for n in gm.graph.nodes if "val" not in n.meta and n.op == "call_function"
    ] == missing


def test_forms_compose() -> None:
    gm, inputs = quantized("conv_add_conv_rhs_relu")
    decomposed = forms.to_decomposed(gm)
    converts = histogram(decomposed)[prims.convert_element_type.default]
    respelled = forms.with_dtype_spelling(decomposed, "to_copy")
    hist = histogram(respelled)
    assert hist[prims.convert_element_type.default] == 0
    assert hist[aten._to_copy.default] == converts > 0
    assert_bit_exact(gm, respelled, inputs)

    shared = forms.share_dequants(forms.to_tensor_qparams(gm))
    tensor_dequants = histogram(shared)[qd.dequantize_per_tensor.tensor]
    assert tensor_dequants == histogram(gm)[DQ] - 1
    assert_bit_exact(gm, shared, inputs)


def test_the_form_enums_name_every_respelling_and_nothing_else() -> None:
    """``PrimaryForm``/``Modifier`` are the respellings of :data:`forms.FORMS` ("" = none)."""
    from qalgebra.testing.strategies import FORMS, Modifier, PrimaryForm, form_name

    named = {str(f) for f in (*PrimaryForm, *Modifier) if f}
    assert named == set(forms.FORMS)
    assert form_name(PrimaryForm.DECOMPOSED, Modifier.VIEW_VIEW) == "decomposed+view_view"
    assert form_name("op") == "op" and "op" in FORMS and type(FORMS[0]) is str
    with pytest.raises(ValueError):
        form_name("decomposd")
