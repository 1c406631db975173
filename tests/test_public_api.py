"""What a fusion author imports: ``qalgebra``'s exports, documented, and cheap to import."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from graphs import GraphBuilder
from pyrsistent import pmap

import qalgebra
from qalgebra import Match, Refusal, Var, require
from qalgebra.checks import dtype_in


def test_all_is_exactly_the_public_names() -> None:
    """As Hypothesis checks its own ``__all__``: nothing public left out, nothing stale listed."""
    public = {
        name
        for name, value in vars(qalgebra).items()
        if not name.startswith("_") and (name == "emit" or not isinstance(value, types.ModuleType))
    }
    assert set(qalgebra.__all__) == public
    assert len(qalgebra.__all__) == len(set(qalgebra.__all__))


def test_the_fusion_api_is_exported() -> None:
    for name in ("Fusion", "Rewriter", "Refusal", "require", "reason", "satisfies", "emit"):
        assert name in qalgebra.__all__, name


@pytest.mark.parametrize("name", sorted(qalgebra.__all__))
def test_every_export_is_documented(name: str) -> None:
    assert (getattr(qalgebra, name).__doc__ or "").strip(), f"qalgebra.{name} has no docstring"


def test_require_raises_a_refusal_with_the_checks_reason() -> None:
    x = GraphBuilder().input("x")
    dt = Var("dt", torch.dtype)
    m = Match(x, pmap({dt: torch.float32}), pmap(), (x,))
    with pytest.raises(Refusal, match=r"^the input: dt is torch.float32, expected one of"):
        require(dtype_in(dt, (torch.uint8,)), m, "the input")
    require(dtype_in(dt, (torch.float32,)), m)  # passes: nothing raised


def _loaded_after(statement: str) -> set[str]:
    """Top-level modules (and qalgebra subpackages) in sys.modules after ``statement``, run in a
    fresh interpreter."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


HEAVY = {"hypothesis", "typer", "rich", "click", "torchao"}


def test_importing_qalgebra_loads_neither_the_testing_kit_nor_the_cli_nor_the_catalog() -> None:
    loaded = _loaded_after("import qalgebra")
    assert not HEAVY & loaded, HEAVY & loaded
    assert not {"qalgebra.testing", "qalgebra.fusions", "qalgebra.cli", "qalgebra.lower"} & loaded


def test_lowering_loads_neither_hypothesis_nor_the_cli() -> None:
    loaded = _loaded_after("import qalgebra.lower")
    assert "qalgebra.fusions" in loaded  # the statement did import the lowering
    assert not HEAVY & loaded, HEAVY & loaded
