"""A test family of yours: your fusions and a strategy of examples they must lower.

Register a :class:`FusionFamily` (:func:`register`) and the catalog's property test runs on
it (:func:`qalgebra.testing.campaign.family_test`, ``qalgebra fuzz --families NAME``); its
fusions go into the catalog by priority (:func:`qalgebra.catalog.with_fusions`), where the
catalog's own families must still hold (:func:`catalog_with`).

:func:`witnesses` gives graphs of every registered family, drawn once per process: where
``with_fusions`` observes which fusion's match contains which.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import fx

from qalgebra.catalog import Placed, with_fusions
from qalgebra.fusion import Fusion
from qalgebra.lower import DEFAULT_FUSIONS
from qalgebra.testing.strategies import examples, families, register_family

__all__ = [
    "FusionFamily",
    "catalog_with",
    "draw",
    "fusions_of",
    "register",
    "witnesses",
]


@dataclass(frozen=True, slots=True)
class FusionFamily:
    """A family: its ``name``, the ``fusions`` it tests (each a Fusion, or :class:`Placed`)
    and ``examples``, a zero-argument factory of a strategy of examples
    (:class:`~qalgebra.testing.strategies.ExampleLike`, e.g. built with
    :class:`~qalgebra.testing.strategies.GraphBuilder`)."""

    name: str
    fusions: tuple[Fusion | Placed, ...]
    examples: Callable[[], st.SearchStrategy[Any]]


def register(family: FusionFamily) -> None:
    """Make ``family`` drawable by name (pytest, ``qalgebra fuzz``, :func:`witnesses`)."""
    register_family(family.name, family.examples)
    witnesses.cache_clear()


def fusions_of(items: Iterable[object]) -> list[Fusion | Placed]:
    """The fusions in ``items`` (Fusion, Placed, FusionFamily, or sequences of them)."""
    out: list[Fusion | Placed] = []
    for item in items:
        if isinstance(item, Fusion | Placed):
            out.append(item)
        elif isinstance(item, FusionFamily):
            out.extend(item.fusions)
        elif isinstance(item, Sequence) and not isinstance(item, str):
            out.extend(fusions_of(item))
        else:
            raise TypeError(f"expected a Fusion, Placed or FusionFamily, got {type(item).__name__}")
    return out


def draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` values of ``strategy``, the same ones every time (derandomized, no database)."""
    out: list[Any] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out[:n]


#: Examples drawn per family for :func:`witnesses`.
WITNESSES_PER_FAMILY = 6


@functools.cache
def witnesses() -> tuple[fx.GraphModule, ...]:
    """Graphs of every registered family (:data:`WITNESSES_PER_FAMILY` each), drawn once."""
    return tuple(
        ex.gm for name in families() for ex in draw(examples([name]), WITNESSES_PER_FAMILY)
    )


def catalog_with(
    items: Iterable[object], base: Sequence[Fusion] = DEFAULT_FUSIONS
) -> tuple[Fusion, ...]:
    """``base`` with the fusions of ``items`` placed by priority (their families registered
    first, so their examples are witnesses too)."""
    items = list(items)
    for item in items:
        if isinstance(item, FusionFamily):
            register(item)
    return with_fusions(base, fusions_of(items))
