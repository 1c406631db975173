"""Static types: the typing table holds at run time, and mypy refuses misused Vars.

``tests/typing_cases/typing_table.py`` is a table of ``assert_type`` cases. The normal ``mypy`` run
checks it; here it is run against real matches (each case also checks the runtime type), and
mypy is run on it and on snippets that misuse typed captures: each misuse must be reported at
its line, and the same code written correctly must pass.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
from graphs import QP, ChannelQP, GraphBuilder, dequantize, dequantize_weight, getitem, quantize
from mypy import api as mypy_api

from qalgebra import call, dtype_of, list_of, tag
from qalgebra.combinators import Unary, dequantize_per_channel, dequantize_per_tensor
from qalgebra.match import find_matches, match_node

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

REPO = Path(__file__).resolve().parent.parent
TABLE = Path(__file__).resolve().parent / "typing_cases" / "typing_table.py"


def _load_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qalgebra_typing_table", TABLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_typing_table_holds_at_run_time() -> None:
    t = _load_table()
    assert len(t.pattern_table()) == 14
    assert t.check_table().describe()

    b = GraphBuilder()
    x = b.input()
    q = quantize(b, x, QP())
    d = dequantize(b, q, QP())
    view = b.op(aten.view.default, b.op(aten.relu.default, d), [2, 3])
    cat = b.op(aten.cat.default, [b.op(aten.relu.default, x), b.op(aten.relu.default, view)])
    _, w = dequantize_weight(b, cp=ChannelQP())
    gm = b.module()

    (m,) = find_matches(dequantize_per_tensor(t.X, t.QP), gm)
    t.qparams_table(m)
    runtime = GraphBuilder()
    chosen = runtime.op(qd.choose_qparams.tensor, runtime.input(), 0, 255, 1e-5, torch.uint8)
    scale, zp = getitem(runtime, chosen, 0), getitem(runtime, chosen, 1)
    rq = runtime.op(qd.quantize_per_tensor.tensor, runtime.input("y"), scale, zp, 0, 255,
                    torch.uint8, meta=False)  # fmt: skip
    runtime.op(qd.dequantize_per_tensor.tensor, rq, scale, zp, 0, 255, torch.uint8, meta=False)
    (m_runtime,) = find_matches(dequantize_per_tensor(t.X, t.QPR), runtime.module())
    t.runtime_table(m_runtime)
    relu_tagged = tag(call(aten.relu.default, dtype_of(t.X, t.DT)), t.U, Unary.RELU)
    m_view = match_node(call(aten.view.default, relu_tagged, t.SHAPE), view)
    assert m_view is not None
    t.scalar_table(m_view)
    m_cat = match_node(call(aten.cat.default, list_of(call(aten.relu.default, t.E))), cat)
    assert m_cat is not None
    t.each_table(m_cat)
    m_w = match_node(dequantize_per_channel(t.X, t.CP), w)
    assert m_w is not None
    t.weight_table(m_w)
    t.matcher_table(call(aten.relu.default, t.X), gm, cat)


#: (snippet, the lines mypy must flag). Each misuse is paired with its correct form in GOOD.
BAD = textwrap.dedent(
    """\
    import torch
    from qalgebra import Match, Var, call, dtype_of, tag
    from qalgebra.qparams import qparams


    def needs_node(n: torch.fx.Node) -> None: ...


    def needs_float(s: float) -> None: ...


    def misuse(m: Match) -> None:
        needs_node(m[Var("s", float)])  # MISUSE: a float where a node is required
        zp: float = m[qparams("x").zero_point]  # fine: an int is a float
        qmin: int = m[qparams("x").scale]  # MISUSE: a float is no int
        relu = call(torch.ops.aten.relu.default, Var("x", torch.fx.Node))
        tag(relu, Var("k", int), "two")  # MISUSE: the tag's value must be an int
        dtype_of(relu, Var("d", int))  # MISUSE: dtype_of binds a torch.dtype
        for n in m.each(Var("e", float)):
            needs_node(n)  # MISUSE: the elements are floats
        needs_float(qparams("x", runtime=True).read(m).scale)  # MISUSE: maybe a runtime node
    """
)
GOOD = textwrap.dedent(
    """\
    import torch
    from qalgebra import Match, Var, call, dtype_of, tag
    from qalgebra.qparams import qparams


    def needs_node(n: torch.fx.Node) -> None: ...


    def needs_float(s: float) -> None: ...


    def use(m: Match) -> None:
        needs_node(m[Var("x", torch.fx.Node)])
        zp: float = m[qparams("x").zero_point]
        qmin: int = m[qparams("x").quant_min]
        relu = call(torch.ops.aten.relu.default, Var("x", torch.fx.Node))
        tag(relu, Var("k", int), 2)
        dtype_of(relu, Var("d", torch.dtype))
        for n in m.each(Var("e", torch.fx.Node)):
            needs_node(n)
        needs_float(m[qparams("x", runtime=True).scale])
    """
)


def _errors(report: str, path: Path) -> dict[int, str]:
    # By file name: mypy's cache may report an unchanged snippet under the path it was first
    # checked at (another pytest tmp_path).
    out: dict[int, str] = {}
    for line in report.splitlines():
        found = re.match(rf"(?:.*/)?{re.escape(path.name)}:(\d+): error: (.*)", line)
        if found:
            out[int(found.group(1))] = found.group(2)
    return out


def test_mypy_refuses_misused_vars_and_accepts_the_correct_code(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad_snippet.py", tmp_path / "good_snippet.py"
    bad.write_text(BAD)
    good.write_text(GOOD)
    args = [str(bad), str(good), str(TABLE), "--strict", "--no-error-summary",
            "--show-absolute-path", "--cache-dir", str(REPO / ".mypy_cache")]
    config = REPO / "mypy.ini"
    if config.exists():
        args += ["--config-file", str(config)]
    stdout, stderr, status = mypy_api.run(args)
    assert status in (0, 1), stderr  # 2 would be a crash or a usage error
    report = stdout + stderr
    expected = {i for i, line in enumerate(BAD.splitlines(), 1) if "# MISUSE" in line}
    errors = _errors(report, bad)
    assert set(errors) == expected, report
    assert "incompatible type \"float\"; expected \"Node\"" in errors[min(expected)]
    assert _errors(report, good) == {}, report
    assert _errors(report, TABLE) == {}, report


@pytest.mark.parametrize("line", [line for line in BAD.splitlines() if "# MISUSE" in line])
def test_each_misuse_has_a_correct_counterpart(line: str) -> None:
    """The GOOD snippet is the BAD one with each misuse fixed (so a pass proves the fix)."""
    assert len(BAD.splitlines()) == len(GOOD.splitlines())
    index = BAD.splitlines().index(line)
    assert GOOD.splitlines()[index] != line
    assert GOOD.splitlines()[index].split("(")[0] == line.split("(")[0]
