"""Fuzzing throughput: ``qalgebra fuzz`` examples per second, and where one process spends it.

    python bench/bench_fuzz.py                       # 400 examples, seed 7, 1 and 2 workers
    python bench/bench_fuzz.py --examples 2000 --repeat 3 --workers 1
    python bench/bench_fuzz.py --breakdown           # one process: time per stage and family

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--breakdown", action="store_true")
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
        print(f"{workers:7} median {statistics.median(rates):.2f} examples/s")


if __name__ == "__main__":
    main()
