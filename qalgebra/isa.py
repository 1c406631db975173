"""What this CPU's oneDNN int8 kernels can do, found by asking them, not by reading CPU flags.

Without AVX512-VNNI or AMX, oneDNN multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds adjacent products in saturating int16: ``255 * 127 * 2`` overflows and
the result is silently wrong. ``int8_pairs_saturate()`` runs one tiny product to find out, and
``pair_sum_may_saturate`` says whether given operand ranges are at risk.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "INT16_MAX",
    "int8_pairs_saturate",
    "pair_sum_may_saturate",
    "qconv_binary_emits_bf16",
    "qlinear_binary_emits_bf16",
]

INT16_MAX = 32767


@functools.cache
def int8_pairs_saturate() -> bool:
    """True when oneDNN's u8 x s8 products saturate in int16 pairs on this machine."""
    onednn = torch.ops.onednn
    weight = torch.full((1, 2), 127, dtype=torch.int8)
    packed = onednn.qlinear_prepack(weight, None)
    x = torch.full((1, 2), 255, dtype=torch.uint8)
    scales = torch.ones(1)
    zero_points = torch.zeros(1, dtype=torch.int64)
    y = onednn.qlinear_pointwise(
        x, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return float(y.item()) != 2.0 * 255 * 127


def pair_sum_may_saturate(max_abs_activation: int, weight: torch.Tensor) -> bool:
    """Whether two adjacent products of these ranges can leave int16 on a saturating CPU."""
    if not int8_pairs_saturate():
        return False
    max_abs_weight = int(weight.to(torch.int16).abs().max().item()) if weight.numel() else 0
    return 2 * max_abs_activation * max_abs_weight > INT16_MAX


@functools.cache
def qlinear_binary_emits_bf16() -> bool:
    """Whether ``onednn.qlinear_pointwise.binary`` accepts a bf16 ``other`` and output here."""
    onednn = torch.ops.onednn
    packed = onednn.qlinear_prepack(torch.ones((2, 2), dtype=torch.int8), None)
    x = torch.ones((1, 2), dtype=torch.uint8)
    other = torch.zeros((1, 2), dtype=torch.bfloat16)
    try:
        onednn.qlinear_pointwise.binary(
            x, 1.0, 0, packed, torch.ones(2), torch.zeros(2, dtype=torch.int64), other, None,
            1.0, 0, torch.bfloat16, 1.0, 0, "add", 1.0, "none", [], "",
        )  # fmt: skip
    except RuntimeError:
        return False
    return True


@functools.cache
def qconv_binary_emits_bf16() -> bool:
    """Whether ``onednn.qconv2d_pointwise.binary`` accepts a bf16 accumulator and output here."""
    onednn = torch.ops.onednn
    weight = torch.ones((2, 2, 1, 1), dtype=torch.int8)
    scales = torch.ones(2)
    packed = onednn.qconv_prepack(weight, scales, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    x = torch.ones((1, 2, 2, 2), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    accum = torch.zeros((1, 2, 2, 2), dtype=torch.bfloat16)
    accum = accum.contiguous(memory_format=torch.channels_last)
    try:
        onednn.qconv2d_pointwise.binary(
            x, 1.0, 0, packed, scales, torch.zeros(2, dtype=torch.int64), accum, None,
            [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.bfloat16, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip
    except RuntimeError:
        return False
    return True
