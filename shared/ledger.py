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

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedmq.shared.broker import DETAIL_HEADER, REASON_HEADER, UPDATE_ID_HEADER, Delivery, JobNames, read_stream
from fedmq.shared.errors import InvalidUpdateError, MalformedMessageError
from fedmq.shared.messages import ID_RE, ModelVersion, Task, Update, update_id_for
from fedmq.shared.signing import JobTrust

log = logging.getLogger(__name__)

#: the reason the broker gives when a quorum queue's delivery limit dead-letters a message
DELIVERY_LIMIT = "delivery_limit"


#: what a reason header may look like: fedmq's and the broker's reasons are short snake_case words
REASON_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: a reason header of another shape (bytes, a number, 1 MB of text): reported as this
UNREADABLE_REASON = "unreadable_reason"
MAX_DETAIL = 1000


def header_id(headers: Any, key: str = UPDATE_ID_HEADER) -> str | None:
    """A sender-chosen id header, only when it is a str matching ID_RE (bounded, printable): every
    header of an update delivery and of a dead letter may have been chosen by a site."""
    value = headers.get(key) if isinstance(headers, dict) else None
    return value if type(value) is str and ID_RE.match(value) else None


def header_detail(headers: Any, max_len: int = MAX_DETAIL) -> str:
    """The detail header as bounded text ("" when absent or not text)."""
    value = headers.get(DETAIL_HEADER) if isinstance(headers, dict) else None
    if isinstance(value, bytes):
        value = value[:max_len * 4].decode(errors="replace")
    return value[:max_len] if type(value) is str else ""


def _reason(value: Any) -> str | None:
    """A reason header's value: None when absent, UNREADABLE_REASON when of the wrong shape."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes) and len(value) <= 64:
        value = value.decode(errors="replace")
    return value if type(value) is str and REASON_RE.match(value) else UNREADABLE_REASON


def dead_reason(headers: dict[str, Any]) -> str:
    """fedmq's reason header, else the broker's (``delivery_limit``, ``rejected``, ...); a value of
    the wrong shape (a site can preset any header, x-first-death-reason too) is UNREADABLE_REASON."""
    if not isinstance(headers, dict):
        return "unknown"
    # the broker dead-lettered it: x-death[0] is the broker's newest entry (it prepends to any
    # x-death a publisher preset), whereas x-fedmq-reason and x-first-death-reason may be the
    # sender's own; the aggregator's dead letters carry fresh headers without x-death
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = _reason(deaths[0].get("reason"))
        if reason is not None:
            return reason
    for key in (REASON_HEADER, "x-first-death-reason"):
        reason = _reason(headers.get(key))
        if reason is not None:
            return reason
    return "unknown"


def logged_update_id(d: Delivery) -> str | None:
    """The id the aggregator dedups on: the body's; the sender's header only for undecodable bodies
    (and only a well-formed one, `header_id`)."""
    try:
        return Update.decode(d.body).update_id
    except MalformedMessageError:
        return header_id(d.headers)


def credible_update(body: bytes, trust: JobTrust | None, routing_key: str | None) -> Update | None:
    """The update in `body` if it answers a task this job issued: it decodes, its id is its task's,
    and it passes `trust` (task proof, site signature; sender = `routing_key` unless None). None for
    anything else. Only credible updates may move a reader's state (what it waits for, how far it
    reads ahead): a site can log any bytes, but not a task proof."""
    try:
        u = Update.decode(body)
    except MalformedMessageError:
        return None
    if u.update_id != update_id_for(u.task_id):
        return None
    try:
        (trust or JobTrust()).verify(u, routing_key)
    except InvalidUpdateError:
        return None
    return u


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
    header = header_id(d.headers)
    return DeadLetter("update" if header else "unknown", header, reason)


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
    #: entries skipped because they are no message at all, per stream (`Ledger.unreadable`)
    unreadable: dict[str, int] = field(default_factory=dict)

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
    #: per stream, entries that decode as nothing (skipped; a site can log any bytes)
    unreadable: dict[str, int] = field(default_factory=dict)

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
            unreadable=dict(self.unreadable),
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
    """Read the three streams from offset 0 (update bodies are decoded and dropped); entries that
    are no message are skipped, logged and counted in `Ledger.unreadable`."""
    unreadable: Counter[str] = Counter()
    versions = []
    for d in read_stream(url, names.models, "first"):
        try:
            mv = ModelVersion.decode(d.body)
        except MalformedMessageError as exc:
            _skip(unreadable, names, "models", d, exc)
            continue
        versions.append(VersionEntry(mv.version, mv.parent, tuple(mv.included), mv.sha256))
    logged = []
    for d in read_stream(url, names.updates_log, "first"):
        uid = logged_update_id(d)
        if uid is None:
            _skip(unreadable, names, "updates_log", d, "no update and no well-formed id header")
            continue
        logged.append(uid)
    dead = []
    for d in read_stream(url, names.dead_log, "first"):
        dl = read_dead_letter(d)
        if dl.kind == "unknown":
            _skip(unreadable, names, "dead_log", d, f"reason={dl.reason}")
        dead.append(dl)
    return Ledger(versions, logged, dead, dict(unreadable))


def _skip(counts: Counter[str], names: JobNames, stream: str, d: Delivery, why: object) -> None:
    counts[stream] += 1
    if counts[stream] <= 20:
        log.warning("unreadable ledger entry job=%s stream=%s offset=%s error=%s", names.job, stream,
                    d.stream_offset, str(why)[:200])
