"""docs/writing-a-fusion.md is run: the file it shows is the one the tests load from outside the
repository, and each command it shows works on that file, in a directory outside the repository.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from torch import fx
from typer.testing import CliRunner

from qalgebra.cli import app

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "writing-a-fusion.md"
USER_FILE = Path(__file__).resolve().parent / "user_fusions" / "qrelu.py"

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_shows_the_file_the_tests_load() -> None:
    *_, whole = _blocks("python")
    assert whole == USER_FILE.read_text()


def _program(path: Path) -> None:
    """A program with one relu chain ``qrelu`` lowers and one whose qparams differ."""
    g = fx.Graph()
    x = g.placeholder("x")
    q = (0.05, 3, 0, 127, torch.uint8)
    levels = g.call_function(qd.quantize_per_tensor.default, (x, *q))
    outputs = []
    for out in (q, (0.1, 3, 0, 127, torch.uint8)):
        relu = g.call_function(
            aten.relu.default, (g.call_function(qd.dequantize_per_tensor.default, (levels, *q)),)
        )
        again = g.call_function(qd.quantize_per_tensor.default, (relu, *out))
        outputs.append(g.call_function(qd.dequantize_per_tensor.default, (again, *out)))
    g.output(tuple(outputs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    torch.export.save(torch.export.export(gm, (torch.randn(2, 8),)), str(path))


def _commands() -> list[list[str]]:
    (console,) = _blocks("console")
    return [shlex.split(line[2:]) for line in console.splitlines() if line.startswith("$ ")]


def test_the_guide_shows_every_command() -> None:
    assert [c[1] for c in _commands()] == ["catalog", "lower", "explain", "fuzz"]


@pytest.mark.parametrize("index", range(4), ids=["catalog", "lower", "explain", "fuzz"])
def test_each_command_of_the_guide_works_outside_the_repository(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine").mkdir()
    shutil.copy(USER_FILE, tmp_path / "mine" / "qrelu.py")
    _program(tmp_path / "program.pt2")
    monkeypatch.chdir(tmp_path)
    command = _commands()[index]
    assert command[0] == "qalgebra"
    args = command[1:]
    if args[0] == "fuzz":  # one process, a database of its own
        args += ["--workers", "1", "--seed", "1", "--db", str(tmp_path / "db")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "qrelu" in result.output
    if args[0] == "lower":
        assert "qrelu: fired 1x" in result.output and "near miss qrelu" in result.output
