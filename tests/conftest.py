"""Test-wide configuration: the Hypothesis profiles, and the ``one_thread``, ``fresh_dynamo``,
``pairs_saturate`` and ``onednn_bf16`` fixtures.

``QALGEBRA_HYPOTHESIS_PROFILE`` picks one (an unknown name is an error); without it the profile is
``ci`` when the ``CI`` variable is set, else ``dev``:

- ``ci``: derandomized (the same examples every run), 30 examples, no deadline, failing examples
  printed as reproduction blobs, and no example database, so a run depends on nothing but the
  commit. If ``QALGEBRA_HYPOTHESIS_DB`` is set explicitly, ``ci`` replays that database instead
  (and saves its failures there) and is no longer derandomized (Hypothesis allows one or the
  other);
- ``dev``: 100 random examples, no deadline;
- ``fuzz``: 5000 random examples, no deadline, for long campaigns (HypoFuzz runs under it).

``dev`` and ``fuzz`` save failing examples in ``QALGEBRA_HYPOTHESIS_DB``
(:func:`qalgebra.testing.database.example_database`): a directory (default
``.hypothesis/examples``), or a Redis URL shared by machines, beside the local directory. As
Hypothesis recommends for teams, campaigns (``fuzz``, ``ci``) publish their failures to the
shared server and ``dev`` only replays it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from qalgebra import isa
from qalgebra.testing.database import DB_ENV, CpuTaggedDatabase, example_database


def _database(*, explicit_only: bool, publish: bool) -> CpuTaggedDatabase | None:
    spec = os.environ.get(DB_ENV, "")
    if not spec and explicit_only:
        return None
    return example_database(spec, publish=publish)


def _default_profile() -> str:
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return "ci" if in_ci else "dev"


_ci_database = _database(explicit_only=True, publish=True)
settings.register_profile(
    "ci",
    # Hypothesis refuses derandomize together with a database: an explicit database wins.
    derandomize=_ci_database is None,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=_ci_database,
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, database=_database(explicit_only=False, publish=False)
)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, database=_database(explicit_only=False, publish=True)
)
settings.load_profile(os.environ.get("QALGEBRA_HYPOTHESIS_PROFILE") or _default_profile())


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: oneDNN's thread pool costs more than their
    tiny ops (20x on a 2-core machine). Restores the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """For a test that compiles its own module: drop what dynamo cached for earlier ones,
    before and after."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[True, False], ids=["saturating", "vnni"])
def pairs_saturate(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The test runs once as on a CPU whose int8 pair sums saturate (AVX2 only) and once as on
    one with VNNI/AMX, whatever this CPU is: ``qalgebra.isa.int8_pairs_saturate`` is forced."""
    answer: bool = request.param
    with isa.forced(int8_pairs_saturate=answer):
        yield answer


@pytest.fixture(params=[True, False], ids=["bf16_out", "fp32_fallback"])
def onednn_bf16(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The test runs once as on a CPU whose oneDNN binary qconv/qlinear emit bf16, and once as
    on one where they cannot (the lowering computes in fp32 and converts)."""
    answer: bool = request.param
    with isa.forced(qlinear_binary_emits_bf16=answer, qconv_binary_emits_bf16=answer):
        yield answer
