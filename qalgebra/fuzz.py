"""Fuzzing campaigns on one machine: the family property tests, run as jobs in worker processes.

:func:`run_campaign` runs the lowering properties as the same Hypothesis tests pytest and
HypoFuzz run (:func:`qalgebra.testing.campaign.family_test`, one per family), split into jobs
of at most :data:`CHUNK` examples, families taking turns; worker processes take the jobs, each
job a Hypothesis run with its own seed (derived from ``seed``), so the campaign goes on after a
failure (a job reports at most one, shrunk). It shows a progress display, prints a summary
(examples per family, per fusion and form, failures, examples per second) and writes each
failing graph as a standalone reproduction script into ``out_dir``. ``qalgebra fuzz`` is its
command line; ``hypothesis fuzz`` (HypoFuzz) drives the same tests for long campaigns.

The first job of each family replays the family's failures from the example database first
(:func:`qalgebra.testing.database.example_database`: ``database``, else
``QALGEBRA_HYPOTHESIS_DB``, a directory or a Redis URL shared by machines, else
``.hypothesis/examples``); failures recorded on another kind of CPU that pass here are kept in
the database and reported, not taken for fixed.

Each worker records every example before checking it (:mod:`qalgebra.fuzz_worker`): a worker
that dies -- a segfault in a kernel, an abort, the out-of-memory killer -- is reported as a
``crash`` failure with its signal and the example's script, a new worker takes its place and
the campaign goes on.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as out:
...     summary = run_campaign(2, None, 0, ["qlinear"], Path(out), workers=1, quiet=True)
>>> summary.examples, summary.exit_code
(2, 0)
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from qalgebra.fusion import Fusion
from qalgebra.fuzz_summary import CampaignSummary, Failure
from qalgebra.fuzz_worker import InFlight, Job, read_in_flight, serve, write_failure
from qalgebra.lower import DEFAULT_FUSIONS
from qalgebra.testing.database import DB_ENV, DEFAULT_DB, example_database, redacted
from qalgebra.testing.strategies import examples, families

__all__ = ["CHUNK", "CampaignSummary", "Failure", "default_workers", "jobs", "run_campaign"]

#: Examples per job: a Hypothesis run, which stops at its first failure and shrinks it.
CHUNK = 50
#: Seed offset of what is left of a job whose worker died (not the examples that crashed it).
_RESEED = 1_000_003


def jobs(max_examples: int | None, family_names: Sequence[str], seed: int) -> Iterator[Job]:
    """The campaign's jobs: ``max_examples`` shared evenly by the families (endless when
    None), in jobs of at most :data:`CHUNK`, families taking turns; the first job of each
    family replays its failures from the database.

    >>> [(j.family, j.examples, j.replay) for j in jobs(130, ["a", "b"], 0)]
    [('a', 50, True), ('b', 50, True), ('a', 15, False), ('b', 15, False)]
    """
    names = list(family_names)
    if max_examples is None:
        quotas: list[int | None] = [None] * len(names)
    else:
        quotas = [max_examples // len(names) + (i < max_examples % len(names)) for i in
                  range(len(names))]  # fmt: skip
    left = dict(enumerate(quotas))
    for turn in itertools.count():
        if not any(q is None or q > 0 for q in left.values()):
            return
        for i, name in enumerate(names):
            quota = left[i]
            size = CHUNK if quota is None else min(CHUNK, quota)
            if size <= 0:
                continue
            left[i] = None if quota is None else quota - size
            yield Job(name, size, seed + 7919 * turn + 104729 * i, replay=turn == 0)


def run_campaign(
    max_examples: int | None,
    minutes: float | None,
    seed: int | None,
    families: Sequence[str] | None,
    out_dir: Path,
    *,
    forms: Sequence[str] | None = None,
    workers: int | None = None,
    database: str | None = None,
    console: Console | None = None,
    quiet: bool = False,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    compiled: bool = False,
) -> CampaignSummary:
    """Check the lowering properties on ``max_examples`` examples or for ``minutes``.

    With neither, 100 examples; with both, whichever ends first. ``seed`` makes the campaign
    reproducible (None: random); ``families`` and ``forms`` restrict what is drawn (default:
    every registered family, every form). ``workers`` processes take the jobs (None:
    :func:`default_workers`); ``database`` names the example database (a directory or a
    Redis URL; None: ``QALGEBRA_HYPOTHESIS_DB`` or the local default). Failing graphs are
    written to ``out_dir``; the summary's ``exit_code`` is non-zero when any example failed.
    ``fusions`` is the catalog the examples are lowered with (a user's fusions in place:
    :func:`qalgebra.catalog.with_fusions`); its failures are kept under keys of their own.
    ``compiled``: each example goes through ``torch.compile`` with the ``qalgebra`` backend
    instead (:func:`qalgebra.testing.properties.check_compiled`, about 2 s an example), its
    failures under keys of their own too.
    """
    if max_examples is None and minutes is None:
        max_examples = 100
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    names = list(_family_names(families))
    example_database(database)  # fails here, clearly, if the server does not answer
    console = console or Console(stderr=True, width=max(Console().width, 132))
    base_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    start = time.monotonic()
    deadline = time.time() + minutes * 60 if minutes is not None else None
    progress = _progress(console, max_examples, quiet)
    with progress:
        task = progress.add_task("examples", total=max_examples, rate=0.0, failures=0)

        def show(done: int, failures: int, what: str) -> None:
            elapsed = time.monotonic() - start
            rate = done / elapsed if elapsed else 0.0
            progress.update(task, completed=done, rate=rate, failures=failures, description=what)

        _preload(names, forms)
        campaign = _Supervisor(
            jobs(max_examples, names, base_seed), workers, out_dir, database, forms, deadline,
            show, fusions=tuple(fusions), compiled=compiled,
        )  # fmt: skip
        summary = campaign.run()
    summary.seed = seed
    summary.workers = workers
    summary.seconds = time.monotonic() - start
    summary.database = redacted(database or os.environ.get(DB_ENV) or DEFAULT_DB)
    if not quiet:
        _report(console, summary, out_dir, compiled=compiled)
    return summary


def _family_names(chosen: Sequence[str] | None) -> Sequence[str]:
    registry = families()
    names = list(registry) if chosen is None else list(chosen)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown families {unknown}; known: {', '.join(registry)}")
    return names


def _report(
    console: Console, summary: CampaignSummary, out_dir: Path, *, compiled: bool = False
) -> None:
    if compiled:
        console.print("checked through torch.compile (the qalgebra backend)", highlight=False)
    for failure in summary.failures:
        console.print(f"[red]FAILED[/red] [{failure.prop}] {failure.message}")
        if failure.replayed:
            where = "; ".join(failure.found_on) or "an untagged run"
            console.print(f"  replayed from the example database; found before on {where}")
        console.print(f"  reproduction: {failure.path}")
    for family, what in summary.not_reproduced:
        console.print(f"[yellow]kept[/yellow] a recorded {family} failure: {what}")
    for table in summary.tables():
        console.print(table)
    console.print(f"example database: {summary.database}", highlight=False)
    if summary.failures:
        crashed = f", {summary.crashes} of them crashes" if summary.crashes else ""
        console.print(
            f"[red]{len(summary.failures)} failing example(s){crashed} written to {out_dir}"
        )
    else:
        console.print("[green]no failures")


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


@dataclass
class _Worker:
    """A worker process, its task queue, its own results pipe, and the job it is running.

    Results come back on a pipe per worker, written from the worker's main thread: a worker
    killed mid-message (a crash is what campaigns look for) then loses only its own pipe. A
    queue shared by all workers has a lock each writer's feeder thread holds while sending;
    a worker dying while holding it stalled every other worker forever.
    """

    ident: int
    process: BaseProcess
    tasks: Any
    results: Connection
    job: Job | None = None
    done: int = 0  # examples of ``job`` checked, as last reported


@dataclass
class _Supervisor:
    """Hands out jobs to worker processes, merges what they report, replaces dead ones."""

    jobs: Iterator[Job]
    workers: int
    out_dir: Path
    database: str | None
    forms: Sequence[str] | None
    deadline: float | None
    show: _Show
    fusions: tuple[Fusion, ...] = DEFAULT_FUSIONS
    compiled: bool = False
    summary: CampaignSummary = field(default_factory=CampaignSummary)
    _retry: deque[Job] = field(default_factory=deque)
    _spawned: int = 0
    _errors: list[str] = field(default_factory=list)

    def run(self) -> CampaignSummary:
        self._context = multiprocessing.get_context("fork")
        self._flights = Path(tempfile.mkdtemp(prefix="qalgebra-fuzz-"))
        running: dict[int, _Worker] = {}
        try:
            for _ in range(self.workers):
                worker = self._spawn()
                running[worker.ident] = worker
                self._assign(worker)
            while any(w.job is not None for w in running.values()) and not self._errors:
                self._receive(running, timeout=0.5)
                for worker in list(running.values()):
                    if worker.job is not None and not worker.process.is_alive():
                        self._receive(running, timeout=0.0, drain=True)
                    if worker.job is not None and not worker.process.is_alive():
                        del running[worker.ident]
                        worker.results.close()
                        self._crashed(worker)
                        replacement = self._spawn()
                        running[replacement.ident] = replacement
                        self._assign(replacement)
        finally:
            for worker in running.values():
                with contextlib.suppress(ValueError, OSError):
                    worker.tasks.put(None)
            for worker in running.values():
                worker.process.join(timeout=10)
                if worker.process.is_alive():
                    worker.process.kill()
                worker.results.close()
            shutil.rmtree(self._flights, ignore_errors=True)
        if self._errors:
            raise RuntimeError("fuzz worker failed: " + "; ".join(self._errors))
        return self.summary

    def _spawn(self) -> _Worker:
        ident = self._spawned
        self._spawned += 1
        tasks = self._context.Queue()
        results, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=serve,
            args=(
                ident, tasks, writer, self.out_dir, self._flights / f"{ident}.json",
                self.database, self.forms, self.deadline, self.fusions, self.compiled,
            ),
            daemon=True,
        )  # fmt: skip
        process.start()
        writer.close()  # the worker's copy is the only one: its death ends the pipe
        return _Worker(ident, process, tasks, results)

    def _next_job(self) -> Job | None:
        if self.deadline is not None and time.time() >= self.deadline:
            return None
        if self._retry:
            return self._retry.popleft()
        return next(self.jobs, None)

    def _assign(self, worker: _Worker) -> None:
        worker.job, worker.done = self._next_job(), 0
        worker.tasks.put(worker.job)  # None: the worker stops

    def _receive(self, running: dict[int, _Worker], timeout: float, drain: bool = False) -> None:
        """Handle one message (``drain``: every message waiting), waiting up to ``timeout``."""
        while True:
            ready = wait([w.results for w in running.values()], 0.0 if drain else timeout)
            message = None
            for conn in ready:
                assert isinstance(conn, Connection)
                try:
                    message = conn.recv()
                    break
                except (EOFError, OSError):  # the worker died: the supervisor sees it exit
                    continue
            if message is None:
                return
            self._handle(running, *message)
            if not drain:
                return

    def _handle(self, running: dict[int, _Worker], ident: int, kind: str, payload: Any) -> None:
        worker = running.get(ident)
        if kind == "error":
            self._errors.append(str(payload))
        elif worker is not None and kind == "progress":
            worker.done = int(payload[0])
            self.show(self._done(running), len(self.summary.failures), str(payload[1]))
        elif worker is not None and kind == "done":
            part, checked = payload
            self.summary.merge(part)
            job = worker.job
            if job is not None and checked < job.examples and part.failures:
                # a failure ended the run early: the rest of its examples, from a new seed
                rest = Job(job.family, job.examples - checked, job.seed + _RESEED)
                self._retry.append(rest)
            self._assign(worker)
            self.show(self._done(running), len(self.summary.failures), "")

    def _done(self, running: dict[int, _Worker]) -> int:
        return self.summary.examples + sum(w.done for w in running.values() if w.job)

    def _crashed(self, worker: _Worker) -> None:
        """Record the example ``worker`` died on; queue the rest of its job."""
        job = worker.job
        assert job is not None
        code = worker.process.exitcode
        how = _signal_name(code)
        flight = read_in_flight(self._flights / f"{worker.ident}.json")
        checking = flight is not None and bool(flight.code)
        if flight is None or not flight.code:  # between examples: drawing one, or Hypothesis
            note = f"# no example was being checked ({job.family}, job seed {job.seed})\n"
            flight = InFlight(job.family, "", flight.checked if flight else 0, note)
        failure = write_failure(
            self.out_dir, f"w{worker.ident}_crash", None, None, code=flight.code,
            family=flight.family, form=flight.form, signal=how,
            compiled=self.compiled and checking,
        )  # fmt: skip
        self.summary.examples += 1
        self.summary.by_family[flight.family] += 1
        self.summary.add_failure(failure)
        self.summary.examples += flight.checked  # checked before it: counted, details lost
        self.summary.by_family[flight.family] += flight.checked
        rest = job.examples - flight.checked - 1
        if rest > 0:
            self._retry.append(Job(job.family, rest, job.seed + _RESEED))


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
    return f"exit code {exitcode}"


def default_workers() -> int:
    """Two processes where two cores are usable, else one: each worker is single-threaded,
    and a campaign should not take more than two cores of a shared machine by default."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(2, usable))


#: Modules the strategies import on first use (export, torchao's quantizer): ~3.5 s.
_LAZY_IMPORTS = (
    "torch._dynamo",
    "torchao.quantization.pt2e.quantize_pt2e",
    "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer",
)


def _preload(family_names: Sequence[str] | None, forms: Sequence[str] | None) -> None:
    """Import the plug-ins and what they import lazily once, before forking: every worker
    inherits them instead of paying for them. (Nothing here may run a oneDNN op: its thread
    pool does not survive a fork.)"""
    examples(family_names, forms)
    for name in _LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qalgebra.fuzz [--max-examples N] [--minutes M] [--seed S] [families...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qalgebra.fuzz")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: default_workers()")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("--db", default=None, help="a directory or a Redis URL")
    parser.add_argument("--compiled", action="store_true", help="through torch.compile")
    parser.add_argument("families", nargs="*", help=f"default: all of {sorted(families())}")
    args = parser.parse_args(argv)
    summary = run_campaign(
        args.max_examples,
        args.minutes,
        args.seed,
        args.families or None,
        args.out,
        workers=args.workers,
        database=args.db,
        compiled=args.compiled,
    )
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
