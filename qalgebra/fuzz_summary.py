"""What a fuzzing campaign checked and found: counts, failures, crashes, and its tables.

Workers of :mod:`qalgebra.fuzz` each fill a :class:`CampaignSummary` per job; the campaign
:meth:`~CampaignSummary.merge` s them and prints :meth:`~CampaignSummary.tables`.

>>> a, b = CampaignSummary(examples=2), CampaignSummary(examples=3)
>>> a.merge(b).examples
5
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from qalgebra.testing.strategies import PRIMARY_FORMS, ExampleLike

__all__ = ["CampaignSummary", "Failure"]


@dataclass(frozen=True, slots=True)
class Failure:
    """One failing example, shrunk: which property, why, and where its reproduction is.

    ``prop`` is a property name (:data:`qalgebra.testing.properties.PROPERTIES`), ``"error"``
    for any other exception, or ``"crash"`` when checking it killed the process (``signal``
    names the signal, such as ``SIGSEGV``; an example that crashes cannot be shrunk).
    ``replayed``: it came from the example database, where it was recorded on ``found_on``.
    """

    family: str
    form: str
    prop: str
    message: str
    path: Path
    signal: str = ""
    replayed: bool = False
    found_on: tuple[str, ...] = ()


@dataclass
class CampaignSummary:
    """What a campaign checked and found."""

    examples: int = 0
    seconds: float = 0.0
    seed: int | None = None
    failures: list[Failure] = field(default_factory=list)
    by_family: Counter[str] = field(default_factory=Counter)
    by_form: Counter[str] = field(default_factory=Counter)
    by_modifier: Counter[str] = field(default_factory=Counter)
    #: fusion name -> primary form -> examples in which it fired
    fired: dict[str, Counter[str]] = field(default_factory=dict)
    #: examples with at least one refusal, by family
    refused: Counter[str] = field(default_factory=Counter)
    failures_by_family: Counter[str] = field(default_factory=Counter)
    #: time spent shrinking failures (in every worker: may exceed ``seconds`` with workers)
    shrink_seconds: float = 0.0
    #: processes that shared the examples
    workers: int = 1
    #: (family, what) for failures recorded on other kinds of CPU that pass here (kept)
    not_reproduced: list[tuple[str, str]] = field(default_factory=list)
    #: the example database, as the campaign named it
    database: str = ""

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def crashes(self) -> int:
        """Failures that killed the process checking them."""
        return sum(1 for f in self.failures if f.prop == "crash")

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when every example passed, 1 otherwise."""
        return 0 if self.ok else 1

    def record(self, ex: ExampleLike, fired: Counter[str], refused: bool) -> None:
        self.examples += 1
        self.by_family[ex.family] += 1
        primary, _, modifier = ex.form.partition("+")
        self.by_form[primary] += 1
        self.by_modifier[modifier or "(none)"] += 1
        for name, count in fired.items():
            if count:
                self.fired.setdefault(name, Counter())[primary] += 1
        if refused:
            self.refused[ex.family] += 1

    def add_failure(self, failure: Failure) -> None:
        self.failures.append(failure)
        self.failures_by_family[failure.family] += 1

    def merge(self, part: CampaignSummary) -> CampaignSummary:
        """Add ``part``'s counts and findings to this summary (returned)."""
        self.examples += part.examples
        self.failures += part.failures
        self.by_family.update(part.by_family)
        self.by_form.update(part.by_form)
        self.by_modifier.update(part.by_modifier)
        self.refused.update(part.refused)
        self.failures_by_family.update(part.failures_by_family)
        self.shrink_seconds += part.shrink_seconds
        self.not_reproduced += part.not_reproduced
        for name, counts in part.fired.items():
            self.fired.setdefault(name, Counter()).update(counts)
        return self

    def tables(self) -> list[Table]:
        """The summary as rich tables: families, fusions x forms, respellings, totals."""
        fam = Table(title="Examples per family")
        for col in ("family", "examples", "with refusals", "failures"):
            fam.add_column(col, justify="left" if col == "family" else "right")
        for name in sorted(self.by_family):
            fam.add_row(
                name,
                str(self.by_family[name]),
                str(self.refused[name]),
                str(self.failures_by_family[name]),
            )
        forms = sorted(self.by_form, key=_form_order)
        fusions = Table(title="Examples in which each fusion fired, per form")
        fusions.add_column("fusion")
        for form in forms:
            fusions.add_column(form, justify="right")
        fusions.add_column("total", justify="right")
        for name in sorted(self.fired):
            counts = self.fired[name]
            fusions.add_row(name, *(str(counts[f]) for f in forms), str(sum(counts.values())))
        fusions.add_row(
            "[dim]examples[/dim]", *(f"[dim]{self.by_form[f]}[/dim]" for f in forms),
            f"[dim]{self.examples}[/dim]",
        )  # fmt: skip
        mods = Table(title="Examples per respelling (applied after the form)")
        mods.add_column("respelling")
        mods.add_column("examples", justify="right")
        for name, count in sorted(self.by_modifier.items()):
            mods.add_row(name, str(count))
        totals = Table(title="Campaign")
        columns = (
            "examples", "failures", "seconds", "of which shrinking", "examples/s", "seed", "workers"
        )  # fmt: skip
        for col in columns:
            totals.add_column(col, justify="right")
        totals.add_row(
            str(self.examples),
            str(len(self.failures)),
            f"{self.seconds:.1f}",
            f"{self.shrink_seconds:.1f}",
            f"{self.examples_per_second:.2f}",
            str(self.seed),
            str(self.workers),
        )
        return [fam, fusions, mods, totals]


def _form_order(form: str) -> tuple[int, str]:
    return (PRIMARY_FORMS.index(form) if form in PRIMARY_FORMS else len(PRIMARY_FORMS), form)
