"""Typed quantization parameters: the Vars a (de)quantize pattern binds, and what they read back.

:func:`qparams` names the Vars of one per-tensor quantization (``x_scale``, ``x_zp``,
``x_dtype``, ``x_qmin``, ``x_qmax``; with ``runtime=True`` also the nodes of a scale and zero
point computed while the graph runs), :func:`channel_qparams` those of a per-channel weight.
The combinators bind them (:mod:`qalgebra.combinators`), checks compare them
(:mod:`qalgebra.checks`), and replacement code reads them back typed: ``m[qp.scale]`` is a
float, ``qp.read(m)`` a :class:`ConstantQParams` or a :class:`RuntimeQParams` to narrow.

>>> qp = qparams("x")
>>> qp.scale, qp.zero_point
(Var('x_scale', float), Var('x_zp', int))
>>> qparams("x", runtime=True).scale_node
Var('x_scale_node', torch.fx.node.Node)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch.fx import Node

from qalgebra.pattern import Match, Var

__all__ = [
    "ChannelQParams",
    "ConstantQParams",
    "QParamValues",
    "QParams",
    "RuntimeQParams",
    "channel_qparams",
    "qparams",
]



@dataclass(frozen=True, slots=True)
class ConstantQParams:
    """A scale and zero point known when lowering (literals, or one-element constants)."""

    scale: float
    zero_point: int


@dataclass(frozen=True, slots=True)
class RuntimeQParams:
    """A scale and zero point computed while the graph runs: the nodes holding them.

    oneDNN's ``.tensor`` overloads take them as they are (one-element tensors).
    """

    scale: Node
    zero_point: Node


#: What :meth:`QParams.read` gives: replacement code narrows it with ``isinstance``.
QParamValues: TypeAlias = ConstantQParams | RuntimeQParams


@dataclass(frozen=True, slots=True)
class QParams:
    """The Vars of one per-tensor (de)quantization: what replacement code reads back.

    ``scale`` / ``zero_point`` bind constants. With ``scale_node`` / ``zero_point_node`` (made
    by ``qparams(..., runtime=True)``) the patterns also match qparams that are runtime
    tensors, binding those Vars instead; :meth:`read` tells the two apart for replacement code,
    typed, so that code handling only constants cannot read a runtime scale by mistake.
    """

    scale: Var[float]
    zero_point: Var[int]
    dtype: Var[torch.dtype]
    quant_min: Var[int]
    quant_max: Var[int]
    scale_node: Var[Node] | None = None
    zero_point_node: Var[Node] | None = None

    def read(self, m: Match) -> QParamValues:
        """The scale and zero point ``m`` bound: constants, or the nodes computing them."""
        node, zp_node = self.scale_node, self.zero_point_node
        if node is not None and zp_node is not None and node in m:
            return RuntimeQParams(m[node], m[zp_node])
        return ConstantQParams(m[self.scale], m[self.zero_point])


def qparams(prefix: str, *, runtime: bool = False) -> QParams:
    """``QParams`` named ``{prefix}_scale``, ``{prefix}_zp``, ``{prefix}_dtype``, ...

    ``runtime``: also match scale and zero point computed in the graph (``{prefix}_scale_node``,
    ``{prefix}_zp_node``); the replacement then reads them through :meth:`QParams.read`.
    """
    return QParams(
        Var(f"{prefix}_scale", float),
        Var(f"{prefix}_zp", int),
        Var(f"{prefix}_dtype", torch.dtype),
        Var(f"{prefix}_qmin", int),
        Var(f"{prefix}_qmax", int),
        Var(f"{prefix}_scale_node", Node) if runtime else None,
        Var(f"{prefix}_zp_node", Node) if runtime else None,
    )


@dataclass(frozen=True, slots=True)
class ChannelQParams:
    """The Vars of a per-channel weight dequantization."""

    scales: Var[torch.Tensor]
    zero_points: Var[torch.Tensor]
    axis: Var[int]
    dtype: Var[torch.dtype]


def channel_qparams(prefix: str) -> ChannelQParams:
    """``ChannelQParams`` named ``{prefix}_scales``, ``{prefix}_zps``, ..."""
    return ChannelQParams(
        Var(f"{prefix}_scales", torch.Tensor),
        Var(f"{prefix}_zps", torch.Tensor),
        Var(f"{prefix}_axis", int),
        Var(f"{prefix}_dtype", torch.dtype),
    )
