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

__all__ = ["RESPELLABLE", "bound_args", "respell_as_arithmetic"]

#: The overloads :func:`respell_as_arithmetic` writes as arithmetic.
RESPELLABLE = frozenset({qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default})


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
