"""Per-tensor quantize/dequantize nodes respelled as the arithmetic they compute.

``quantized_decomposed.quantize_per_tensor`` computes ``clamp(round(x * (1.0 / scale)) + zp,
qmin, qmax).to(dtype)``, a bf16/fp16 input converted to fp32 first, and
``dequantize_per_tensor`` computes ``(q.to(out_dtype or float32) - zp) * scale``
(docs/onednn_ops.md). :func:`respell_as_arithmetic` writes those aten/prims nodes before one
such node: the "decomposed" form of a quantized graph, bit-exact against the op. The testing
forms draw decomposed graphs with it; :mod:`qalgebra.compile` uses it so that Inductor's
quantization patterns, which match the ops only, leave alone what qalgebra left unfused.

>>> import torch
>>> from torch import fx
>>> qd = torch.ops.quantized_decomposed
>>> graph = fx.Graph()
>>> x = graph.placeholder("x")
>>> q = graph.call_function(qd.quantize_per_tensor.default, (x, 0.5, 3, 0, 255, torch.uint8))
>>> _ = graph.output(q)
>>> out = respell_as_arithmetic(q, torch.float32)
>>> [str(n.target) for n in graph.nodes if n.op == "call_function" and n is not q]
['aten.mul.Tensor', 'aten.round.default', 'aten.add.Tensor', 'aten.clamp_min.default', \
'aten.clamp_max.default', 'prims.convert_element_type.default']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qalgebra.ops import aten, prims
from qalgebra.ops import quantized_decomposed as qd

__all__ = [
    "RESPELLABLE",
    "RUNTIME_RESPELLABLE",
    "bound_args",
    "respell_as_arithmetic",
    "respell_runtime_as_arithmetic",
]

#: The overloads :func:`respell_as_arithmetic` writes as arithmetic.
RESPELLABLE = frozenset({qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default})


#: The overloads whose qparams are tensors, computed while the graph runs (``choose_qparams``):
#: :func:`respell_runtime_as_arithmetic`.
RUNTIME_RESPELLABLE = frozenset({qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor})


def bound_args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults filled in), e.g. ``b["scale"]``."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"{node.name} does not call an OpOverload: {target!r}")
    bound: dict[str, Any] = {}
    schema_args = target._schema.arguments
    positional = [a for a in schema_args if not a.kwarg_only]
    for arg, value in zip(positional, node.args, strict=False):
        bound[arg.name] = value
    bound.update(node.kwargs)
    for arg in schema_args:
        if arg.name not in bound and arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def respell_as_arithmetic(
    node: fx.Node,
    input_dtype: torch.dtype,
    *,
    single_clamp: bool = False,
    drop_zero_zp: bool = True,
    qparam: Callable[[float, torch.dtype], float | fx.Node] | None = None,
) -> fx.Node:
    """Insert the arithmetic ``node`` computes before it; return the node holding the result.

    ``node`` calls one of :data:`RESPELLABLE`; ``input_dtype`` is the dtype of its input (a
    bf16/fp16 quantize input is converted to fp32 first, as the op does). ``single_clamp``
    writes one ``clamp(_, qmin, qmax)`` instead of ``clamp_min`` then ``clamp_max``;
    ``drop_zero_zp`` leaves out the ``add``/``sub`` of a zero point 0 (the spelling that made
    Inductor miss fusions). ``qparam(value, dtype)`` gives the argument that carries a scale
    (its reciprocal, for a quantize) or zero point into arithmetic run in ``dtype``; by default
    the number itself. ``node`` itself is left in place for the caller to replace.
    """
    if node.op != "call_function" or node.target not in RESPELLABLE:
        raise ValueError(f"{node.name}: not a per-tensor quantize/dequantize: {node.target}")
    graph = node.graph
    b = bound_args(node)
    scale, zp = float(b["scale"]), int(b["zero_point"])

    def operand(value: float, dtype: torch.dtype) -> float | fx.Node:
        return value if qparam is None else qparam(value, dtype)

    with graph.inserting_before(node):
        if node.target is qd.quantize_per_tensor.default:
            x = b["input"]
            if input_dtype in (torch.bfloat16, torch.float16):
                x = graph.call_function(prims.convert_element_type.default, (x, torch.float32))
            y = graph.call_function(aten.mul.Tensor, (x, operand(1.0 / scale, torch.float32)))
            y = graph.call_function(aten.round.default, (y,))
            if zp != 0 or not drop_zero_zp:
                y = graph.call_function(aten.add.Tensor, (y, operand(zp, torch.float32)))
            if single_clamp:
                y = graph.call_function(aten.clamp.default, (y, b["quant_min"], b["quant_max"]))
            else:
                y = graph.call_function(aten.clamp_min.default, (y, b["quant_min"]))
                y = graph.call_function(aten.clamp_max.default, (y, b["quant_max"]))
            return graph.call_function(prims.convert_element_type.default, (y, b["dtype"]))
        out_dtype = b.get("out_dtype") or torch.float32
        y = graph.call_function(prims.convert_element_type.default, (b["input"], out_dtype))
        if zp != 0 or not drop_zero_zp:
            y = graph.call_function(aten.sub.Tensor, (y, operand(zp, out_dtype)))
        return graph.call_function(aten.mul.Tensor, (y, operand(scale, out_dtype)))


def respell_runtime_as_arithmetic(node: fx.Node, input_rank: int) -> fx.Node:
    """Insert the arithmetic a ``.tensor`` quantize/dequantize computes from qparams read
    while the graph runs; return the node holding the result (``node`` is left in place).

    The op reads its one-element ``scale`` and ``zero_point`` as Python numbers and runs the
    per-tensor op; the float32 arithmetic then takes them as float32: the reciprocal of the
    scale is taken in float64, then rounded (a quantize), the scale rounded (a dequantize). A
    dequantize to bf16/fp16 computes in float32 and rounds once, as the op does (``q - zp``
    is an integer both hold exactly). ``input_rank`` (at least 1) is the input's: the
    one-element qparams broadcast over it.
    """
    if node.op != "call_function" or node.target not in RUNTIME_RESPELLABLE:
        raise ValueError(f"{node.name}: not a per-tensor .tensor quantize/dequantize")
    if input_rank < 1:
        raise ValueError(f"{node.name}: a 0-d input would take the qparams' shape [1]")
    graph = node.graph
    b = bound_args(node)
    f32, convert = torch.float32, prims.convert_element_type.default
    with graph.inserting_before(node):
        zero_point = graph.call_function(convert, (b["zero_point"], f32))
        scale64 = graph.call_function(convert, (b["scale"], torch.float64))
        if node.target is qd.quantize_per_tensor.tensor:
            x = graph.call_function(convert, (b["input"], f32))
            inverse = graph.call_function(torch.ops.aten.reciprocal.default, (scale64,))
            y = graph.call_function(
                aten.mul.Tensor, (x, graph.call_function(convert, (inverse, f32)))
            )
            y = graph.call_function(aten.round.default, (y,))
            y = graph.call_function(aten.add.Tensor, (y, zero_point))
            y = graph.call_function(aten.clamp_min.default, (y, b["quant_min"]))
            y = graph.call_function(aten.clamp_max.default, (y, b["quant_max"]))
            return graph.call_function(convert, (y, b["dtype"]))
        y = graph.call_function(convert, (b["input"], f32))
        y = graph.call_function(aten.sub.Tensor, (y, zero_point))
        y = graph.call_function(aten.mul.Tensor, (y, graph.call_function(convert, (scale64, f32))))
        out_dtype = b.get("out_dtype") or f32
        return y if out_dtype == f32 else graph.call_function(convert, (y, out_dtype))
