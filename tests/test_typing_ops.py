"""Static types of calls through ``qalgebra.ops`` (checked by mypy) and a runtime smoke test.

Every ``assert_type`` below is checked twice: mypy verifies the static type when the suite is
type-checked, and the call itself runs here against the real kernels.
"""

from __future__ import annotations

from typing import assert_type

import torch
from torch._ops import OpOverload, OpOverloadPacket

from qalgebra.ops import aten, onednn, prims, quantized, quantized_decomposed

X_SCALE, X_ZP = 0.05, 128
QMIN_U8, QMAX_U8 = 0, 255
QMIN_S8, QMAX_S8 = -128, 127


def _quantized_linear_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    qx = quantized_decomposed.quantize_per_tensor.default(
        x, X_SCALE, X_ZP, QMIN_U8, QMAX_U8, torch.uint8
    )
    w_scales = w.abs().amax(dim=1) / QMAX_S8
    w_zps = torch.zeros(3, dtype=torch.int64)
    qw = quantized_decomposed.quantize_per_channel.default(
        w, w_scales, w_zps, 0, QMIN_S8, QMAX_S8, torch.int8
    )
    return assert_type(qx, torch.Tensor), qw, w_scales, w_zps


def test_qlinear_matches_the_dequantized_reference() -> None:
    qx, qw, w_scales, w_zps = _quantized_linear_operands()
    bias = torch.randn(3)
    packed = assert_type(onednn.qlinear_prepack.default(qw, None), torch.Tensor)
    y = onednn.qlinear_pointwise.default(
        qx, X_SCALE, X_ZP, packed, w_scales, w_zps, bias, 1.0, 0, torch.float32, "none", [], ""
    )
    assert_type(y, torch.Tensor)

    x_ref = quantized_decomposed.dequantize_per_tensor.default(
        qx, X_SCALE, X_ZP, QMIN_U8, QMAX_U8, torch.uint8
    )
    w_ref = quantized_decomposed.dequantize_per_channel(
        qw, w_scales, w_zps, 0, QMIN_S8, QMAX_S8, torch.int8
    )
    expected = aten.linear.default(x_ref, w_ref, bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_qconv_prepack_through_the_packet() -> None:
    w = torch.randint(QMIN_S8, QMAX_S8, (4, 2, 3, 3), dtype=torch.int8)
    packed = onednn.qconv_prepack(w, torch.ones(4), X_SCALE, 0, [1, 1], [0, 0], [1, 1], 1)
    assert_type(packed, torch.Tensor)
    assert packed.dtype == torch.int8


def test_tuple_returns_and_aten_packets() -> None:
    x = torch.randn(2, 3, 8, 8)
    scale, zero_point = quantized_decomposed.choose_qparams.tensor(
        x, QMIN_S8, QMAX_S8, 1e-5, torch.int8
    )
    assert_type(scale, torch.Tensor)
    assert_type(zero_point, torch.Tensor)
    assert_type(aten.add(x, 1.0), torch.Tensor)  # the packet resolves to add.Scalar statically
    assert_type(aten.to.dtype(x, torch.bfloat16), torch.Tensor)
    assert_type(aten.max_pool2d.default(x, 2), torch.Tensor)  # int[2] takes a bare int
    assert_type(prims.convert_element_type.default(x, torch.float16), torch.Tensor)
    q = quantized_decomposed.quantize_per_tensor(x, 0.1, 0, QMIN_U8, QMAX_U8, torch.uint8)
    assert_type(aten.add.int(1, 2), int)
    pooled = quantized.max_pool2d.default(q, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert_type(pooled, torch.Tensor)
    assert pooled.shape == (2, 3, 4, 4)


def test_overloads_and_packets_keep_the_torch_types() -> None:
    overload: OpOverload = onednn.qconv_pointwise.tensor
    packet: OpOverloadPacket = onednn.qconv_pointwise
    assert isinstance(overload, OpOverload)
    assert isinstance(packet, OpOverloadPacket)
    assert overload.overloadpacket is packet
    assert onednn.qconv_pointwise.default is torch.ops.onednn.qconv_pointwise.default


def _calls_the_stubs_reject(w: torch.Tensor) -> None:
    """Never run: mypy must report each call, or ``warn_unused_ignores`` (strict) fails the check.

    Each ``type: ignore`` here is the assertion itself, not a silenced error: it proves the stub
    types the call (a call typed ``Any`` would make the ignore unused).
    """
    onednn.qconv_prepack.default(w, w, "0.1", 0, [1], [0], [1], 1)  # type: ignore[arg-type]
    onednn.qlinear_prepack.default(w)  # type: ignore[call-arg]
    assert onednn.qlinear_pointwize  # type: ignore[attr-defined]
