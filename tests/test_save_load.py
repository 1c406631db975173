"""qalgebra.artifact: a quantized model saved by one process, lowered and run by another."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx
from typer.testing import CliRunner

from qalgebra.artifact import FORMAT, load, load_with_report, save
from qalgebra.cli import app
from qalgebra.errors import LoweringError, UnsupportedGraphError
from qalgebra.fusions import DEFAULT_FUSIONS
from qalgebra.fusions.conv import QCONV
from qalgebra.lower import lower
from qalgebra.testing.models import build
from qalgebra.testing.oracle import assert_outputs_close, output_quant_steps
from qalgebra.testing.quantize import quantize_pt2e

pytestmark = pytest.mark.usefixtures("one_thread")


def the_step(gm: fx.GraphModule) -> float | None:
    """The quantization step of a one-output model's output (None: a compute op's output)."""
    (step,) = output_quant_steps(gm)
    return step


#: Runs in a fresh interpreter: loads the artifact, runs it lowered and compiled, saves outputs.
FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from qalgebra.artifact import load_with_report, load_compiled
    path, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    lowered, report, info = load_with_report(path)
    compiled = load_compiled(path)
    with torch.no_grad():
        outputs = {"lowered": lowered(*inputs), "compiled": compiled(*inputs)}
    outputs["fired"] = dict(report.fired)
    outputs["saved_fired"] = dict(info.fired)
    torch.save(outputs, out_path)
    """
)


def test_a_saved_model_runs_lowered_and_compiled_in_a_fresh_process(tmp_path: Path) -> None:
    model, inputs = build("conv_add_conv_rhs_relu")
    gm = quantize_pt2e(model, inputs)
    path = tmp_path / "conv_add.pt2"
    info = save(gm, path, inputs)
    assert info.format == FORMAT and info.fired["qconv_binary"] == 1
    here = lower(gm, inputs)
    with torch.no_grad():
        reference, lowered_here = gm(*inputs), here(*inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    there = torch.load(tmp_path / "out.pt")
    assert there["fired"] == there["saved_fired"] == dict(info.fired)
    assert torch.equal(there["lowered"], lowered_here)  # the same lowering, the same machine
    steps = the_step(gm)
    assert_outputs_close(reference, there["lowered"], quant_step=steps)
    assert_outputs_close(reference, there["compiled"], quant_step=steps)


def test_a_dynamic_batch_artifact_runs_any_batch(tmp_path: Path) -> None:
    model, inputs = build("linear3d_relu")
    gm = quantize_pt2e(model, inputs, dynamic_batch=True)
    path = tmp_path / "linear.pt2"
    save(gm, path, inputs, dynamic_shapes=({0: torch.export.Dim("batch")},))
    loaded, report, _ = load_with_report(path)
    assert report.fired["qlinear"] == 2
    x = torch.randn(5, *inputs[0].shape[1:])
    with torch.no_grad():
        assert_outputs_close(gm(x), loaded(x), quant_step=the_step(gm))


def test_saving_a_lowered_module_is_refused(tmp_path: Path) -> None:
    model, inputs = build("conv2d_relu")
    lowered = lower(quantize_pt2e(model, inputs), inputs)
    with pytest.raises(UnsupportedGraphError, match="already lowered"):
        save(lowered, tmp_path / "x.pt2", inputs)
    assert not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("kind", ["plain_program", "garbage"])
def test_loading_what_is_not_an_artifact_says_so(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pt2"
    if kind == "garbage":
        path.write_text("not a program")
        expected = "not a program saved by"
    else:
        model, inputs = build("conv2d_relu")
        torch.export.save(torch.export.export(quantize_pt2e(model, inputs), inputs), path)
        expected = "without qalgebra's metadata"
    with pytest.raises(UnsupportedGraphError, match=expected):
        load(path)


def test_a_users_fusion_must_be_given_again_at_load(tmp_path: Path) -> None:
    mine = dataclasses.replace(QCONV, name="my_qconv")
    fusions = tuple(mine if f is QCONV else f for f in DEFAULT_FUSIONS)
    model, inputs = build("conv2d_relu")
    path = tmp_path / "conv.pt2"
    assert save(quantize_pt2e(model, inputs), path, inputs, fusions=fusions).fired["my_qconv"] == 2
    with pytest.raises(LoweringError, match="my_qconv"):
        load(path)
    _, report, _ = load_with_report(path, fusions=fusions)
    assert report.fired["my_qconv"] == 2


def test_cli_lower_out_writes_an_artifact(tmp_path: Path) -> None:
    model, inputs = build("conv2d_relu")
    gm = quantize_pt2e(model, inputs)
    program, out = tmp_path / "conv.pt2", tmp_path / "conv.qalgebra.pt2"
    torch.export.save(torch.export.export(gm, inputs), program)
    result = CliRunner().invoke(app, ["lower", str(program), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.replace("\n", "")
    loaded, report, info = load_with_report(out)
    assert report.fired["qconv"] == info.fired["qconv"] == 2
    with torch.no_grad():
        assert_outputs_close(gm(*inputs), loaded(*inputs), quant_step=the_step(gm))
