"""A user's fusion, in a file outside the repository: loaded, placed in the catalog by priority,
checked by the catalog's properties (its own family and the catalog's, with it in place), and
used by the CLI (``--fusions`` for catalog, lower, explain and fuzz)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from torch import fx
from typer.testing import CliRunner, Result

from qalgebra import call, emit
from qalgebra.catalog import PREPARING, Placed, contains, load, placement, with_fusions
from qalgebra.cli import app
from qalgebra.combinators import dequantize_per_tensor
from qalgebra.errors import CatalogError
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion, Rewriter
from qalgebra.pattern import Match, Var
from qalgebra.qparams import qparams
from qalgebra.testing.campaign import family_test
from qalgebra.testing.families import FusionFamily, catalog_with, draw, witnesses
from qalgebra.testing.properties import PropertyFailure, check_example
from qalgebra.testing.strategies import families

REPO = Path(__file__).resolve().parents[1]
USER_FILE = Path(__file__).parent / "user_fusions" / "qrelu.py"
ENV = {"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"}
aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


@pytest.fixture(scope="module")
def user_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's file, copied where a user keeps it: outside the repository."""
    path = tmp_path_factory.mktemp("mine") / "qrelu.py"
    shutil.copy(USER_FILE, path)
    assert not path.resolve().is_relative_to(REPO)
    return path


@pytest.fixture(scope="module")
def family(user_file: Path) -> FusionFamily:
    (loaded,) = load(f"{user_file}:QRELU_FAMILY")
    assert isinstance(loaded, FusionFamily)
    return loaded


@pytest.fixture(scope="module")
def catalog(family: FusionFamily) -> tuple[Fusion, ...]:
    return catalog_with([family])


def _names(fusions: tuple[Fusion, ...]) -> list[str]:
    return [f.name for f in fusions]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_reads_fusions_from_a_file_or_a_module(user_file: Path) -> None:
    fusion, placed = load(f"{user_file}:QRELU, QRELU_BEFORE_QCONV")
    assert isinstance(fusion, Fusion) and fusion.name == "qrelu"
    assert isinstance(placed, Placed) and placed.fusion is fusion and placed.before == "qconv"
    assert (
        load("qalgebra.fusions:QCONV")[0] is DEFAULT_FUSIONS[_names(DEFAULT_FUSIONS).index("qconv")]
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{file}:NOPE", "defines no 'NOPE'; it defines: .*QRELU"),
        ("{file}", "expected FILE_OR_MODULE:NAME"),
        ("/nonexistent/mine.py:QRELU", "no such file"),
        ("no_such_module_here:QRELU", "no such file or module"),
    ],
)
def test_load_says_what_is_missing(user_file: Path, spec: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load(spec.format(file=user_file))


# ---------------------------------------------------------------------------------------------
# The properties, with the user's fusion in the catalog
# ---------------------------------------------------------------------------------------------


def test_user_examples_hold_with_the_user_fusion_and_fail_without(
    family: FusionFamily, catalog: tuple[Fusion, ...]
) -> None:
    examples = draw(family.examples(), 8)
    assert {ex.form for ex in examples} >= {"op", "decomposed"}, [ex.form for ex in examples]
    for ex in examples:
        outcome = check_example(ex, fusions=catalog)  # every property, the user's fusion in
        assert outcome.report.fired["qrelu"] == 1
        with pytest.raises(PropertyFailure, match=r"\[fires\].*'qrelu': \(1, 0\)"):
            check_example(ex)  # the default catalog does not lower it


def _wrong_levels(m: Match, rw: Rewriter) -> fx.Node:
    x = m[Var("x", fx.Node)]
    return emit.aten.clamp.default(rw, self=x, min=0, max=255)  # forgets the zero point


def test_a_wrong_user_rewrite_fails_the_numerics(family: FusionFamily) -> None:
    (mine,) = family.fusions
    assert isinstance(mine, Fusion)
    broken = Fusion("qrelu", "mine", mine.pattern, _wrong_levels)
    shifted = [ex for ex in draw(family.examples(), 30) if "zero_point=0," not in repr(ex)]
    failures = 0
    for ex in shifted:
        try:
            check_example(ex, fusions=with_fusions(DEFAULT_FUSIONS, [broken]))
        except PropertyFailure as failure:
            assert failure.prop == "numerics", failure
            failures += 1
    assert failures, "a rewrite that ignores the zero point went unnoticed"


@pytest.mark.parametrize("name", ["qconv", "qlinear_binary", "dequant_promotion", "qcat", "qrelu"])
def test_families_hold_with_the_user_fusion_in_place(
    name: str, family: FusionFamily, catalog: tuple[Fusion, ...]
) -> None:
    """The catalog's own properties rerun with the user's fusion added (and the user's)."""
    assert name in families()
    run = settings(
        max_examples=4,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )(family_test(fusions=catalog))
    run(family=name)


def _own_dequantize(m: Match, rw: Rewriter) -> fx.Node:
    """The same numbers, spelled as the catalog does not read a dequantize: the levels made
    float by ``x * 1.0`` (exact), not by a dtype conversion."""
    qp = qparams("d")
    as_float = emit.aten.mul.Scalar(rw, self=m[Var("x", fx.Node)], other=1.0)
    shifted = emit.aten.sub.Scalar(rw, self=as_float, other=m[qp.zero_point])
    return emit.aten.mul.Scalar(rw, self=shifted, other=m[qp.scale])


#: Takes every dequantize into the user's kernel: tried before qconv, it takes qconv's input.
OWN_DEQUANTIZE = Fusion(
    "own_dequantize",
    "mine",
    dequantize_per_tensor(Var("x", fx.Node), qparams("d")),
    _own_dequantize,
)


def test_the_catalog_families_catch_a_user_fusion_placed_wrongly() -> None:
    """Placed before qconv, the user's dequantize takes qconv's input: qconv no longer fires.
    Placed by containment (after qconv, whose match contains it), the family holds."""
    order = _names(DEFAULT_FUSIONS)
    computed = with_fusions(DEFAULT_FUSIONS, [OWN_DEQUANTIZE], witnesses=witnesses())
    assert _names(computed).index("own_dequantize") > order.index("qconv")
    runner = settings(
        max_examples=6, derandomize=True, database=None, deadline=None, phases=[Phase.generate]
    )
    runner(family_test(fusions=computed))(family="qconv")
    wrong = with_fusions(DEFAULT_FUSIONS, [OWN_DEQUANTIZE], before="qconv_binary")
    with pytest.raises(PropertyFailure, match=r"\[fires\].*'qconv': \(1, 0\)"):
        runner(family_test(fusions=wrong))(family="qconv")


# ---------------------------------------------------------------------------------------------
# Priority: containment
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containment() -> list[tuple[str, str]]:
    """The pairs of catalog fusions (outer, inner) where outer's match contains inner's."""
    corpus = witnesses()
    pairs = {
        (a.name, b.name)
        for a in DEFAULT_FUSIONS
        for b in DEFAULT_FUSIONS
        if a is not b and contains(a, b, corpus)
    }
    return sorted((a, b) for a, b in pairs if (b, a) not in pairs)  # one way round: it decides


def test_the_catalog_order_follows_containment(containment: list[tuple[str, str]]) -> None:
    order = _names(DEFAULT_FUSIONS)
    assert {("qconv_binary", "qconv"), ("qlinear_binary", "qlinear")} <= set(containment)
    wrong = [(a, b) for a, b in containment if order.index(a) > order.index(b)]
    assert wrong == []


def test_the_preparing_fusions_are_the_catalog_fusions_that_run_first() -> None:
    order = _names(DEFAULT_FUSIONS)
    assert set(order) >= PREPARING
    assert order[: len(PREPARING)] == [n for n in order if n in PREPARING]


def test_with_fusions_puts_each_catalog_fusion_back_in_order(
    containment: list[tuple[str, str]],
) -> None:
    """Take a fusion out, add it back by containment: every pair containment orders is kept."""
    corpus = witnesses()
    related = {name for pair in containment for name in pair}
    for fusion in DEFAULT_FUSIONS:
        if fusion.name not in related:
            continue
        rest = tuple(f for f in DEFAULT_FUSIONS if f is not fusion)
        order = _names(with_fusions(rest, [fusion], witnesses=corpus))
        wrong = [(a, b) for a, b in containment if order.index(a) > order.index(b)]
        assert wrong == [], fusion.name


def test_a_user_fusion_goes_before_what_it_contains_and_after_what_contains_it() -> None:
    corpus = witnesses()
    binary = next(f for f in DEFAULT_FUSIONS if f.name == "qlinear_binary")
    variant = Fusion("my_qlinear_binary", "mine", binary.pattern, lambda m, rw: m.root)
    order = _names(DEFAULT_FUSIONS)
    assert placement(DEFAULT_FUSIONS, variant, corpus) == order.index("qlinear")
    x = Var("x", fx.Node)
    relu = Fusion("my_relu", "mine", call(aten.relu.default, x), lambda m, rw: m.root)
    at = placement(DEFAULT_FUSIONS, relu, corpus)
    assert at > max(order.index(n) for n in ("qconv", "qlinear", "qconv_binary"))
    assert at == 1 + max(i for i, f in enumerate(DEFAULT_FUSIONS) if contains(f, relu, corpus))


def test_a_fusion_nothing_contains_goes_last(
    family: FusionFamily, catalog: tuple[Fusion, ...]
) -> None:
    assert _names(catalog) == [*_names(DEFAULT_FUSIONS), "qrelu"]


def test_explicit_places(family: FusionFamily) -> None:
    (mine,) = family.fusions
    assert isinstance(mine, Fusion)
    other = Fusion("qrelu2", "mine", mine.pattern, mine.rewrite)
    before = _names(with_fusions(DEFAULT_FUSIONS, [mine, other], before="qconv"))
    assert before[before.index("qconv") - 2 : before.index("qconv")] == ["qrelu", "qrelu2"]
    after = _names(with_fusions(DEFAULT_FUSIONS, [mine, other], after="qconv"))
    assert after[after.index("qconv") + 1 : after.index("qconv") + 3] == ["qrelu", "qrelu2"]
    placed = _names(with_fusions(DEFAULT_FUSIONS, [Placed(mine, after="qlinear")]))
    assert placed[placed.index("qlinear") + 1] == "qrelu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"before": "nope"}, "no fusion named 'nope'"),
        ({"before": "qconv", "after": "qlinear"}, "not both"),
    ],
)
def test_explicit_place_errors(family: FusionFamily, kwargs: Any, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        with_fusions(DEFAULT_FUSIONS, family.fusions, **kwargs)


def test_a_name_already_in_the_catalog_is_refused() -> None:
    qconv = DEFAULT_FUSIONS[_names(DEFAULT_FUSIONS).index("qconv")]
    with pytest.raises(CatalogError, match="'qconv' is there"):
        with_fusions(DEFAULT_FUSIONS, [qconv], before="qlinear")


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def _qrelu_graph() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Two relu chains: one the user's fusion takes, one whose qparams differ (a near miss)."""
    g = fx.Graph()
    x = g.placeholder("x")
    q = (0.05, 3, 0, 127, torch.uint8)
    other = (0.1, 3, 0, 127, torch.uint8)
    levels = g.call_function(qd.quantize_per_tensor.default, (x, *q))
    out = []
    for qp in (q, other):
        dq = g.call_function(qd.dequantize_per_tensor.default, (levels, *q))
        relu = g.call_function(aten.relu.default, (dq,))
        requantized = g.call_function(qd.quantize_per_tensor.default, (relu, *qp))
        out.append(g.call_function(qd.dequantize_per_tensor.default, (requantized, *qp)))
    g.output(tuple(out))
    return fx.GraphModule(torch.nn.Module(), g), (torch.randn(2, 8),)


@pytest.fixture(scope="module")
def saved_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gm, inputs = _qrelu_graph()
    path = tmp_path_factory.mktemp("program") / "program.pt2"
    torch.export.save(torch.export.export(gm, inputs), str(path))
    return path


def test_cli_catalog_lists_the_user_fusion_in_its_place(user_file: Path) -> None:
    result = invoke("catalog", "--fusions", f"{user_file}:QRELU_BEFORE_QCONV")
    assert result.exit_code == 0, result.output
    rows = re.findall(r"│ +\d+ │ (\w+(?: \*)?) +│", result.output)
    assert rows[rows.index("qconv") - 1] == "qrelu *", result.output
    assert len(rows) == len(DEFAULT_FUSIONS) + 1


def test_cli_rejects_a_bad_fusions_spec(user_file: Path) -> None:
    result = invoke("catalog", "--fusions", f"{user_file}:NOPE")
    assert result.exit_code == 2
    assert "defines no 'NOPE'" in result.output and "Traceback" not in result.output


def test_cli_lower_uses_the_user_fusion_and_shows_near_misses(
    user_file: Path, saved_program: Path
) -> None:
    plain = invoke("lower", str(saved_program))
    assert plain.exit_code == 0, plain.output
    assert "qrelu" not in plain.output
    result = invoke("lower", str(saved_program), "--fusions", f"{user_file}:QRELU_FAMILY")
    assert result.exit_code == 0, result.output
    assert "qrelu: fired 1x" in result.output
    assert re.search(r"near miss qrelu at \w+: .*scale", result.output), result.output
    diff = re.search(r"max abs diff vs the program run eagerly: (\S+)", result.output)
    assert diff is not None and float(diff.group(1)) == 0.0, result.output


def test_cli_explain_on_a_saved_program_with_the_user_fusion(
    user_file: Path, saved_program: Path
) -> None:
    unknown = invoke("explain", "--program", str(saved_program), "--fusion", "qrelu")
    assert unknown.exit_code == 2 and "unknown fusion 'qrelu'" in unknown.output
    args = ("--program", str(saved_program), "--fusion", "qrelu", "--fusions", f"{user_file}:QRELU")
    result = invoke("explain", *args)
    assert result.exit_code == 0, result.output
    assert re.search(r"qrelu matches at node \w+", result.output), result.output
    assert re.search(
        r"qrelu does not match at node \w+.*\n.*\n.*\n  reason: check failed", result.output
    )
    pipeline = invoke("explain", *args, "--pipeline")
    assert pipeline.exit_code == 0, pipeline.output
    assert "the graph after" in pipeline.output
    neither = invoke("explain", "--fusion", "qconv")
    assert neither.exit_code == 2 and "--model NAME or --program PATH" in neither.output


def test_cli_fuzz_runs_the_user_family_and_the_catalog_with_it(
    user_file: Path, tmp_path: Path
) -> None:
    result = invoke(
        "fuzz", "--fusions", f"{user_file}:QRELU_FAMILY", "--families", "qrelu,qlinear",
        "--max-examples", "6", "--workers", "1", "--seed", "1", "--out", str(tmp_path / "out"),
        "--db", str(tmp_path / "db"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"qrelu\s+│\s+3\b", result.output), result.output
