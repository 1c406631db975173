"""Constants of a graph: nodes computed from module tensors only, folded when lowering.

A weight reaches its op through views, conversions or a tensor subclass' inner tensor
(``get_attr -> to(bf16) -> t``); a fusion that prepacks it needs its value. :func:`is_constant`
says whether a node is computed from ``get_attr`` tensors only, through ops that neither read
inputs nor depend on anything but their arguments; :func:`fold_constant` evaluates it now.

>>> import torch
>>> from torch import fx
>>> root = torch.nn.Module()
>>> root.register_buffer("w", torch.ones(2, 3))
>>> g = fx.Graph()
>>> x = g.placeholder("x")
>>> t = g.call_function(torch.ops.aten.t.default, (g.get_attr("w"),))
>>> y = g.call_function(torch.ops.aten.mm.default, (x, t))
>>> _ = g.output(y)
>>> gm = fx.GraphModule(root, g)
>>> is_constant(t), is_constant(y), fold_constant(t).shape
(True, False, torch.Size([3, 2]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import fx
from torch._ops import OpOverload, OpOverloadPacket

from qalgebra.shapes import known_shape

__all__ = ["fold_constant", "is_constant", "node_shape"]

aten = torch.ops.aten

#: Ops a constant may pass through: conversions, views and copies of their one input.
_FOLDABLE: frozenset[str] = frozenset(
    str(p)
    for p in (
        aten._to_copy,
        aten.to,
        torch.ops.prims.convert_element_type,
        torch.ops.quantized_decomposed.convert_element_type,
        aten.view,
        aten.reshape,
        aten._unsafe_view,
        aten.flatten,
        aten.squeeze,
        aten.unsqueeze,
        aten.permute,
        aten.t,
        aten.transpose,
        aten.expand,
        aten.contiguous,
        aten.clone,
        aten.alias,
        aten.detach,
        aten.lift_fresh_copy,
        torch.ops.export.access_subclass_inner_tensor,
    )
)
_MAX_DEPTH = 16


class _NotConstant(Exception):
    pass


def _packet_name(target: object) -> str:
    if isinstance(target, OpOverload):
        return str(target.overloadpacket)
    if isinstance(target, OpOverloadPacket):
        return str(target)
    return ""


def _get_attr(node: fx.Node) -> object:
    obj: object = node.graph.owning_module
    if obj is None or not isinstance(node.target, str):
        raise _NotConstant
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise _NotConstant
    return obj


def is_constant(node: object, _depth: int = 0) -> bool:
    """Whether ``node`` is computed from ``get_attr`` tensors only, through views/conversions."""
    if not isinstance(node, fx.Node) or _depth > _MAX_DEPTH:
        return False
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or _packet_name(node.target) not in _FOLDABLE:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(is_constant(n, _depth + 1) for n in inputs)


def fold_constant(node: fx.Node) -> torch.Tensor | None:
    """The tensor a constant node computes (evaluated now, without gradients), or None."""
    cache: dict[fx.Node, object] = {}

    def value(n: fx.Node, depth: int) -> object:
        if n in cache:
            return cache[n]
        if depth > _MAX_DEPTH:
            raise _NotConstant
        if n.op == "get_attr":
            out = _get_attr(n)
        elif n.op == "call_function" and _packet_name(n.target) in _FOLDABLE:
            args = fx.node.map_arg(n.args, lambda a: cast(fx.Node, value(a, depth + 1)))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: cast(fx.Node, value(a, depth + 1)))
            target = cast(Callable[..., object], n.target)
            out = target(*args, **kwargs)
        else:
            raise _NotConstant
        cache[n] = out
        return out

    try:
        with torch.no_grad():
            result = value(node, 0)
    except (_NotConstant, RuntimeError, TypeError, ValueError):
        return None
    return result.detach() if isinstance(result, torch.Tensor) else None


def node_shape(node: fx.Node) -> tuple[object, ...] | None:
    """The node's shape from its metadata, or from folding it when it is a constant."""
    shape = known_shape(node)
    if shape is not None:
        return shape
    if is_constant(node):
        folded = fold_constant(node)
        if folded is not None:
            return tuple(folded.shape)
    return None
