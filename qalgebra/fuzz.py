"""Fuzzing campaigns: the lowering properties on many random graphs, outside pytest.

:func:`run_campaign` draws examples of every family (:func:`qalgebra.testing.strategies.
examples`), checks every property of :mod:`qalgebra.testing.properties` on each, shows a
progress display, prints a summary (examples per family, per fusion and form, failures,
examples per second) and writes each failing graph -- shrunk by Hypothesis -- as a standalone
reproduction script into ``out_dir``. ``qalgebra fuzz`` is its command line.

The campaign runs in chunks of Hypothesis runs with seeds derived from ``seed``, so it goes on
after a failure (each chunk reports at most one, shrunk); the first chunk (of the first worker)
replays the example database (``QALGEBRA_HYPOTHESIS_DB``, default ``.hypothesis/examples``,
shared by the test profiles): failures found by other machines come back first.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as out:
...     summary = run_campaign(2, None, 0, ["qlinear"], Path(out), workers=1, quiet=True)
>>> summary.examples, summary.exit_code
(2, 0)
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from qalgebra.testing.properties import PropertyFailure, check_example
from qalgebra.testing.strategies import PRIMARY_FORMS, ExampleLike, examples, families

__all__ = ["CampaignSummary", "Failure", "default_workers", "run_campaign"]

#: Examples per Hypothesis run (a run stops at its first failure and shrinks it).
CHUNK = 50
_DEFAULT_DB = ".hypothesis/examples"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failing example, shrunk: which property, why, and where its reproduction is."""

    family: str
    form: str
    prop: str
    message: str
    path: Path


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

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

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


_PRIMARY_ORDER = PRIMARY_FORMS


def default_workers() -> int:
    """Two processes where two cores are usable, else one: each worker is single-threaded,
    and a campaign should not take more than two cores of a shared machine by default."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(2, usable))


def _form_order(form: str) -> tuple[int, str]:
    return (_PRIMARY_ORDER.index(form) if form in _PRIMARY_ORDER else len(_PRIMARY_ORDER), form)


class _Stop(BaseException):
    """Ends a Hypothesis run when the campaign's time is up (not a failure: not shrunk)."""


@dataclass
class _Chunk:
    failed: bool = False
    failed_at: float = 0.0
    last: tuple[ExampleLike, BaseException, str] | None = None


def _database() -> ExampleDatabase:
    return DirectoryBasedExampleDatabase(os.environ.get("QALGEBRA_HYPOTHESIS_DB") or _DEFAULT_DB)


def _write_failure(
    out_dir: Path, name: str, ex: ExampleLike, exc: BaseException, tb: str
) -> Failure:
    prop = exc.prop if isinstance(exc, PropertyFailure) else "crash"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"failure_{name}_{ex.family}_{prop}.py"
    message = str(exc)
    header = "\n".join(f"# {line}" for line in (message or type(exc).__name__).splitlines())
    if prop == "crash":
        header += "\n" + "\n".join(f"# {line}" for line in tb.splitlines())
    path.write_text(f"# qalgebra fuzz: property {prop!r} failed\n{header}\n\n{ex.code()}")
    return Failure(ex.family, ex.form, prop, message.splitlines()[0] if message else prop, path)


def _check_one(
    ex: ExampleLike, chunk: _Chunk, summary: CampaignSummary, deadline: float | None
) -> None:
    """Check one example; count it unless the chunk is already shrinking a failure."""
    if not chunk.failed and deadline is not None and time.monotonic() >= deadline:
        raise _Stop
    try:
        outcome = check_example(ex)
    except BaseException as exc:
        chunk.last = (ex, exc, traceback.format_exc())
        if not chunk.failed:
            chunk.failed = True
            chunk.failed_at = time.monotonic()
            summary.examples += 1  # the first failing example counts; its shrinks do not
            summary.by_family[ex.family] += 1
        raise
    if not chunk.failed:
        summary.record(ex, outcome.report.fired, bool(outcome.report.refused))


def run_campaign(
    max_examples: int | None,
    minutes: float | None,
    seed: int | None,
    families: Sequence[str] | None,
    out_dir: Path,
    *,
    forms: Sequence[str] | None = None,
    workers: int | None = None,
    console: Console | None = None,
    quiet: bool = False,
) -> CampaignSummary:
    """Check the lowering properties on ``max_examples`` examples or for ``minutes``.

    With neither, 100 examples; with both, whichever ends first. ``seed`` makes the campaign
    reproducible (None: random); ``families`` and ``forms`` restrict what is drawn (default:
    every registered family, every form). ``workers`` processes share the examples (each with
    its own seed, all with the same example database; None: :func:`default_workers`). Failing
    graphs are written to ``out_dir``; the summary's ``exit_code`` is non-zero when any example
    failed.
    """
    if max_examples is None and minutes is None:
        max_examples = 100
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    console = console or Console(stderr=True, width=max(Console().width, 132))
    base_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    start = time.monotonic()
    progress = _progress(console, max_examples, quiet)
    with progress:
        task = progress.add_task("examples", total=max_examples, rate=0.0, failures=0)

        def show(done: int, failures: int, what: str) -> None:
            elapsed = time.monotonic() - start
            rate = done / elapsed if elapsed else 0.0
            progress.update(task, completed=done, rate=rate, failures=failures, description=what)

        if workers == 1:
            summary = _campaign(max_examples, minutes, base_seed, families, forms, out_dir, show)
        else:
            summary = _parallel(
                max_examples, minutes, base_seed, families, forms, out_dir, workers, show
            )
    summary.seed = seed
    summary.workers = workers
    summary.seconds = time.monotonic() - start
    if not quiet:
        for failure in summary.failures:
            console.print(f"[red]FAILED[/red] [{failure.prop}] {failure.message}")
            console.print(f"  reproduction: {failure.path}")
        for table in summary.tables():
            console.print(table)
        if summary.failures:
            console.print(f"[red]{len(summary.failures)} failing example(s) written to {out_dir}")
        else:
            console.print("[green]no failures")
    return summary


_Show = Callable[[int, int, str], None]


def _progress(console: Console, total: int | None, quiet: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]fuzz[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn() if total is not None else TextColumn(""),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]:.1f} ex/s  [red]{task.fields[failures]} failed[/red]"),
        console=console,
        disable=quiet,
    )


def _campaign(
    max_examples: int | None,
    minutes: float | None,
    base_seed: int,
    family_names: Sequence[str] | None,
    forms: Sequence[str] | None,
    out_dir: Path,
    show: _Show,
    *,
    prefix: str = "",
    replay: bool = True,
) -> CampaignSummary:
    """One process: Hypothesis runs of :data:`CHUNK` examples until the budget is spent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oneDNN's thread pool costs more than these tiny ops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _chunks(
                max_examples, minutes, base_seed, family_names, forms, out_dir, show, prefix, replay
            )
    finally:
        torch.set_num_threads(threads)


def _chunks(
    max_examples: int | None,
    minutes: float | None,
    base_seed: int,
    family_names: Sequence[str] | None,
    forms: Sequence[str] | None,
    out_dir: Path,
    show: _Show,
    prefix: str,
    replay: bool,
) -> CampaignSummary:
    strategy = examples(family_names, forms)
    summary = CampaignSummary()
    deadline = time.monotonic() + minutes * 60 if minutes is not None else None
    database = _database()
    chunk_index = 0
    while True:
        remaining = None if max_examples is None else max_examples - summary.examples
        if remaining is not None and remaining <= 0:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        chunk = _Chunk()

        def check(ex: ExampleLike) -> None:
            _check_one(ex, chunk, summary, deadline)  # noqa: B023  # this chunk's
            show(summary.examples, len(summary.failures), f"{ex.family} / {ex.form}")

        phases = [Phase.generate, Phase.shrink]
        if chunk_index == 0 and replay:
            phases.insert(0, Phase.reuse)
        runner = settings(
            max_examples=CHUNK if remaining is None else min(CHUNK, remaining),
            deadline=None,
            database=database,
            derandomize=False,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
        )(hypothesis_seed(base_seed + chunk_index)(given(ex=strategy)(check)))
        chunk_index += 1
        try:
            runner()
        except _Stop:
            break
        except KeyboardInterrupt:
            raise
        except BaseException:  # the chunk's failure, shrunk: the last one recorded
            if chunk.last is None:
                raise
            summary.shrink_seconds += time.monotonic() - chunk.failed_at
            ex, err, tb = chunk.last
            name = f"{prefix}{len(summary.failures):03d}"
            failure = _write_failure(out_dir, name, ex, err, tb)
            summary.failures.append(failure)
            summary.failures_by_family[failure.family] += 1
            show(summary.examples, len(summary.failures), f"FAILED {failure.prop}")
    return summary


def _parallel(
    max_examples: int | None,
    minutes: float | None,
    base_seed: int,
    family_names: Sequence[str] | None,
    forms: Sequence[str] | None,
    out_dir: Path,
    workers: int,
    show: _Show,
) -> CampaignSummary:
    """``workers`` forked processes, each a :func:`_campaign` with its own seed and share."""
    _preload(family_names, forms)
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[tuple[int, str, object]] = context.Queue()
    shares = [None] * workers if max_examples is None else [
        max_examples // workers + (i < max_examples % workers) for i in range(workers)
    ]  # fmt: skip
    procs = [
        context.Process(
            target=_worker,
            args=(i, shares[i], minutes, base_seed + 7919 * i, family_names, forms, out_dir, queue),
            daemon=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    done = [0] * workers
    failed = [0] * workers
    summaries: dict[int, CampaignSummary] = {}
    errors: list[str] = []
    while len(summaries) + len(errors) < workers:
        try:
            index, kind, payload = queue.get(timeout=1.0)
        except Empty:
            if not any(p.is_alive() for p in procs) and queue.empty():
                errors.append("a worker died without reporting")
                break
            continue
        if kind == "progress":
            assert isinstance(payload, tuple)
            done[index], failed[index], what = payload
            show(sum(done), sum(failed), str(what))
        elif kind == "summary":
            assert isinstance(payload, CampaignSummary)
            summaries[index] = payload
        else:
            errors.append(str(payload))
    for proc in procs:
        proc.join(timeout=10)
    if errors:
        raise RuntimeError("fuzz worker failed: " + "; ".join(errors))
    return _merge([summaries[i] for i in sorted(summaries)])


#: Modules the strategies import on first use (export, torchao's quantizer): ~3.5 s.
_LAZY_IMPORTS = (
    "torch._dynamo",
    "torchao.quantization.pt2e.quantize_pt2e",
    "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer",
)


def _preload(family_names: Sequence[str] | None, forms: Sequence[str] | None) -> None:
    """Import the plug-ins and what they import lazily once, before forking: every worker
    inherits them instead of paying for them."""
    examples(family_names, forms)
    for name in _LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _worker(
    index: int,
    max_examples: int | None,
    minutes: float | None,
    seed: int,
    family_names: Sequence[str] | None,
    forms: Sequence[str] | None,
    out_dir: Path,
    queue: multiprocessing.Queue[tuple[int, str, object]],
) -> None:
    last = [0.0]

    def show(done: int, failures: int, what: str) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2:
            last[0] = now
            queue.put((index, "progress", (done, failures, what)))

    try:
        summary = _campaign(
            max_examples,
            minutes,
            seed,
            family_names,
            forms,
            out_dir,
            show,
            prefix=f"w{index}_",
            replay=index == 0,  # one worker replays the shared database
        )
    except BaseException as exc:
        queue.put((index, "error", f"worker {index}: {type(exc).__name__}: {exc}"))
        return
    queue.put((index, "progress", (summary.examples, len(summary.failures), "done")))
    queue.put((index, "summary", summary))


def _merge(parts: Sequence[CampaignSummary]) -> CampaignSummary:
    out = CampaignSummary()
    for part in parts:
        out.examples += part.examples
        out.failures += part.failures
        out.by_family.update(part.by_family)
        out.by_form.update(part.by_form)
        out.by_modifier.update(part.by_modifier)
        out.refused.update(part.refused)
        out.failures_by_family.update(part.failures_by_family)
        out.shrink_seconds += part.shrink_seconds
        for name, counts in part.fired.items():
            out.fired.setdefault(name, Counter()).update(counts)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qalgebra.fuzz [--max-examples N] [--minutes M] [--seed S] [families...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qalgebra.fuzz")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: default_workers()")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("families", nargs="*", help=f"default: all of {sorted(families())}")
    args = parser.parse_args(argv)
    summary = run_campaign(
        args.max_examples,
        args.minutes,
        args.seed,
        args.families or None,
        args.out,
        workers=args.workers,
    )
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
