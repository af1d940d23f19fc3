"""`fedmq history`: the audit trail of a job, read from its streams alone.

Which site's update went into which version (with its base version, staleness, weight and
samples), each version's sha256 and test accuracy, every dead letter with its reason, and totals
per site. Nothing here needs a process of the job to be alive: the models, updates-log, dead-log
and events streams are the whole record (DESIGN.md, "Messages": every message is self-describing).

This module also holds `StreamCursor`, the reader `replay` and `export` share: it reads a stream
from its first entry up to the tail it had when the cursor opened, so a live job still yields one
consistent prefix, and an end is never guessed from a quiet moment on a busy broker.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shared.broker import (
    DETAIL_HEADER,
    REASON_HEADER,
    UPDATE_ID_HEADER,
    Delivery,
    JobNames,
    StreamReader,
)
from shared.errors import BrokerUnavailableError, JobNotFoundError, MalformedMessageError
from shared.messages import Event, EventKind, ModelVersion, Task, Update

log = logging.getLogger(__name__)

#: how long a reader may wait for the next entry before the stream counts as stalled
STALL_SECONDS = 30.0


# ---------------------------------------------------------------------------- reading streams


def stream_tail(url: str, stream: str, *, first_wait: float = 1.0, idle: float = 0.1) -> int | None:
    """Offset of the newest entry of `stream`, or None when it is empty.

    A ``"last"`` consumer yields the whole last chunk within milliseconds; the highest offset in
    it is the tail. An empty stream yields nothing, which costs `first_wait` to be sure of.
    """
    with StreamReader(url, stream, name="fedmq-stream-tail", prefetch=64) as reader:
        reader.start("last")
        tail: int | None = None
        deadline = time.monotonic() + first_wait
        while time.monotonic() < deadline:
            got = reader.poll(0.02)
            offsets = [d.stream_offset for d in got if d.stream_offset is not None]
            if offsets:
                tail = max([*offsets, tail if tail is not None else -1])
                deadline = time.monotonic() + idle
        return tail


class StreamCursor:
    """Entries of one stream in order, from the first still kept up to the tail at open time.

    `first_offset` > 0 means retention has dropped the stream's oldest segments (a stream's first
    entry has offset 0). `extend` reads on past the tail until the stream is quiet, for callers
    that know something must still come (an included update the snapshot tail did not cover).
    """

    def __init__(self, url: str, stream: str, *, name: str, prefetch: int = 32,
                 stall: float = STALL_SECONDS) -> None:
        self.stream = stream
        self.stall = stall
        self.tail = stream_tail(url, stream)
        self.first_offset: int | None = None
        self.entries_read = 0
        self._reader = StreamReader(url, stream, name=name, prefetch=prefetch)
        self._ready: deque[Delivery] = deque()
        self._beyond: deque[Delivery] = deque()  # arrived after the tail; kept for `extend`
        self._at_tail = self.tail is None
        if not self._at_tail:
            self._reader.start("first")

    def __enter__(self) -> StreamCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def __iter__(self) -> Iterator[Delivery]:
        while (d := self.next()) is not None:
            yield d

    def next(self) -> Delivery | None:
        """The next entry up to the tail, or None once the tail has been returned."""
        while not self._ready:
            if self._at_tail:
                return None
            self._pull()
        return self._take(self._ready.popleft())

    def extend(self, idle: float = 0.5) -> Delivery | None:
        """The next entry past the tail, or None after `idle` seconds without one."""
        if not self._at_tail:
            raise RuntimeError("StreamCursor.extend before the tail was reached")
        if self._beyond:
            return self._take(self._beyond.popleft())
        if self.tail is None:
            return None  # the stream was empty at open: nobody started a consumer
        deadline = time.monotonic() + idle
        while time.monotonic() < deadline:
            got = self._reader.poll(0.05)
            if got:
                self._beyond.extend(got[1:])
                return self._take(got[0])
        return None

    def _take(self, d: Delivery) -> Delivery:
        if self.first_offset is None:
            self.first_offset = d.stream_offset
        self.entries_read += 1
        return d

    def _pull(self) -> None:
        if self.tail is None:
            return
        deadline = time.monotonic() + self.stall
        while time.monotonic() < deadline:
            got = self._reader.poll(0.05)
            if not got:
                continue
            for d in got:
                off = d.stream_offset if d.stream_offset is not None else -1
                if self._at_tail:
                    self._beyond.append(d)
                    continue
                self._ready.append(d)
                if off >= self.tail:
                    self._at_tail = True
            return
        raise BrokerUnavailableError(
            f"stream {self.stream} stalled: nothing for {self.stall:.0f}s before its tail offset {self.tail}"
        )


def decode_or_none(cls: type[Any], d: Delivery) -> Any:
    """A message or None for bytes that are not one (logged streams can hold junk: it was
    dead-lettered when it arrived, and history counts it)."""
    try:
        return cls.decode(d.body)
    except MalformedMessageError:
        return None


# ---------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class VersionEntry:
    version: int
    parent: int
    strategy: str
    included: tuple[str, ...]
    contributions: tuple[dict[str, Any], ...]
    sha256: str
    created_at: float
    accuracy: float | None
    offset: int | None
    epsilon: float | None = None  # the job's DP epsilon after this version (meta["dp"]), None = no DP

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "parent": self.parent, "strategy": self.strategy,
                "included": list(self.included), "contributions": [dict(c) for c in self.contributions],
                "sha256": self.sha256, "accuracy": self.accuracy, "created_at": self.created_at,
                "offset": self.offset, "epsilon": self.epsilon}


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead log: an update the aggregator refused, a task a worker refused, or a
    message the broker dead-lettered itself (delivery limit: `x-first-death-reason`)."""

    kind: str  # "update" | "task" | "unknown"
    update_id: str | None
    task_id: str | None
    site: str | None
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "reason": self.reason, "kind": self.kind,
                "task_id": self.task_id, "site": self.site, "detail": self.detail}


@dataclass
class SiteTotals:
    updates_logged: int = 0
    updates_included: int = 0
    samples_included: int = 0
    total_weight: float = 0.0
    staleness_sum: int = 0
    dead_lettered: int = 0
    epsilon: float | None = None  # highest DP epsilon the site reported in its updates

    def to_dict(self) -> dict[str, Any]:
        mean = self.staleness_sum / self.updates_included if self.updates_included else None
        return {"updates_logged": self.updates_logged, "updates_included": self.updates_included,
                "samples_included": self.samples_included, "total_weight": self.total_weight,
                "mean_staleness": mean, "dead_lettered": self.dead_lettered, "epsilon": self.epsilon}


@dataclass
class History:
    job: str
    versions: list[VersionEntry] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    updates_logged: list[str] = field(default_factory=list)
    unreadable_updates: int = 0
    models_first_offset: int | None = None
    updates_first_offset: int | None = None
    sites: dict[str, SiteTotals] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        """Retention dropped the oldest segments of the models stream or the updates log."""
        first_version = self.versions[0].version if self.versions else 0
        return bool(first_version != 0 or (self.models_first_offset or 0) > 0
                    or (self.updates_first_offset or 0) > 0)

    def not_included(self) -> list[str]:
        """Logged ids neither folded into a version nor dead-lettered, each once: updates still in
        flight when the job ended. A redelivered copy of an included id is not listed."""
        accounted = {i for v in self.versions for i in v.included}
        accounted |= {d.update_id for d in self.dead_letters if d.update_id}
        seen: set[str] = set()
        out = []
        for uid in self.updates_logged:
            if uid not in accounted and uid not in seen:
                out.append(uid)
                seen.add(uid)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The DESIGN.md contract (job, versions, dead_letters, updates_logged) plus detail."""
        return {
            "job": self.job,
            "versions": [v.to_dict() for v in self.versions],
            "dead_letters": [d.to_dict() for d in self.dead_letters],
            "updates_logged": list(self.updates_logged),
            "updates_not_included": self.not_included(),
            "unreadable_updates": self.unreadable_updates,
            "sites": {s: t.to_dict() for s, t in sorted(self.sites.items())},
            "truncated": self.truncated,
            "first_version": self.versions[0].version if self.versions else None,
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_dead_letter(d: Delivery) -> DeadLetter:
    """Reason from fedmq's header, else from the broker's own dead-lettering headers."""
    h = d.headers
    reason = _text(h.get(REASON_HEADER)) or _text(h.get("x-first-death-reason"))
    deaths = h.get("x-death")
    if reason is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = _text(deaths[0].get("reason"))
    update_id = _text(h.get(UPDATE_ID_HEADER))
    detail = _text(h.get(DETAIL_HEADER)) or ""
    if d.routing_key == "task":
        task = decode_or_none(Task, d)
        return DeadLetter("task", task.update_id if task else update_id, task.task_id if task else None,
                          None, reason or "unknown", detail)
    update = decode_or_none(Update, d)
    if update is not None:
        return DeadLetter("update", update.update_id, update.task_id, update.site, reason or "unknown", detail)
    task = decode_or_none(Task, d)  # a task dead-lettered by the broker keeps its own routing key
    if task is not None:
        return DeadLetter("task", task.update_id, task.task_id, None, reason or "unknown", detail)
    return DeadLetter("unknown", update_id, None, d.routing_key or None, reason or "unknown", detail)


def read_accuracies(url: str, names: JobNames) -> dict[int, float]:
    """Test accuracy per version from the coordinator's VERSION_EVALUATED events."""
    out: dict[int, float] = {}
    with StreamCursor(url, names.events, name=f"fedmq-history-events-{names.job}", prefetch=256) as cur:
        for d in cur:
            ev = decode_or_none(Event, d)
            if ev is not None and ev.event == EventKind.VERSION_EVALUATED:
                try:
                    out[int(ev.data["version"])] = float(ev.data["accuracy"])
                except (KeyError, TypeError, ValueError):
                    continue
    return out


def read_history(url: str, job: str) -> History:
    """Everything `fedmq history` shows, from the job's four streams."""
    names = JobNames(job)
    hist = History(job)
    accuracy = read_accuracies(url, names)
    with StreamCursor(url, names.models, name=f"fedmq-history-models-{job}", prefetch=8) as cur:
        for d in cur:
            mv = decode_or_none(ModelVersion, d)
            if mv is None:
                log.error("unreadable model version job=%s offset=%s", job, d.stream_offset)
                continue
            hist.versions.append(VersionEntry(
                mv.version, mv.parent, mv.strategy, mv.included, mv.contributions, mv.sha256,
                mv.created_at, accuracy.get(mv.version), d.stream_offset,
                _number((mv.meta.get("dp") or {}).get("epsilon"))))
        hist.models_first_offset = cur.first_offset
    if not hist.versions:
        raise JobNotFoundError(f"job {job} has no model version on the broker")
    with StreamCursor(url, names.updates_log, name=f"fedmq-history-updates-{job}", prefetch=32) as cur:
        for d in cur:
            u = decode_or_none(Update, d)
            if u is None:
                hist.unreadable_updates += 1
                continue
            hist.updates_logged.append(u.update_id)
            totals = hist.sites.setdefault(u.site, SiteTotals())
            totals.updates_logged += 1
            eps = _number(u.privacy.get("epsilon"))
            if eps is not None:
                totals.epsilon = max(eps, totals.epsilon or 0.0)
        hist.updates_first_offset = cur.first_offset
    with StreamCursor(url, names.dead_log, name=f"fedmq-history-dead-{job}", prefetch=32) as cur:
        hist.dead_letters = [parse_dead_letter(d) for d in cur]
    _site_totals(hist)
    return hist


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _site_totals(hist: History) -> None:
    for v in hist.versions:
        for c in v.contributions:
            t = hist.sites.setdefault(str(c.get("site")), SiteTotals())
            t.updates_included += 1
            t.samples_included += int(c.get("num_samples", 0))
            t.total_weight += float(c.get("weight", 0.0))
            t.staleness_sum += int(c.get("staleness", 0))
    for dl in hist.dead_letters:
        if dl.site:
            hist.sites.setdefault(dl.site, SiteTotals()).dead_lettered += 1


# ---------------------------------------------------------------------------- output


def _contribution_text(c: dict[str, Any]) -> str:
    return (f"{c.get('site')} base v{c.get('base_version')} tau {c.get('staleness')} "
            f"w {float(c.get('weight', 0.0)):.4g} n {c.get('num_samples')}  {c.get('update_id')}")


def render(hist: History) -> None:
    """Human tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped to a file: do not squeeze the tables into 80 columns
    if hist.truncated:
        console.print(f"[yellow]history truncated by retention: the oldest readable version is "
                      f"v{hist.versions[0].version}[/]")
    t = Table(title=f"job {hist.job}: {len(hist.versions)} versions")
    for col in ("version", "parent", "strategy", "included updates (site, base, tau, weight, samples, id)",
                "sha256", "accuracy", "epsilon"):
        t.add_column(col)
    for v in hist.versions:
        lines = [_contribution_text(c) for c in v.contributions] or list(v.included) or ["-"]
        t.add_row(str(v.version), str(v.parent), v.strategy, "\n".join(lines), v.sha256[:16],
                  "-" if v.accuracy is None else f"{v.accuracy:.4f}",
                  "-" if v.epsilon is None else f"{v.epsilon:.3f}")
    console.print(t)
    d = Table(title=f"dead letters: {len(hist.dead_letters)}")
    for col in ("kind", "update id", "site", "reason", "detail"):
        d.add_column(col)
    for dl in hist.dead_letters:
        d.add_row(dl.kind, dl.update_id or "-", dl.site or "-", dl.reason, dl.detail[:80])
    console.print(d)
    s = Table(title="per site")
    for col in ("site", "logged", "included", "samples", "total weight", "mean staleness", "dead-lettered",
                "epsilon"):
        s.add_column(col)
    for site, tot in sorted(hist.sites.items()):
        row = tot.to_dict()
        mean = row["mean_staleness"]
        s.add_row(site, str(tot.updates_logged), str(tot.updates_included), str(tot.samples_included),
                  f"{tot.total_weight:.4g}", "-" if mean is None else f"{mean:.2f}", str(tot.dead_lettered),
                  "-" if tot.epsilon is None else f"{tot.epsilon:.3f}")
    console.print(s)
    missing = hist.not_included()
    console.print(f"{len(hist.updates_logged)} updates logged, {len(missing)} neither included nor "
                  f"dead-lettered{': ' + ', '.join(missing[:10]) if missing else ''}"
                  f"{' ...' if len(missing) > 10 else ''}; {hist.unreadable_updates} unreadable")


def cmd_history(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json

    hist = read_history(args.broker, args.job)
    if args.json:
        print_json(hist.to_dict())
    else:
        render(hist)
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("history", help="versions with their included updates, dead letters with reasons",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (the last stdout line)")
    p.set_defaults(run=cmd_history)
