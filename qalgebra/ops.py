"""The torch operator namespaces qalgebra uses, with precise static types.

At runtime each name is the ``torch.ops`` namespace itself::

    >>> from qalgebra.ops import aten, onednn, quantized_decomposed
    >>> onednn.qconv_prepack.default is torch.ops.onednn.qconv_prepack.default
    True
    >>> quantized_decomposed.dequantize_per_tensor.tensor
    <OpOverload(op='quantized_decomposed.dequantize_per_tensor', overload='tensor')>

For mypy each name is typed by the generated stubs shipped with the package (``qalgebra/opstubs/``;
regenerate them with ``python -m qalgebra.stubgen``): every overload is an ``OpOverload`` subclass
whose ``__call__`` mirrors its schema, every packet an ``OpOverloadPacket`` subclass with one
attribute per overload, and a misspelt op or overload name is a type error::

    onednn.qconv_prepack.default(w, w_scales, x_scale, x_zp, stride, padding, dilation, groups)
    # -> torch.Tensor; ``x_scale`` must be a float, ``stride`` a sequence of ints, ...

Patterns name their targets through these (so mypy knows every op the catalog matches);
replacement code builds nodes through :mod:`qalgebra.emit`, the graph-side counterpart.
Importing this module registers ``quantized_decomposed`` (a library torch defines in Python, which
``torch.ops`` does not know until ``torch.ao.quantization.fx._decomposed`` is imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

# Registers the ``quantized_decomposed`` library (the same one torchao's convert_pt2e produces).
import torch.ao.quantization.fx._decomposed
from torch import fx

if TYPE_CHECKING:
    from qalgebra.opstubs import aten as _aten
    from qalgebra.opstubs import onednn as _onednn
    from qalgebra.opstubs import prims as _prims
    from qalgebra.opstubs import quantized as _quantized
    from qalgebra.opstubs import quantized_decomposed as _quantized_decomposed

__all__ = [
    "KERNEL_NAMESPACES",
    "aten",
    "calls_kernel_op",
    "onednn",
    "prims",
    "quantized",
    "quantized_decomposed",
]

aten = cast("_aten.Namespace", torch.ops.aten)
prims = cast("_prims.Namespace", torch.ops.prims)
quantized_decomposed = cast("_quantized_decomposed.Namespace", torch.ops.quantized_decomposed)
onednn = cast("_onednn.Namespace", torch.ops.onednn)
quantized = cast("_quantized.Namespace", torch.ops.quantized)

#: The namespaces of the lowered kernels: oneDNN's fused ops and ATen's quantized ones (a
#: lowered graph calls them; Inductor calls them as extern kernels, never fused into its C++).
KERNEL_NAMESPACES = frozenset({"onednn", "quantized"})


def calls_kernel_op(node: fx.Node) -> bool:
    """Whether ``node`` calls an op of :data:`KERNEL_NAMESPACES`."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) in (
        KERNEL_NAMESPACES
    )
