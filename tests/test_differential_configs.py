"""Differential tests for the other quantization configs: qalgebra against torchao's lowering.

torchao's ``lower_pt2e_quantized_to_x86`` (Inductor's fusion passes) lowers the dynamic config's
2-D linears to ``qlinear_pointwise.tensor`` / ``.binary_tensor``: there qalgebra must fuse at
least as much, and both must agree with the reference. What qalgebra lowers beyond it is pinned:
torchao leaves dynamic 3-D linears, dynamic convs and per-tensor weights in float (and its conv
with int8 activations fails at run time: tests/test_differential.py). docs/findings.md lists
them ("Differential: torchao").
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from test_lower import EXPECTED, assert_close_to_reference
from test_lower_configs import (
    DYNAMIC_EXPECTED,
    _fired,
    _model,
    assert_close_to_dynamic_reference,
)
from torch import fx

from qalgebra.lower import lower_with_report
from qalgebra.testing.quantize import quantize_pt2e, torchao_lower

onednn = torch.ops.onednn

pytestmark = pytest.mark.usefixtures("one_thread")

#: The fused ops counted on both sides.
FUSED = (
    onednn.qlinear_pointwise.default,
    onednn.qlinear_pointwise.tensor,
    onednn.qlinear_pointwise.binary,
    onednn.qlinear_pointwise.binary_tensor,
    onednn.qconv_pointwise.default,
    onednn.qconv_pointwise.tensor,
    onednn.qconv2d_pointwise.binary,
)


def _fused(gm: fx.GraphModule) -> Counter[object]:
    return Counter(
        n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in FUSED
    )


def _quantized(name: str, **config: Any) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = _model(name)
    return quantize_pt2e(model, inputs, reduce_range=True, **config), inputs


@pytest.mark.parametrize("is_qat", [False, True], ids=["ptq", "qat"])
@pytest.mark.parametrize("name", ["linear_relu", "linear_add_linear_rhs_relu", "promotion_2d"])
def test_dynamic_linears_fuse_at_least_what_torchao_fuses(name: str, is_qat: bool) -> None:
    gm, inputs = _quantized(name, dynamic=True, is_qat=is_qat)
    theirs = torchao_lower(gm, inputs)
    ours, report = lower_with_report(gm, inputs)
    assert _fired(report) == DYNAMIC_EXPECTED[name]
    assert sum(_fused(theirs).values()) > 0, "torchao fuses the dynamic 2-D linears"
    for op, count in _fused(theirs).items():
        assert _fused(ours)[op] >= count, (op, _fused(ours), _fused(theirs))
    assert_close_to_dynamic_reference(gm, theirs, inputs)
    assert_close_to_dynamic_reference(gm, ours, inputs)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("linear3d_relu", {"dynamic": True}),
        ("promotion_3d", {"dynamic": True}),
        ("conv2d_relu", {"dynamic": True}),
        ("conv2d_relu", {"weight_per_tensor": True}),
        ("linear_relu", {"weight_per_tensor": True}),
        ("conv_add_conv_lhs", {"weight_per_tensor": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else "+".join(v),
)
def test_torchao_leaves_in_float_what_qalgebra_lowers(name: str, config: dict[str, bool]) -> None:
    gm, inputs = _quantized(name, **config)
    theirs = torchao_lower(gm, inputs)
    assert not _fused(theirs), _fused(theirs)
    ours, report = lower_with_report(gm, inputs)
    expected = DYNAMIC_EXPECTED[name] if config.get("dynamic") else EXPECTED[name]
    assert _fired(report) == expected, report.summary()
    if config.get("dynamic"):
        assert_close_to_dynamic_reference(gm, ours, inputs)
    else:
        assert_close_to_reference(gm(*inputs), ours(*inputs), gm)
