"""A family's property test: the one definition pytest, HypoFuzz and ``qalgebra fuzz`` run.

:func:`family_test` returns a Hypothesis test ``test(family, data)`` that draws an example of
``family`` (:func:`qalgebra.testing.strategies.examples`) and checks every lowering property on
it (:func:`qalgebra.testing.properties.check_example`). ``tests/test_properties_lowering.py``
parametrizes it by family as ``test_family``, which makes each family a pytest item that
HypoFuzz collects and schedules separately (it gives effort to the families whose coverage
still grows); ``qalgebra fuzz`` (:mod:`qalgebra.fuzz`) runs the same test, family by family, in
worker processes with its own settings, under the database key pytest and HypoFuzz give it
(:func:`use_pytest_key`), so that every driver replays every other's failures.

With ``compiled=True`` the same test compiles each example with the ``qalgebra`` backend
instead (:func:`qalgebra.testing.properties.check_compiled`), under a database key of its own:
``qalgebra fuzz --compiled``.

>>> from hypothesis import settings
>>> test = family_test()
>>> settings(max_examples=2, database=None, deadline=None)(test)(family="qlinear")  # passes
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.internal.reflection import function_digest

from qalgebra.fusion import Fusion
from qalgebra.lower import DEFAULT_FUSIONS
from qalgebra.lower import _single_thread as single_thread
from qalgebra.testing.properties import Outcome, check_compiled, check_example
from qalgebra.testing.strategies import SCRIPT_CHECK, ExampleLike, examples, families

if TYPE_CHECKING:
    from qalgebra.compile import CompileReport

__all__ = [
    "FAMILY_TEST_NODEID",
    "Observer",
    "catalog_variant",
    "compiled_script",
    "database_key",
    "family_test",
    "use_pytest_key",
]

#: The pytest node id of a family's test: Hypothesis's pytest plugin and HypoFuzz both key a
#: parametrized test's database entries by it.
FAMILY_TEST_NODEID = "tests/test_properties_lowering.py::test_family[{family}]"


class Observer(Protocol):
    """Sees every example a family test checks (``qalgebra fuzz`` counts and records them)."""

    def before(self, ex: ExampleLike) -> None:
        """Called before checking ``ex``; may raise to end the run."""

    def after(
        self, ex: ExampleLike, outcome: Outcome | CompileReport | None, error: BaseException | None
    ) -> None:
        """Called after checking ``ex``: its outcome (a compile's report, compiled), or the
        error it raised."""


def family_test(
    observer: Observer | None = None,
    *,
    forms: Sequence[str] | None = None,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    compiled: bool = False,
) -> Callable[..., None]:
    """A new Hypothesis test ``test(family, data)``: one example of ``family``, every property.

    Each call returns a fresh test object, so a driver may apply its own ``settings`` and
    ``seed`` to it. ``observer`` (None for pytest and HypoFuzz) sees each
    example. ``forms`` restricts the forms drawn (see :func:`~.strategies.examples`).
    ``fusions`` is the catalog the examples are lowered with: the catalog's families must
    still hold with a fusion of yours in place (:func:`qalgebra.catalog.with_fusions`).
    ``compiled``: check :func:`~.properties.check_compiled` instead (dynamo is reset before
    each example, so a long campaign does not keep every compiled graph).
    """

    @given(data=st.data())
    def test_family(family: str, data: st.DataObject) -> None:
        chosen = None if forms is None else tuple(forms)
        ex = data.draw(_examples(family, chosen, families().get(family)), "example")
        if observer is not None:
            observer.before(ex)
        outcome: Outcome | CompileReport
        try:
            with single_thread():  # campaigns run a process per core
                if compiled:
                    torch._dynamo.reset()
                    outcome = check_compiled(ex, fusions=fusions)
                else:
                    outcome = check_example(ex, fusions=fusions)
        except BaseException as exc:
            variant = catalog_variant(fusions)
            lowered_with = f" (lowered with the fusions {variant}: pass them as fusions=)"
            script = compiled_script(ex.code()) if compiled else ex.code()
            note(f"reproduction script{lowered_with if variant else ''}:\n{script}")
            if observer is not None:
                observer.after(ex, None, exc)
            raise
        if observer is not None:
            observer.after(ex, outcome, None)

    return test_family


#: What an example's script runs compiled, in place of :data:`~.strategies.SCRIPT_CHECK`.
_COMPILED_CHECK = (
    "from qalgebra.testing.properties import check_compiled",
    "print(check_compiled(example).summary())",
)


def compiled_script(code: str) -> str:
    """An example's reproduction script (:meth:`ExampleLike.code`) checking it compiled.

    Scripts that check the eager lowering the catalog's way have their check swapped; any
    other gets the compiled check appended, on the ``example`` it defines."""
    if all(part in code for part in SCRIPT_CHECK):
        for eager, compiled in zip(SCRIPT_CHECK, _COMPILED_CHECK, strict=True):
            code = code.replace(eager, compiled)
        return code
    return (
        f"{code.rstrip()}\n\n"
        "if __name__ == '__main__':  # qalgebra fuzz --compiled: the check that failed\n"
        f"    {_COMPILED_CHECK[0]}\n\n"
        f"    {_COMPILED_CHECK[1]}\n"
    )


@functools.cache
def _examples(
    family: str, forms: tuple[str, ...] | None, factory: object
) -> st.SearchStrategy[Any]:
    """The strategy of ``family`` (built once per registered ``factory``)."""
    return examples([family], forms)


def catalog_variant(fusions: Sequence[Fusion]) -> str:
    """How ``fusions`` differ from the catalog, for database keys: "" for the catalog itself,
    else the names in order (failures found with a fusion of yours are kept apart)."""
    if tuple(fusions) == DEFAULT_FUSIONS:
        return ""
    return ",".join(f.name for f in fusions)


def use_pytest_key(test: Any, family: str, variant: str = "", *, compiled: bool = False) -> None:
    """Key ``test``'s database entries as pytest and HypoFuzz key ``test_family[family]``
    (with a :func:`catalog_variant`, or ``compiled``, a key of its own)."""
    inner = test.hypothesis.inner_test
    key = FAMILY_TEST_NODEID.format(family=family) + (f"+fusions={variant}" if variant else "")
    inner._hypothesis_internal_add_digest = (key + ("+compiled" if compiled else "")).encode()


def database_key(family: str, variant: str = "", *, compiled: bool = False) -> bytes:
    """The database key of ``family``'s failures (the same for every driver)."""
    test: Any = family_test()
    use_pytest_key(test, family, variant, compiled=compiled)
    return function_digest(test.hypothesis.inner_test)
