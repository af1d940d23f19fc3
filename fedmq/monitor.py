"""`fedmq monitor --job ID`: a live dashboard of one job, or one JSON snapshot for scripts.

Everything comes from the broker, read the ways measured on RabbitMQ 3.10 to be cheap and side-effect
free, so the monitor needs no plugin and no permission beyond reading the job's streams:

* queue depth and consumer count of the tasks, updates and dead-letter queues by *passive*
  declare (ready messages only; single-active-consumer counts only the active consumer). A
  missing queue answers 404: after a job ends the coordinator deletes tasks and updates, and the
  monitor reports that instead of failing;
* the newest model version from the models stream (streams answer 0/0 to a passive declare);
* everything else by following the events stream: versions, test accuracy, per-site updates,
  staleness, epsilon, dead letters, which replica is the active aggregator;
* with ``--management-url`` (the management plugin enabled), unacked counts as well.

`JobView` folds events and `alerts` judges a snapshot: both are pure, so tests drive them with
hand-made events; `Monitor` is the broker side.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedmq.shared.broker import Connection, Delivery, JobNames, StreamReader, broker_urls, read_last
from fedmq.shared.codec import unpack
from fedmq.shared.errors import ConfigError, FedmqError, JobNotFoundError, MalformedMessageError
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
from fedmq.shared.signing import META_REGISTRY

log = logging.getLogger(__name__)

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40


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


# ----------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class QueueState:
    queue: str
    exists: bool
    messages: int | None = None     # ready (passive declare); ready + unacked with the management API
    consumers: int | None = None
    unacked: int | None = None      # management API only

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "exists": self.exists, "messages": self.messages,
                "consumers": self.consumers, "unacked": self.unacked}


@dataclass(frozen=True)
class Alert:
    level: Level
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level.value, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Thresholds:
    stall_seconds: float = 60.0   # no new version for this long while running: "job stalled"
    window: float = 60.0          # versions/min and "dead letters growing" look this far back
    silent_seconds: float = 120.0  # a roster or known site unheard of for this long: "site silent"

    def __post_init__(self) -> None:
        if self.stall_seconds <= 0:
            raise ConfigError(f"--stall-seconds must be > 0, got {self.stall_seconds}")
        if self.window <= 0:
            raise ConfigError(f"--window must be > 0, got {self.window}")
        if not self.silent_seconds > 0:
            raise ConfigError(f"--silent-seconds must be > 0, got {self.silent_seconds}")


def alerts(view: JobView, queues: dict[str, QueueState], now: float, limits: Thresholds,
           dead_growth: int = 0) -> list[Alert]:
    """Judge one snapshot; `dead_growth` = dead-letter queue depth gained within the window."""
    out: list[Alert] = []
    names = JobNames(view.job)
    if view.status is Status.NOT_FOUND:
        return [Alert(Level.CRITICAL, "job_not_found",
                      f"job {view.job} has no events stream on this broker: check --job and --broker")]
    if view.status is Status.FINISHED:
        out.append(Alert(Level.INFO, "job_finished",
                         f"job finished ({view.stop_reason}); the coordinator deleted the tasks and updates "
                         "queues, the streams remain for history, replay and report"))
    running = view.status is Status.RUNNING
    for role in ("tasks", "updates"):
        q = queues.get(role)
        if running and q is not None and not q.exists:
            out.append(Alert(Level.CRITICAL, "queue_missing", f"queue {q.queue} is missing while the job runs"))
    upd, tasks = queues.get("updates"), queues.get("tasks")
    if running and upd is not None and upd.exists and upd.consumers == 0:
        out.append(Alert(Level.CRITICAL, "no_active_aggregator",
                         f"no aggregator consumes {names.updates} ({upd.messages} updates waiting): "
                         f"start `fedmq aggregator --job {view.job}`"))
    if running and tasks is not None and tasks.exists and tasks.consumers == 0 and (tasks.messages or 0) > 0:
        out.append(Alert(Level.WARNING, "tasks_without_consumer",
                         f"{tasks.messages} tasks waiting and no worker consuming {names.tasks}"))
    recent = [r for ts, r in view.dead_letters if ts >= now - limits.window]
    grown = max(len(recent), dead_growth)
    if grown:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(_count(recent).items())) or "broker delivery limit"
        out.append(Alert(Level.WARNING, "dead_letters_growing",
                         f"{grown} dead letters in the last {limits.window:g} s ({reasons})"))
    failing = sorted(name for name, row in view.sites.items()
                     if row.last_failure is not None and row.last_failure >= now - limits.window)
    if failing:
        shown = ", ".join(f"{name} ({view.sites[name].last_error or '?'})"[:200] for name in failing[:5])
        more = f" and {len(failing) - 5} more" if len(failing) > 5 else ""
        out.append(Alert(Level.WARNING, "training_failing",
                         f"training failed in the last {limits.window:g} s at {len(failing)} site(s): {shown}{more}"))
    silent = silent_sites(view, now, limits.silent_seconds) if running else []
    if silent:
        shown = ", ".join(silent[:10]) + (f" and {len(silent) - 10} more" if len(silent) > 10 else "")
        out.append(Alert(Level.WARNING, "site_silent",
                         f"{len(silent)} site(s) sent nothing for over {limits.silent_seconds:g} s: {shown}"))
    last = view.last_progress()
    if running and last is not None and now - last > limits.stall_seconds:
        out.append(Alert(Level.WARNING, "job_stalled",
                         f"no new version for {now - last:.0f} s (limit {limits.stall_seconds:g} s)"))
    return out


def silent_sites(view: JobView, now: float, seconds: float) -> list[str]:
    """Roster and known sites not heard of for `seconds`: since their last event, or since the job
    started for a roster site never seen."""
    out = []
    for name in sorted(view.roster | set(view.sites)):
        row = view.sites.get(name)
        ref = row.last_seen if row is not None and row.last_seen is not None else view.started_at
        if ref is not None and now - ref > seconds:
            out.append(name)
    return out


def _count(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


@dataclass(frozen=True)
class Snapshot:
    """One look at a job. `to_dict` is the `--once --json` contract (the documented field names first)."""

    job: str
    ts: float
    view: JobView
    queues: dict[str, QueueState]
    streams: dict[str, int | None]
    alerts: list[Alert]
    window: float
    management: bool = False

    @property
    def latest_accuracy(self) -> float | None:
        return self.view.accuracy[-1][2] if self.view.accuracy else None

    def to_dict(self) -> dict[str, Any]:
        v = self.view
        return {
            "job": self.job,
            "queues": {name: q.to_dict() for name, q in self.queues.items()},
            "latest_version": v.latest_version,
            "sites": {name: row.to_dict(self.ts) for name, row in sorted(v.sites.items())},
            "roster": sorted(v.roster),
            "ts": self.ts,
            "status": v.status.value,
            "stop_reason": v.stop_reason,
            "strategy": v.strategy,
            "active_aggregator": v.active_aggregator,
            "aggregator_takeovers": v.takeovers,
            "latest_accuracy": self.latest_accuracy,
            "versions_per_min": v.versions_per_minute(self.ts, self.window),
            "accuracy_history": [{"version": ver, "t": round(t, 3), "accuracy": acc}
                                 for ver, t, acc in v.accuracy[-200:]],
            "metrics": {scope: {"version": e.version, "metrics": dict(e.metrics), "sites": e.sites}
                        for scope, e in sorted(v.evaluations.items())},
            "metrics_history": [{"version": e.version, "t": round(e.t, 3), "scope": e.scope, "metrics": e.metrics}
                                for e in list(v.metric_history)[-200:]],
            "tasks_issued": v.tasks_issued,
            "updates_published": v.updates_published,
            "updates_applied": v.updates_applied,
            "dead_letters": v.dead_letter_count,
            "dead_letter_reasons": v.dead_reasons(),
            "poison_events": sum(v.poison.values()),
            "poison_reasons": dict(sorted(v.poison.items())),
            "streams": dict(self.streams),
            "alerts": [a.to_dict() for a in self.alerts],
            "management_api": self.management,
        }


# ----------------------------------------------------------------------------- management API


class ManagementAPI:
    """Queue details from the management plugin's HTTP API (only when the operator enables it)."""

    def __init__(self, base_url: str, broker_url: str, timeout: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        broker = urllib.parse.urlsplit(broker_urls(broker_url)[0])  # a cluster's nodes share users and vhosts
        user = urllib.parse.unquote(parts.username or broker.username or "guest")
        password = urllib.parse.unquote(parts.password or broker.password or "guest")
        host = parts.hostname or "127.0.0.1"
        netloc = f"{host}:{parts.port}" if parts.port else host
        self.base = urllib.parse.urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        self.vhost = urllib.parse.quote(urllib.parse.unquote(broker.path[1:] or "/"), safe="")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def queue(self, name: str) -> dict[str, Any] | None:
        """The queue's JSON, None when it does not exist; other failures raise OSError."""
        url = f"{self.base}/api/queues/{self.vhost}/{urllib.parse.quote(name, safe='')}"
        req = urllib.request.Request(url, headers={"Authorization": self.auth})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - operator URL
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise OSError(f"management API {url}: HTTP {exc.code}") from exc


# ----------------------------------------------------------------------------- broker side


class Monitor:
    """Follows one job: passive declares on one connection, the events stream on its own."""

    QUEUES = ("tasks", "updates", "dead")

    def __init__(self, url: str, job: str, *, limits: Thresholds | None = None,
                 management_url: str | None = None, expect_sites: Sequence[str] = (),
                 summaries: bool = True) -> None:
        self.url = url
        self.summaries = summaries  # False: fold the events stream from its first entry (a recount)
        self.names = JobNames(job)
        self.limits = limits or Thresholds()
        self.view = JobView(job, roster=set(expect_sites))
        self.api = ManagementAPI(management_url, url) if management_url else None
        self._conn: Connection | None = None
        self._events: StreamReader | None = None
        self._events_next: int | str = "first"  # resume point after a reconnect: no event twice
        self._events_last: int | None = None    # offset of the newest entry folded
        self._tail: int | None = None           # the first snapshot reads up to this offset
        self._bootstrapped = False
        self._since_compact = 0
        #: `covers` of the summary the view was restored from (None: folded from the first entry)
        self.restored_from: int | None = None
        self._models_offset: int | None = None
        self._dead_depths: deque[tuple[float, int]] = deque()
        self._api_error: str | None = None

    def close(self) -> None:
        if self._events is not None:
            if self._events.last_offset is not None:
                self._events_next = self._events.last_offset + 1
            self._events.close()
            self._events = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _queue_name(self, role: str) -> str:
        return {"tasks": self.names.tasks, "updates": self.names.updates, "dead": self.names.dead}[role]

    def _attach(self) -> tuple[Connection, StreamReader] | None:
        """The open connection and events reader; None while the job does not exist."""
        if self._conn is None or not self._conn.is_open:
            self._conn = Connection(self.url, name=f"fedmq-monitor-{self.names.job}").open()
        if self._events is None:
            if not self._bootstrapped:
                try:
                    self._bootstrap()
                except JobNotFoundError:
                    return None
            reader = StreamReader(self.url, self.names.events, name=f"fedmq-monitor-events-{self.names.job}")
            try:
                reader.start(self._events_next)
            except JobNotFoundError:
                reader.close()
                return None
            self._events = reader
        return self._conn, self._events

    def _bootstrap(self) -> None:
        """Before following the events stream: find its tail, restore the newest summary near it
        and fold what follows the summary, up to the tail. The follower then starts after the
        tail. Without a usable summary (an older job, a short one) it starts at "first"."""
        self._tail = self._events_tail()
        self._bootstrapped = True
        if not self.summaries or self._tail is None or self._tail < 2 * SUMMARY_EVERY:
            return
        # summaries lie about SUMMARY_EVERY entries apart (plus the coordinator's lag); a fleet's
        # are further apart (SUMMARY_PER_SITE), and a coordinator that was down wrote none for a while
        for window in (SUMMARY_EVERY * 5 // 4, 16 * SUMMARY_EVERY):
            start = self._tail - window
            if start <= 0:
                return
            entries = self._read_range(start, self._tail)
            if entries and self._restore_from(entries, start):
                return

    def _events_tail(self, first_wait: float = 0.3, idle: float = 0.05, most: float = 0.5) -> int | None:
        """The newest offset of the events stream (None: empty): a "last" consumer gets the last
        chunk at once; on a busy stream it never goes quiet, so `most` s bound the read."""
        with StreamReader(self.url, self.names.events, name=f"fedmq-monitor-tail-{self.names.job}",
                          prefetch=256) as reader:
            reader.start("last")
            tail: int | None = None
            began = time.monotonic()
            deadline = began + first_wait
            while time.monotonic() < min(deadline, began + most):
                offsets = [d.stream_offset for d in reader.poll(0.02) if d.stream_offset is not None]
                if offsets:
                    tail = max(offsets + ([] if tail is None else [tail]))
                    deadline = time.monotonic() + idle
            return tail

    def _read_range(self, start: int, end: int, stall: float = 5.0) -> list[Delivery]:
        """Entries `start`..`end` of the events stream (fewer if it stalls for `stall` s)."""
        out: list[Delivery] = []
        with StreamReader(self.url, self.names.events, name=f"fedmq-monitor-scan-{self.names.job}",
                          prefetch=512) as reader:
            reader.start(start)
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < stall:
                got = reader.poll(0.05)
                if got:
                    quiet_since = time.monotonic()
                out.extend(d for d in got if (d.stream_offset or 0) >= start)
                if out and (out[-1].stream_offset or 0) >= end:
                    break
        return [d for d in out if (d.stream_offset or 0) <= end]

    def _restore_from(self, entries: list[Delivery], start: int) -> bool:
        """Restore the newest valid coordinator summary among `entries` whose fold begins within
        them, then fold the entries after it; False when there is none."""
        found: tuple[int, JobView] | None = None
        for d in entries:
            if d.routing_key != EventKind.JOB_SUMMARY:
                continue  # the cheap test first: only a bare "job_summary" key can carry one
            try:
                got = summary_of(read_event_delivery(d))
            except MalformedMessageError:
                continue
            if got is None or not start - 1 <= got[0] <= (d.stream_offset or 0):
                continue
            view = restore(self.names.job, got[1], self.view.roster)
            if view is not None:
                found = (got[0], view)
        if found is None:
            return False
        covers, self.view = found
        self.restored_from = covers
        for d in entries:
            if (d.stream_offset or 0) > covers:
                fold_entry(self.view, d)
        self._events_last = entries[-1].stream_offset
        self._events_next = (self._events_last or 0) + 1
        log.info("monitor restored a job summary job=%s covers=%d folded_after=%d", self.names.job, covers,
                 sum(1 for d in entries if (d.stream_offset or 0) > covers))
        return True

    def _read_models_head(self) -> None:
        """Newest version from the models stream: authoritative even if its event was never emitted."""
        try:
            last = read_last(self.url, self.names.models, idle=0.05)  # the last chunk comes at once
        except JobNotFoundError:
            return
        if last is None:
            return
        self._models_offset = last.stream_offset
        try:
            head = unpack(last.body)
        except MalformedMessageError:
            return
        version = as_int(head.get("version"))
        if version is not None:
            self.view.latest_version = max(version, self.view.latest_version or 0)
        meta = head.get("meta")
        registry = meta.get(META_REGISTRY) if isinstance(meta, dict) else None
        if isinstance(registry, dict):  # the sites with a signing key are the ones expected
            self.view.roster.update(s for s in map(as_site, list(registry)[:MAX_ROSTER]) if s is not None)

    def _drain_events(self, reader: StreamReader, idle: float, budget: float) -> None:
        """Apply new events up to the tail found at attach time (first snapshot), else until the
        stream is quiet for `idle` s; at most `budget` s either way."""
        end = time.monotonic() + budget
        quiet_since = time.monotonic()
        until, self._tail = self._tail, None
        if until is not None and self._events_last is not None and self._events_last >= until:
            return  # the bootstrap read up to the tail already
        while time.monotonic() < end:
            got = reader.poll(0.05)
            if got:
                quiet_since = time.monotonic()
            elif until is None and time.monotonic() - quiet_since >= idle:
                return
            for d in got:
                fold_entry(self.view, d)
            if got:
                self._events_last = got[-1].stream_offset
                self._since_compact += len(got)
            if until is not None and self._events_last is not None and self._events_last >= until:
                return

    def _compact(self) -> None:
        """A live monitor's view, summarized now and then like the coordinator's: memory and the
        cost of a refresh stay bounded on an endless job."""
        if self._since_compact < 20 * SUMMARY_EVERY:
            return
        restored = restore(self.names.job, checkpoint(self.view), self.view.roster)
        if restored is not None:
            self.view = restored
        self._since_compact = 0

    def _queue_state(self, conn: Connection, role: str) -> QueueState:
        name = self._queue_name(role)
        if self.api is not None:
            try:
                info = self.api.queue(name)
                self._api_error = None
                if info is None:
                    return QueueState(name, False)
                return QueueState(name, True, int(info.get("messages", 0)), int(info.get("consumers", 0)),
                                  int(info.get("messages_unacknowledged", 0)))
            except (OSError, ValueError) as exc:
                self._api_error = str(exc)
        try:
            ready, consumers = conn.queue_stats(name)
        except JobNotFoundError:
            return QueueState(name, False)
        return QueueState(name, True, ready, consumers)

    def _dead_growth(self, now: float, queues: dict[str, QueueState]) -> int:
        dead = queues.get("dead")
        if dead is None or dead.messages is None:
            return 0
        self._dead_depths.append((now, dead.messages))
        while self._dead_depths and self._dead_depths[0][0] < now - self.limits.window:
            self._dead_depths.popleft()
        return max(0, dead.messages - self._dead_depths[0][1])

    def snapshot(self, *, idle: float = 0.3, budget: float = 30.0) -> Snapshot:
        """Catch up on events, read the queues, judge. Raises JobNotFoundError for an unknown job."""
        attached = self._attach()
        if attached is None:
            raise JobNotFoundError(f"job {self.names.job} not found: no events stream {self.names.events} "
                                   "(check --job and --broker)")
        conn, reader = attached
        self._drain_events(reader, idle, budget)
        self._compact()
        if self._models_offset is None:
            self._read_models_head()
        queues = {role: self._queue_state(conn, role) for role in self.QUEUES}
        now = time.time()
        found = alerts(self.view, queues, now, self.limits, self._dead_growth(now, queues))
        if self._api_error:
            found.append(Alert(Level.WARNING, "management_api", f"management API failed, using AMQP: "
                               f"{self._api_error}"))
        streams = {"models_last_offset": self._models_offset, "events_last_offset": self._events_last}
        return Snapshot(self.names.job, now, self.view, queues, streams, found, self.limits.window,
                        management=self.api is not None and self._api_error is None)


# ----------------------------------------------------------------------------- rendering


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK_BLOCKS[len(SPARK_BLOCKS) // 2] * len(vals)
    top = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[round((v - lo) / (hi - lo) * top)] for v in vals)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


_LEVEL_STYLE = {Level.CRITICAL: "bold red", Level.WARNING: "yellow", Level.INFO: "cyan"}


def _header(snap: Snapshot) -> Panel:
    v, d = snap.view, snap.to_dict()
    acc = [a for _, _, a in v.accuracy][-SPARK_WIDTH:]
    lines = Text()
    lines.append(f"job {snap.job}", style="bold")
    lines.append(f" · {v.status.value} · {v.strategy or '-'} · version v{_fmt(v.latest_version)} · "
                 f"{d['versions_per_min']:.1f} versions/min\n")
    lines.append(f"active aggregator {v.active_aggregator or '-'} (takeovers {v.takeovers}) · updates "
                 f"{d['updates_published']} published, {d['updates_applied']} applied · "
                 f"dead letters {d['dead_letters']}\n")
    lines.append(f"test accuracy {_fmt(snap.latest_accuracy, '.4f')} ")
    lines.append(sparkline(acc), style="green")
    if acc:
        lines.append(f" ({min(acc):.3f}..{max(acc):.3f} over the last {len(acc)} versions)")
    for scope, e in sorted(v.evaluations.items()):
        values = " ".join(f"{k} {x:.4f}" for k, x in e.metrics.items())
        lines.append(f"\n{scope} v{e.version}: {values}" + (f" ({e.sites} sites)" if e.sites else ""))
    return Panel(lines, title="fedmq monitor", subtitle=time.strftime("%H:%M:%S", time.localtime(snap.ts)))


def _queues_table(snap: Snapshot) -> Table:
    t = Table(title="queues", title_justify="left", expand=True)
    for col in ("queue", "ready", "unacked", "consumers", "note"):
        t.add_column(col, justify="right" if col in ("ready", "unacked", "consumers") else "left")
    for role, q in snap.queues.items():
        if not q.exists:
            note = "deleted (job finished)" if snap.view.status is Status.FINISHED else "missing"
            t.add_row(q.queue, "-", "-", "-", note, style="dim")
            continue
        note = {"tasks": "workers take tasks", "updates": "active aggregator (SAC)",
                "dead": "dead letters (kept)"}[role]
        t.add_row(q.queue, _fmt(q.messages), _fmt(q.unacked), _fmt(q.consumers), note)
    return t


def _sites_table(snap: Snapshot) -> Table:
    t = Table(title="sites", title_justify="left", expand=True)
    for col in ("site", "updates", "applied", "mean staleness", "last seen", "epsilon", "failed", "evaluation"):
        t.add_column(col, justify="left" if col in ("site", "evaluation") else "right")
    for name, row in sorted(snap.view.sites.items()):
        seen = None if row.last_seen is None else snap.ts - row.last_seen
        ev = row.evaluation
        t.add_row(name, str(row.updates), str(row.applied), _fmt(row.mean_staleness, ".2f"), _ago(seen),
                  _fmt(row.epsilon, ".3f"), str(row.failed) if row.failed else "",
                  "" if ev is None else f"v{ev.version} " + " ".join(f"{k} {x:.3f}" for k, x in ev.metrics.items()))
    if not snap.view.sites:
        t.add_row("(no site has published yet)", "", "", "", "", "", "", "")
    return t


def _alerts_text(snap: Snapshot) -> Text:
    if not snap.alerts:
        return Text("no alerts", style="green")
    out = Text()
    for i, a in enumerate(snap.alerts):
        out.append(f"{'' if i == 0 else chr(10)}[{a.level.value}] {a.code}: ", style=_LEVEL_STYLE[a.level])
        out.append(a.message)
    return out


def render(snap: Snapshot) -> RenderableType:
    """The whole dashboard for one snapshot."""
    return Group(_header(snap), _queues_table(snap), _sites_table(snap),
                 Panel(_alerts_text(snap), title="alerts"))


def render_text(snap: Snapshot, width: int = 120) -> str:
    """The dashboard as plain text (tests, logs, `--once` without --json)."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(render(snap))
    return console.export_text()


# ----------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json, stop_on_signals

    limits = Thresholds(stall_seconds=args.stall_seconds, window=args.window, silent_seconds=args.silent_seconds)
    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval}")
    expect = [s.strip() for s in (args.expect_sites or "").split(",") if s.strip()]
    bad = [s for s in expect if as_site(s) is None]
    if bad:
        raise ConfigError(f"--expect-sites: {bad[0]!r} is not a site name (letters, digits, '.', '_', '-')")
    with Monitor(args.broker, args.job, limits=limits, management_url=args.management_url,
                 expect_sites=expect) as mon:
        if args.once:
            snap = mon.snapshot()
            if args.json:
                print_json(snap.to_dict())
            else:
                Console().print(render(snap))
            return 0
        return _live(mon, args, stop_on_signals(), print_json)


def _refresh(mon: Monitor, interval: float) -> RenderableType | Snapshot:
    """One refresh: a snapshot, or a panel saying why there is none (retried next time)."""
    try:
        return mon.snapshot(idle=0.05, budget=max(interval / 2, 0.2))
    except JobNotFoundError as exc:
        return Panel(Text(f"{exc}; retrying", style="yellow"), title="fedmq monitor")
    except FedmqError as exc:
        mon.close()  # reattached on the next refresh, resuming the events stream where it was
        return Panel(Text(f"broker trouble: {exc}; reconnecting", style="red"), title="fedmq monitor")


def _live(mon: Monitor, args: argparse.Namespace, stop: Any, print_json: Callable[[dict[str, Any]], None]) -> int:
    """Refresh every `--interval` s; broker trouble is shown and retried, never fatal."""
    if args.json:
        while not stop.is_set():
            got = _refresh(mon, args.interval)
            if isinstance(got, Snapshot):
                print_json(got.to_dict())
            stop.wait(args.interval)
        return 0
    from rich.live import Live

    with Live(console=Console(), refresh_per_second=4, screen=False, transient=False) as live:
        while not stop.is_set():
            got = _refresh(mon, args.interval)
            live.update(render(got) if isinstance(got, Snapshot) else got)
            stop.wait(args.interval)
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("monitor", help="live dashboard of a job's queues, versions and sites; "
                       "--once --json prints one snapshot")
    add_common(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: one JSON object as the last stdout "
                   "line; without: one JSON line per refresh")
    p.add_argument("--interval", type=float, default=float(os.environ.get("FEDMQ_MONITOR_INTERVAL", "1.0")),
                   help="seconds between refreshes (env FEDMQ_MONITOR_INTERVAL)")
    p.add_argument("--stall-seconds", type=float, default=60.0,
                   help="alert 'job stalled' when no version appeared for this long")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds looked back for versions/min and 'dead letters growing'")
    p.add_argument("--silent-seconds", type=float, default=120.0,
                   help="alert 'site silent' for a site (of the roster, or seen before) that sent nothing this long")
    p.add_argument("--expect-sites", default=os.environ.get("FEDMQ_EXPECT_SITES"),
                   help="comma-separated roster of the sites that should take part, besides the job's signing "
                   "registry (env FEDMQ_EXPECT_SITES)")
    p.add_argument("--management-url", default=os.environ.get("FEDMQ_MANAGEMENT_URL"),
                   help="RabbitMQ management API, e.g. http://host:15672 (credentials from the URL or "
                   "--broker), adds unacked counts; off by default (env FEDMQ_MANAGEMENT_URL)")
    p.set_defaults(run=run)
