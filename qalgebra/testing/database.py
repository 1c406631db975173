"""The example database of the lowering properties: a directory or a Redis server, shared by
machines, with the CPU each failure was found on.

:func:`example_database` turns a specification -- ``QALGEBRA_HYPOTHESIS_DB``, ``qalgebra fuzz
--db`` -- into Hypothesis's own database classes: a directory is used as is (several machines
may share it over a network file system); a Redis URL (``redis://host:6379/0``) gives the recipe
Hypothesis documents for teams, a local directory plus the shared server
(:class:`~hypothesis.database.MultiplexedDatabase`), the shared one read-only
(:class:`~hypothesis.database.ReadOnlyDatabase`) for runs that should not publish what they
find. Every failure Hypothesis saves in it then comes back first on every machine.

The same graph lowers differently on AVX2, AVX512-VNNI and AMX, so a failure found on one CPU
may pass on another without being fixed. :class:`CpuTaggedDatabase` records, beside each
failure, the CPU it was found on (:class:`CpuTag`: ISA flags and probe answers, from
:mod:`qalgebra.isa`). When a replayed failure passes on a CPU of another kind, Hypothesis would
delete it as fixed; the wrapper keeps it and records a :class:`Replay` saying so instead.

>>> from hypothesis.database import InMemoryExampleDatabase
>>> db = CpuTaggedDatabase(InMemoryExampleDatabase(), CpuTag("AVX2", ("avx2",), ()))
>>> key = bytes(48)  # Hypothesis's keys of a test are 48 bytes (its sha384 digest)
>>> db.save(key, b"failing choices")
>>> [tag.kind for tag in db.found_on(key, b"failing choices")]
['AVX2 avx2']
>>> elsewhere = CpuTaggedDatabase(db.inner, CpuTag("AMX", ("amx_int8",), ()))
>>> elsewhere.delete(key, b"failing choices")  # passes on an AMX machine: kept
>>> list(db.fetch(key)), elsewhere.replays[0].reproduced
([b'failing choices'], False)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    MultiplexedDatabase,
    ReadOnlyDatabase,
)

from qalgebra.errors import ExampleDatabaseError

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "CpuTag",
    "CpuTaggedDatabase",
    "Replay",
    "example_database",
    "is_redis_url",
    "redacted",
    "this_cpu",
]

#: Environment variable naming the example database (a directory or a Redis URL).
DB_ENV = "QALGEBRA_HYPOTHESIS_DB"
#: The local directory: the whole database without a specification, its writable half with a
#: Redis URL.
DEFAULT_DB = ".hypothesis/examples"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: Hypothesis keys a test's failures by its 48-byte digest; longer keys are derived from it
#: (``.secondary``, ``.pareto``, HypoFuzz's corpus and reports) and are not failures.
_PRIMARY_KEY_LENGTH = 48
_TAGS = b".qalgebra-cpu"


@dataclass(frozen=True, slots=True)
class CpuTag:
    """The kind of CPU a failure was found on: what makes oneDNN's int8 kernels differ."""

    capability: str
    flags: tuple[str, ...]
    probes: tuple[tuple[str, bool], ...]
    model: str = ""

    @property
    def kind(self) -> str:
        """Equal on CPUs whose kernels behave alike (the model name aside)."""
        forced = "".join(f" {name}={int(answer)}" for name, answer in self.probes)
        return f"{self.capability} {' '.join(self.flags)}{forced}"

    def describe(self) -> str:
        return f"{self.model or 'a CPU'} ({self.kind})"

    def to_json(self) -> dict[str, Any]:
        return {
            "capability": self.capability,
            "flags": list(self.flags),
            "probes": dict(self.probes),
            "model": self.model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CpuTag:
        probes = tuple(sorted((str(k), bool(v)) for k, v in dict(data["probes"]).items()))
        return cls(str(data["capability"]), tuple(data["flags"]), probes, str(data["model"]))


def this_cpu() -> CpuTag:
    """This process's CPU: :func:`qalgebra.isa.cpu_description` and the probes' answers
    (forced answers included: a forced probe stands for another kind of CPU)."""
    from qalgebra import isa

    cpu = isa.cpu_description()
    flags = cpu["flags"]
    return CpuTag(
        capability=str(cpu["capability"]),
        flags=tuple(str(f) for f in flags) if isinstance(flags, list) else (),
        probes=tuple(sorted(isa.probe_answers().items())),
        model=str(cpu["model"]),
    )


@dataclass(frozen=True, slots=True)
class Replay:
    """A failure from the database replayed here, and found on ``found_on`` before.

    ``reproduced``: it failed here too. Otherwise it passed here, but was found on CPUs of
    other kinds only, and stays in the database for them.
    """

    key: bytes
    value: bytes
    found_on: tuple[CpuTag, ...]
    reproduced: bool

    def describe(self) -> str:
        where = ", ".join(tag.describe() for tag in self.found_on) or "an untagged run"
        if self.reproduced:
            return f"reproduced here; found before on {where}"
        return f"passes on this CPU, kept for the CPU(s) it was found on: {where}"


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


class CpuTaggedDatabase(ExampleDatabase):
    """``inner``, with the CPU each failure was saved from, and failures kept on other CPUs.

    Beside a failure (a value saved under a test's primary key) goes a record under
    ``key + b".qalgebra-cpu"``: the value's digest and ``cpu``. Deleting a failure -- what
    Hypothesis does when a replayed failure passes -- removes this CPU kind's record, and the
    value itself only when no CPU of another kind has a record of it. :attr:`replays` lists
    what replaying recorded failures found, for reports.
    """

    def __init__(self, inner: ExampleDatabase, cpu: CpuTag | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._cpu = cpu
        self.replays: list[Replay] = []

    @property
    def cpu(self) -> CpuTag:
        """The CPU failures are saved from (default :func:`this_cpu`, asked on first use: the
        probes run oneDNN, which a process that forks workers must not do beforehand)."""
        if self._cpu is None:
            self._cpu = this_cpu()
        return self._cpu

    def __repr__(self) -> str:
        return f"CpuTaggedDatabase({self.inner!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CpuTaggedDatabase)
            and self.inner == other.inner
            and self._cpu == other._cpu
        )

    __hash__ = ExampleDatabase.__hash__

    def _records(self, key: bytes, value: bytes) -> list[tuple[bytes, CpuTag]]:
        digest = _digest(value)
        found = []
        for raw in self.inner.fetch(key + _TAGS):
            try:
                record = json.loads(raw)
                if record["value"] == digest:
                    found.append((raw, CpuTag.from_json(record["cpu"])))
            except (ValueError, KeyError, TypeError):
                continue  # not a record of ours: ignored
        return found

    def found_on(self, key: bytes, value: bytes) -> list[CpuTag]:
        """The CPUs ``value`` was saved from as a failure under ``key``."""
        return [tag for _, tag in self._records(key, value)]

    def _record(self, key: bytes, value: bytes) -> bytes:
        record = {"value": _digest(value), "cpu": self.cpu.to_json()}
        return json.dumps(record, sort_keys=True).encode()

    def fetch(self, key: bytes) -> Iterable[bytes]:
        return self.inner.fetch(key)

    def save(self, key: bytes, value: bytes) -> None:
        if len(key) == _PRIMARY_KEY_LENGTH:
            before = self.found_on(key, value)
            if before:  # a recorded failure failed again: Hypothesis saves it anew
                self.replays.append(Replay(key, value, tuple(before), reproduced=True))
            self.inner.save(key + _TAGS, self._record(key, value))
        self.inner.save(key, value)

    def delete(self, key: bytes, value: bytes) -> None:
        if len(key) == _PRIMARY_KEY_LENGTH and self._keeps(key, value):
            return
        self.inner.delete(key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        if len(src) == _PRIMARY_KEY_LENGTH and self._keeps(src, value):
            self.inner.save(dest, value)  # a copy, as Hypothesis wants; the failure stays
            return
        self.inner.move(src, dest, value)

    def _keeps(self, key: bytes, value: bytes) -> bool:
        """Forget this CPU kind's record of ``value``; whether other kinds still have one."""
        records = self._records(key, value)
        others = tuple(tag for _, tag in records if tag.kind != self.cpu.kind)
        for raw, tag in records:
            if tag.kind == self.cpu.kind:
                self.inner.delete(key + _TAGS, raw)
        if others:
            self.replays.append(Replay(key, value, others, reproduced=False))
        return bool(others)

    def _start_listening(self) -> None:
        self.inner.add_listener(self._broadcast_change)

    def _stop_listening(self) -> None:
        self.inner.remove_listener(self._broadcast_change)


def is_redis_url(spec: str) -> bool:
    """Whether ``spec`` names a Redis server rather than a directory."""
    return spec.startswith(_REDIS_SCHEMES)


def redacted(spec: str) -> str:
    """``spec`` without its password (a Redis URL's ``user:password@``), for messages."""
    parts = urlsplit(spec)
    if parts.password is None:
        return spec
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}{port}"
    return parts._replace(netloc=netloc).geturl()


def _redis(url: str) -> ExampleDatabase:
    try:
        from hypothesis.extra.redis import RedisExampleDatabase
        from redis import Redis
        from redis.exceptions import RedisError
    except ImportError as exc:
        raise ExampleDatabaseError(
            f"{redacted(url)}: a Redis example database needs the redis client "
            "(pip install redis)"
        ) from exc
    try:
        client = Redis.from_url(url)
        client.ping()
    except (RedisError, ValueError) as exc:
        raise ExampleDatabaseError(
            f"{redacted(url)}: cannot reach the Redis server ({exc})"
        ) from exc
    return RedisExampleDatabase(client)


def example_database(
    spec: str | None = None, *, publish: bool = True, local: str | Path = DEFAULT_DB
) -> CpuTaggedDatabase:
    """The database named by ``spec`` (default: ``$QALGEBRA_HYPOTHESIS_DB``, else ``local``).

    A directory is the database. A Redis URL gives ``local`` for this machine plus the server;
    ``publish=False`` makes the server read-only (this run replays the team's failures and
    keeps its own locally). The server must answer at once: :class:`ExampleDatabaseError`
    otherwise.
    """
    spec = os.environ.get(DB_ENV, "") if spec is None else spec
    inner: ExampleDatabase
    if not spec:
        inner = DirectoryBasedExampleDatabase(str(local))
    elif is_redis_url(spec):
        shared = _redis(spec)
        inner = MultiplexedDatabase(
            DirectoryBasedExampleDatabase(str(local)),
            shared if publish else ReadOnlyDatabase(shared),
        )
    else:
        inner = DirectoryBasedExampleDatabase(spec)
    return CpuTaggedDatabase(inner)

