"""What a job's events stream says, folded: the view `fedmq monitor` shows and the compact
summary of it (`job_summary`) the coordinator journals every few hundred entries, so a monitor
starts from the newest summary instead of the stream's first entry.

Here, not in fedmq.monitor, because two parties need it: the coordinator writes summaries with
exactly the fold the monitor reads them with. Every entry is hostile until `read_event_delivery`
vouched for it; a summary counts only from the coordinator under the bare routing key.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fedmq.shared.broker import Connection, Delivery, JobNames
from fedmq.shared.errors import MalformedMessageError
from fedmq.shared.evaluation import EvalSource, Evaluated, SiteReport, read_evaluated, read_report
from fedmq.shared.jobstate import (
    SourcedEvent,
    as_id,
    as_int,
    as_site,
    emit,
    field_float,
    field_id,
    field_int,
    field_list,
    field_site,
    field_text,
    read_event_delivery,
)
from fedmq.shared.messages import Event, EventKind, update_id_for

log = logging.getLogger(__name__)


class Status(StrEnum):
    NOT_FOUND = "not_found"     # no events stream: wrong job id, or its coordinator never ran
    WAITING = "waiting"         # topology exists, job_started not seen yet
    RUNNING = "running"
    FINISHING = "finishing"     # coordinator stopped issuing tasks, draining updates
    FINISHED = "finished"       # tasks and updates queues deleted by the coordinator


class Level(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


# ----------------------------------------------------------------------------- folding events


@dataclass
class SiteRow:
    """One site as the events stream saw it."""

    site: str
    updates: int = 0               # updates published (distinct update ids)
    applied: int = 0               # updates folded into a version
    staleness_sum: int = 0
    last_seen: float | None = None
    epsilon: float | None = None   # newest privacy spend the site reported (DP on)
    refused: int = 0
    failed: int = 0                # tasks whose training raised at the site (task_failed)
    last_failure: float | None = None
    last_error: str | None = None  # the newest failure's error text, as the site reported it
    evaluation: SiteReport | None = None  # the site's newest federated evaluation report

    @property
    def mean_staleness(self) -> float | None:
        return self.staleness_sum / self.applied if self.applied else None

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "updates": self.updates, "applied": self.applied,
            "mean_staleness": None if self.mean_staleness is None else round(self.mean_staleness, 3),
            "last_seen": self.last_seen,
            "last_seen_seconds_ago": None if self.last_seen is None else round(now - self.last_seen, 1),
            "epsilon": self.epsilon, "refused": self.refused, "failed": self.failed,
            "last_error": self.last_error,
            "evaluation": None if self.evaluation is None else {
                "version": self.evaluation.version, "samples": self.evaluation.samples,
                "metrics": dict(self.evaluation.metrics)},
        }


#: bounds of what the dashboard shows: a site's 1e308 epsilon or 10**15 staleness is not a number
#: anyone can read, and must not break a table, the JSON or a sum
MAX_EPSILON = 1e6
MAX_STALENESS = 2**31
DEAD_REASON_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: sites a roster takes from the registry: more would be no roster anyone can read
MAX_ROSTER = 100_000


def _epsilon(data: dict[str, Any]) -> float | None:
    """The DP spend an event reports: top-level `epsilon`, or inside a `privacy` map."""
    eps = field_float(data, "epsilon", 0.0, MAX_EPSILON)
    if eps is None and data.get("epsilon") is None:
        eps = field_float(data.get("privacy"), "epsilon", 0.0, MAX_EPSILON)
    return eps


def _staleness(value: Any) -> int | None:
    return as_int(value, 0, MAX_STALENESS)


def _bad_epsilon(data: dict[str, Any], eps: float | None) -> bool:
    """An epsilon was sent but is no bounded number: the whole event is suspect."""
    return eps is None and (data.get("epsilon") is not None
                            or isinstance(data.get("privacy"), dict) and data["privacy"].get("epsilon") is not None)


def _optional_list(data: dict[str, Any], key: str, item: Callable[[Any], Any]) -> list[Any] | None:
    """A list field that may be missing ([]); None when present but not a list of valid items."""
    return [] if data.get(key) is None else field_list(data, key, item)


@dataclass
class JobView:
    """What the events stream says about a job; `apply` each event in stream order.

    Every data field is type-checked and bounded before it is kept: an event with a field of the
    wrong type is skipped and counted in `poison` (with what `Monitor` skips before folding)."""

    job: str
    status: Status = Status.WAITING
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    stop_reason: str | None = None
    latest_version: int | None = None
    version_times: list[tuple[float, int]] = field(default_factory=list)      # (ts, version)
    accuracy: list[tuple[int, float, float]] = field(default_factory=list)    # (version, t, accuracy)
    #: the newest evaluation per scope ("central", "federated") and every metric's recent values
    evaluations: dict[str, Evaluated] = field(default_factory=dict)
    metric_history: deque[Evaluated] = field(default_factory=lambda: deque(maxlen=400))
    sites: dict[str, SiteRow] = field(default_factory=dict)
    #: update ids published (dicts as insertion-ordered sets: a summary keeps the newest)
    update_ids: dict[str, None] = field(default_factory=dict)
    #: update ids of the tasks the coordinator issued: a site's event counts only for one of
    #: these, so junk ids cannot grow the view's memory or its per-site counts
    issued_updates: dict[str, None] = field(default_factory=dict)
    updates_applied: int = 0
    tasks_issued: int = 0
    dead_letters: list[tuple[float, str]] = field(default_factory=list)       # (ts, reason)
    active_aggregator: str | None = None
    active_since: float | None = None
    takeovers: int = 0
    events: int = 0
    poison: dict[str, int] = field(default_factory=dict)                      # reason -> entries skipped
    #: the sites expected to take part: the job's signing registry (v0's meta) and --expect-sites
    roster: set[str] = field(default_factory=set)
    #: what a summary (`checkpoint`) counted but no longer lists: versions, published update ids,
    #: dead letters by reason
    versions_before: int = 0
    updates_before: int = 0
    dead_before: dict[str, int] = field(default_factory=dict)
    #: False in the coordinator's copy: it logs the entries it skips itself
    log_skips: bool = True

    def _site(self, name: str) -> SiteRow:
        return self.sites.setdefault(name, SiteRow(name))

    def _seen(self, name: str, ts: float) -> SiteRow:
        row = self._site(name)
        row.last_seen = ts if row.last_seen is None else max(row.last_seen, ts)
        return row

    def skip(self, reason: str) -> None:
        self.poison[reason] = self.poison.get(reason, 0) + 1

    def apply(self, ev: Event) -> None:
        self.events += 1
        handler = _HANDLERS.get(ev.event)
        if handler is not None and handler(self, ev) is False:
            self.skip("bad_field")
            n = self.poison["bad_field"]
            if self.log_skips and (n <= 20 or n % 1000 == 0):  # a flood of junk events must not flood the log too
                log.warning("event with a bad field skipped job=%s event=%s skipped=%d", self.job, ev.event, n)

    def _on_started(self, ev: Event) -> bool:
        self.started_at = ev.ts
        self.strategy = field_text(ev.data, "strategy", 64)
        params = ev.data.get("params")
        self.params = dict(params) if isinstance(params, dict) else {}
        if self.status is Status.WAITING:
            self.status = Status.RUNNING
        if self.latest_version is None:
            self.latest_version = 0
        return True

    def _on_update(self, ev: Event) -> bool:
        uid, site, eps = field_id(ev.data, "update_id"), field_site(ev.data), _epsilon(ev.data)
        if uid is None or site is None or _bad_epsilon(ev.data, eps):
            return False
        if uid not in self.issued_updates:
            return False
        row = self._seen(site, ev.ts)
        if uid not in self.update_ids:  # a redelivered task re-publishes the same update id
            self.update_ids[uid] = None
            row.updates += 1
        if eps is not None:
            row.epsilon = eps
        if "eval" in ev.data:
            report = read_report(ev.data["eval"])
            if report is None:
                return False
            row.evaluation = report
        return True

    def _on_refused(self, ev: Event) -> bool:
        site, eps = field_site(ev.data), _epsilon(ev.data)
        if site is None or _bad_epsilon(ev.data, eps):
            return False
        row = self._seen(site, ev.ts)
        row.refused += 1
        if eps is not None:
            row.epsilon = eps
        return True

    def _on_failed(self, ev: Event) -> bool:
        site, tid = field_site(ev.data), field_id(ev.data, "task_id")
        error = field_text(ev.data, "error", 500)
        if site is None or tid is None or (error is None and "error" in ev.data):
            return False
        if update_id_for(tid) not in self.issued_updates:
            return False  # not a task of this job: junk cannot grow the table
        row = self._seen(site, ev.ts)
        row.failed += 1
        row.last_failure, row.last_error = ev.ts, error
        return True

    def _on_version(self, ev: Event) -> bool:
        version = field_int(ev.data, "version")
        included = _optional_list(ev.data, "included", as_id)
        sites = _optional_list(ev.data, "sites", as_site)
        staleness = _optional_list(ev.data, "staleness", _staleness)
        if version is None or included is None or sites is None or staleness is None:
            return False
        self.version_times.append((ev.ts, version))
        self.latest_version = max(version, self.latest_version or 0)
        self.updates_applied += len(included)
        for site, tau in zip(sites, staleness, strict=False):
            row = self._site(site)
            row.applied += 1
            row.staleness_sum += tau
        return True

    def _on_evaluated(self, ev: Event) -> bool:
        read = read_evaluated(ev.data)
        if read is None:
            return False
        if read.scope == EvalSource.CENTRAL.value and read.accuracy is not None:
            self.accuracy.append((read.version, read.t, read.accuracy))
        self.evaluations[read.scope] = read
        self.metric_history.append(read)
        return True

    def _on_dead(self, ev: Event) -> bool:
        self.dead_letters.append((ev.ts, field_text(ev.data, "reason", 64, DEAD_REASON_RE) or "unknown"))
        return True

    def _on_active(self, ev: Event) -> bool:
        self.active_aggregator = field_text(ev.data, "replica", 128) or ev.source
        self.active_since = ev.ts
        self.takeovers += 1 if ev.data.get("takeover") is True else 0
        return True

    def _on_task(self, ev: Event) -> bool:
        task = ev.data.get("task")
        task_id = field_id(task, "task_id") if isinstance(task, dict) else None
        if task_id is not None:
            self.issued_updates[update_id_for(task_id)] = None
        self.tasks_issued += 1
        return True

    def _on_summary(self, ev: Event) -> bool:
        """A summary changes nothing here (`Monitor` starts from one); it must be the coordinator's."""
        return ev.source == SUMMARY_SOURCE and as_int(ev.data.get("covers"), 0, 2**63) is not None \
            and isinstance(ev.data.get("view"), dict)

    def _on_finishing(self, ev: Event) -> bool:
        self.status = Status.FINISHING
        self.stop_reason = field_text(ev.data, "reason", 64)
        return True

    def _on_finished(self, ev: Event) -> bool:
        self.status = Status.FINISHED
        self.finished_at = ev.ts
        self.stop_reason = field_text(ev.data, "stop_reason", 64) or self.stop_reason
        return True

    # ------------------------------------------------------------------ derived figures

    def versions_per_minute(self, now: float, window: float) -> float:
        """Over the last `window` seconds while running; over the whole run once it ended."""
        if self.finished_at is not None and self.started_at is not None:
            span = max(self.finished_at - self.started_at, 1e-9)
            return round((self.versions_before + len(self.version_times)) * 60.0 / span, 2)
        recent = sum(1 for ts, _ in self.version_times if ts >= now - window)
        if self.started_at is not None:
            window = min(window, max(now - self.started_at, 1e-9))
        return round(recent * 60.0 / window, 2)

    def last_progress(self) -> float | None:
        """When the job last moved: its newest version, else its start."""
        if self.version_times:
            return self.version_times[-1][0]
        return self.started_at

    @property
    def updates_published(self) -> int:
        return self.updates_before + len(self.update_ids)

    @property
    def dead_letter_count(self) -> int:
        return sum(self.dead_before.values()) + len(self.dead_letters)

    def dead_reasons(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.dead_before)
        for _, reason in self.dead_letters:
            out[reason] = out.get(reason, 0) + 1
        return out


_HANDLERS: dict[str, Callable[[JobView, Event], bool]] = {
    EventKind.JOB_STARTED: JobView._on_started,
    EventKind.TASK_ISSUED: JobView._on_task,
    EventKind.TASK_REFUSED: JobView._on_refused,
    EventKind.TASK_FAILED: JobView._on_failed,
    EventKind.UPDATE_PUBLISHED: JobView._on_update,
    EventKind.VERSION_PUBLISHED: JobView._on_version,
    EventKind.VERSION_EVALUATED: JobView._on_evaluated,
    EventKind.DEAD_LETTERED: JobView._on_dead,
    EventKind.AGGREGATOR_ACTIVE: JobView._on_active,
    EventKind.JOB_FINISHING: JobView._on_finishing,
    EventKind.JOB_FINISHED: JobView._on_finished,
    EventKind.JOB_SUMMARY: JobView._on_summary,
}


# ----------------------------------------------------------------------------- summaries
#
# Why: folding the events stream from its first entry costs ~0.4 ms an entry (pika's frames, the
# strict decode, the fold), so on a job of 1,000 versions (10,000 entries) `monitor --once` took
# 4-6 s and kept growing. The coordinator, which reads every entry anyway, folds them into a
# JobView too and every `SUMMARY_EVERY` entries journals it as a JOB_SUMMARY event ("this is the
# view of entries up to offset `covers`"); a monitor restores the newest one and folds only what
# follows. Only the coordinator's own entries are believed: a bare routing key (no site can write
# one where per-site permissions are set, `read_event`) and source "coordinator"; anything else
# under that kind, or a summary that does not parse, is skipped and counted like any poison entry.
# A job without summaries (older releases, a coordinator that never ran) is read from "first".

#: entries of the events stream between two summaries (at least `SUMMARY_PER_SITE` per site, so
#: a summary of a big fleet is never most of the stream's bytes)
SUMMARY_EVERY = 500
SUMMARY_PER_SITE = 4
#: what a summary keeps of what grows with the job: the newest accuracy/metric points and dead
#: letters (the JSON shows 200), published ids (a republished event within this many is no double
#: count), issued ids not answered yet, version times (versions/min)
KEEP_RECENT = 200
KEEP_PUBLISHED = 256      # at least; twice the ids pending when more tasks are in flight
KEEP_PENDING = 8192
KEEP_VERSION_TIMES = 1000
VERSION_TIMES_SECONDS = 600.0  # no --window looks back further than this
#: a summary holds at most this many values (Event data allows 100,000): a bigger one is not written
MAX_SUMMARY_VALUES = 90_000
SUMMARY_SOURCE = "coordinator"
SUMMARY_SCHEMA = 1


def _row_out(row: SiteRow) -> list[Any]:
    ev = row.evaluation
    return [row.updates, row.applied, row.staleness_sum, row.last_seen, row.epsilon, row.refused, row.failed,
            row.last_failure, row.last_error,
            None if ev is None else {"version": ev.version, "samples": ev.samples, "metrics": dict(ev.metrics)}]


def _nonneg(value: Any) -> int | None:
    return as_int(value, 0, MAX_STALENESS * 2**21)


def _all_counts(values: Sequence[Any]) -> list[int] | None:
    out = [_nonneg(v) for v in values]
    return None if any(c is None for c in out) else [c for c in out if c is not None]


def _time(value: Any) -> float | None:
    return value if value is None else (float(value) if type(value) in (int, float) and 0 <= value < 1e11 else None)


def _row_in(name: str, raw: Any) -> SiteRow | None:
    if type(raw) is not list or len(raw) != 10:
        return None
    counts = _all_counts([raw[i] for i in (0, 1, 2, 5, 6)])
    if counts is None:
        return None
    eps = raw[4]
    if eps is not None and (type(eps) not in (int, float) or not 0 <= eps <= MAX_EPSILON):
        return None
    error = raw[8]
    if error is not None and (type(error) is not str or len(error) > 500):
        return None
    report = None if raw[9] is None else read_report(raw[9])
    if raw[9] is not None and report is None:
        return None
    last_seen, last_failure = _time(raw[3]), _time(raw[7])
    if (last_seen is None) != (raw[3] is None) or (last_failure is None) != (raw[7] is None):
        return None
    updates, applied, stale, refused, failed = counts
    return SiteRow(name, updates, applied, stale, last_seen, None if eps is None else float(eps), refused,
                   failed, last_failure, error, report)


def _evaluated_out(e: Evaluated) -> list[Any]:
    return [e.version, e.t, e.scope, dict(e.metrics), e.sites]


def _evaluated_in(raw: Any) -> Evaluated | None:
    if type(raw) is not list or len(raw) != 5:
        return None
    return read_evaluated(dict(zip(("version", "t", "scope", "metrics", "sites"), raw, strict=True)))


def _times_out(times: list[tuple[float, int]]) -> dict[str, Any]:
    """Version times as the first (ts, version) and millisecond / version steps: 2-3 bytes an entry."""
    if not times:
        return {"t0": 0.0, "v0": 0, "dt": [], "dv": []}
    t0, v0 = times[0]
    ms = [round((ts - t0) * 1000) for ts, _ in times]
    return {"t0": t0, "v0": v0, "dt": [b - a for a, b in zip(ms, ms[1:], strict=False)],
            "dv": [b[1] - a[1] for a, b in zip(times, times[1:], strict=False)]}


def _times_in(raw: Any) -> list[tuple[float, int]] | None:
    if not isinstance(raw, dict):
        return None
    t0, v0, dt, dv = _time(raw.get("t0")), as_int(raw.get("v0")), raw.get("dt"), raw.get("dv")
    if (t0 is None or v0 is None or type(dt) is not list or type(dv) is not list or len(dt) != len(dv)
            or len(dt) >= KEEP_VERSION_TIMES or not all(type(x) is int and -2**40 < x < 2**40 for x in dt + dv)):
        return None
    if not dt and raw.get("t0") == 0.0 and v0 == 0:
        return []
    out, ms, v = [(t0, v0)], 0, v0
    for a, b in zip(dt, dv, strict=True):
        ms, v = ms + a, v + b
        if v < 0:
            return None
        out.append((t0 + ms / 1000, v))
    return out


def checkpoint(view: JobView) -> dict[str, Any]:
    """The view as a JOB_SUMMARY carries it: every count whole, of what grows only the newest."""
    pending = [u for u in view.issued_updates if u not in view.update_ids][-KEEP_PENDING:]
    published = list(view.update_ids)
    kept = published[-max(KEEP_PUBLISHED, 2 * len(pending)):]
    times = view.version_times[-KEEP_VERSION_TIMES:]
    if times:
        recent = times[-1][0] - VERSION_TIMES_SECONDS
        times = [vt for vt in times if vt[0] >= recent] or times[-1:]
    dead_before = dict(view.dead_before)
    for _, reason in view.dead_letters[:-KEEP_RECENT]:
        dead_before[reason] = dead_before.get(reason, 0) + 1
    return {
        "schema": SUMMARY_SCHEMA, "status": view.status.value, "strategy": view.strategy,
        "params": dict(view.params), "started_at": view.started_at, "finished_at": view.finished_at,
        "stop_reason": view.stop_reason, "latest_version": view.latest_version,
        "versions_before": view.versions_before + len(view.version_times) - len(times),
        "version_times": _times_out(times),
        "accuracy": [[v, t, a] for v, t, a in view.accuracy[-KEEP_RECENT:]],
        "evaluations": {k: _evaluated_out(e) for k, e in view.evaluations.items()},
        "metric_history": [_evaluated_out(e) for e in list(view.metric_history)[-KEEP_RECENT:]],
        "sites": {name: _row_out(row) for name, row in view.sites.items()},
        "updates_before": view.updates_before + len(published) - len(kept), "published": kept,
        "pending": pending, "updates_applied": view.updates_applied, "tasks_issued": view.tasks_issued,
        "dead_before": dead_before, "dead_letters": [[ts, r] for ts, r in view.dead_letters[-KEEP_RECENT:]],
        "active_aggregator": view.active_aggregator, "active_since": view.active_since,
        "takeovers": view.takeovers, "events": view.events, "poison": dict(view.poison),
    }


def _pairs(raw: Any, first: Callable[[Any], Any], second: Callable[[Any], Any], limit: int) -> list[Any] | None:
    if type(raw) is not list or len(raw) > limit:
        return None
    out = []
    for item in raw:
        if type(item) is not list or len(item) != 2:
            return None
        a, b = first(item[0]), second(item[1])
        if a is None or b is None:
            return None
        out.append((a, b))
    return out


def _counts(raw: Any, key: Callable[[Any], Any]) -> dict[str, int] | None:
    if type(raw) is not dict or len(raw) > 1000:
        return None
    out = {key(k): _nonneg(v) for k, v in raw.items()}
    return None if None in out or None in out.values() else out  # type: ignore[return-value]


def _ids(raw: Any, limit: int) -> dict[str, None] | None:
    if type(raw) is not list or len(raw) > limit or any(as_id(u) is None for u in raw):
        return None
    return dict.fromkeys(raw)


def _reason(value: Any) -> str | None:
    return value if type(value) is str and DEAD_REASON_RE.match(value) else None


def restore(job: str, data: Any, roster: set[str] | None = None) -> JobView | None:
    """The JobView a `checkpoint` describes, or None when any part of it does not parse (the
    monitor then reads the stream from an earlier summary or from its first entry)."""
    if not isinstance(data, dict) or data.get("schema") != SUMMARY_SCHEMA:
        return None
    try:
        status = Status(str(data.get("status")))
    except ValueError:
        return None
    sites_raw = data.get("sites")
    if not isinstance(sites_raw, dict) or len(sites_raw) > MAX_ROSTER:
        return None
    sites = {}
    for name, raw in sites_raw.items():
        row = _row_in(name, raw) if as_site(name) is not None else None
        if row is None:
            return None
        sites[name] = row
    times = _times_in(data.get("version_times"))
    dead = _pairs(data.get("dead_letters"), _time, _reason, KEEP_RECENT)
    accuracy = data.get("accuracy")
    acc_ok = type(accuracy) is list and len(accuracy) <= KEEP_RECENT and all(
        type(a) is list and len(a) == 3 and as_int(a[0]) is not None and _time(a[1]) is not None
        and type(a[2]) in (int, float) and math.isfinite(a[2]) for a in accuracy)
    evals = data.get("evaluations")
    history = data.get("metric_history")
    if not isinstance(evals, dict) or type(history) is not list or len(history) > KEEP_RECENT:
        return None
    evaluations = {k: _evaluated_in(v) for k, v in evals.items()}
    metric_history = [_evaluated_in(v) for v in history]
    published, pending = _ids(data.get("published"), 2 * KEEP_PENDING), _ids(data.get("pending"), KEEP_PENDING)
    dead_before, poison = _counts(data.get("dead_before"), _reason), _counts(data.get("poison"), _reason)
    counts = _all_counts([data.get(k) for k in ("versions_before", "updates_before", "updates_applied",
                                                "tasks_issued", "takeovers", "events")])
    latest = data.get("latest_version")
    params = data.get("params")
    texts = [data.get(k) for k in ("strategy", "stop_reason", "active_aggregator")]
    stamps = [data.get(k) for k in ("started_at", "finished_at", "active_since")]
    if (times is None or dead is None or not acc_ok or None in evaluations.values() or None in metric_history
            or published is None or pending is None or dead_before is None or poison is None
            or counts is None or not isinstance(params, dict) or type(accuracy) is not list
            or (latest is not None and as_int(latest) is None)
            or any(t is not None and (type(t) is not str or len(t) > 128) for t in texts)
            or any(t is not None and _time(t) is None for t in stamps)
            or any(k not in (EvalSource.CENTRAL.value, EvalSource.FEDERATED.value) for k in evaluations)):
        return None
    versions_before, updates_before, applied, issued, takeovers, events = counts
    view = JobView(job, status=status, strategy=texts[0], params=dict(params), started_at=_time(stamps[0]),
                   finished_at=_time(stamps[1]), stop_reason=texts[1], latest_version=latest,
                   version_times=times, accuracy=[(a[0], float(a[1]), float(a[2])) for a in accuracy],
                   sites=sites, update_ids=published, issued_updates={**pending, **published},
                   updates_applied=applied, tasks_issued=issued, dead_letters=dead,
                   active_aggregator=texts[2], active_since=_time(stamps[2]), takeovers=takeovers, events=events,
                   poison=poison, roster=set(roster or ()), versions_before=versions_before,
                   updates_before=updates_before, dead_before=dead_before)
    view.evaluations = {k: e for k, e in evaluations.items() if e is not None}
    view.metric_history.extend(e for e in metric_history if e is not None)
    return view


def summary_of(sev: SourcedEvent) -> tuple[int, dict[str, Any]] | None:
    """(covers, view data) of a JOB_SUMMARY the coordinator wrote; None for any other entry."""
    ev = sev.event
    if ev.event != EventKind.JOB_SUMMARY or sev.site is not None or ev.source != SUMMARY_SOURCE:
        return None
    covers, data = as_int(ev.data.get("covers"), 0, 2**63), ev.data.get("view")
    if covers is None or not isinstance(data, dict):
        return None
    return covers, data


def fold_entry(view: JobView, d: Delivery) -> SourcedEvent | None:
    """One entry of the events stream into `view`: skipped and counted unless its routing key
    vouches for it (`read_event_delivery`); the event read, or None when skipped."""
    try:
        sev = read_event_delivery(d)
    except MalformedMessageError as exc:  # junk, or not vouched for by its routing key
        view.skip(exc.reason)
        if view.log_skips:
            log.warning("event skipped job=%s offset=%s reason=%s error=%s", view.job, d.stream_offset,
                        exc.reason, str(exc)[:200])
        return None
    view.apply(sev.event)
    return sev


class SummaryJournal:
    """The coordinator's side: fold every entry it reads, journal the view every `every` entries.

    After each summary the coordinator's view is replaced by the one restored from it, so the
    next summary continues from exactly what a monitor restores, and its memory stays bounded."""

    def __init__(self, job: str, every: int | None = None) -> None:
        self.job = job
        self.every = every or SUMMARY_EVERY
        self.view = JobView(job, log_skips=False)
        self.covers: int | None = None      # offset of the newest entry folded
        self.summarized = -1                # `covers` of the newest summary journaled (or read back)
        self.written = 0

    def fold(self, d: Delivery) -> None:
        offset = d.stream_offset
        if offset is None or (self.covers is not None and offset <= self.covers):
            return  # not a stream entry, or one folded already (a reader re-attached)
        sev = fold_entry(self.view, d)
        self.covers = offset
        got = summary_of(sev) if sev is not None else None
        if got is not None:
            self.summarized = max(self.summarized, got[0])

    def due(self) -> bool:
        every = max(self.every, SUMMARY_PER_SITE * len(self.view.sites))
        return self.covers is not None and self.covers - self.summarized >= every

    def emit(self, conn: Connection, names: JobNames) -> bool:
        """Journal the view (confirmed); False when it is too big to be one event (never expected)."""
        if self.covers is None:
            return False
        data = checkpoint(self.view)
        restored = restore(self.job, data)
        size = 40 + 12 * len(data["sites"]) + len(data["published"]) + len(data["pending"]) + \
            2 * len(data["version_times"]["dt"]) + 8 * (len(data["accuracy"]) + len(data["metric_history"]))
        if restored is None or size > MAX_SUMMARY_VALUES:
            log.warning("job summary not written job=%s covers=%d values=%d", self.job, self.covers, size)
            self.summarized = self.covers
            return False
        emit(conn, names, SUMMARY_SOURCE, EventKind.JOB_SUMMARY, covers=self.covers, view=data)
        restored.log_skips = False
        self.view, self.summarized = restored, self.covers
        self.written += 1
        return True

    def maybe_emit(self, conn: Connection, names: JobNames) -> None:
        if self.due():
            self.emit(conn, names)
