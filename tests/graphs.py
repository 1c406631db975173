"""Hand-built ``torch.fx`` graphs for the tests: every form a (de)quantization takes.

``GraphBuilder`` wraps an ``fx.Graph`` and a root module: ``input`` makes a placeholder, ``const``
a ``get_attr`` tensor registered on the root, ``op`` a ``call_function``. Every node gets the
``meta['val']`` a real pass would give it (a tensor on the ``meta`` device, computed by running the
op on the meta values of its arguments), unless ``meta=False`` asks for a node without one.

The quant helpers build one (de)quantization in a chosen form and return its output node:

- ``quantize(b, x, QP(...), form)`` with ``form`` one of ``QUANT_FORMS``: the op form
  ``quantized_decomposed.quantize_per_tensor.default`` / ``.tensor`` (tensor form: scale and zero
  point are ``get_attr`` tensors), or decomposed ``mul(x, 1/scale) -> round -> add(zp) ->
  clamp_min -> clamp_max -> convert(dtype)`` (``add`` absent when zp == 0; ``"decomposed_clamp"``
  uses a single ``clamp``);
- ``dequantize(b, q, QP(...), form)``: op form, or decomposed ``convert(q, float32) -> sub(zp) ->
  mul(scale)`` (``sub`` absent when zp == 0);
- ``convert(b, x, dtype, spelling)`` in each of ``CONVERT_SPELLINGS``;
- ``reshape(b, x, shape, spelling)`` in each of ``RESHAPE_SPELLINGS``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
from torch import fx
from torch.fx.node import Argument

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed

QuantForm = Literal["op_default", "op_tensor", "decomposed", "decomposed_clamp"]
DequantForm = Literal["op_default", "op_tensor", "decomposed"]
ConvertSpelling = Literal["prims", "to_copy", "to_dtype"]
ReshapeSpelling = Literal["view", "reshape", "unsafe_view"]

QUANT_FORMS: tuple[QuantForm, ...] = get_args(QuantForm)
DEQUANT_FORMS: tuple[DequantForm, ...] = get_args(DequantForm)
CONVERT_SPELLINGS: tuple[ConvertSpelling, ...] = get_args(ConvertSpelling)
RESHAPE_SPELLINGS: tuple[ReshapeSpelling, ...] = get_args(ReshapeSpelling)


@dataclass(frozen=True)
class QP:
    """Concrete per-tensor quantization parameters (what a pattern's ``QParams`` should bind)."""

    scale: float = 0.0234375
    zero_point: int = 84
    quant_min: int = 0
    quant_max: int = 255
    dtype: torch.dtype = torch.uint8


class GraphBuilder:
    """An ``fx.Graph`` under construction, with a root module holding its ``get_attr`` tensors."""

    def __init__(self, *, owned: bool = True) -> None:
        self.root = torch.nn.Module()
        # Owned: the graph knows the root, so the matcher can read get_attr tensors before
        # ``module()`` is called. ``owned=False`` gives a bare graph (no tensors to read).
        # (fx types the owner as a GraphModule; the matcher only reads attributes from it.)
        owner = cast(fx.GraphModule, self.root) if owned else None
        self.graph = fx.Graph(owning_module=owner)
        self._n_consts = 0
        self._input_names: set[str] = set()

    def input(
        self,
        name: str = "x",
        shape: tuple[int, ...] = (2, 3),
        dtype: torch.dtype = torch.float32,
        *,
        meta: bool = True,
    ) -> fx.Node:
        unique, i = name, 0
        while unique in self._input_names:  # an input's name is an argument name of forward()
            i += 1
            unique = f"{name}_{i}"
        self._input_names.add(unique)
        node = self.graph.placeholder(unique)
        if meta:
            node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        return node

    def const(self, value: torch.Tensor, name: str | None = None) -> fx.Node:
        """A ``get_attr`` node reading ``value`` (registered as a buffer of the root)."""
        if name is None:
            name = f"_const{self._n_consts}"
            self._n_consts += 1
        self.root.register_buffer(name, value)
        node = self.graph.get_attr(name)
        node.meta["val"] = torch.empty_like(value, device="meta")
        return node

    def op(
        self, target: Callable[..., Any], *args: object, meta: bool = True, **kwargs: object
    ) -> fx.Node:
        node = self.graph.call_function(
            target, cast(tuple[Argument, ...], args), cast(dict[str, Argument], kwargs)
        )
        if meta:
            margs, mkwargs = _meta_vals(args), _meta_vals(kwargs)
            if not any(v is _NO_META for v in _flatten((margs, mkwargs))):
                assert isinstance(margs, list) and isinstance(mkwargs, dict)
                node.meta["val"] = target(*margs, **mkwargs)
        return node

    def output(self, *nodes: fx.Node) -> None:
        self.graph.output(nodes[0] if len(nodes) == 1 else tuple(nodes))

    def module(self) -> fx.GraphModule:
        """The graph as a GraphModule (an output of the last node is added if missing)."""
        if not any(n.op == "output" for n in self.graph.nodes):
            self.output(list(self.graph.nodes)[-1])
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)


_NO_META = object()


def _meta_vals(value: object) -> object:
    """``value`` with every node replaced by its ``meta['val']`` (``_NO_META`` if it has none)."""
    if isinstance(value, fx.Node):
        return value.meta.get("val", _NO_META)
    if isinstance(value, list | tuple):
        return [_meta_vals(v) for v in value]
    if isinstance(value, dict):
        return {k: _meta_vals(v) for k, v in value.items()}
    return value


def _flatten(value: object) -> list[object]:
    if isinstance(value, list | tuple):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


# --------------------------------------------------------------------------------------------
# Spellings
# --------------------------------------------------------------------------------------------


def convert(
    b: GraphBuilder,
    x: fx.Node,
    dtype: torch.dtype,
    spelling: ConvertSpelling = "prims",
    *,
    meta: bool = True,
) -> fx.Node:
    """A dtype conversion spelled as ``prims.convert_element_type``, ``_to_copy`` or ``to``."""
    if spelling == "prims":
        return b.op(prims.convert_element_type.default, x, dtype, meta=meta)
    if spelling == "to_copy":
        return b.op(aten._to_copy.default, x, dtype=dtype, meta=meta)
    return b.op(aten.to.dtype, x, dtype, meta=meta)


def reshape(
    b: GraphBuilder, x: fx.Node, shape: list[int], spelling: ReshapeSpelling = "view"
) -> fx.Node:
    target = {
        "view": aten.view.default,
        "reshape": aten.reshape.default,
        "unsafe_view": aten._unsafe_view.default,
    }[spelling]
    return b.op(target, x, shape)


# --------------------------------------------------------------------------------------------
# Quantize / dequantize in every form
# --------------------------------------------------------------------------------------------


def _qparam_consts(b: GraphBuilder, qp: QP) -> tuple[fx.Node, fx.Node]:
    scale = b.const(torch.tensor([qp.scale], dtype=torch.float32))
    zp = b.const(torch.tensor([qp.zero_point], dtype=torch.int64))
    return scale, zp


def quantize(
    b: GraphBuilder,
    x: fx.Node,
    qp: QP = QP(),
    form: QuantForm = "op_default",
    *,
    zp_add: bool | None = None,
    spelling: ConvertSpelling = "prims",
    meta: bool = True,
) -> fx.Node:
    """One per-tensor quantize of ``x``; ``zp_add`` forces the decomposed add in or out."""
    if form == "op_default":
        return b.op(
            qd.quantize_per_tensor.default,
            x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype, meta=meta,
        )
    if form == "op_tensor":
        scale, zp = _qparam_consts(b, qp)
        return b.op(
            qd.quantize_per_tensor.tensor,
            x, scale, zp, qp.quant_min, qp.quant_max, qp.dtype, meta=meta,
        )
    y = b.op(aten.mul.Tensor, x, 1.0 / qp.scale, meta=meta)
    y = b.op(aten.round.default, y, meta=meta)
    if zp_add if zp_add is not None else qp.zero_point != 0:
        y = b.op(aten.add.Tensor, y, qp.zero_point, meta=meta)
    if form == "decomposed_clamp":
        y = b.op(aten.clamp.default, y, qp.quant_min, qp.quant_max, meta=meta)
    else:
        y = b.op(aten.clamp_min.default, y, qp.quant_min, meta=meta)
        y = b.op(aten.clamp_max.default, y, qp.quant_max, meta=meta)
    return convert(b, y, qp.dtype, spelling, meta=meta)


def dequantize(
    b: GraphBuilder,
    q: fx.Node,
    qp: QP = QP(),
    form: DequantForm = "op_default",
    *,
    zp_sub: bool | None = None,
    spelling: ConvertSpelling = "prims",
    meta: bool = True,
) -> fx.Node:
    """One per-tensor dequantize of ``q``; ``zp_sub`` forces the decomposed sub in or out."""
    if form == "op_default":
        return b.op(
            qd.dequantize_per_tensor.default,
            q, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype, meta=meta,
        )
    if form == "op_tensor":
        scale, zp = _qparam_consts(b, qp)
        return b.op(
            qd.dequantize_per_tensor.tensor,
            q, scale, zp, qp.quant_min, qp.quant_max, qp.dtype, meta=meta,
        )
    y = convert(b, q, torch.float32, spelling, meta=meta)
    if zp_sub if zp_sub is not None else qp.zero_point != 0:
        y = b.op(aten.sub.Tensor, y, qp.zero_point, meta=meta)
    return b.op(aten.mul.Tensor, y, qp.scale, meta=meta)


@dataclass(frozen=True)
class ChannelQP:
    """Concrete per-channel weight quantization parameters."""

    scales: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)
    zero_points: tuple[int, ...] = (0, 0, 0, 0)
    axis: int = 0
    dtype: torch.dtype = torch.int8


def dequantize_weight(
    b: GraphBuilder,
    shape: tuple[int, ...] = (4, 3),
    cp: ChannelQP = ChannelQP(),
    *,
    clone: bool = False,
    to_dtype: torch.dtype | None = None,
    permute: list[int] | None = None,
) -> tuple[fx.Node, fx.Node]:
    """(int8 weight get_attr, dequantized weight) with optional clone / convert / permute."""
    w = b.const(torch.zeros(shape, dtype=cp.dtype))
    scales = b.const(torch.tensor(cp.scales, dtype=torch.float32))
    zps = b.const(torch.tensor(cp.zero_points, dtype=torch.int64))
    info = torch.iinfo(cp.dtype)
    y = b.op(
        qd.dequantize_per_channel.default, w, scales, zps, cp.axis, info.min, info.max, cp.dtype
    )
    if clone:
        y = b.op(aten.clone.default, y, memory_format=torch.channels_last)
    if to_dtype is not None:
        y = convert(b, y, to_dtype)
    if permute is not None:
        y = b.op(aten.permute.default, y, permute)
    return w, y


def getitem(b: GraphBuilder, x: fx.Node, i: int) -> fx.Node:
    return b.op(operator.getitem, x, i, meta=False)
