"""Hand a graph qalgebra lowered to Inductor in the shape Inductor's later passes expect.

:class:`qalgebra.catalog_pass.CatalogPass` lowers the aten graph AOT autograd traced, then
these fix-ups make the result ordinary input for the rest of Inductor's compile:

- :func:`respell_unfused`: every quantize/dequantize qalgebra left unfused becomes the
  arithmetic it computes (or a constant, for a weight's dequantize). Inductor's quantization
  patterns match the ops only, so they find nothing: a conv qalgebra refused (saturating int8
  products on this CPU, int8 activations) stays unfused instead of being fused by Inductor.
  The scales and zero points enter that arithmetic as one-element tensor constants, which
  Inductor's C++ kernels read from memory: kernels that differ only in qparams (the same layer
  repeated, left float) then have one source, compiled once.
  A oneDNN conv/linear quantizing to another 8-bit dtype than its input's gets its quantize
  written out too (:func:`quantize_outside_kernels_typed_wrong`): Inductor types such an output
  by the kernel's input.
- :func:`functional_clamps`: an in-place range clamp the lowering puts on a tensor it owns
  (``clamp_max_``...) becomes its functional op where a C++ kernel Inductor generates reads
  the result (Inductor fuses it there; it has no lowering for the in-place ones). Between
  oneDNN calls it stays in place, an ATen call (lowered so inside
  :func:`in_place_clamp_lowerings`): as a kernel of its own it would cost a C++ source to
  generate and compile per shape.
- :func:`scalar_constants_as_vectors`: a 0-d tensor constant a oneDNN op reads (the zero point
  of a dynamic linear's ``qlinear_pointwise.tensor``, a static activation scale) gets shape
  ``[1]``: Inductor lowers a 0-d constant to a number, which its oneDNN lowerings refuse where
  the op takes a tensor (``x_zp type is Constant, not int``), and reads a ``[1]`` one as the
  tensor it normalizes to 0-d itself.
- :func:`woq_scales_as_buffers`: a weight-only int8 linear (``_weight_int8pack_mm``) of at
  most 8 output features gets its weight and scales padded to 16 rows, and its output is sliced
  back: Inductor inlines a 1-d constant of up to 8 elements as computed values, and its lowering
  of the op hands the scales to the extern kernel unrealized (``AssertionError: Pointwise``).
- :func:`kernels_closed_to_post_op_patterns`: a oneDNN conv/linear with a float output is read
  through an identity ``permute`` (a view: free). Inductor's freezing passes fuse the ops after
  a oneDNN kernel into it (``qlinear_pointwise`` then ``add`` then ``relu``...), and assert
  that the kernel has no post-op yet: on a kernel the catalog fused, they crashed the compile,
  and on one it left bare, they overrode its decision.
- :func:`decompose`: the compile traces with Inductor's decompositions except those of the
  post-ops the catalog fuses (:data:`KEPT_OPS`: ``gelu`` decomposed is ``x * 0.5 * (1 +
  erf(...))``, which no catalog pattern spells); what the catalog did not fuse, and any op it
  wrote that Inductor would have decomposed and cannot lower, is decomposed here, by
  Inductor's own table; a uint8 ``quantized.max_pool2d`` over few channels becomes Inductor's
  own max pool.
"""

from __future__ import annotations

import contextlib
import functools
import unittest.mock
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from qalgebra.costcheck import AS_TIMED_KEY
from qalgebra.match import node_dtype
from qalgebra.ops import calls_kernel_op
from qalgebra.ops import quantized_decomposed as qd
from qalgebra.qdq_arithmetic import (
    RESPELLABLE,
    bound_args,
    respell_as_arithmetic,
    respell_runtime_as_arithmetic,
)
from qalgebra.shapes import known_shape

__all__ = [
    "CORRECTED_DECOMPOSITIONS",
    "INLINED_CONSTANT_ELEMENTS",
    "KEPT_OPS",
    "TRACED_KEY",
    "VECTOR_POOL_CHANNELS",
    "WOQ_PADDED_ROWS",
    "TensorQparams",
    "add_constant",
    "choose_qparams_with_zero",
    "compile_decompositions",
    "convolutions_as_timed",
    "decompose",
    "fetch",
    "fresh_name",
    "functional_clamps",
    "in_place_clamp_lowerings",
    "kernels_closed_to_post_op_patterns",
    "mark_traced",
    "propagate_vals",
    "quantize_outside_kernels_typed_wrong",
    "respell_unfused",
    "scalar_constants_as_vectors",
    "woq_scales_as_buffers",
]

Decompositions = Mapping[Any, Callable[..., Any]]

aten = torch.ops.aten  # untyped: the in-place clamps are not in the generated stubs

#: The post-ops the catalog fuses into oneDNN ops (:class:`qalgebra.combinators.Unary`) that
#: Inductor would decompose before qalgebra sees them.
KEPT_OPS: frozenset[Any] = frozenset(
    {
        aten.gelu.default,
        aten.hardswish.default,
        aten.silu.default,
        aten.hardtanh.default,
        aten.relu6.default,
        aten.leaky_relu.default,
        aten.clamp.default,
    }
)

_FUNCTIONAL_CLAMPS: Mapping[Any, Any] = {
    aten.clamp_max_.default: aten.clamp_max.default,
    aten.clamp_min_.default: aten.clamp_min.default,
    aten.clamp_.default: aten.clamp.default,
}


def choose_qparams_with_zero(
    input: torch.Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantized_decomposed.choose_qparams.tensor`` decomposed to the values the op computes.

    The op's range always includes zero (``determine_qparams``: ``min(min_val, 0)``,
    ``max(max_val, 0)``); Inductor's decomposition (torch 2.13) drops that, so wherever a
    tensor's values all have one sign and none is zero -- a dynamically quantized activation
    after a sigmoid, a one-element row -- the compiled scale and zero point differ from the
    op's, and ``torch.compile`` with Inductor alone computes wrong outputs (measured:
    ``[[0.1, 0.2, 0.3]]`` gets scale 0.2/255 instead of 0.3/255; a one-element ``x`` was
    quantized with the scale ``eps``). A relu's output mostly holds zeros, which hides it.
    """
    del dtype  # the op takes it for its check only
    min_val, max_val = torch.aminmax(input)
    low = torch.clamp(min_val, max=0.0)
    high = torch.clamp(max_val, min=0.0)
    scale = (high - low) / float(quant_max - quant_min)
    scale = torch.maximum(scale, scale.new_full((1,), eps, dtype=torch.float32))
    zero_point = quant_min - torch.round(low / scale).to(torch.int)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)
    return scale.to(torch.float64), zero_point.to(torch.int64)


#: Where qalgebra's compile decomposes an op otherwise than Inductor's table does.
CORRECTED_DECOMPOSITIONS: Mapping[Any, Callable[..., Any]] = {
    qd.choose_qparams.tensor: choose_qparams_with_zero,
}


@functools.cache
def _inductor_table() -> Decompositions:
    """Inductor's decompositions, with :data:`CORRECTED_DECOMPOSITIONS` in place of its own."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), **CORRECTED_DECOMPOSITIONS}


def compile_decompositions() -> dict[Any, Callable[..., Any]]:
    """Inductor's decompositions (corrected: :data:`CORRECTED_DECOMPOSITIONS`), less those of
    :data:`KEPT_OPS`: what the compile traces with."""
    return {op: fn for op, fn in _inductor_table().items() if op not in KEPT_OPS}


def fresh_name(module: torch.nn.Module, stem: str) -> str:
    """``stem`` followed by the smallest index no attribute of ``module`` has."""
    i = 0
    while hasattr(module, f"{stem}{i}"):
        i += 1
    return f"{stem}{i}"


def fetch(module: torch.nn.Module, target: str) -> Any:
    """The attribute a get_attr node reads (dotted path)."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant(node: object, module: torch.nn.Module) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch(module, str(node.target))
        if isinstance(value, torch.Tensor):
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Quantize/dequantize left unfused


def respell_unfused(gm: fx.GraphModule) -> tuple[str, ...]:
    """Respell the quantize/dequantize nodes left in ``gm`` so no Inductor pattern matches them.

    A weight ``dequantize_per_channel`` of constants is computed now (by the op itself) and
    becomes a float constant; a per-tensor ``.tensor`` overload with constant qparams becomes
    ``.default`` (the op reads ``scale.item()`` itself); per-tensor ``.default`` nodes become
    their arithmetic; so do ``.tensor`` nodes whose qparams are computed while the graph runs
    (a dynamic quantization the catalog left: Inductor's dequant promotion duplicated its
    dequantize), by :func:`~qalgebra.qdq_arithmetic.respell_runtime_as_arithmetic`; and the
    output quantize of a oneDNN kernel Inductor would type wrong
    (:func:`quantize_outside_kernels_typed_wrong`). Returns the names of the nodes replaced and
    of those kernels; any other quantized_decomposed node stays (and Inductor's counters say
    whether one of its patterns fused it).
    """
    graph = gm.graph
    qparams = TensorQparams(gm)
    hidden = quantize_outside_kernels_typed_wrong(gm, qparams)
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "namespace", None) != (
            "quantized_decomposed"
        ):
            continue
        replacement = _respelled(node, gm, qparams)
        if replacement is not None:
            carried = {k: v for k, v in node.meta.items() if k != TRACED_KEY}
            replacement.meta = {**carried, **replacement.meta}
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            hidden.append(node.name)
    graph.eliminate_dead_code()
    gm.recompile()
    return tuple(hidden)


#: Arguments of a oneDNN conv/linear that quantize its output inside the kernel.
_OUTPUT_QPARAMS = ("output_scale", "output_zero_point", "output_dtype")


def quantize_outside_kernels_typed_wrong(gm: fx.GraphModule, qparams: TensorQparams) -> list[str]:
    """Each oneDNN conv/linear quantizing to another 8-bit dtype than its input's returns float,
    and its output quantize becomes arithmetic after it; returns the kernels' names.

    Inductor (torch 2.13) types a quantized output by the kernel's *input* (its
    ``QConvPointWisePT2E`` and ``QLinearPointwisePT2E`` take ``x.dtype`` unless the output is
    float): a conv from uint8 to int8 is recorded as uint8, and the C++ kernel that reads it
    loads its bytes as uint8 (found compiling a ``qconv_binary`` example with an int8 residual,
    5 output steps off). A conv accumulating into its ``sum`` operand is typed by that operand,
    and is left alone. The kernel's own saturation to the dtype's range is the quantize's range.
    """
    changed: list[str] = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "onednn":
            continue
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            continue
        names = [a.name for a in target._schema.arguments]
        if not all(name in names for name in _OUTPUT_QPARAMS) or not node.args:
            continue
        b = bound_args(node)
        dtype, source = b["output_dtype"], node.args[0]
        if dtype not in (torch.int8, torch.uint8) or not isinstance(source, fx.Node):
            continue
        accumulates = "sum" in (b.get("binary_attr"), b.get("binary_post_op"))
        if _input_dtype(source) == dtype or accumulates:
            continue  # an unknown input dtype may differ: written out, right either way
        info = torch.iinfo(dtype)
        scale, zero_point = float(b["output_scale"]), int(b["output_zero_point"])
        with graph.inserting_after(node):
            quantize = graph.call_function(
                qd.quantize_per_tensor.default,
                (node, scale, zero_point, info.min, info.max, dtype),
            )
        quantize.meta = {k: v for k, v in node.meta.items() if k != TRACED_KEY}
        for user in [u for u in node.users if u is not quantize]:
            user.replace_input_with(node, quantize)
        for name, value in zip(_OUTPUT_QPARAMS, (1.0, 0, torch.float32), strict=True):
            position = names.index(name)
            if name in node.kwargs or position >= len(node.args):
                node.update_kwarg(name, value)
            else:
                node.update_arg(position, value)
        respelled = respell_as_arithmetic(
            quantize, torch.float32, drop_zero_zp=False, qparam=qparams.for_input(node)
        )
        respelled.meta = dict(quantize.meta)
        quantize.replace_all_uses_with(respelled)
        graph.erase_node(quantize)
        # the kernel's value is float now: propagate_vals recomputes it (the rank stays)
        node.meta = {k: v for k, v in node.meta.items() if k not in ("val", TRACED_KEY)}
        changed.append(node.name)
    return changed


#: Ops whose output has their first argument's dtype, which a rewrite may write without one.
_DTYPE_KEEPING = frozenset(
    {
        aten.constant_pad_nd.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.permute.default,
        aten.view.default,
        aten.reshape.default,
    }
)


def _input_dtype(node: fx.Node) -> torch.dtype | None:
    """``node``'s dtype, looked for through the ops of :data:`_DTYPE_KEEPING` (a conv's
    activation padded with its zero point is one); None when unknown."""
    while (dtype := node_dtype(node)) is None and node.target in _DTYPE_KEEPING:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node):
            return None
        node = arg
    return dtype


def _respelled(node: fx.Node, gm: fx.GraphModule, constants: TensorQparams) -> fx.Node | None:
    graph = gm.graph
    if node.target is qd.dequantize_per_channel.default:
        return _folded_dequantize_per_channel(node, gm)
    if node.target in (qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor):
        b = bound_args(node)
        scale, zero_point = _constant(b["scale"], gm), _constant(b["zero_point"], gm)
        if scale is None or zero_point is None:  # computed while the graph runs (dynamic)
            rank = _value_rank(b["input"])
            return None if not rank else respell_runtime_as_arithmetic(node, rank)
        default = (
            qd.quantize_per_tensor.default
            if node.target is qd.quantize_per_tensor.tensor
            else qd.dequantize_per_tensor.default
        )
        qparams = (float(scale.item()), int(zero_point.item()))
        kwargs = {"out_dtype": b["out_dtype"]} if b.get("out_dtype") is not None else {}
        with graph.inserting_before(node):
            node = graph.call_function(
                default,
                (b["input"], *qparams, b["quant_min"], b["quant_max"], b["dtype"]),
                kwargs,
            )
    if node.target not in RESPELLABLE:
        return None
    source = bound_args(node)["input"]
    input_dtype = node_dtype(source) if isinstance(source, fx.Node) else None
    if input_dtype is None:
        return None  # a bf16 quantize input must be converted first: the dtype must be known
    # a zero point of 0 keeps its add/sub: the arithmetic, hence the C++ kernel, is then the
    # same whatever the zero point, and a tensor constant 0 costs one vector add
    return respell_as_arithmetic(
        node, input_dtype, drop_zero_zp=False, qparam=constants.for_input(source)
    )


class TensorQparams:
    """Scales and zero points as float32 constants of shape ``(1,) * rank``, one per value.

    Inductor writes a number into the C++ kernel's source but reads a tensor constant from
    memory (one that is not 0-d nor a short 1-d vector, which it inlines too), so kernels that
    differ only in qparams compile once: ``ffn_stack(8, 3d)`` with every linear left float
    compiled in 4.9-5.3 s instead of 8.3-9.3 s (6 kernel sources instead of 17), at the same
    runtime. Only fp32 arithmetic on tensors of rank 2 or more is given constants: a
    tensor-tensor ``mul`` would promote bf16 to fp32, and broadcasting a lower-rank input
    against ``(1, 1)`` would change its shape.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._made: dict[tuple[float, int], fx.Node] = {}

    def for_input(self, source: object) -> Callable[[float, torch.dtype], float | fx.Node]:
        """The ``qparam`` hook of :func:`respell_as_arithmetic` for arithmetic on ``source``."""
        val = source.meta.get("val") if isinstance(source, fx.Node) else None
        rank = val.dim() if isinstance(val, torch.Tensor) else 0

        def qparam(value: float, dtype: torch.dtype) -> float | fx.Node:
            if rank < 2 or dtype != torch.float32:
                return value
            return self.constant(float(value), rank)

        return qparam

    def constant(self, value: float, rank: int) -> fx.Node:
        """A ``get_attr`` of ``value`` (fp32, shape ``(1,) * rank``), at the graph's start."""
        made = self._made.get((value, rank))
        if made is not None:
            return made
        first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        constant = torch.full((1,) * rank, value, dtype=torch.float32)
        node = add_constant(self.gm, "_qalgebra_qparam_", constant, before=first)
        self._made[(value, rank)] = node
        return node


def _folded_dequantize_per_channel(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """A weight's ``dequantize_per_channel`` of constants, computed now by the op itself."""
    b = bound_args(node)
    weight, scales = _constant(b["input"], gm), _constant(b["scales"], gm)
    zero_points = None if b["zero_points"] is None else _constant(b["zero_points"], gm)
    if weight is None or scales is None or (b["zero_points"] is not None and zero_points is None):
        return None
    value = qd.dequantize_per_channel.default(
        weight,
        scales,
        zero_points,
        int(b["axis"]),
        int(b["quant_min"]),
        int(b["quant_max"]),
        b["dtype"],
        out_dtype=b["out_dtype"],
    )
    return add_constant(gm, "_qalgebra_dequantized_", value, before=node)


def add_constant(gm: fx.GraphModule, stem: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """A ``get_attr`` node, before ``before``, of ``value`` set on ``gm`` under a fresh name."""
    name = fresh_name(gm, stem)
    setattr(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.create_node("get_attr", name)


# ---------------------------------------------------------------------------------------------
# In-place clamps, decompositions


def functional_clamps(graph: fx.Graph) -> int:
    """In-place clamps of a tensor nothing else reads become functional where Inductor could
    fuse them into a kernel it generates; returns how many.

    A clamp only oneDNN or quantized ops read (the range clamp of a binary conv's int8 output
    before the next conv, with 7-bit activations) would be a C++ kernel of its own: one source
    per shape to generate and compile (ResNet-18: seven, about a third of its compile time over
    Inductor's) to run what ATen's in-place clamp runs as fast. It stays in place, which
    Inductor calls through its fallback kernel.
    """
    count = 0
    for node in list(graph.nodes):
        functional = _FUNCTIONAL_CLAMPS.get(node.target) if node.op == "call_function" else None
        source = node.args[0] if node.args else None
        if functional is None or not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        if node.users and all(calls_kernel_op(user) for user in node.users):
            continue
        node.target = functional
        count += 1
    return count


@contextlib.contextmanager
def in_place_clamp_lowerings() -> Iterator[None]:
    """Inside the block, Inductor lowers the in-place clamps :func:`functional_clamps` leaves
    as calls to ATen's kernels.

    Without a lowering of its own, Inductor makes an implicit fallback, which raises wherever
    the environment sets ``CI`` (GitHub Actions does: a check for PyTorch's own CI that the
    op has no decomposition) and stays registered for the rest of the process.
    """
    from torch._inductor import lowering

    handler = cast("Callable[..., Callable[..., Any]]", lowering.fallback_handler)  # untyped
    lowerings = lowering.lowerings
    added = [op for op in _FUNCTIONAL_CLAMPS if op not in lowerings]
    for op in added:
        lowerings[op] = handler(op, add_to_fallback_set=False)
    try:
        yield
    finally:
        for op in added:
            lowerings.pop(op, None)


def convolutions_as_timed(graph: fx.Graph) -> int:
    """Each convolution the cost check left float becomes ``aten._convolution``; returns how many.

    Inductor lowers ``_convolution`` to the same ATen call as ``convolution``, but its freezing
    passes only prepack ``convolution`` nodes for oneDNN: so the layer runs the call the cost
    check timed (:data:`qalgebra.costcheck.AS_TIMED_KEY`).
    """
    count = 0
    for node in graph.find_nodes(op="call_function", target=aten.convolution.default):
        if not node.meta.get(AS_TIMED_KEY) or node.kwargs or len(node.args) != 9:
            continue
        with graph.inserting_before(node):
            # benchmark, deterministic, cudnn_enabled, allow_tf32: inert on CPU
            timed = graph.call_function(
                aten._convolution.default, (*node.args, False, False, True, True)
            )
        timed.meta = {k: v for k, v in node.meta.items() if k != TRACED_KEY}
        node.replace_all_uses_with(timed)
        graph.erase_node(node)
        count += 1
    return count


#: The oneDNN quantized conv/linear ops whose outputs Inductor's post-op patterns extend.
_POST_OP_EXTENDED = frozenset(
    {
        torch.ops.onednn.qconv_pointwise,
        torch.ops.onednn.qconv2d_pointwise,
        torch.ops.onednn.qlinear_pointwise,
    }
)


def kernels_closed_to_post_op_patterns(graph: fx.Graph) -> int:
    """Each oneDNN quantized conv/linear with a float output and one reader is read through an
    identity ``permute``; returns how many.

    Inductor's freezing passes (torch 2.13, ``qlinear_post_op_fusion`` and its conv twin) match
    a kernel followed directly by a unary or binary op (``qlinear_pointwise`` with a float
    output, then ``add``, then ``relu``) and fuse the ops into it, asserting that the kernel has
    no post-op yet: found on a drawn ``dequant_promotion`` example whose linear the catalog
    fused with ``relu6``, the compile failed with an empty ``AssertionError``; on a bare kernel
    they would override the catalog's decision to leave the ops out. Their patterns need the
    reader to be the kernel's only one, and the ``permute`` to its own order is a view: it costs
    nothing, and Inductor's no-op removal (which would drop an ``alias``) runs before them but
    leaves it. Quantized outputs need no guard: their patterns end in a quantize, which
    :func:`respell_unfused` writes as arithmetic.
    """
    count = 0
    for node in list(graph.nodes):
        target = node.target
        if (
            node.op != "call_function"
            or not isinstance(target, torch._ops.OpOverload)
            or target.overloadpacket not in _POST_OP_EXTENDED
            or len(node.users) != 1
        ):
            continue
        output_dtype = bound_args(node).get("output_dtype")
        if output_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            continue
        rank = _rank(node)
        if rank is None:
            continue
        (reader,) = node.users
        with graph.inserting_after(node):
            view = graph.call_function(torch.ops.aten.permute.default, (node, list(range(rank))))
        reader.replace_input_with(node, view)
        count += 1
    return count


def _rank(node: fx.Node) -> int | None:
    """The rank of a kernel's output: its input's (convs and linears keep the rank)."""
    for candidate in (node.args[0] if node.args else None, node):
        if (rank := _value_rank(candidate)) is not None:
            return rank
    return None


def _value_rank(value: object) -> int | None:
    """The rank of a node's value (:func:`~qalgebra.shapes.known_shape`); None when unknown."""
    shape = known_shape(value) if isinstance(value, fx.Node) else None
    return None if shape is None else len(shape)


#: Inductor inlines a 1-d constant of at most this many elements (``can_inline_constant``).
INLINED_CONSTANT_ELEMENTS = 8
#: The rows a weight-only int8 linear with inlined-size scales is padded to.
WOQ_PADDED_ROWS = 16


def woq_scales_as_buffers(gm: fx.GraphModule) -> int:
    """Each ``_weight_int8pack_mm`` with at most :data:`INLINED_CONSTANT_ELEMENTS` output
    features computes :data:`WOQ_PADDED_ROWS` instead (zero weight rows, zero scales) and its
    output is sliced back to its features; returns how many.

    Inductor (torch 2.13) inlines such a small 1-d constant as computed values, and its
    lowering of the op binds the scales to the extern kernel without realizing them: the
    compile failed (``LoweringException: AssertionError: <class 'Pointwise'>``) on 10 of 20
    drawn ``woq`` examples. Each output column is the same dot product either way; the padding
    costs at most 16 columns. Call with real tensors (outside the compile's fake mode).
    """
    graph = gm.graph
    count = 0
    for node in list(graph.find_nodes(op="call_function", target=aten._weight_int8pack_mm.default)):
        weight_node, scales_node = node.args[1], node.args[2]
        if not (isinstance(weight_node, fx.Node) and isinstance(scales_node, fx.Node)):
            continue
        if weight_node.op != "get_attr" or scales_node.op != "get_attr":
            continue
        weight = fetch(gm, str(weight_node.target))
        scales = fetch(gm, str(scales_node.target))
        features = scales.shape[0] if scales.dim() == 1 else None
        if features is None or features > INLINED_CONSTANT_ELEMENTS:
            continue
        extra = WOQ_PADDED_ROWS - features
        padded_weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
        padded_scales = torch.cat([scales, scales.new_zeros(extra)])
        node.update_arg(1, add_constant(gm, "_qalgebra_woq_weight_", padded_weight, before=node))
        node.update_arg(2, add_constant(gm, "_qalgebra_woq_scales_", padded_scales, before=node))
        readers = list(node.users)
        with graph.inserting_after(node):
            columns = graph.call_function(aten.slice.Tensor, (node, 1, 0, features))
        for reader in readers:
            reader.replace_input_with(node, columns)
        # the kernel's value is wider now: propagate_vals recomputes it
        node.meta = {k: v for k, v in node.meta.items() if k not in ("val", TRACED_KEY)}
        for old in (weight_node, scales_node):
            if not old.users:
                graph.erase_node(old)
        count += 1
    return count


def scalar_constants_as_vectors(gm: fx.GraphModule) -> int:
    """Every 0-d tensor constant a oneDNN op reads becomes a ``[1]`` one; returns how many.

    Inductor lowers a 0-d ``get_attr`` to a number (``ir.Constant``), and its oneDNN lowerings
    take a number only where the op's schema has one: ``qlinear_pointwise.tensor`` asserts its
    zero point is a tensor or an int (measured: a per-token ``_int_mm`` linear of one row,
    fused with a 0-d zero point, failed to compile). A ``[1]`` constant is inlined as a
    tensor, which those lowerings reduce to 0-d themselves; the kernels take either shape.
    Call with real tensors (outside the compile's fake mode).
    """
    made: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "onednn":
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                continue
            vector = made.get(arg)
            if vector is None:
                value = fetch(gm, str(arg.target))
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    continue
                vector = add_constant(gm, "_qalgebra_vector_", value.reshape(1), before=node)
                made[arg] = vector
            node.replace_input_with(arg, vector)
    for old in made:
        if not old.users:
            gm.graph.erase_node(old)
    return len(made)


#: ``node.meta`` key: the node's ``"val"`` is AOT autograd's own (see :func:`mark_traced`).
TRACED_KEY = "qalgebra_traced_val"


def mark_traced(graph: fx.Graph) -> None:
    """Mark the values AOT autograd propagated, before the lowering copies the graph.

    A rewrite carries the replaced root's ``"val"`` onto its new node for later patterns to
    read, but the new op may lay its output out differently (a oneDNN conv returns channels
    last): :func:`propagate_vals` trusts only the marked values.
    """
    for node in graph.nodes:
        if "val" in node.meta:
            node.meta[TRACED_KEY] = True


def propagate_vals(gm: fx.GraphModule) -> int:
    """``meta["val"]`` on every node, by fake-tensor propagation from the placeholders' values.

    Nodes a rewrite wrote have none (or one carried from the node they replace); Inductor's own
    passes (and :func:`decompose`) read them. The fake mode is the one of the placeholders'
    values (AOT autograd's); constants are converted as Inductor's ``fake_tensor_prop`` does,
    non-fake inputs allowed. Incremental: a node keeps its value when it is AOT autograd's
    (:func:`mark_traced`) and no input's value changed (shape, strides, dtype); measured on
    ResNet-50, propagating the whole graph took 0.5 s, most of it converting constants that
    were converted already. Returns how many nodes were run.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        return 0
    mode = fake_mode  # narrowed, for the class below
    changed: set[fx.Node] = set()
    ran = 0

    class Incremental(FakeTensorProp):
        def run_node(self, n: fx.Node) -> Any:
            nonlocal ran
            old = n.meta.get("val")
            if (
                old is not None
                and n.meta.get(TRACED_KEY)
                and n.op not in ("placeholder", "output")
                and not any(a in changed for a in n.all_input_nodes)
            ):
                return old
            if n.op == "get_attr":
                # a constant a rewrite made: its fake value, converted once, is what the
                # readers get (else each reader's op converts the real tensor again)
                value = self.fetch_attr(str(n.target))
                if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                    fake = mode.from_tensor(value, static_shapes=True)
                    n.meta["val"] = fake
                    changed.add(n)
                    ran += 1
                    return fake
            result = super().run_node(n)
            ran += n.op not in ("placeholder", "output")
            if n.op != "placeholder" and _layout(old) != _layout(n.meta.get("val")):
                changed.add(n)
            return result

    with unittest.mock.patch.object(fake_mode, "allow_non_fake_inputs", True):
        Incremental(gm, mode=fake_mode).propagate_dont_convert_inputs(*vals)
    return ran


def _layout(val: object) -> object:
    """What a node's readers see of its value: shapes, strides, dtypes (symbols by name)."""
    if isinstance(val, torch.Tensor):
        return (repr(tuple(val.shape)), repr(val.stride()), val.dtype, repr(val.storage_offset()))
    if isinstance(val, list | tuple):
        return tuple(_layout(v) for v in val)
    return repr(val)


def decompose(graph: fx.Graph) -> int:
    """Replace each node Inductor has a decomposition but no lowering for by its trace.

    Such a node is one AOT autograd would have decomposed: a post-op the catalog did not fuse
    (:data:`KEPT_OPS`) or an op a rewrite wrote (``_to_copy``, a two-sided ``clamp``). A
    ``quantized.max_pool2d`` over fewer than :data:`VECTOR_POOL_CHANNELS` channels becomes
    ``aten.max_pool2d`` traced the same way: a max of uint8 values is the same whatever computes
    it, and there Inductor's C++ max pool is several times faster than the ATen kernel, which
    vectorizes over channels (one thread: [8, 16, 32, 32] 48 us vs 277 us). With more channels
    the ATen kernel is as fast or faster ([8, 64, 32, 32] 99 vs 121 us; [1, 64, 56, 56] 43 vs
    96 us) and the C++ kernel would only cost compile time (a 3x3 pool's masked loads take
    Inductor about 0.5 s to generate and compile), so the pool stays an ATen call.
    Every tensor argument must carry ``meta["val"]`` (fake tensors, as in AOT autograd's
    graphs); a node without, or one whose trace fails, is left for Inductor's fallback kernel.
    Returns how many were replaced.
    """
    from torch._inductor.lowering import lowerings

    table = _inductor_table()
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.quantized.max_pool2d.default:
            if not _few_channels(node):
                continue
            target: Any = aten.max_pool2d.default  # the same arguments, in the same order
        elif node.target in table and node.target not in lowerings:
            target = node.target
        else:
            continue
        count += _replace_by_trace(node, target, table)
    graph.eliminate_dead_code()
    return count


#: ``quantized.max_pool2d`` vectorizes over channels: from this many on it is as fast as
#: Inductor's C++ max pool (measured, see :func:`decompose`).
VECTOR_POOL_CHANNELS = 32


def _few_channels(pool: fx.Node) -> bool:
    """Whether the pooled tensor has fewer than :data:`VECTOR_POOL_CHANNELS` channels (or an
    unknown count: Inductor's kernel is never much slower)."""
    source = pool.args[0] if pool.args else None
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return True
    channels = val.shape[1]
    return not (type(channels) is int and channels >= VECTOR_POOL_CHANNELS)


def _replace_by_trace(node: fx.Node, target: Callable[..., Any], table: Decompositions) -> bool:
    """Replace ``node`` by ``target`` on its arguments, traced through ``table``."""
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    inputs = list(dict.fromkeys(inputs))
    vals = [n.meta.get("val") for n in inputs]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return False
    try:
        traced = _traced(node, target, inputs, vals, table)
    except Exception:  # an optimization only: Inductor runs the op as a fallback kernel
        return False
    output = traced.graph.output_node().args[0]
    if not isinstance(output, fx.Node):
        return False  # several outputs: not one of the ops this is for
    placeholders = traced.graph.find_nodes(op="placeholder")
    with node.graph.inserting_before(node):
        out = node.graph.graph_copy(traced.graph, dict(zip(placeholders, inputs, strict=True)))
    assert isinstance(out, fx.Node)
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    return True


def _traced(
    node: fx.Node,
    target: Callable[..., Any],
    inputs: list[fx.Node],
    vals: list[Any],
    table: Decompositions,
) -> fx.GraphModule:
    """``target`` on ``node``'s arguments (fake ``vals``), traced through ``table``."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.experimental.proxy_tensor import make_fx

    def call(*tensors: torch.Tensor) -> Any:
        by_node = dict(zip(inputs, tensors, strict=True))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), by_node.__getitem__)
        return target(*args, **kwargs)

    fake_mode = detect_fake_mode(vals)
    with enable_python_dispatcher(), fake_mode or contextlib.nullcontext():
        traced: fx.GraphModule = make_fx(call, dict(table), tracing_mode="real")(*vals)
    return traced
