"""`fedmq monitor --job ID`: a live dashboard of one job, or one JSON snapshot for scripts.

Everything comes from the broker, read the ways measured on RabbitMQ 3.10 to be cheap and side-effect
free, so the monitor needs no plugin and no permission beyond reading the job's streams:

* queue depth and consumer count of the tasks, updates and dead-letter queues by *passive*
  declare (ready messages only; only the active aggregator consumes the shared updates queue, and
  its depth leaves out the per-site updates queues of a job with a site registry). A
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
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedmq.shared.broker import Connection, Delivery, JobNames, StreamReader, broker_urls, read_last
from fedmq.shared.codec import unpack_any
from fedmq.shared.errors import ConfigError, FedmqError, JobNotFoundError, MalformedMessageError
from fedmq.shared.jobstate import (
    as_int,
    as_site,
    read_event_delivery,
)
from fedmq.shared.jobview import (
    MAX_ROSTER,
    SUMMARY_EVERY,
    JobView,
    Level,
    Status,
    checkpoint,
    fold_entry,
    restore,
    summary_of,
)
from fedmq.shared.messages import EventKind
from fedmq.shared.parts import MAX_MESSAGE_BYTES
from fedmq.shared.signing import META_REGISTRY

log = logging.getLogger(__name__)

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40


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
            # either form: a framed version's header holds these fields
            head = unpack_any(last.body, max_bytes=MAX_MESSAGE_BYTES)
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
