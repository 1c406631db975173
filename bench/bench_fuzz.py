"""Fuzzing throughput: ``qalgebra fuzz`` examples per second, and where one process spends it.

    python bench/bench_fuzz.py                       # 400 examples, seed 7, 1 and 2 workers
    python bench/bench_fuzz.py --examples 2000 --repeat 3 --workers 1
    python bench/bench_fuzz.py --breakdown           # one process: time per stage and family
    python bench/bench_fuzz.py --engine --seconds 300 --workers 2   # + HypoFuzz, side by side

``--engine`` also runs HypoFuzz (``hypothesis fuzz``, the ``campaign`` extra) on the same family
tests for ``--seconds`` with as many processes, and prints both engines' examples per second
per process (per core, with one process per core). HypoFuzz reports what it ran in the example
database (``.hypofuzz.reports``): its examples are the valid and failing test cases of the
last report of each family and process. Its rate counts from its start, collection included,
as the runner's does. ``hypothesis fuzz``'s hub stops the campaign when, 60 s in, no worker
has reported yet: on a loaded machine its workers (collection, then 100 examples of a first
family) take longer, and the run ends with next to nothing done. ``--direct`` runs HypoFuzz's
workers without the hub (its private ``_start_worker``), the families split between them.

Each run is a whole campaign (``qalgebra.fuzz.run_campaign``: generate, lower, check every
property); the table gives examples/s per run and their median. The machine is shared: compare
runs made side by side, and read ``load`` (the 1-minute load average before each run).

``--breakdown`` runs one single-process campaign with timers around its stages: checking
(``check_example``, of which the two lowerings) and building (per family: ``build_example``
of the built-in and pointwise families, the WOQ plug-ins' cases); the rest is Hypothesis.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qalgebra import fuzz
from qalgebra.testing import pointwise_strategies, properties, strategies, woq_strategies


def campaign(examples: int, seed: int, workers: int) -> fuzz.CampaignSummary:
    with tempfile.TemporaryDirectory() as out:
        return fuzz.run_campaign(examples, None, seed, None, Path(out), workers=workers, quiet=True)


def _timed(
    owner: Any, name: str, label: Callable[..., str], seconds: defaultdict[str, float]
) -> None:
    """Wrap ``owner.name`` to add its time to ``seconds[label(*args, **kwargs)]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[label(*args, **kwargs)] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _case_label(case: str) -> Callable[..., str]:
    def label(*args: Any, **kwargs: Any) -> str:
        return f"build {case} [{kwargs.get('form', 'op')}]"

    return label


def breakdown(examples: int, seed: int) -> None:
    seconds: defaultdict[str, float] = defaultdict(float)
    _timed(fuzz, "check_example", lambda ex: "check (all properties)", seconds)
    _timed(properties, "lower_with_report", lambda *a, **k: "  of which lowering (x2)", seconds)
    _timed(strategies, "build_example", lambda spec, form="op": f"build {spec.family}", seconds)
    _timed(
        pointwise_strategies, "build_example", lambda *a, **k: "build pointwise", seconds
    )  # fmt: skip
    for case in ("woq_case", "int_mm_case", "dynamic_fp16_case"):
        _timed(woq_strategies, case, _case_label(case), seconds)
    summary = campaign(examples, seed, 1)
    total = summary.seconds
    print(f"{summary.examples} examples in {total:.1f} s ({summary.examples_per_second:.2f}/s)")
    print(f"{'stage':42} {'seconds':>8} {'ms/example':>11}")
    for stage, spent in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{stage:42} {spent:8.1f} {1000 * spent / summary.examples:11.1f}")
    rest = total - sum(v for k, v in seconds.items() if not k.startswith(" "))
    rest_label = "rest (Hypothesis, progress, ...)"
    print(f"{rest_label:42} {rest:8.1f} {1000 * rest / summary.examples:11.1f}")


#: One HypoFuzz worker on the given families for the given seconds (``--direct``).
_DIRECT_WORKER = """
import os, sys, threading
from hypofuzz.hypofuzz import _start_worker
ids = {f"tests/test_properties_lowering.py::test_family[{f}]" for f in sys.argv[2].split(",")}
state = {"hub_state": {"nodeids": ids}, "worker_state": {"nodeids": {}, "current_lifetime": 0.0,
         "expected_lifetime": 0.0, "valid_nodeids": []}}
threading.Timer(float(sys.argv[1]), lambda: os._exit(0)).start()
_start_worker(pytest_args=["-p", "no:cacheprovider", "tests/test_properties_lowering.py", "-k",
              "test_family"], shared_state=state)
"""


def hypofuzz_rate(seconds: float, processes: int, direct: bool) -> tuple[int, float]:
    """Run ``hypothesis fuzz`` (or, ``direct``, its workers without the hub) on every family
    test for ``seconds``: (examples, wall seconds)."""
    import signal
    import subprocess
    import sys

    from hypofuzz.database import HypofuzzDatabase
    from hypothesis.internal.conjecture.data import Status

    from qalgebra.testing.campaign import database_key
    from qalgebra.testing.database import example_database

    with tempfile.TemporaryDirectory() as db:
        env = {
            **os.environ, "QALGEBRA_HYPOTHESIS_PROFILE": "fuzz", "QALGEBRA_HYPOTHESIS_DB": db,
            "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        hypothesis_cli = str(Path(sys.executable).with_name("hypothesis"))  # HypoFuzz's command
        command = [
            hypothesis_cli, "fuzz", "-n", str(processes), "--no-dashboard",
            "--", "-p", "no:cacheprovider", "tests/test_properties_lowering.py", "-k",
            "test_family",
        ]  # fmt: skip
        if direct:  # HypoFuzz's workers without its hub, the families split between them
            names = sorted(strategies.families())
            command_of = [
                [sys.executable, "-c", _DIRECT_WORKER, str(seconds), ",".join(names[i::processes])]
                for i in range(processes)
            ]
        else:
            command_of = [command]
        start = time.monotonic()
        procs = [
            subprocess.Popen(c, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for c in command_of
        ]  # fmt: skip
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, seconds + 60 - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
        wall = time.monotonic() - start
        reports = HypofuzzDatabase(example_database(db).inner)
        examples = 0
        for family in strategies.families():
            last: dict[str, Any] = {}
            for report in reports.reports.fetch(database_key(family)):
                if report.elapsed_time >= last.get(report.worker_uuid, (0.0, None))[0]:
                    last[report.worker_uuid] = (report.elapsed_time, report)
            for _, report in last.values():
                counts = report.status_counts
                examples += counts.get(Status.VALID, 0) + counts.get(Status.INTERESTING, 0)
    return examples, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--engine", action="store_true", help="also run HypoFuzz")
    parser.add_argument("--seconds", type=float, default=300.0, help="HypoFuzz's run")
    parser.add_argument("--direct", action="store_true", help="HypoFuzz's workers, no hub")
    args = parser.parse_args()
    if args.breakdown:
        breakdown(args.examples, args.seed)
        return
    print(f"{'workers':>7} {'run':>3} {'load':>5} {'examples':>8} {'failures':>8} {'ex/s':>7}")
    for workers in args.workers:
        rates = []
        for run in range(args.repeat):
            load = os.getloadavg()[0]
            summary = campaign(args.examples, args.seed, workers)
            rates.append(summary.examples_per_second)
            print(
                f"{workers:7} {run:3} {load:5.2f} {summary.examples:8} "
                f"{len(summary.failures):8} {summary.examples_per_second:7.2f}"
            )
        median = statistics.median(rates)
        print(f"{workers:7} median {median:.2f} examples/s, {median / workers:.2f} per process")
        if args.engine:
            load = os.getloadavg()[0]
            examples, wall = hypofuzz_rate(args.seconds, workers, args.direct)
            print(
                f"hypofuzz {workers} processes, load {load:.2f}: {examples} examples in "
                f"{wall:.0f} s: {examples / wall:.2f} examples/s, "
                f"{examples / wall / workers:.2f} per process"
            )


if __name__ == "__main__":
    main()
