"""Rewrite a converted (op-form) quantized GraphModule into the other forms the catalog accepts.

``convert_pt2e`` produces one spelling of a quantized graph; Inductor and other front ends
produce others (docs/design.md, "Quant/dequant forms"). Fusion authors test that one pattern
definition covers all of them, so each form here is a pure function: it returns a NEW
GraphModule (a deep copy, rewritten) and never touches the input module, its graph or its
tensors.

======================================  =========================================================
function                                what changes
======================================  =========================================================
:func:`to_tensor_qparams`               per-tensor quant/dequant ``.default`` -> ``.tensor``,
                                        scale/zero point read from get_attr buffers
:func:`to_decomposed`                   per-tensor quant/dequant -> mul/round/add/clamp/convert
                                        and convert/sub/mul (Inductor's decomposition, seed 000)
:func:`with_dtype_spelling`             dtype conversions as ``prims.convert_element_type``,
                                        ``aten._to_copy(dtype=)`` or ``aten.to.dtype``
:func:`with_view_spelling`              reshapes as ``aten.view``, ``aten.reshape`` or
                                        ``aten._unsafe_view``
:func:`share_dequants`                  duplicated dequantize nodes merged into one with several
                                        users (what Inductor sees after CSE: dequant promotion)
:func:`with_fp32_before_quant`          explicit fp32 conversion before a quantize of a bf16
                                        value (the int8-mixed-bf16 shape Inductor's patterns match)
:func:`with_weight_clone`               ``clone(memory_format=channels_last)`` after conv weight
                                        dequantize (Inductor's layout pass); views -> reshape
:func:`decompose_compute`               re-export with CompositeImplicit decompositions: conv ->
                                        ``aten.convolution``, linear -> ``permute + addmm/mm``
                                        (``view``s around it for >2-D input), max_pool2d ->
                                        ``max_pool2d_with_indices + getitem``
                                        (:func:`decompose_exported`: the same for an
                                        ``ExportedProgram``)
:func:`with_meta`                       fill ``node.meta["val"]`` (FakeTensors) on every node
:func:`respell`                         several of :data:`FORMS` in turn, with one copy
======================================  =========================================================

Numerics (checked in tests/test_forms.py with :mod:`qalgebra.testing.oracle`): every form is
bit-exact against the input module except

- ``to_tensor_qparams(scale_dtype=torch.float32)``: the ``.tensor`` ops read ``scale.item()``,
  so a float32-rounded scale changes ``1/scale`` and may move a value across a rounding
  boundary: at most one quantization step. The default float64 storage is exact.
- ``decompose_compute``: ``addmm`` instead of ``linear`` may round differently in float; a
  following quantize then differs by at most one step (bit-exact on every registry model).
- ``with_weight_clone``: a channels-last conv sums in another order; float values move by
  ~1e-7 relative and a following quantize may move by one step.

``to_decomposed`` is exact because it is the same arithmetic the quantize op performs:
``x * (1.0 / scale)`` with a Python-float inverse, ``round``, ``+ zp``, clamp, convert; a bf16
input is converted to fp32 first, as the op does internally.

Nodes are recognised by their ``OpOverload`` targets (``quantize_per_tensor.default`` ...), as
``torch.export`` and ``convert_pt2e`` produce them; a call of a bare ``OpOverloadPacket`` (what
``fx.symbolic_trace`` records for ``torch.ops.ns.op(...)``) is left as it is.

``node.meta["val"]`` is filled by fake-tensor propagation when the module's placeholders carry
FakeTensors (graphs from ``torch.export`` do); nothing here relies on it. Note that
``convert_pt2e`` itself leaves quantize/dequantize nodes without ``meta["val"]``.

>>> import torch
>>> from torch import fx
>>> qd = torch.ops.quantized_decomposed
>>> class QDQ(torch.nn.Module):
...     def forward(self, x):
...         q = qd.quantize_per_tensor.default(x, 0.1, 0, 0, 255, torch.uint8)
...         return qd.dequantize_per_tensor.default(q, 0.1, 0, 0, 255, torch.uint8)
>>> gm = fx.symbolic_trace(QDQ())
>>> new = to_decomposed(gm)  # zp == 0: no add, no sub
>>> for node in new.graph.nodes:
...     if node.op == "call_function":
...         print(node.target)
aten.mul.Tensor
aten.round.default
aten.clamp_min.default
aten.clamp_max.default
prims.convert_element_type.default
prims.convert_element_type.default
aten.mul.Tensor
>>> x = torch.randn(8)
>>> torch.equal(new(x), gm(x))
True
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from qalgebra.qdq_arithmetic import bound_args as _bound
from qalgebra.qdq_arithmetic import respell_as_arithmetic

__all__ = [
    "DTYPE_SPELLINGS",
    "FORMS",
    "VIEW_SPELLINGS",
    "DtypeSpelling",
    "Form",
    "ViewSpelling",
    "decompose_compute",
    "decompose_exported",
    "respell",
    "share_dequants",
    "to_decomposed",
    "to_tensor_qparams",
    "with_dtype_spelling",
    "with_fp32_before_quant",
    "with_meta",
    "with_view_spelling",
    "with_weight_clone",
]

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed

DtypeSpelling: TypeAlias = Literal["prims", "to_copy", "to_dtype"]
"""``prims.convert_element_type(x, dt)``, ``aten._to_copy(x, dtype=dt)`` or ``aten.to.dtype``."""
ViewSpelling: TypeAlias = Literal["view", "reshape", "unsafe_view"]
"""``aten.view.default``, ``aten.reshape.default``, ``aten._unsafe_view.default``."""

DTYPE_SPELLINGS: tuple[DtypeSpelling, ...] = ("prims", "to_copy", "to_dtype")
VIEW_SPELLINGS: tuple[ViewSpelling, ...] = ("view", "reshape", "unsafe_view")

_Q_DEFAULT = qd.quantize_per_tensor.default
_DQ_DEFAULT = qd.dequantize_per_tensor.default
_Q_TENSOR = qd.quantize_per_tensor.tensor
_DQ_TENSOR = qd.dequantize_per_tensor.tensor
_DQ_CHANNEL = qd.dequantize_per_channel.default

_VIEW_TARGETS: dict[ViewSpelling, Any] = {
    "view": aten.view.default,
    "reshape": aten.reshape.default,
    "unsafe_view": aten._unsafe_view.default,
}


# ---------------------------------------------------------------------------------------------
# helpers


#: Inside :func:`respell`: the module is already the caller's copy, finished once at the end.
_RESPELLING: contextvars.ContextVar[bool] = contextvars.ContextVar("respelling", default=False)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy: the forms rewrite the copy's graph and buffers, never the caller's."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a torch.fx.GraphModule, got {type(gm).__name__}")
    if _RESPELLING.get():
        return gm
    new = copy.deepcopy(gm)
    assert isinstance(new, fx.GraphModule)
    return new


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, regenerate the code and refresh meta vals: every form ends here."""
    if _RESPELLING.get():
        return gm
    gm.graph.lint()
    gm.recompile()
    _propagate_meta(gm)
    return gm


def _propagate_meta(gm: fx.GraphModule) -> bool:
    """Best effort: FakeTensor-propagate through ``gm`` if its placeholders carry fake vals."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if not vals or any(not isinstance(v, torch.Tensor) for v in vals):
        return False
    mode = detect_fake_mode(vals)
    if mode is None:
        return False
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    except Exception:  # metadata is a courtesy: the rewritten graph is valid without it
        return False
    return True


def _calls(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    """The call_function nodes of ``gm`` whose target is one of ``targets``, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _val(node: object) -> torch.Tensor | None:
    """``node.meta["val"]`` if it is a tensor (fake or meta), else None."""
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
    return None


def _replace(old: fx.Node, new: fx.Node) -> None:
    """Route every use of ``old`` to ``new``, keep ``old``'s metadata, erase ``old``."""
    new.meta = {**old.meta, **new.meta} if new.meta else dict(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    """The attribute a get_attr node reads (dotted path)."""
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fresh_index(gm: fx.GraphModule, *stems: str) -> int:
    """The smallest ``i`` such that no attribute ``f"{stem}{i}"`` exists on ``gm``."""
    i = 0
    while any(hasattr(gm, f"{stem}{i}") for stem in stems):
        i += 1
    return i


def _first_node(gm: fx.GraphModule) -> fx.Node:
    first: fx.Node = next(iter(gm.graph.nodes))
    return first


# ---------------------------------------------------------------------------------------------
# (a) tensor qparams


def to_tensor_qparams(
    gm: fx.GraphModule, *, scale_dtype: torch.dtype = torch.float64
) -> fx.GraphModule:
    """Per-tensor ``quantize``/``dequantize`` ``.default`` -> ``.tensor`` with get_attr qparams.

    Scale and zero point become 1-element buffers (``scale_dtype`` scale, int64 zero point:
    the dtypes and shape ``quantized_decomposed.choose_qparams.tensor`` returns, which is where
    ``.tensor`` overloads come from in torchao's dynamic-quantization flow) registered on the
    new module as ``_qalgebra_scale_{i}`` / ``_qalgebra_zero_point_{i}``, one pair per distinct
    ``(scale, zero_point)``. The ``.tensor`` kernels call ``scale.item()``, so float64 storage
    is bit-exact; float32 storage may differ by one quantization step.
    """
    if scale_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float64 or torch.float32, got {scale_dtype}")
    new = _copy(gm)
    graph = new.graph
    pairs: dict[tuple[float, int], tuple[fx.Node, fx.Node]] = {}
    for node in _calls(new, _Q_DEFAULT, _DQ_DEFAULT):
        b = _bound(node)
        key = (float(b["scale"]), int(b["zero_point"]))
        if key not in pairs:
            i = _fresh_index(new, "_qalgebra_scale_", "_qalgebra_zero_point_")
            scale_name, zp_name = f"_qalgebra_scale_{i}", f"_qalgebra_zero_point_{i}"
            new.register_buffer(scale_name, torch.tensor([key[0]], dtype=scale_dtype))
            new.register_buffer(zp_name, torch.tensor([key[1]], dtype=torch.int64))
            with graph.inserting_before(_first_node(new)):
                pairs[key] = (graph.get_attr(scale_name), graph.get_attr(zp_name))
        scale_node, zp_node = pairs[key]
        target = _Q_TENSOR if node.target is _Q_DEFAULT else _DQ_TENSOR
        kwargs = {}
        if target is _DQ_TENSOR and b.get("out_dtype") is not None:
            kwargs["out_dtype"] = b["out_dtype"]
        args = (b["input"], scale_node, zp_node, b["quant_min"], b["quant_max"], b["dtype"])
        with graph.inserting_before(node):
            replacement = graph.call_function(target, args, kwargs)
        _replace(node, replacement)
    return _finish(new)


# ---------------------------------------------------------------------------------------------
# (b) decomposed


def to_decomposed(
    gm: fx.GraphModule, *, single_clamp: bool = False, drop_zero_zp: bool = True
) -> fx.GraphModule:
    """Per-tensor quantize/dequantize ``.default`` -> Inductor's decomposed arithmetic.

    quantize: ``convert_element_type(clamp_max(clamp_min(add(round(mul(x, 1/scale)), zp),
    qmin), qmax), dtype)`` (``single_clamp``: one ``clamp(_, qmin, qmax)``); a bf16/fp16 input
    is first converted to fp32. dequantize: ``mul(sub(convert_element_type(q, float32), zp),
    scale)`` (``out_dtype`` instead of float32 when the dequantize has one). With
    ``drop_zero_zp`` and ``zp == 0`` the ``add``/``sub`` node is absent -- the shape that made
    Inductor miss fusions (seed 000). Bit-exact. ``.tensor`` overloads and weight
    ``dequantize_per_channel`` stay in op form.
    """
    new = _copy(gm)
    _propagate_meta(new)  # to learn the quantize inputs' dtypes where possible
    for node in _calls(new, _Q_DEFAULT, _DQ_DEFAULT):
        x_val = _val(_bound(node)["input"])
        x_dtype = torch.float32 if x_val is None else x_val.dtype
        out = respell_as_arithmetic(
            node, x_dtype, single_clamp=single_clamp, drop_zero_zp=drop_zero_zp
        )
        _replace(node, out)
    return _finish(new)


# ---------------------------------------------------------------------------------------------
# (c) dtype spelling


def _dtype_conversion(node: fx.Node) -> tuple[fx.Node, torch.dtype] | None:
    """``(input, dtype)`` if ``node`` is a pure dtype conversion in any spelling, else None."""
    if node.op != "call_function":
        return None
    if node.target is prims.convert_element_type.default:
        b = _bound(node)
        return b["a"], b["dtype"]
    if node.target is aten._to_copy.default:
        b = _bound(node)
        others = {k: v for k, v in b.items() if k not in ("self", "dtype")}
        if b.get("dtype") is None or any(
            v not in (None, False) for k, v in others.items() if k != "memory_format"
        ):
            return None
        if others.get("memory_format") not in (None, torch.preserve_format):
            return None
        return b["self"], b["dtype"]
    if node.target is aten.to.dtype:
        b = _bound(node)
        plain_format = b.get("memory_format") in (None, torch.preserve_format)
        if b.get("non_blocking") or b.get("copy") or not plain_format:
            return None
        return b["self"], b["dtype"]
    return None


def _convert(graph: fx.Graph, x: fx.Node, dtype: torch.dtype, spelling: DtypeSpelling) -> fx.Node:
    if spelling == "prims":
        return graph.call_function(prims.convert_element_type.default, (x, dtype))
    if spelling == "to_copy":
        return graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
    return graph.call_function(aten.to.dtype, (x, dtype))


def with_dtype_spelling(gm: fx.GraphModule, spelling: DtypeSpelling) -> fx.GraphModule:
    """Spell every pure dtype conversion one way: ``"prims"`` (``prims.convert_element_type``),
    ``"to_copy"`` (``aten._to_copy(dtype=)``) or ``"to_dtype"`` (``aten.to.dtype``).

    Only conversions that change nothing but the dtype are rewritten (a ``_to_copy`` that also
    moves device or layout is left alone). Bit-exact.
    """
    if spelling not in DTYPE_SPELLINGS:
        raise ValueError(f"spelling must be one of {DTYPE_SPELLINGS}, got {spelling!r}")
    new = _copy(gm)
    graph = new.graph
    for node in list(graph.nodes):
        conversion = _dtype_conversion(node)
        if conversion is None:
            continue
        x, dtype = conversion
        with graph.inserting_before(node):
            replacement = _convert(graph, x, dtype, spelling)
        _replace(node, replacement)
    return _finish(new)


# ---------------------------------------------------------------------------------------------
# (d) view spelling


def with_view_spelling(gm: fx.GraphModule, spelling: ViewSpelling) -> fx.GraphModule:
    """Spell every ``aten.view``/``reshape``/``_unsafe_view`` as ``spelling`` (``"view"``,
    ``"reshape"`` or ``"unsafe_view"``).

    ``view`` and ``_unsafe_view`` need a viewable input at run time; graphs from
    ``torch.export`` only reshape contiguous tensors, where all three agree. Bit-exact.
    """
    if spelling not in VIEW_SPELLINGS:
        raise ValueError(f"spelling must be one of {VIEW_SPELLINGS}, got {spelling!r}")
    target = _VIEW_TARGETS[spelling]
    new = _copy(gm)
    graph = new.graph
    for node in _calls(new, *_VIEW_TARGETS.values()):
        if node.target is target:
            continue
        x, size = node.args[0], node.args[1]
        with graph.inserting_before(node):
            replacement = graph.call_function(target, (x, size))
        _replace(node, replacement)
    return _finish(new)


# ---------------------------------------------------------------------------------------------
# more forms


def share_dequants(gm: fx.GraphModule) -> fx.GraphModule:
    """Merge identical per-tensor dequantize nodes into one node with several users.

    ``convert_pt2e`` duplicates a dequantize per user; Inductor's CSE merges them again, which
    is the shape its "dequant promotion" pass undoes. Bit-exact.
    """
    new = _copy(gm)
    seen: dict[tuple[Any, ...], fx.Node] = {}
    for node in _calls(new, _DQ_DEFAULT, _DQ_TENSOR):
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        kept = seen.setdefault(key, node)
        if kept is not node:
            node.replace_all_uses_with(kept)
            new.graph.erase_node(node)
    return _finish(new)


def with_fp32_before_quant(
    gm: fx.GraphModule, *, spelling: DtypeSpelling = "to_copy"
) -> fx.GraphModule:
    """Insert an explicit fp32 conversion before every quantize whose input is bf16/fp16.

    torch 2.13's autocast export feeds the bf16 value straight into ``quantize_per_tensor``
    (the op upcasts internally); Inductor's int8-mixed-bf16 patterns were written for an
    explicit ``to(float32)`` there. Needs ``meta["val"]`` to see the dtype (graphs from
    ``torch.export`` have it). Bit-exact.
    """
    new = _copy(gm)
    _propagate_meta(new)
    graph = new.graph
    for node in _calls(new, _Q_DEFAULT, _Q_TENSOR):
        x = node.args[0]
        x_val = _val(x)
        if not isinstance(x, fx.Node) or x_val is None:
            continue
        if x_val.dtype not in (torch.bfloat16, torch.float16):
            continue
        with graph.inserting_before(node):
            up = _convert(graph, x, torch.float32, spelling)
        node.replace_input_with(x, up)
    return _finish(new)


def with_weight_clone(gm: fx.GraphModule) -> fx.GraphModule:
    """``clone(memory_format=channels_last)`` right after every 4-D weight dequantize.

    Inductor's layout optimisation inserts it between ``dequantize_per_channel`` and a conv (or
    the bf16 conversion before the conv). A channels-last weight makes eager conv return a
    channels-last output, which ``aten.view``/``_unsafe_view`` cannot always reshape, so those
    are respelled ``aten.reshape`` (Inductor's spelling anyway). Float outputs change by
    rounding only (channels-last conv sums in another order, ~1e-7 relative).
    """
    new = _copy(gm)
    graph = new.graph
    cloned = False
    for node in _calls(new, _DQ_CHANNEL):
        w = node.args[0]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            w_val: object = _fetch_attr(new, str(w.target))
        else:
            w_val = _val(node)
        if not isinstance(w_val, torch.Tensor) or w_val.dim() != 4:
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            clone = graph.call_function(
                aten.clone.default, (node,), {"memory_format": torch.channels_last}
            )
        for user in users:
            user.replace_input_with(node, clone)
        cloned = True
    if cloned:
        for node in _calls(new, aten.view.default, aten._unsafe_view.default):
            with graph.inserting_before(node):
                replacement = graph.call_function(aten.reshape.default, node.args)
            _replace(node, replacement)
    return _finish(new)


def _cia_decompositions() -> dict[Any, Callable[..., Any]]:
    """Decompositions of CompositeImplicitAutograd ops only: what torch.export applies to the
    ops it must not keep (conv2d, linear, ...) without touching hardswish, gelu and friends."""
    from torch._export.utils import _is_cia_op

    table = torch.export.default_decompositions().materialize()
    return {op: fn for op, fn in table.items() if _is_cia_op(op)}


def _registry_size() -> tuple[int, int]:
    """Grows when ops are registered: keys the cached split of :func:`_cia_decompositions`."""
    cia = torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd")
    return len(torch.ops._dir), len(cia)


def _own_kernel(op: Any, fn: object) -> bool:
    """True when ``fn`` decomposes ``op`` exactly as its own CIA kernel does while tracing."""
    dk = torch._C.DispatchKey.CompositeImplicitAutograd
    if isinstance(fn, functools.partial) and fn.keywords.get("kernel") is op:
        return getattr(fn.func, "__name__", "") == "_special_op_to_decompose_cia"
    return dk in op.py_kernels and op.py_kernels[dk] is fn


_Split: TypeAlias = tuple[dict[Any, Callable[..., Any]], dict[Any, Callable[..., Any]]]


@functools.lru_cache(maxsize=1)
def _decomposition_split(_registry: tuple[int, int]) -> _Split:
    """``(cia_overrides, python_table)`` for ``run_decompositions(_cia_decompositions())``.

    The public call overrides the CIA kernel of every one of the ~500 CIA ops on each call
    (4/5 of its time on these small graphs). Overriding an op with its own CIA kernel changes
    nothing, so only the ops it preserves or decomposes differently are kept here (a handful:
    upsample ``.vec``, backward ops). Cached per registry size (new ops re-split).
    """
    from torch.export.exported_program import _split_decomp_table_to_cia_and_python_decomp

    cia, python = _split_decomp_table_to_cia_and_python_decomp(_cia_decompositions())
    return {op: fn for op, fn in cia.items() if not _own_kernel(op, fn)}, python


def _run_cia_decompositions(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep.run_decompositions(_cia_decompositions())``, the same program (checked by
    tests/test_forms.py) at a fifth of the cost: see :func:`_decomposition_split`."""
    try:
        from torch.export.exported_program import _decompose_exported_program
    except ImportError:  # another torch: the public route
        public: torch.export.ExportedProgram = ep.run_decompositions(_cia_decompositions())
        return public
    cia, python = _decomposition_split(_registry_size())
    decomposed: torch.export.ExportedProgram = _decompose_exported_program(
        ep,
        cia_to_decomp=dict(cia),
        python_decomp_table=dict(python),
        joint_loss_index=None,
        decompose_custom_triton_ops=False,
    )
    return decomposed


def decompose_compute(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = False,
) -> fx.GraphModule:
    """Re-export ``gm`` and apply CompositeImplicit decompositions (the graph Inductor sees).

    conv1d/conv2d -> ``aten.convolution``; linear -> ``permute(w, [1, 0])`` + ``addmm``/``mm``
    with ``view``s around it for >2-D input (export's ``aten.t`` is respelled ``permute``, as
    Inductor and torchao's lowering do); max_pool2d -> ``max_pool2d_with_indices`` +
    ``getitem``; flatten -> ``view``. Quantize/dequantize ops are kept. ``dynamic_batch``
    re-exports with a symbolic dimension 0 on every input (``sym_size`` nodes then feed the
    views). Outputs match to float rounding (bit-exact on the registry models).
    """
    src = _copy(gm)
    inputs = tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    ep = torch.export.export(src, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    return decompose_exported(ep)


def decompose_exported(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """:func:`decompose_compute` of an exported program (a model exported once need not be
    exported again): its module with CompositeImplicit decompositions applied."""
    new = _run_cia_decompositions(ep).module()
    assert isinstance(new, fx.GraphModule)
    graph = new.graph
    for node in _calls(new, aten.t.default):
        with graph.inserting_before(node):
            permute = graph.call_function(aten.permute.default, (node.args[0], [1, 0]))
        _replace(node, permute)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return _finish(new)


def with_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose every node has ``meta["val"]`` (needs FakeTensor placeholder vals).

    ``convert_pt2e`` leaves quantize/dequantize nodes without ``meta["val"]``; matchers that
    check dtypes can run on this copy. Raises ValueError when the placeholders carry no
    FakeTensors to start from.
    """
    new = _copy(gm)
    if not _propagate_meta(new):
        raise ValueError("cannot propagate: the placeholders carry no FakeTensor meta['val']")
    return new


Form: TypeAlias = Callable[[fx.GraphModule], fx.GraphModule]
"""A single-argument form: GraphModule in, new GraphModule out."""


def _dtype_form(spelling: DtypeSpelling) -> Form:
    return functools.partial(with_dtype_spelling, spelling=spelling)


def _view_form(spelling: ViewSpelling) -> Form:
    return functools.partial(with_view_spelling, spelling=spelling)


FORMS: Mapping[str, Form] = MappingProxyType(
    {
        "op": _copy,
        "tensor_qparams": to_tensor_qparams,
        "tensor_qparams_f32": functools.partial(to_tensor_qparams, scale_dtype=torch.float32),
        "decomposed": to_decomposed,
        "decomposed_single_clamp": functools.partial(to_decomposed, single_clamp=True),
        "decomposed_keep_zero_zp": functools.partial(to_decomposed, drop_zero_zp=False),
        "shared_dequants": share_dequants,
        "weight_clone": with_weight_clone,
        "fp32_before_quant": with_fp32_before_quant,
        **{f"dtype_{s}": _dtype_form(s) for s in DTYPE_SPELLINGS},
        **{f"view_{s}": _view_form(s) for s in VIEW_SPELLINGS},
    }
)
"""Every single-argument form by name (for ``hypothesis.strategies.sampled_from``)."""


def respell(gm: fx.GraphModule, *names: str) -> fx.GraphModule:
    """``gm`` in each form of :data:`FORMS` named, in turn: what composing them gives (a new
    module, the input untouched), with one copy and one finish instead of one per form."""
    unknown = [n for n in names if n not in FORMS]
    if unknown:
        raise KeyError(f"unknown forms {unknown}; known: {', '.join(FORMS)}")
    new = _copy(gm)
    token = _RESPELLING.set(True)
    try:
        for name in names:
            new = FORMS[name](new)
    finally:
        _RESPELLING.reset(token)
    return _finish(new) if any(n != "op" for n in names) else new  # "op" only copies
