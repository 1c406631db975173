"""Graphs on which oneDNN's AVX512/AMX int8 conv crashed or erred (docs/findings.md, bug 5).

A crash (segfault in oneDNN) takes the interpreter with it, so each crash reproducer runs in a
subprocess; on a CPU where the kernel never misbehaved, the structural checks beside them (how
the lowering calls the kernel) still fail if a fix is undone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalgebra.combinators import Unary
from qalgebra.lower import lower
from qalgebra.testing.properties import check_example
from qalgebra.testing.strategies import (
    ConvSpec,
    Example,
    GraphSpec,
    Layer,
    QuantSpec,
    Residual,
    build_example,
)

onednn = torch.ops.onednn


def _u8(scale: float, zero_point: int) -> QuantSpec:
    return QuantSpec(scale, zero_point, 0, 127, torch.uint8)


#: ``qalgebra fuzz --max-examples 600 --seed 73115`` (bug 5 in docs/findings.md): the consumer
#: conv has a (3, 1) kernel dilated (2, 2) on a width-1 input padded by 1 with stride 2, so
#: both output columns read only padding; oneDNN's AVX512/AMX kernel segfaulted on it.
DILATED_WIDTH_ONE = build_example(
    GraphSpec(
        family="qconv",
        input_shape=(1, 1, 6, 3),
        input_quant=_u8(0.0029929111549338652, 111),
        main=Layer(
            ConvSpec(1, 1, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 2), bias=False,
                     spelling="convolution"),
            weight_max=127, weight_scale=0.003384453254663177, seed=1267,
        ),
        output_quant=_u8(0.04640548981105647, 0),
        returns="dequantized",
        consumer=Layer(
            ConvSpec(1, 7, (3, 1), stride=(2, 2), padding=(1, 1), dilation=(2, 2), bias=False,
                     spelling="convolution"),
            Unary.SILU, weight_max=127, weight_scale=0.0469717094869088, seed=180,
        ),
        dtype="bf16",
        meta="all",
        seed=1052,
    ),
    form="op",
)  # fmt: skip
#: The binary conv calls the same kernel: a (1, 1) kernel dilated (1, 2) on a width-1 input.
DILATED_WIDTH_ONE_BINARY = build_example(
    GraphSpec(
        family="qconv_binary",
        input_shape=(1, 2, 3, 1),
        input_quant=_u8(0.02, 3),
        main=Layer(
            ConvSpec(2, 4, (1, 1), stride=(1, 2), padding=(0, 1), dilation=(1, 2)), seed=5
        ),
        residual=Residual("float"),
        returns="float",
    ),
    form="op",
)
CRASHERS = {"qconv": DILATED_WIDTH_ONE, "qconv_binary": DILATED_WIDTH_ONE_BINARY}
#: A single output column from a strided window: wrong on AMX (lowered, and eager bf16 too).
SINGLE_COLUMN = build_example(
    GraphSpec(
        family="qconv",
        input_shape=(1, 4, 6, 6),
        input_quant=_u8(0.03, 5),
        main=Layer(ConvSpec(4, 4, (2, 3), stride=(1, 2), dilation=(1, 2)), seed=7),
    ),
    form="op",
)


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_reproducer_runs_without_crashing(name: str, tmp_path: Path) -> None:
    script = tmp_path / f"reproduce_{name}.py"
    script.write_text(CRASHERS[name].code())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    died = f" (killed by {signal.Signals(-done.returncode).name})" if done.returncode < 0 else ""
    assert done.returncode == 0, f"exit {done.returncode}{died}\n{done.stderr[-3000:]}"


def _conv_calls(ex: Example) -> list[torch.fx.Node]:
    targets = (onednn.qconv_pointwise.default, onednn.qconv2d_pointwise.binary)
    return [n for n in lower(ex.gm, ex.inputs).graph.nodes if n.target in targets]


def test_size_one_kernel_dimensions_are_called_undilated() -> None:
    first, consumer = _conv_calls(DILATED_WIDTH_ONE)
    assert first.args[9] == [2, 2]  # a (2, 3) kernel keeps its dilation
    assert consumer.args[9] == [2, 1]  # a (3, 1) kernel: the width-1 dimension is not dilated
    (binary,) = _conv_calls(DILATED_WIDTH_ONE_BINARY)
    assert binary.args[10] == [1, 1]


def test_a_single_output_column_is_computed_from_its_window() -> None:
    (call,) = _conv_calls(SINGLE_COLUMN)
    stride, padding = call.args[7], call.args[8]
    assert stride == [1, 1] and padding == [0, 0]  # width: unstrided, unpadded
    window = call.args[0]
    assert isinstance(window, torch.fx.Node)
    assert window.target is torch.ops.aten.constant_pad_nd.default
    assert window.args[1] == [0, -1, 0, 0] and window.args[2] == 5  # its 5 columns; zp 5
    check_example(SINGLE_COLUMN)  # against the reference


#: A window of padding only: a (2, 1) kernel with height padding 2 on a 1-row input.
PADDING_ONLY_WINDOW = build_example(
    GraphSpec(
        family="qconv",
        input_shape=(1, 1, 1, 5),
        input_quant=_u8(0.03, 7),
        main=Layer(ConvSpec(1, 6, (2, 1), padding=(2, 0)), seed=9),
    ),
    form="op",
)


def test_a_window_of_padding_only_reads_explicit_padding() -> None:
    (call,) = _conv_calls(PADDING_ONLY_WINDOW)
    assert call.args[8] == [0, 0]  # the conv runs unpadded
    padded = call.args[0]
    assert isinstance(padded, torch.fx.Node)
    assert padded.target is torch.ops.aten.constant_pad_nd.default
    assert padded.args[1] == [0, 0, 2, 2] and padded.args[2] == 7  # height 2 + 2, zero point
    check_example(PADDING_ONLY_WINDOW)
