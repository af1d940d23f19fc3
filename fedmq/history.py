"""`fedmq history`: the audit trail of a job, read from its streams alone.

Which site's update went into which version (with its base version, staleness, weight and
samples), each version's sha256 and test accuracy, every dead letter with its reason, and totals
per site. Nothing here needs a process of the job to be alive: the models, updates-log, dead-log
and events streams are the whole record (docs/architecture.md, "Messages": every message is self-describing).

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

from fedmq.shared.broker import Delivery, JobNames, StreamReader
from fedmq.shared.errors import BrokerUnavailableError, JobNotFoundError, MalformedMessageError
from fedmq.shared.evaluation import EvalSource, SiteReport, read_evaluated, read_report
from fedmq.shared.jobstate import (
    PoisonCounter,
    as_int,
    as_site,
    field_float,
    field_id,
    field_text,
    read_event_delivery,
)
from fedmq.shared.ledger import dead_reason, header_detail, header_id
from fedmq.shared.messages import EventKind, ModelVersion, Task, Update

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
            reader.poll(0.02)
            # any entry counts, a part of a message begun before the last chunk too
            if reader.seen_offset is not None and reader.seen_offset != tail:
                tail = reader.seen_offset
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
                off = d.end_offset if d.end_offset is not None else -1
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
    metrics: dict[str, float] = field(default_factory=dict)    # central: the coordinator's test data
    federated: dict[str, float] = field(default_factory=dict)  # the sites' sample-weighted reports

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "parent": self.parent, "strategy": self.strategy,
                "included": list(self.included), "contributions": [dict(c) for c in self.contributions],
                "sha256": self.sha256, "accuracy": self.accuracy, "created_at": self.created_at,
                "offset": self.offset, "epsilon": self.epsilon, "metrics": dict(self.metrics),
                "federated_metrics": dict(self.federated)}


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
    task_failures: int = 0        # tasks whose training raised at the site (task_failed events)
    evaluation: SiteReport | None = None  # the site's newest federated evaluation report

    def to_dict(self) -> dict[str, Any]:
        mean = self.staleness_sum / self.updates_included if self.updates_included else None
        ev = self.evaluation
        return {"updates_logged": self.updates_logged, "updates_included": self.updates_included,
                "samples_included": self.samples_included, "total_weight": self.total_weight,
                "mean_staleness": mean, "dead_lettered": self.dead_lettered, "epsilon": self.epsilon,
                "task_failures": self.task_failures,
                "evaluation": None if ev is None else {"version": ev.version, "samples": ev.samples,
                                                       "metrics": dict(ev.metrics)}}


@dataclass(frozen=True)
class TaskFailure:
    """A site's report that its training raised on a task (the task went back to the others)."""

    site: str
    task_id: str
    error: str
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "task_id": self.task_id, "error": self.error, "ts": self.ts}


#: task failures a history keeps (a site reporting failures without end cannot grow it past this;
#: the rest are counted per site only)
MAX_FAILURES_KEPT = 10_000


@dataclass
class History:
    job: str
    versions: list[VersionEntry] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    updates_logged: list[str] = field(default_factory=list)
    unreadable_updates: int = 0
    #: entries skipped per reason (junk events, updates from another site than they name, ...)
    poison: dict[str, int] = field(default_factory=dict)
    models_first_offset: int | None = None
    updates_first_offset: int | None = None
    sites: dict[str, SiteTotals] = field(default_factory=dict)
    task_failures: list[TaskFailure] = field(default_factory=list)

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
        """The documented --json contract (job, versions, dead_letters, updates_logged) plus detail."""
        return {
            "job": self.job,
            "versions": [v.to_dict() for v in self.versions],
            "dead_letters": [d.to_dict() for d in self.dead_letters],
            "updates_logged": list(self.updates_logged),
            "updates_not_included": self.not_included(),
            "unreadable_updates": self.unreadable_updates,
            "poison": dict(self.poison),
            "sites": {s: t.to_dict() for s, t in sorted(self.sites.items())},
            "task_failures": [f.to_dict() for f in self.task_failures],
            "truncated": self.truncated,
            "first_version": self.versions[0].version if self.versions else None,
        }


def parse_dead_letter(d: Delivery) -> DeadLetter:
    """Reason from fedmq's header, else from the broker's own dead-lettering headers.

    Every header and the body may be a site's choice (the broker dead-letters a site's raw bytes
    past the delivery limit, keeping the sender's headers): header values are used only when
    well-formed (`shared.ledger.header_id`, `dead_reason`), the detail is bounded text."""
    reason = dead_reason(d.headers)
    update_id = header_id(d.headers)
    detail = header_detail(d.headers)
    if d.routing_key == "task":
        task = decode_or_none(Task, d)
        return DeadLetter("task", task.update_id if task else update_id, task.task_id if task else None,
                          None, reason, detail)
    update = decode_or_none(Update, d)
    if update is not None:
        return DeadLetter("update", update.update_id, update.task_id, update.site, reason, detail)
    task = decode_or_none(Task, d)  # a task dead-lettered by the broker keeps its own routing key
    if task is not None:
        return DeadLetter("task", task.update_id, task.task_id, None, reason, detail)
    return DeadLetter("unknown", update_id, None, as_site(d.routing_key), reason, detail)


@dataclass
class Evaluations:
    """What the events stream says of each version: central and federated metrics, and each
    site's newest evaluation report."""

    central: dict[int, dict[str, float]] = field(default_factory=dict)
    federated: dict[int, dict[str, float]] = field(default_factory=dict)
    site_reports: dict[str, SiteReport] = field(default_factory=dict)

    def accuracy(self) -> dict[int, float]:
        return {v: m["accuracy"] for v, m in self.central.items() if "accuracy" in m}


def read_evaluations(url: str, names: JobNames, poison: PoisonCounter | None = None,
                     failures: dict[str, list[TaskFailure]] | None = None) -> Evaluations:
    """Metrics per version from the coordinator's VERSION_EVALUATED events, and the sites' own
    reports from their UPDATE_PUBLISHED events (only events the routing key vouches for, every
    field type- and range-checked); with `failures`, also each site's TASK_FAILED reports."""
    out = Evaluations()
    poison = poison or PoisonCounter("history", names.job)
    with StreamCursor(url, names.events, name=f"fedmq-history-events-{names.job}", prefetch=256) as cur:
        for d in cur:
            try:
                sev = read_event_delivery(d)
            except MalformedMessageError as exc:
                poison.note(f"event_{exc.reason}", names.events, d.stream_offset, exc)
                continue
            if sev.event.event == EventKind.TASK_FAILED and failures is not None and sev.site is not None:
                failure = _task_failure(sev.site, sev.data, sev.event.ts)
                if failure is None:
                    poison.note("event_bad_field", names.events, d.stream_offset, "task_failed")
                else:
                    failures.setdefault(sev.site, []).append(failure)
                continue
            if sev.event.event == EventKind.UPDATE_PUBLISHED and sev.site is not None and "eval" in sev.data:
                report = read_report(sev.data["eval"])
                if report is None:
                    poison.note("event_bad_field", names.events, d.stream_offset, "update_published eval")
                else:
                    out.site_reports[sev.site] = report
                continue
            if sev.event.event != EventKind.VERSION_EVALUATED:
                continue
            ev = read_evaluated(sev.data) if sev.site is None else None
            if ev is None:
                poison.note("event_bad_field", names.events, d.stream_offset, "version_evaluated")
                continue
            (out.federated if ev.scope == EvalSource.FEDERATED.value else out.central)[ev.version] = ev.metrics
    return out


def read_accuracies(url: str, names: JobNames, poison: PoisonCounter | None = None,
                    failures: dict[str, list[TaskFailure]] | None = None) -> dict[int, float]:
    """Central test accuracy per version (see `read_evaluations`)."""
    return read_evaluations(url, names, poison, failures).accuracy()


def _task_failure(site: str, data: dict[str, Any], ts: float) -> TaskFailure | None:
    tid, error = field_id(data, "task_id"), field_text(data, "error", 500)
    if tid is None or (error is None and "error" in data):
        return None
    return TaskFailure(site, tid, error or "", ts)


def read_history(url: str, job: str) -> History:
    """Everything `fedmq history` shows, from the job's four streams; what is no message, or lies
    about its sender, is skipped and counted (`History.poison`), never fatal."""
    names = JobNames(job)
    hist = History(job)
    poison = PoisonCounter("history", job)
    failures: dict[str, list[TaskFailure]] = {}
    evals = read_evaluations(url, names, poison, failures)
    accuracy = evals.accuracy()
    with StreamCursor(url, names.models, name=f"fedmq-history-models-{job}", prefetch=8) as cur:
        for d in cur:
            mv = decode_or_none(ModelVersion, d)
            if mv is None:
                poison.note("model_unreadable", names.models, d.stream_offset)
                continue
            hist.versions.append(VersionEntry(
                mv.version, mv.parent, mv.strategy, mv.included, mv.contributions, mv.sha256,
                mv.created_at, accuracy.get(mv.version), d.stream_offset,
                field_float(mv.meta.get("dp"), "epsilon", 0.0, MAX_EPSILON),
                evals.central.get(mv.version, {}), evals.federated.get(mv.version, {})))
        hist.models_first_offset = cur.first_offset
    if not hist.versions:
        raise JobNotFoundError(f"job {job} has no model version on the broker")
    with StreamCursor(url, names.updates_log, name=f"fedmq-history-updates-{job}", prefetch=32) as cur:
        for d in cur:
            u = decode_or_none(Update, d)
            if u is None or u.site != d.routing_key:  # junk, or a body naming another site
                hist.unreadable_updates += 1
                poison.note("update_unreadable" if u is None else "update_wrong_site", names.updates_log,
                            d.stream_offset)
                continue
            hist.updates_logged.append(u.update_id)
            totals = hist.sites.setdefault(u.site, SiteTotals())
            totals.updates_logged += 1
            eps = field_float(u.privacy, "epsilon", 0.0, MAX_EPSILON)
            if eps is not None:
                totals.epsilon = max(eps, totals.epsilon or 0.0)
        hist.updates_first_offset = cur.first_offset
    with StreamCursor(url, names.dead_log, name=f"fedmq-history-dead-{job}", prefetch=32) as cur:
        for d in cur:
            dl = parse_dead_letter(d)
            if dl.kind == "unknown":
                poison.note("dead_unreadable", names.dead_log, d.stream_offset, f"reason={dl.reason}")
            hist.dead_letters.append(dl)
    for site, reported in failures.items():
        hist.sites.setdefault(site, SiteTotals()).task_failures = len(reported)
    for site, report in evals.site_reports.items():
        hist.sites.setdefault(site, SiteTotals()).evaluation = report
    hist.task_failures = sorted((f for fs in failures.values() for f in fs), key=lambda f: f.ts)[:MAX_FAILURES_KEPT]
    _site_totals(hist)
    hist.poison = poison.to_dict()
    return hist


#: larger epsilons are no privacy at all; a bound keeps a site's 1e308 out of tables and sums
MAX_EPSILON = 1e6


def _site_totals(hist: History) -> None:
    """Per-site sums from the versions' contributions; a field of the wrong type counts as 0."""
    for v in hist.versions:
        for c in v.contributions:
            t = hist.sites.setdefault(as_site(c.get("site")) or "?", SiteTotals())
            t.updates_included += 1
            t.samples_included += as_int(c.get("num_samples"), 0, 2**40) or 0
            t.total_weight += field_float(c, "weight", -1e12, 1e12) or 0.0
            t.staleness_sum += as_int(c.get("staleness"), 0, 2**31) or 0
    for dl in hist.dead_letters:
        if dl.site:
            hist.sites.setdefault(dl.site, SiteTotals()).dead_lettered += 1


# ---------------------------------------------------------------------------- output


def _short(value: Any, width: int = 40) -> str:
    """Any recorded value as short text, for a table cell."""
    return str(value)[:width] if isinstance(value, str | int | float | type(None)) else type(value).__name__


def _contribution_text(c: dict[str, Any]) -> str:
    weight = field_float(c, "weight")
    return (f"{_short(c.get('site'))} base v{_short(c.get('base_version'))} tau {_short(c.get('staleness'))} "
            f"w {'-' if weight is None else format(weight, '.4g')} n {_short(c.get('num_samples'))}  "
            f"{_short(c.get('update_id'), 130)}")


def _metrics_text(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in values.items()) or "-"


def render(hist: History) -> None:
    """Human tables on stdout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped to a file: do not squeeze the tables into 80 columns
    if hist.truncated:
        console.print(f"[yellow]history truncated by retention: the oldest readable version is "
                      f"v{hist.versions[0].version}[/]")
    t = Table(title=f"job {hist.job}: {len(hist.versions)} versions")
    for col in ("version", "parent", "strategy", "included updates (site, base, tau, weight, samples, id)",
                "sha256", "metrics (central)", "metrics (federated)", "epsilon"):
        t.add_column(col)
    for v in hist.versions:
        lines = [_contribution_text(c) for c in v.contributions] or list(v.included) or ["-"]
        t.add_row(str(v.version), str(v.parent), escape(v.strategy), escape("\n".join(lines)), v.sha256[:16],
                  _metrics_text(v.metrics), _metrics_text(v.federated),
                  "-" if v.epsilon is None else f"{v.epsilon:.3f}")
    console.print(t)
    d = Table(title=f"dead letters: {len(hist.dead_letters)}")
    for col in ("kind", "update id", "site", "reason", "detail"):
        d.add_column(col)
    for dl in hist.dead_letters:
        d.add_row(dl.kind, dl.update_id or "-", dl.site or "-", dl.reason, escape(dl.detail[:80]))
    console.print(d)
    s = Table(title="per site")
    for col in ("site", "logged", "included", "samples", "total weight", "mean staleness", "dead-lettered",
                "epsilon", "training failed", "last evaluation"):
        s.add_column(col)
    for site, tot in sorted(hist.sites.items()):
        row = tot.to_dict()
        mean = row["mean_staleness"]
        s.add_row(site, str(tot.updates_logged), str(tot.updates_included), str(tot.samples_included),
                  f"{tot.total_weight:.4g}", "-" if mean is None else f"{mean:.2f}", str(tot.dead_lettered),
                  "-" if tot.epsilon is None else f"{tot.epsilon:.3f}", str(tot.task_failures),
                  "-" if tot.evaluation is None else
                  f"v{tot.evaluation.version} {_metrics_text(tot.evaluation.metrics)} (n {tot.evaluation.samples})")
    console.print(s)
    if hist.task_failures:
        f = Table(title=f"training failures reported by sites: {len(hist.task_failures)}")
        for col in ("site", "task", "error"):
            f.add_column(col)
        for tf in hist.task_failures[-50:]:
            f.add_row(tf.site, tf.task_id, escape(tf.error[:120]))
        console.print(f)
    missing = hist.not_included()
    console.print(f"{len(hist.updates_logged)} updates logged, {len(missing)} neither included nor "
                  f"dead-lettered{': ' + ', '.join(missing[:10]) if missing else ''}"
                  f"{' ...' if len(missing) > 10 else ''}; {hist.unreadable_updates} unreadable; "
                  f"skipped: {', '.join(f'{k} {n}' for k, n in hist.poison.items()) or 'nothing'}")


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
