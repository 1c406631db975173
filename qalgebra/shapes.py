"""Shapes of graph values, also when ``meta['val']`` is missing (``convert_pt2e`` adds q/dq nodes
without it): read upstream through shape-preserving ops, or from what the lowering recorded on a
replacement node (``meta['qalgebra_shape']``); symbolic dimensions compare by expression.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.ao.quantization.fx._decomposed  # registers quantized_decomposed ops
from torch import fx

__all__ = ["SHAPE_KEY", "known_shape", "same_dims", "tensor_meta"]

SHAPE_KEY = "qalgebra_shape"
aten = torch.ops.aten

#: Ops whose output has the shape of their first argument (so a shape can be read upstream).
_SAME_SHAPE_PACKETS = frozenset(
    str(p)
    for p in (
        torch.ops.quantized_decomposed.quantize_per_tensor,
        torch.ops.quantized_decomposed.dequantize_per_tensor,
        torch.ops.prims.convert_element_type,
        aten._to_copy,
        aten.to,
        aten.clone,
        aten.relu,
        aten.hardtanh,
        aten.mul,
        aten.sub,
        aten.add,
        aten.round,
        aten.clamp,
        aten.clamp_min,
        aten.clamp_max,
    )
)


def known_shape(node: fx.Node) -> tuple[object, ...] | None:
    """The node's shape from meta['val'], else from upstream through shape-preserving ops.

    Binary ops (mul/sub/add) are followed only when their first argument is a node, as in the
    decomposed (de)quantize, where the second argument is a scalar.
    """
    for _ in range(32):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
        recorded = node.meta.get(SHAPE_KEY)
        if isinstance(recorded, tuple):
            return recorded
        packet = getattr(node.target, "overloadpacket", None)
        if node.op != "call_function" or str(packet) not in _SAME_SHAPE_PACKETS:
            return None
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        node = first
    return None


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The node's ``meta['val']`` tensor (a FakeTensor from export), if any."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def same_dims(a: Sequence[object], b: Sequence[object]) -> bool:
    """Shapes equal, symbolic dimensions compared by their expressions."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b, strict=True))
