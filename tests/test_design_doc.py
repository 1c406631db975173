"""docs/design.md shows the modules' imports as they are, and they have no cycle."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import module_graph  # noqa: E402


def test_the_design_doc_holds_the_current_module_graph() -> None:
    doc = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    assert module_graph.block() in doc, "run `python scripts/module_graph.py --write`"


def test_the_modules_import_each_other_without_a_cycle() -> None:
    assert module_graph.cycles(module_graph.edges()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}
    assert module_graph.cycles(graph) == [["a", "b", "c", "a"]]


def test_type_checking_and_function_local_imports_are_not_edges() -> None:
    lower = module_graph.imports_of(REPO / "qalgebra" / "lower.py")
    assert "qalgebra.rewriter" in lower and "qalgebra.fusions" in lower
    measure = module_graph.imports_of(REPO / "qalgebra" / "measure.py")
    assert "qalgebra.lower" not in measure  # imported under TYPE_CHECKING and inside compare()
