"""One worker process of a fuzzing campaign: family tests run as jobs, each example recorded
before it is checked.

A :class:`Job` is a Hypothesis run of a family's property test
(:func:`qalgebra.testing.campaign.family_test`) with the campaign's settings: ``examples``
examples from ``seed``, replaying the family's failures from the example database first when
``replay`` is set. :func:`run_job` checks them and returns what it saw as a
:class:`~qalgebra.fuzz_summary.CampaignSummary`; a failing run is shrunk and written as a
reproduction script (:meth:`ExampleLike.code`).

Before each example, the worker writes the example's script to its *in-flight* file
(:func:`write_in_flight`): when checking it kills the process (a segfault in a kernel, an
abort, the out-of-memory killer), the supervisor (:mod:`qalgebra.fuzz`) still has the example
and writes it as a crash. :func:`serve` is the worker's loop.
"""

from __future__ import annotations

import json
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed

from qalgebra.fusion import Fusion
from qalgebra.fuzz_summary import CampaignSummary, Failure
from qalgebra.lower import DEFAULT_FUSIONS
from qalgebra.testing.campaign import (
    catalog_variant,
    compiled_script,
    database_key,
    family_test,
    use_pytest_key,
)
from qalgebra.testing.database import CpuTaggedDatabase, example_database
from qalgebra.testing.properties import Outcome, PropertyFailure
from qalgebra.testing.strategies import ExampleLike

if TYPE_CHECKING:
    from qalgebra.compile import CompileReport

__all__ = ["InFlight", "Job", "Stop", "read_in_flight", "run_job", "write_in_flight"]


@dataclass(frozen=True, slots=True)
class Job:
    """``examples`` examples of ``family`` from ``seed``; ``replay``: the database first."""

    family: str
    examples: int
    seed: int
    replay: bool = False


@dataclass(frozen=True, slots=True)
class InFlight:
    """The example a worker is checking (``code`` empty: none, between two), and how many of
    its job it checked before."""

    family: str
    form: str
    checked: int
    code: str


def write_in_flight(path: Path, ex: ExampleLike, checked: int) -> None:
    record = {"family": ex.family, "form": ex.form, "checked": checked, "code": ex.code()}
    path.write_text(json.dumps(record))


def read_in_flight(path: Path) -> InFlight | None:
    """The last example recorded at ``path`` (None if none was)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return InFlight(
        record["family"], record.get("form", ""), int(record["checked"]), record.get("code", "")
    )


class Stop(BaseException):
    """Ends a Hypothesis run when the campaign's time is up (not a failure: not shrunk)."""


Progress = Callable[[int, str], None]
"""``progress(examples checked in this job, what)``."""


class _Observer:
    """Counts the examples of one job (not the shrinker's retries) and records each first."""

    def __init__(
        self, summary: CampaignSummary, in_flight: Path, deadline: float | None, show: Progress
    ) -> None:
        self.summary = summary
        self.in_flight = in_flight
        self.deadline = deadline
        self.show = show
        self.checked = 0
        self.failed_at: float | None = None
        self.failed_index = -1
        self.last: tuple[ExampleLike, BaseException] | None = None

    def before(self, ex: ExampleLike) -> None:
        if self.failed_at is None and self.deadline is not None and time.time() >= self.deadline:
            raise Stop
        write_in_flight(self.in_flight, ex, self.checked)

    def after(
        self, ex: ExampleLike, outcome: Outcome | CompileReport | None, error: BaseException | None
    ) -> None:
        if error is not None:
            self.last = (ex, error)
            if self.failed_at is None:  # the first failing example counts; its shrinks do not
                self.failed_at = time.monotonic()
                self.failed_index = self.checked
                self.checked += 1
                self.summary.examples += 1
                self.summary.by_family[ex.family] += 1
        elif self.failed_at is None and outcome is not None:
            self.checked += 1
            report = outcome.report if isinstance(outcome, Outcome) else outcome.lowering
            self.summary.record(ex, report.fired, bool(report.refused))
        # checked: a crash from here on is not its own
        self.in_flight.write_text(json.dumps({"family": ex.family, "checked": self.checked}))
        self.show(self.checked, f"{ex.family} / {ex.form}")


def run_job(
    job: Job,
    database: CpuTaggedDatabase,
    out_dir: Path,
    name: str,
    in_flight: Path,
    *,
    forms: Sequence[str] | None = None,
    deadline: float | None = None,
    show: Progress = lambda done, what: None,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    compiled: bool = False,
) -> tuple[CampaignSummary, int]:
    """Run ``job`` here; its summary, and how many of its examples it checked (fewer than
    asked when a failure ended it, or ``deadline``, a ``time.time()``, passed). ``compiled``:
    the examples go through ``torch.compile`` (``properties.check_compiled``)."""
    summary = CampaignSummary()
    observer = _Observer(summary, in_flight, deadline, show)
    test = family_test(observer, forms=forms, fusions=fusions, compiled=compiled)
    variant = catalog_variant(fusions)
    use_pytest_key(test, job.family, variant, compiled=compiled)
    key = database_key(job.family, variant, compiled=compiled)
    recorded = sum(1 for _ in database.fetch(key)) if job.replay else 0
    replays_before = len(database.replays)
    phases = [Phase.reuse] if job.replay else []
    runner = settings(
        max_examples=max(job.examples, 1),
        deadline=None,
        database=database,
        derandomize=False,
        phases=[*phases, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
        verbosity=Verbosity.quiet,
    )(hypothesis_seed(job.seed)(test))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            runner(family=job.family)
    except Stop:
        pass
    except KeyboardInterrupt:
        raise
    except BaseException:  # the run's failure, shrunk: the last one the observer saw
        if observer.last is None or observer.failed_at is None:
            raise
        summary.shrink_seconds += time.monotonic() - observer.failed_at
        ex, error = observer.last
        replays = [r for r in database.replays[replays_before:] if r.key == key and r.reproduced]
        found_on = tuple(tag.describe() for r in replays for tag in r.found_on)
        summary.add_failure(
            write_failure(
                out_dir, name, ex, error, replayed=observer.failed_index < recorded,
                found_on=found_on, compiled=compiled,
            )
        )  # fmt: skip
    for replay in database.replays[replays_before:]:
        if replay.key == key and not replay.reproduced:
            summary.not_reproduced.append((job.family, replay.describe()))
    return summary, observer.checked


def write_failure(
    out_dir: Path,
    name: str,
    ex: ExampleLike | None,
    error: BaseException | None,
    *,
    code: str | None = None,
    family: str = "",
    form: str = "",
    signal: str = "",
    replayed: bool = False,
    found_on: tuple[str, ...] = (),
    compiled: bool = False,
) -> Failure:
    """Write a failing example's reproduction script into ``out_dir``: an example that raised
    ``error``, or (``signal`` set) the recorded ``code`` of one that killed its process (empty
    when it died between examples); ``compiled``: a script that checks it compiled."""
    if ex is not None:
        family, form, code = ex.family, ex.form, ex.code()
    if compiled and code:
        code = compiled_script(code)
    if signal:
        prop, message = "crash", f"the process checking it was killed by {signal}"
        header = f"# qalgebra fuzz: checking this example killed the process ({signal})"
    else:
        assert error is not None
        prop = error.prop if isinstance(error, PropertyFailure) else "error"
        message = str(error) or type(error).__name__
        lines = message.splitlines()
        if prop == "error":
            lines += traceback.format_exception(error)
        header = f"# qalgebra fuzz: property {prop!r} failed\n" + "\n".join(
            f"# {line}" for chunk in lines for line in chunk.splitlines()
        )
    if replayed:
        where = "; ".join(found_on) or "an untagged run"
        header += f"\n# replayed from the example database; found before on {where}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"failure_{name}_{family}_{prop}.py"
    path.write_text(f"{header}\n\n{code}")
    first = message.splitlines()[0] if message else prop
    return Failure(family, form, prop, first, path, signal, replayed, found_on)


def serve(
    index: int,
    tasks: Any,
    results: Any,
    out_dir: Path,
    in_flight: Path,
    database: str | None,
    forms: Sequence[str] | None,
    deadline: float | None,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    compiled: bool = False,
) -> None:
    """The worker loop: take a job from ``tasks`` (None: stop), report on ``results``.

    Workers are forked: ``fusions`` (a user's included) are the parent's objects, not pickled.
    Compiling, Inductor compiles its C++ in the worker itself (one process per core already)."""
    last = [0.0]

    def show(done: int, what: str) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2:
            last[0] = now
            results.send((index, "progress", (done, what)))

    torch.set_num_threads(1)  # one process per core; and no oneDNN thread pool after a fork
    if compiled:
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    try:
        db = example_database(database)
        number = 0
        while (job := tasks.get()) is not None:
            part, checked = run_job(
                job, db, out_dir, f"w{index}_{number:03d}", in_flight,
                forms=forms, deadline=deadline, show=show, fusions=fusions, compiled=compiled,
            )  # fmt: skip
            number += len(part.failures)
            results.send((index, "done", (part, checked)))
    except BaseException as exc:
        results.send((index, "error", f"worker {index}: {type(exc).__name__}: {exc}"))
