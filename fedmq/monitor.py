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

from fedmq.shared.broker import Connection, JobNames, StreamReader, broker_urls, read_last
from fedmq.shared.codec import unpack
from fedmq.shared.errors import ConfigError, FedmqError, JobNotFoundError, MalformedMessageError
from fedmq.shared.evaluation import EvalSource, Evaluated, SiteReport, read_evaluated, read_report
from fedmq.shared.jobstate import (
    as_id,
    as_int,
    as_site,
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
    update_ids: set[str] = field(default_factory=set)
    #: update ids of the tasks the coordinator issued: a site's event counts only for one of
    #: these, so junk ids cannot grow the view's memory or its per-site counts
    issued_updates: set[str] = field(default_factory=set)
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
            if n <= 20 or n % 1000 == 0:  # a flood of junk events must not flood the log too
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
            self.update_ids.add(uid)
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
            self.issued_updates.add(update_id_for(task_id))
        self.tasks_issued += 1
        return True

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
            return round(len(self.version_times) * 60.0 / span, 2)
        recent = sum(1 for ts, _ in self.version_times if ts >= now - window)
        if self.started_at is not None:
            window = min(window, max(now - self.started_at, 1e-9))
        return round(recent * 60.0 / window, 2)

    def last_progress(self) -> float | None:
        """When the job last moved: its newest version, else its start."""
        if self.version_times:
            return self.version_times[-1][0]
        return self.started_at

    def dead_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
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
}


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
            "updates_published": len(v.update_ids),
            "updates_applied": v.updates_applied,
            "dead_letters": len(v.dead_letters),
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
                 management_url: str | None = None, expect_sites: Sequence[str] = ()) -> None:
        self.url = url
        self.names = JobNames(job)
        self.limits = limits or Thresholds()
        self.view = JobView(job, roster=set(expect_sites))
        self.api = ManagementAPI(management_url, url) if management_url else None
        self._conn: Connection | None = None
        self._events: StreamReader | None = None
        self._events_next: int | str = "first"  # resume point after a reconnect: no event twice
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
            reader = StreamReader(self.url, self.names.events, name=f"fedmq-monitor-events-{self.names.job}")
            try:
                reader.start(self._events_next)
            except JobNotFoundError:
                reader.close()
                return None
            self._events = reader
        return self._conn, self._events

    def _read_models_head(self) -> None:
        """Newest version from the models stream: authoritative even if its event was never emitted."""
        try:
            last = read_last(self.url, self.names.models)
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
        """Apply new events until the stream is quiet for `idle` s (or `budget` s have passed)."""
        end = time.monotonic() + budget
        quiet_since = time.monotonic()
        while time.monotonic() < end:
            got = reader.poll(0.05)
            if got:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= idle:
                return
            for d in got:
                try:
                    sev = read_event_delivery(d)
                except MalformedMessageError as exc:  # junk, or not vouched for by its routing key
                    self.view.skip(exc.reason)
                    log.warning("event skipped job=%s offset=%s reason=%s error=%s", self.names.job,
                                d.stream_offset, exc.reason, str(exc)[:200])
                    continue
                self.view.apply(sev.event)

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
        if self._models_offset is None:
            self._read_models_head()
        queues = {role: self._queue_state(conn, role) for role in self.QUEUES}
        now = time.time()
        found = alerts(self.view, queues, now, self.limits, self._dead_growth(now, queues))
        if self._api_error:
            found.append(Alert(Level.WARNING, "management_api", f"management API failed, using AMQP: "
                               f"{self._api_error}"))
        streams = {"models_last_offset": self._models_offset, "events_last_offset": reader.last_offset}
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
