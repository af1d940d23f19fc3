"""A job's ledger, read from its streams alone: where did every update go?

The promise fedmq makes under faults (docs/guarantees.md): every update that reached the updates
log is in exactly one version's ``included`` list or in dead letters with a reason, no id is
counted twice, and version numbers are contiguous. `read_ledger` + `Ledger.check` verify that
from the models, updates-log and dead-log streams alone (tests/chaos also recomputes every version
from v0 and the ``included`` lists with the aggregator's own `Accumulator`). Nothing here needs a
running process.

The coordinator uses `logged_update_id` and `read_dead_letter` to decide when a finishing job has
nothing left in flight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.broker import REASON_HEADER, UPDATE_ID_HEADER, Delivery, JobNames, read_stream
from shared.errors import MalformedMessageError
from shared.messages import ModelVersion, Task, Update

#: the reason the broker gives when a quorum queue's delivery limit dead-letters a message
DELIVERY_LIMIT = "delivery_limit"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def dead_reason(headers: dict[str, Any]) -> str:
    """fedmq's reason header, else the broker's (``delivery_limit``, ``rejected``, ...)."""
    for key in (REASON_HEADER, "x-first-death-reason"):
        if headers.get(key):
            return _text(headers[key])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) and deaths[0].get("reason"):
        return _text(deaths[0]["reason"])
    return "unknown"


def logged_update_id(d: Delivery) -> str | None:
    """The id the aggregator dedups on: the body's; the sender's header only for undecodable bodies."""
    try:
        return Update.decode(d.body).update_id
    except MalformedMessageError:
        header = d.headers.get(UPDATE_ID_HEADER)
        return _text(header) if header else None


@dataclass(frozen=True)
class DeadLetter:
    """One dead-log entry: an update or a task, with the reason it was parked."""

    kind: str  # "update", "task" or "unknown" (bytes that are neither)
    ident: str | None  # update id or task id
    reason: str


def read_dead_letter(d: Delivery) -> DeadLetter:
    reason = dead_reason(d.headers)
    try:
        return DeadLetter("update", Update.decode(d.body).update_id, reason)
    except MalformedMessageError:
        pass
    try:
        return DeadLetter("task", Task.decode(d.body).task_id, reason)
    except MalformedMessageError:
        pass
    header = d.headers.get(UPDATE_ID_HEADER)
    return DeadLetter("update" if header else "unknown", _text(header) if header else None, reason)


@dataclass(frozen=True)
class VersionEntry:
    version: int
    parent: int
    included: tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class LedgerReport:
    """What `Ledger.check` found; `ok` means nothing lost, nothing double counted, no gap."""

    logged: int
    included: int
    dead_lettered: int
    versions: int
    lost: list[str] = field(default_factory=list)
    double_counted: list[str] = field(default_factory=list)
    included_and_dead: list[str] = field(default_factory=list)
    #: ids included once whose stale copy the broker dead-lettered after too many crashes
    redundant_dead_letters: list[str] = field(default_factory=list)
    never_logged: list[str] = field(default_factory=list)
    version_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double_counted or self.included_and_dead or self.never_logged
                    or self.version_errors)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"ok": self.ok}


@dataclass
class Ledger:
    versions: list[VersionEntry]  # in stream order
    logged: list[str]  # update ids in updates-log order (a republished update appears twice)
    dead: list[DeadLetter]

    def check(self) -> LedgerReport:
        counts = Counter(uid for v in self.versions for uid in v.included)
        included = set(counts)
        logged = set(self.logged)
        dead_updates: dict[str, set[str]] = {}
        for dl in self.dead:
            if dl.kind == "update" and dl.ident:
                dead_updates.setdefault(dl.ident, set()).add(dl.reason)
        both = sorted(included & set(dead_updates))
        return LedgerReport(
            logged=len(logged), included=len(included), dead_lettered=len(set(dead_updates) - included),
            versions=len(self.versions),
            lost=sorted(logged - included - set(dead_updates)),
            double_counted=sorted(uid for uid, n in counts.items() if n > 1),
            included_and_dead=[u for u in both if dead_updates[u] != {DELIVERY_LIMIT}],
            redundant_dead_letters=[u for u in both if dead_updates[u] == {DELIVERY_LIMIT}],
            never_logged=sorted(included - logged),
            version_errors=self._version_errors(),
        )

    def _version_errors(self) -> list[str]:
        errors = []
        for i, v in enumerate(self.versions):
            if v.version != i:
                errors.append(f"entry {i} of the models stream is version {v.version}")
            if i and v.parent != v.version - 1:
                errors.append(f"version {v.version} has parent {v.parent}")
        return errors


def read_ledger(url: str, names: JobNames) -> Ledger:
    """Read the three streams from offset 0 (update bodies are decoded and dropped)."""
    versions = []
    for d in read_stream(url, names.models, "first"):
        mv = ModelVersion.decode(d.body)
        versions.append(VersionEntry(mv.version, mv.parent, tuple(mv.included), mv.sha256))
    logged = [uid for d in read_stream(url, names.updates_log, "first") if (uid := logged_update_id(d))]
    dead = [read_dead_letter(d) for d in read_stream(url, names.dead_log, "first")]
    return Ledger(versions, logged, dead)
