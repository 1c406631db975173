"""Typed graph-side op calls: how replacement code builds nodes, by keyword, through a Rewriter.

``emit.onednn.qlinear_pointwise.default(rw, qx=..., x_scale=..., ...)`` adds a node calling
``torch.ops.onednn.qlinear_pointwise.default`` before the rewrite's anchor and returns it. Every
argument is given by its schema name. mypy checks them against the generated stubs
(``qalgebra/opstubs/emit/``: a tensor argument takes an ``fx.Node``, an optional one
``fx.Node | None``, a scalar keeps its type, defaults are the schema's), and the Rewriter checks
them again when the rewrite runs (:meth:`~qalgebra.rewriter.Rewriter.call`), so a ``float``
bound in a match passed where the op takes a tensor is an error in both places.

A packet is callable too when its overloads take the same arguments with different types:
``emit.onednn.qlinear_pointwise(rw, x_scale=s, ...)`` emits ``.default`` for a float ``s`` and
``.tensor`` for a node (the first overload, in torch's order, whose schema takes the arguments).

>>> import torch
>>> from torch import fx
>>> from qalgebra import emit
>>> from qalgebra.rewriter import Rewriter
>>> gm = fx.symbolic_trace(torch.nn.Identity())
>>> x, out = gm.graph.nodes
>>> rw = Rewriter(gm.graph, gm, out, {})
>>> emit.aten.clamp_min.default(rw, self=x, min=0.0)
clamp_min_default
>>> emit.aten.add(rw, self=x, other=1).target
<OpOverload(op='aten.add', overload='Scalar')>
>>> emit.aten.add.Tensor(rw, self=x, other=1.0)
Traceback (most recent call last):
...
qalgebra.errors.EmitError: aten.add.Tensor: argument 'other' takes a graph node (Tensor), got 1.0

Namespaces: ``aten``, ``prims``, ``quantized_decomposed``, ``onednn``, ``quantized`` (the ops
``python -m qalgebra.stubgen`` stubs); ``namespace(name)`` gives any other at run time, typed
loosely unless cast to stubs generated for it (see :mod:`qalgebra.stubgen`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

# Registers the ``quantized_decomposed`` library (the same one torchao's convert_pt2e produces).
import torch.ao.quantization.fx._decomposed
from torch import fx
from torch._ops import OpOverload, OpOverloadPacket

from qalgebra.errors import EmitError
from qalgebra.schemas import argument_problems, emittable, value_problem

if TYPE_CHECKING:
    from qalgebra.opstubs.emit import aten as _aten
    from qalgebra.opstubs.emit import onednn as _onednn
    from qalgebra.opstubs.emit import prims as _prims
    from qalgebra.opstubs.emit import quantized as _quantized
    from qalgebra.opstubs.emit import quantized_decomposed as _quantized_decomposed
    from qalgebra.rewriter import Rewriter

__all__ = [
    "Namespace",
    "Overload",
    "Packet",
    "aten",
    "namespace",
    "onednn",
    "prims",
    "quantized",
    "quantized_decomposed",
]


class Overload:
    """One op overload, emitted by keyword through a Rewriter."""

    __slots__ = ("op",)

    def __init__(self, op: OpOverload[..., Any]) -> None:
        #: The overload a call emits.
        self.op = op

    def __call__(self, rw: Rewriter, /, **arguments: object) -> fx.Node:
        return rw.call(self.op, **arguments)

    def __repr__(self) -> str:
        return f"<emit {self.op}>"


def _problem(op: OpOverload[..., Any], arguments: dict[str, object]) -> str | None:
    problem = argument_problems(op, 0, arguments, hint="")
    for name, value in arguments.items():
        if problem is not None:
            break
        problem = value_problem(op, name, value)
    return problem


class Packet:
    """One op: its overloads as attributes; called, the first overload that takes the arguments."""

    __slots__ = ("_overloads", "packet")

    def __init__(self, packet: OpOverloadPacket[..., Any]) -> None:
        #: The op whose overloads this emits.
        self.packet = packet
        self._overloads: dict[str, Overload] = {}

    def __getattr__(self, name: str) -> Overload:
        if name.startswith("__"):
            raise AttributeError(name)
        overloads = self._overloads
        if name not in overloads:
            op = getattr(self.packet, name)  # AttributeError: no such overload
            if op not in emittable(self.packet):
                raise AttributeError(
                    f"{op} cannot be emitted: it takes no tensor or writes an out= argument"
                )
            overloads[name] = Overload(op)
        return overloads[name]

    def __call__(self, rw: Rewriter, /, **arguments: object) -> fx.Node:
        problems = []
        for op in emittable(self.packet):
            problem = _problem(op, arguments)
            if problem is None:
                return rw.call(op, **arguments)
            problems.append(f"{op._overloadname}: {problem}")
        raise EmitError(
            f"no overload of {self.packet} takes these arguments ({'; '.join(problems)})"
        )

    def __repr__(self) -> str:
        return f"<emit {self.packet}>"


class Namespace:
    """One ``torch.ops`` namespace: its ops as attributes."""

    __slots__ = ("_packets", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._packets: dict[str, Packet] = {}

    def __getattr__(self, op: str) -> Packet:
        if op.startswith("__"):
            raise AttributeError(op)
        packets = self._packets
        if op not in packets:
            packet = getattr(getattr(torch.ops, self.name), op)
            if not isinstance(packet, OpOverloadPacket):
                raise AttributeError(f"torch.ops.{self.name}.{op} is not an op")
            packets[op] = Packet(packet)
        return packets[op]

    def __repr__(self) -> str:
        return f"<emit namespace {self.name}>"


_NAMESPACES: dict[str, Namespace] = {}


def namespace(name: str) -> Namespace:
    """The emission namespace of ``torch.ops.<name>`` (one object per name)."""
    if name not in _NAMESPACES:
        _NAMESPACES[name] = Namespace(name)
    return _NAMESPACES[name]


aten = cast("_aten.Namespace", namespace("aten"))
prims = cast("_prims.Namespace", namespace("prims"))
quantized_decomposed = cast("_quantized_decomposed.Namespace", namespace("quantized_decomposed"))
onednn = cast("_onednn.Namespace", namespace("onednn"))
quantized = cast("_quantized.Namespace", namespace("quantized"))
