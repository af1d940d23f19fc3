"""`fedmq jobs` and `fedmq delete`: many jobs on one broker, and the end of a job's life.

Discovery. AMQP cannot list queues, so a broker-wide listing needs the management plugin's HTTP
API (``--management-url``): it is what a RabbitMQ operator already runs to watch a broker, it sees
every job whoever created it, and it needs no write path that a site's user could abuse (a
registry stream would be one more thing to protect and would miss jobs created by older
versions). Without the API, ``--job`` names the jobs to look at and everything else is AMQP.

State. Always from the job's own streams, never from the listing: a job is *finished* when its
events stream holds the coordinator's ``job_finished`` (with its stop reason), *running* when a
worker or aggregator consumes its tasks or updates queue, otherwise *idle* (its roles are gone:
abandoned, or between restarts). A finished job's coordinator has already deleted the tasks and
updates queues; its streams (models, events, logs) stay, subject to the job's stream retention,
until `fedmq delete` removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import Any

from fedmq.cli import print_json
from fedmq.history import stream_tail
from fedmq.monitor import ManagementAPI
from fedmq.shared.broker import Connection, JobNames, StreamReader, mask_url, read_last, validate_job_id
from fedmq.shared.errors import ConfigError, FedmqError, JobNotFoundError, MalformedMessageError
from fedmq.shared.jobstate import PoisonCounter, field_text, read_event_delivery
from fedmq.shared.messages import EventKind, ModelVersion

#: a job is discovered by its events stream: the one queue every job keeps until it is deleted
EVENTS_RE = re.compile(r"^fedmq\.([A-Za-z0-9_-]{1,64})\.events$")
#: how many of the newest events are read for job_finished (it is among the last few)
TAIL_EVENTS = 256
#: the management API's queue listing is read up to this size (~100k jobs' names)
MAX_LISTING_BYTES = 64 * 1024 * 1024

RUNNING, FINISHED, IDLE = "running", "finished", "idle"


class JobRunningError(FedmqError):
    """`fedmq delete` of a job that has not finished."""

    exit_code = 5


@dataclass
class JobInfo:
    job: str
    state: str
    stop_reason: str | None = None
    latest_version: int | None = None
    created_at: float | None = None
    finished_at: float | None = None
    consumers: int = 0
    poison_events: int = 0
    #: the registry's sites (each has its own updates queue); not listed in the output
    sites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["sites"]
        return out


def list_job_ids(api: ManagementAPI) -> list[str]:
    """Job ids on the API's vhost: every ``fedmq.<job>.events`` queue; other names are skipped."""
    url = f"{api.base}/api/queues/{api.vhost}?columns=name"
    req = urllib.request.Request(url, headers={"Authorization": api.auth})
    try:
        with urllib.request.urlopen(req, timeout=max(api.timeout, 10.0)) as resp:  # noqa: S310 - operator URL
            body = resp.read(MAX_LISTING_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise FedmqError(f"management API {url}: HTTP {exc.code}") from exc
    except OSError as exc:
        raise FedmqError(f"management API {url}: {exc}") from exc
    if len(body) > MAX_LISTING_BYTES:
        raise FedmqError(f"management API {url}: queue listing over {MAX_LISTING_BYTES} bytes")
    try:
        rows = json.loads(body)
    except ValueError as exc:
        raise FedmqError(f"management API {url}: not JSON ({exc})") from exc
    jobs: set[str] = set()
    for row in rows if isinstance(rows, list) else []:
        name = row.get("name") if isinstance(row, dict) else None
        m = EVENTS_RE.match(name) if isinstance(name, str) else None
        if m:
            jobs.add(m.group(1))
    return sorted(jobs)


def _consumers(conn: Connection, queue: str) -> int:
    try:
        return conn.queue_stats(queue)[1]
    except JobNotFoundError:
        return 0


def _scan_events(url: str, names: JobNames, info: JobInfo, poison: PoisonCounter) -> None:
    """Reads the first event (the job's creation) and the newest TAIL_EVENTS (job_finished)."""
    tail = stream_tail(url, names.events)
    if tail is None:
        return
    start = max(0, tail - TAIL_EVENTS)
    with StreamReader(url, names.events, name=f"fedmq-jobs-{names.job}") as reader:
        offsets = [0, start] if start > 0 else [0]
        for first in offsets:
            for d in reader.read(first, idle=0.3, max_seconds=20.0):
                try:
                    ev = read_event_delivery(d).event
                except MalformedMessageError as exc:
                    poison.note("malformed_event", names.events, d.stream_offset, exc)
                    ev = None
                if ev is not None:
                    if info.created_at is None:
                        info.created_at = ev.ts
                    if ev.event == EventKind.JOB_FINISHED.value:
                        info.finished_at = ev.ts
                        info.stop_reason = field_text(ev.data, "stop_reason", 64)
                if first == 0 and start > 0 and info.created_at is not None:
                    break  # only the creation time is wanted from the head
                if (d.stream_offset or 0) >= tail:
                    break
            reader.close()
    info.poison_events = poison.total


def job_info(url: str, job: str) -> JobInfo:
    """The job's state from its own streams; JobNotFoundError when it has no events stream."""
    names = JobNames(validate_job_id(job))
    with Connection(url, name="fedmq-jobs").open() as conn:
        try:
            conn.queue_stats(names.events)
        except JobNotFoundError:
            raise JobNotFoundError(f"job {job} not found on {mask_url(url)} (no {names.events})") from None
        consumers = sum(_consumers(conn, q) for q in (names.tasks, names.updates, names.aggregator_lock))
    info = JobInfo(job=job, state=IDLE, consumers=consumers)
    _scan_events(url, names, info, PoisonCounter("jobs", job))
    last = read_last(url, names.models)
    if last is not None:
        with suppress(MalformedMessageError):
            latest = ModelVersion.decode(last.body)
            info.latest_version = latest.version
            info.sites = tuple(latest.listed_sites)
    if info.finished_at is not None:
        info.state = FINISHED
    elif consumers > 0:
        info.state = RUNNING
    return info


def delete_job(url: str, job: str, *, force: bool = False, finished_before: float | None = None) -> JobInfo:
    """Removes every queue, stream and exchange of a finished job (all names from JobNames).

    Refuses a job that has not finished unless `force`; `finished_before` (seconds) also refuses
    a job that finished more recently than that."""
    info = job_info(url, job)
    if info.state != FINISHED and not force:
        raise JobRunningError(f"job {job} is {info.state}, not finished: stop it first or pass --force")
    if (finished_before is not None and info.finished_at is not None and not force
            and time.time() - info.finished_at < finished_before):
        raise JobRunningError(f"job {job} finished {time.time() - info.finished_at:.0f} s ago, "
                              f"less than --finished-before {finished_before:.0f} s")
    with Connection(url, name="fedmq-delete").open() as conn:
        conn.delete_job(JobNames(job), sites=info.sites)
    return info


# ----------------------------------------------------------------------------- CLI

_AGE_RE = re.compile(r"^(\d{1,9})([smhd])$")
_AGE_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    m = _AGE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} must look like 30s, 15m, 12h or 7d")
    return float(int(m.group(1)) * _AGE_UNIT[m.group(2)])


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.job:
        ids = sorted(set(args.job))
    elif args.management_url:
        ids = list_job_ids(ManagementAPI(args.management_url, args.broker))
    else:
        raise ConfigError("AMQP cannot list queues: pass --management-url (the management plugin) "
                         "or name the jobs with --job")
    rows: list[JobInfo] = []
    for job in ids:
        try:
            rows.append(job_info(args.broker, job))
        except JobNotFoundError:
            rows.append(JobInfo(job=job, state="missing"))
    if args.json:
        print_json({"broker": mask_url(args.broker), "jobs": [r.to_dict() for r in rows]})
        return 0
    print(f"{'JOB':<24} {'STATE':<9} {'STOP REASON':<16} {'VERSION':>7}  {'CREATED (UTC)':<19}  FINISHED (UTC)")
    for r in rows:
        print(f"{r.job:<24} {r.state:<9} {r.stop_reason or '-':<16} "
              f"{'-' if r.latest_version is None else r.latest_version:>7}  "
              f"{_fmt_time(r.created_at):<19}  {_fmt_time(r.finished_at)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    info = delete_job(args.broker, args.job, force=args.force, finished_before=args.finished_before)
    print(f"deleted job {args.job} ({info.state}) from {mask_url(args.broker)}")
    return 0


def _job_id(text: str) -> str:
    try:
        return validate_job_id(text)
    except FedmqError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("jobs", help="list the jobs on a broker: state (running / finished with its stop "
                                    "reason / idle), latest version, created and finished times")
    add_common(p, job=False)
    p.add_argument("--job", action="append", type=_job_id, default=[],
                   help="look at this job (repeatable); without it, every job the management API lists")
    p.add_argument("--management-url", default=os.environ.get("FEDMQ_MANAGEMENT_URL"),
                   help="RabbitMQ management API, e.g. http://host:15672, to discover every job "
                   "(credentials from the URL or the broker URL; env FEDMQ_MANAGEMENT_URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("delete", help="remove a finished job's queues, streams and exchanges "
                                      "(refuses a job that has not finished unless --force)")
    add_common(p)
    p.add_argument("--force", action="store_true", help="delete even a running or idle job (its roles fail)")
    p.add_argument("--finished-before", type=parse_age, default=None, metavar="AGE",
                   help="refuse unless the job finished at least AGE ago (30s, 15m, 12h, 7d)")
    p.set_defaults(run=cmd_delete)
