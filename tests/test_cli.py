"""The ``qalgebra`` command line, driven through typer's CliRunner (in-process)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from qalgebra import Mismatch, fuzz
from qalgebra.cli import _explain_one, app
from qalgebra.fuzz import default_workers
from qalgebra.lower import DEFAULT_FUSIONS
from qalgebra.testing import campaign
from qalgebra.testing.models import build
from qalgebra.testing.properties import PropertyFailure
from qalgebra.testing.quantize import quantize_pt2e

# Wide enough that rich never wraps a table cell or a line the assertions read.
ENV = {"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


@pytest.fixture(scope="module")
def demo_quick() -> Result:
    return invoke("demo", "--quick")


def test_catalog_lists_every_fusion_in_priority_order() -> None:
    result = invoke("catalog")
    assert result.exit_code == 0, result.output
    rows = re.findall(r"│ +(\d+) │ (\w+) +│", result.output)
    assert rows == [(str(i), f.name) for i, f in enumerate(DEFAULT_FUSIONS, 1)], result.output
    for fusion in DEFAULT_FUSIONS:
        assert fusion.family in result.output


def test_demo_quick_reports_fusions_numerics_and_speed(demo_quick: Result) -> None:
    out = demo_quick.output
    assert demo_quick.exit_code == 0, out
    # The ResNet-style stack fires the conv families, the FFN stack the linear ones.
    fired = set(re.findall(r"│ (?:resnet_like|ffn_stack)\S* +│ (\w+) +│ +[1-9]", out))
    assert {"qconv", "qconv_binary", "qlinear", "qlinear_binary"} <= fired, out
    numerics = re.findall(r"numerics (\S+): qalgebra max abs diff (\S+), torchao (\S+)", out)
    assert [name for name, _, _ in numerics] == ["resnet_like(1)", "ffn_stack(1,3d)"], out
    for _, qalgebra_diff, _ in numerics:
        assert math.isfinite(float(qalgebra_diff)) and float(qalgebra_diff) < 1e-3, out
    for title in ("Lowering time", "Steady-state runtime", "fp32 eager", "torchao/qalgebra"):
        assert title in out
    assert "Traceback" not in out


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_lower_bad_path_fails_with_a_message_and_no_traceback(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.pt2"
    if kind == "garbage":
        path.write_text("not a saved program")
    result = invoke("lower", str(path))
    assert result.exit_code != 0
    expected = "no such file" if kind == "missing" else "not a program saved with torch.export.save"
    assert "error:" in result.output and expected in result.output, result.output
    assert str(path) in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_lower_saved_program_prints_the_report_and_numerics(tmp_path: Path) -> None:
    model, inputs = build("conv2d_relu")
    converted = quantize_pt2e(model, inputs, reduce_range=True)  # exact on every CPU
    path = tmp_path / "conv2d_relu.pt2"
    torch.export.save(torch.export.export(converted, inputs), str(path))
    result = invoke("lower", str(path))
    assert result.exit_code == 0, result.output
    assert re.search(r"qconv: fired 2x, consumed \d+ nodes", result.output), result.output
    match = re.search(r"numerics: max abs diff vs the program run eagerly: (\S+)", result.output)
    assert match is not None and float(match.group(1)) < 1e-4, result.output


def test_explain_says_matches_or_why_not() -> None:
    matches = invoke("explain", "--model", "conv2d_relu", "--fusion", "qconv", "--node", "conv2d")
    assert matches.exit_code == 0, matches.output
    assert "qconv matches at node conv2d" in matches.output
    why = invoke(
        "explain", "--model", "conv2d_relu", "--fusion", "qconv_binary", "--node", "conv2d"
    )
    assert why.exit_code == 0, why.output
    assert "qconv_binary does not match at node conv2d" in why.output
    for field in ("path:", "node:", "reason:"):
        assert field in why.output


def test_explain_shows_every_alternative_that_fails_as_far_in() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    add = graph.call_function(torch.ops.aten.add.Tensor, (x, 3))
    first = Mismatch("expected {}, got {}", (1, 3), (".args[1]",), 3)
    tied = Mismatch("expected {}, got {}", (2, 3), (".args[1]",), 3)
    text = str(_explain_one("f", add, replace(first, tied=(tied,))))
    assert text.splitlines()[1:] == [
        "  path:   root.args[1]",
        "  node:   3",
        "  reason: expected 1, got 3",
        "  or",
        "  path:   root.args[1]",
        "  node:   3",
        "  reason: expected 2, got 3",
    ]


def test_explain_unknown_names_fail_with_suggestions() -> None:
    result = invoke("explain", "--model", "conv2d_rleu", "--fusion", "qconv")
    assert result.exit_code == 2
    assert "unknown model 'conv2d_rleu'" in result.output and "conv2d_relu" in result.output
    result = invoke("explain", "--model", "conv2d_relu", "--fusion", "nope")
    assert result.exit_code == 2 and "unknown fusion 'nope'" in result.output


# ---------------------------------------------------------------------------------------------
# fuzz


def campaign_row(output: str) -> list[str]:
    """The cells of the Campaign table's one row."""
    rows = re.findall(
        r"^│ +(\d+) │ +(\d+) │ +(\S+) │ +(\S+) │ +(\S+) │ +(\S+) │ +(\d+) │$", output, re.M
    )
    assert len(rows) == 1, output
    return list(rows[0])


def test_fuzz_shares_the_examples_between_the_default_workers(tmp_path: Path) -> None:
    result = invoke(
        "fuzz", "--max-examples", "6", "--seed", "3", "--families", "qlinear,qreshape",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    examples, failures, *_, seed, workers = campaign_row(result.output)
    assert (examples, failures, seed) == ("6", "0", "3")
    assert int(workers) == default_workers()
    families_table = result.output.split("Examples in which")[0]
    per_family = re.findall(r"^│ (qlinear|qreshape) +│ +(\d+) │", families_table, re.M)
    assert sum(int(n) for _, n in per_family) == 6, result.output
    assert "no failures" in result.output


def test_fuzz_compiled_checks_the_examples_through_torch_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eager(ex: object, *, fusions: object = None) -> object:
        raise PropertyFailure("numerics", "the eager check ran")

    monkeypatch.setattr(campaign, "check_example", eager)  # forked workers inherit it
    result = invoke(
        "fuzz", "--compiled", "--max-examples", "2", "--seed", "4", "--families", "qlinear",
        "--workers", "1", "--out", str(tmp_path / "out"), "--db", str(tmp_path / "db"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "checked through torch.compile" in result.output
    assert campaign_row(result.output)[:2] == ["2", "0"]


@pytest.mark.parametrize("workers", [1, 2])
def test_fuzz_workers_report_every_failure_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A property that fails everywhere: each worker writes its shrunk failure, the campaign
    merges them and fails (forked workers inherit the patched check)."""

    def fails(ex: object, *, fusions: object = None) -> object:
        raise PropertyFailure("numerics", "deliberately broken")

    monkeypatch.setattr(campaign, "check_example", fails)
    monkeypatch.setenv("QALGEBRA_HYPOTHESIS_DB", str(tmp_path / "db"))
    summary = fuzz.run_campaign(
        2 * workers, None, 5, ["qlinear"], tmp_path / "out", workers=workers, quiet=True
    )
    assert summary.exit_code == 1 and summary.workers == workers
    assert len(summary.failures) == 2 * workers  # one per Hypothesis run: 1 example each
    assert summary.examples == 2 * workers
    assert {f.prop for f in summary.failures} == {"numerics"}
    assert all(
        f.path.exists() and "deliberately broken" in f.path.read_text() for f in summary.failures
    )


def test_the_refusals_table_lists_failed_rewrites_too() -> None:
    from rich.console import Console

    from qalgebra.cli import _refusals_table
    from qalgebra.lower import FailedRewrite, LoweringReport, RefusedMatch
    from qalgebra.measure import Comparison

    report = LoweringReport(
        refused=[RefusedMatch("qlinear", "linear", "weight dtype torch.float32 is not int8")],
        failed=[FailedRewrite("qconv", "conv2d", "RuntimeError: could not create a primitive")],
    )
    table = _refusals_table([Comparison("m", report=report)])
    assert table is not None
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "weight dtype torch.float32 is not int8" in text
    assert "failed, rolled back: RuntimeError: could not create a primitive" in text
