"""Conv geometries oneDNN's int8 kernels compute wrongly: refused before a kernel is emitted.

Measured against ``onednn.qconv_prepack`` + ``onednn.qconv_pointwise`` on a float reference
(``python scripts/conv_kernel_grid.py``; table in docs/onednn_ops.md, "Conv geometries oneDNN
gets wrong"). Two classes, each a plain function of the geometry:

- :func:`single_strided_column`: the output is one column wide, from a kernel and a stride both
  wider than 1 along the last spatial axis. oneDNN's AVX512 kernels (with or without VNNI)
  return wrong values for some such convs (grouped, one input channel per group), its AMX
  kernel for many more (grouped or not, 2-D and 3-D, whatever the post-op or output dtype);
  its AVX2 kernel, and every 1-D conv, compute them right. Refused where the probe
  :func:`qalgebra.isa.qconv_single_column_stride_wrong` finds this CPU wrong.
- :func:`padding_only_axis`: some output position reads only padding (its value is the bias).
  oneDNN's AVX512 and AMX kernels return garbage there, depending on what memory held before,
  or crash (segmentation fault). Refused on every CPU: a crash cannot be probed in-process,
  and the result depends on memory, not on the CPU alone.

An input size that is symbolic counts as the smallest it may be (its lower bound, else the
smallest the conv accepts): both classes are most likely on small inputs.

>>> single_strided_column((1, 8, 6, 2), (2, 4, 2, 2), [1, 2], [0, 0], [1, 1])
True
>>> single_strided_column((1, 8, 6, 4), (2, 4, 2, 2), [1, 2], [0, 0], [1, 1])  # 2 columns
False
>>> padding_only_axis((1, 4, 12, 6), (4, 2, 2, 2), [1, 1], [2, 1], [1, 1])  # rows -2, -1
0
>>> padding_only_axis((1, 4, 12, 6), (4, 2, 3, 3), [1, 1], [1, 1], [1, 1]) is None  # "same"
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from qalgebra.errors import Refusal
from qalgebra.isa import qconv_single_column_stride_wrong
from qalgebra.shapes import known_shape

__all__ = [
    "check_conv_kernel",
    "padding_only_axis",
    "single_strided_column",
    "trusted_input_shape",
]

_PROBE = qconv_single_column_stride_wrong.__name__


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _smallest(size: object, kernel: int, padding: int, dilation: int) -> int:
    """``size`` if concrete, else the smallest it can be: its symbol's lower bound, at least
    the smallest input the conv accepts (one output position)."""
    accepted = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    if type(size) is int:
        return size
    if isinstance(size, torch.SymInt):
        try:
            lower = size.node.shape_env.bound_sympy(size.node.expr).lower
            return max(accepted, int(lower))
        except (AttributeError, TypeError, ValueError):  # no shape env, or an unbounded range
            pass
    return accepted


def _spatial(
    input_shape: Sequence[object] | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[tuple[int, int, int, int, int]]:
    """Per spatial axis: (smallest input size, kernel, stride, padding, dilation)."""
    kernel = list(weight_shape[2:])
    sizes: Sequence[object] = input_shape[2:] if input_shape is not None else [None] * len(kernel)
    return [
        (_smallest(n, k, p, d), k, s, p, d)
        for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True)
    ]


def single_strided_column(
    input_shape: Sequence[object] | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> bool:
    """Whether the output may be one column wide with kernel width and width stride > 1.

    1-D convs are left out: measured right with every ISA (the failing kernel is 2-D/3-D).
    """
    axes = _spatial(input_shape, weight_shape, stride, padding, dilation)
    if len(axes) < 2:
        return False
    size, k, s, p, d = axes[-1]
    return k > 1 and s > 1 and _output_size(size, k, s, p, d) == 1


def padding_only_axis(
    input_shape: Sequence[object] | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> int | None:
    """The first spatial axis (0-based) along which some output position reads only padding.

    Padding wider than the dilated kernel's reach (``padding > dilation * (kernel - 1)``) does
    so at the first position whatever the input size; a dilation wider than a small input can
    skip over it in between. None when every output position reads the input.
    """
    for axis, (size, k, s, p, d) in enumerate(
        _spatial(input_shape, weight_shape, stride, padding, dilation)
    ):
        if p > d * (k - 1):
            return axis
        for j in range(_output_size(size, k, s, p, d)):
            if all(not 0 <= j * s - p + t * d < size for t in range(k)):
                return axis
    return None


def check_conv_kernel(
    shape: Sequence[object] | None,
    weight: torch.Tensor,
    geometry: tuple[Sequence[int], Sequence[int], Sequence[int], int],
) -> None:
    """Refuse a conv call whose geometry oneDNN computes wrongly (reasons above).

    ``shape`` is the activation's shape as the kernel gets it (None: unknown, judged at the
    smallest input the conv accepts), ``geometry`` the call's (stride, padding, dilation,
    groups).
    """
    stride, padding, dilation, _ = geometry
    sizes = (shape, tuple(weight.shape), stride, padding, dilation)
    axis = padding_only_axis(*sizes)
    if axis is not None:
        raise Refusal(
            f"output positions along spatial axis {axis} read only padding (input "
            f"{_describe(shape)}, kernel {list(weight.shape[2:])}, padding {list(padding)}, "
            f"dilation {list(dilation)}): oneDNN's int8 conv computes garbage or crashes there"
        )
    if single_strided_column(*sizes) and qconv_single_column_stride_wrong():
        raise Refusal(
            f"the output is one column wide (input {_describe(shape)}) with kernel width "
            f"{weight.shape[-1]} and width stride {stride[-1]}: this CPU's oneDNN int8 conv "
            f"computes that wrongly (probe {_PROBE})",
            cause=f"probe:{_PROBE}",
        )


def trusted_input_shape(
    x: fx.Node,
    root: fx.Node,
    weight: torch.Tensor,
    geometry: tuple[Sequence[int], Sequence[int], Sequence[int], int],
) -> tuple[object, ...] | None:
    """``x``'s shape when it fits the weight and the conv's result, else None (unknown).

    ``root`` is the match's root (its shape is the conv's result), ``geometry`` the conv's
    (stride, padding, dilation, groups) as the graph writes it.

    ``meta['val']`` can be stale (batch norms swapped after QAT keep a pattern's example shape,
    see ``qalgebra.fusions.conv.input_shape_hint``): a stale shape must not decide.
    """
    shape = known_shape(x)
    stride, padding, dilation, groups = geometry
    if shape is None or len(shape) != weight.dim() or shape[1] != weight.shape[1] * groups:
        return None
    result = known_shape(root)
    if result is None or len(result) != len(shape):
        return shape  # nothing to compare with
    inputs = [n for n in shape[2:] if type(n) is int]
    outputs = [n for n in result[2:] if type(n) is int]
    if len(inputs) != len(shape) - 2 or len(outputs) != len(inputs):
        return shape  # symbolic sizes: judged by their lower bounds
    expected = [
        _output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(inputs, weight.shape[2:], stride, padding, dilation, strict=True)
    ]
    return shape if outputs == expected else None


def _describe(shape: Sequence[object] | None) -> str:
    return "of unknown shape" if shape is None else str(list(shape))
