"""Reading a job's state back from its streams; what every role needs after a (re)start."""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmq.shared.broker import SITE_EVENTS, Connection, Delivery, JobNames, StreamReader, read_last
from fedmq.shared.errors import BrokerUnavailableError, JobNotFoundError, MalformedMessageError
from fedmq.shared.messages import (
    ID_RE,
    MAX_INT,
    MAX_LIST,
    NAME_RE,
    Event,
    EventKind,
    ModelVersion,
    integer,
    number,
    text,
)

log = logging.getLogger(__name__)


_SITE_PREFIX = "site."


def emit(conn: Connection, names: JobNames, source: str, event: str, **data: Any) -> None:
    """Append an Event to the job's events stream (confirmed); routing key = event name.

    Only trusted roles (coordinator, aggregator, key holder) publish under the bare event name;
    sites use `emit_site`."""
    ev = Event(job=names.job, event=event, source=source, data=data)
    conn.publish(names.events_exchange, event, ev.encode())


def emit_site(conn: Connection, names: JobNames, site: str, event: str, /, **data: Any) -> None:
    """A site's event, under the routing key its broker user is pinned to (`site_event_key`);
    data["site"] is always `site` (readers check it against the routing key, `read_event`)."""
    ev = Event(job=names.job, event=event, source=site, data={**data, "site": site})
    conn.publish(names.events_exchange, site_event_key(site, event), ev.encode())


def site_event_key(site: str, event: str) -> str:
    return f"{_SITE_PREFIX}{site}.{event}"


def event_sender(routing_key: str) -> tuple[str, str] | None:
    """(site, event) for a site's routing key, None for a trusted role's (bare event name).

    The site part is authentic where per-site topic permissions are set (docs/security.md): it
    is the one identity in an event that the sender did not choose."""
    if not routing_key.startswith(_SITE_PREFIX):
        return None
    site, _, event = routing_key[len(_SITE_PREFIX):].rpartition(".")
    return site, event


@dataclass
class ModelState:
    """The newest version plus the update ids of recent versions (the dedup set)."""

    latest: ModelVersion
    offset: int
    recent_included: set[str] = field(default_factory=set)
    #: (version, parent, contributions) of every version read, in stream order: the running-median
    #: clip rebuilds its norm history from these (aggregator.strategy.chain_window)
    recent_contributions: list[tuple[int, int, tuple[dict[str, Any], ...]]] = field(default_factory=list)
    #: the newest entry of latest.parent read before latest (centred clipping's centre needs its
    #: weights); None when latest is v0 or that entry was not in the window read
    parent: ModelVersion | None = None


def load_model_state(url: str, names: JobNames, *, window: int = 64, wait: float = 0.0) -> ModelState:
    """Newest ModelVersion and the ids in the `window` versions before it.

    Redeliveries only ever concern updates in flight around the newest versions, so a window is
    enough to dedup; reading the whole stream would cost O(history x model size) per takeover.
    `wait` > 0 polls that long for v0 to appear (an aggregator started before its coordinator).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            last = read_last(url, names.models)
        except JobNotFoundError:
            last = None  # topology not declared yet
        if last is not None:
            break
        if time.monotonic() >= deadline:
            raise JobNotFoundError(f"job {names.job} has no model version yet (is its coordinator running?)")
        time.sleep(0.5)
    last_offset = last.stream_offset or 0
    best: ModelVersion | None = None
    best_offset = 0
    included: set[str] = set()
    contributions: list[tuple[int, int, tuple[dict[str, Any], ...]]] = []
    # the newest entry of each of the last two version numbers: the best one's parent is among
    # them (keeps two models in memory, not the window's)
    newest: dict[int, ModelVersion] = {}
    # stop at the offset "last" found instead of waiting for the stream to go quiet: this read is
    # on the takeover path, and the idle wait would be most of a standby's takeover time
    with StreamReader(url, names.models, name=f"fedmq-state-{names.job}") as reader:
        # a window of versions: of entries, when each version came in parts
        for d in reader.read(max(0, last_offset - window * last.parts), idle=2.0):
            try:
                mv = ModelVersion.decode(d.body)
            except MalformedMessageError as exc:
                log.error("unreadable model version job=%s offset=%s error=%s", names.job, d.stream_offset, exc)
                mv = None
            if mv is not None:
                included.update(mv.included)
                contributions.append((mv.version, mv.parent, mv.contributions))
                if best is None or mv.version >= best.version:
                    if best is not None and best.version < mv.version:
                        newest = {v: e for v, e in newest.items() if v >= mv.version - 1}
                    best, best_offset = mv, d.stream_offset or 0
                    newest[mv.version] = mv
            if (d.stream_offset or 0) >= last_offset:
                break
    if best is None:
        raise JobNotFoundError(f"job {names.job}: models stream has no readable version")
    parent = newest.get(best.parent) if best.parent == best.version - 1 else None
    return ModelState(best, best_offset, included, contributions, parent)


def find_version(url: str, names: JobNames, version: int, offset: int | None = None,
                 timeout: float = 30.0) -> tuple[ModelVersion, int]:
    """Version `version` of the job's model, seeking straight to `offset` when the task gave one."""
    with StreamReader(url, names.models, name=f"fedmq-models-{names.job}") as reader:
        reader.start(offset if offset is not None else "first")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in reader.poll(0.1):
                mv = ModelVersion.decode(d.body)
                if mv.version == version:
                    return mv, d.stream_offset or 0
                if offset is not None and mv.version > version:
                    break  # the hint was wrong: fall back to a full scan
            else:
                continue
            reader.close()
            return find_version(url, names, version, None, timeout)
    raise JobNotFoundError(f"job {names.job}: version {version} not found in the models stream")


class ModelFeed:
    """A site's view of the models stream: one reader that stays attached and follows the stream,
    and the last `cache` versions decoded.

    Why: nearly every task names a version the site has not seen yet, and opening a reader for it
    (`find_version`: a new connection, a consumer, a seek) cost tens of milliseconds per task, on
    the critical path between a task's arrival and its training. Attached once, the feed has
    usually read the version before the task for it arrives. A version it has already passed
    without keeping it, a fork (the task's offset names another entry) or a dropped connection
    fall back to `find_version`.
    """

    def __init__(self, url: str, names: JobNames, *, cache: int = 4) -> None:
        self.url, self.names, self.size = url, names, max(cache, 1)
        self._reader: StreamReader | None = None
        self._cache: OrderedDict[int, tuple[ModelVersion, int]] = OrderedDict()
        self._newest = -1  # the highest version number read so far
        self.attached = 0  # readers opened (1 for a whole job unless a connection was lost)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def get(self, version: int, offset: int | None = None, timeout: float = 30.0) -> ModelVersion:
        """Version `version` (the entry at `offset`, when the task gave one)."""
        hit = self._cached(version, offset)
        if hit is not None:
            return hit
        if self._reader is None:
            self._attach(offset)
        elif version <= self._newest:
            return self._fallback(version, offset, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self._reader.poll(0.05) if self._reader is not None else []
            except BrokerUnavailableError as exc:
                log.warning("models feed lost its connection, reading directly job=%s error=%s", self.names.job, exc)
                self.close()
                return self._fallback(version, offset, timeout)
            for d in got:
                self._absorb(d)
            hit = self._cached(version, offset)
            if hit is not None:
                return hit
            if version <= self._newest:  # passed without a match: a fork or a wrong hint
                return self._fallback(version, offset, timeout)
        raise JobNotFoundError(f"job {self.names.job}: version {version} did not appear in the models stream "
                               f"within {timeout:g} s")

    def _attach(self, offset: int | None) -> None:
        reader = StreamReader(self.url, self.names.models, name=f"fedmq-models-feed-{self.names.job}", prefetch=8)
        try:
            reader.start(offset if offset is not None else "first")
        except BaseException:
            # kept, a reader that never started would fail every later task (the broker was
            # restarting when it attached: seen in the chaos test); the next task attaches anew
            reader.close()
            raise
        self._reader = reader
        self.attached += 1

    def _absorb(self, d: Delivery) -> None:
        try:
            mv = ModelVersion.decode(d.body)
        except MalformedMessageError as exc:
            log.error("unreadable model version skipped job=%s offset=%s error=%s", self.names.job,
                      d.stream_offset, exc)
            return
        self._newest = max(self._newest, mv.version)
        self._keep(mv, d.stream_offset or 0)

    def _keep(self, mv: ModelVersion, offset: int) -> None:
        self._cache[mv.version] = (mv, offset)
        self._cache.move_to_end(mv.version)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def _cached(self, version: int, offset: int | None) -> ModelVersion | None:
        entry = self._cache.get(version)
        if entry is None or (offset is not None and entry[1] != offset):
            return None
        self._cache.move_to_end(version)
        return entry[0]

    def _fallback(self, version: int, offset: int | None, timeout: float) -> ModelVersion:
        mv, at = find_version(self.url, self.names, version, offset, timeout)
        self._keep(mv, at)
        return mv


# --------------------------------------------------------------------------- reading events safely
#
# Why: a site (or a thief of its broker credentials) can put any bytes on the events exchange, so
# every reader of the events stream passes each entry through `read_event` and reads its data
# fields only through the typed `field_*` helpers. Decoding alone is not enough: the body chooses
# its own `event`, `source` and `data`; the routing key is the one thing the broker pinned.

#: the events a site may publish, and only under `site_event_key(<its own name>, <event>)`; the
#: broker's topic permissions grant the same set (`shared.broker.site_permissions`)
SITE_EVENT_KINDS = SITE_EVENTS
#: the events trusted roles publish, under the bare event name
TRUSTED_EVENT_KINDS = frozenset(k.value for k in EventKind) - SITE_EVENT_KINDS


class ForgedEventError(MalformedMessageError):
    """A well-formed event whose routing key does not vouch for it (another site, a trusted kind
    sent under a site key, a site kind under a bare key): readers skip it and count it."""

    reason = "forged"


@dataclass(frozen=True)
class SourcedEvent:
    """An event together with who sent it, as far as the broker vouches for that."""

    event: Event
    #: the sending site (authentic where per-site topic permissions are set); None = a trusted role
    site: str | None

    @property
    def data(self) -> dict[str, Any]:
        return self.event.data


def read_event(routing_key: str, body: bytes) -> SourcedEvent:
    """The event in `body` if its routing key vouches for it; else MalformedMessageError (bytes that
    are no event) or ForgedEventError. A site event also names its own site in data["site"]: a
    reader may then use that value as the authentic sender."""
    ev = Event.decode(body)
    sender = event_sender(routing_key)
    if sender is None:
        if ev.event not in TRUSTED_EVENT_KINDS or routing_key != ev.event:
            raise ForgedEventError(f"event {ev.event[:64]!r} under routing key {routing_key[:80]!r}: "
                                   "not a trusted role's event")
        return SourcedEvent(ev, None)
    site, kind = sender
    if not NAME_RE.match(site) or kind not in SITE_EVENT_KINDS or ev.event != kind:
        raise ForgedEventError(f"event {ev.event[:64]!r} under site routing key {routing_key[:80]!r}: "
                               "sites publish only their own update_published / task_refused")
    if ev.data.get("site") != site:
        raise ForgedEventError(f"event {kind} sent by site {site!r} names another site in its data")
    return SourcedEvent(ev, site)


def read_event_delivery(d: Delivery) -> SourcedEvent:
    """`read_event` for a stream delivery."""
    return read_event(d.routing_key, d.body)


class PoisonCounter:
    """Counts skipped entries per reason and logs them (key=value), without letting a flood of
    junk flood the log too: the first `log_first` of each reason, then one in every `log_every`."""

    def __init__(self, reader: str, job: str, *, log_first: int = 20, log_every: int = 1000) -> None:
        self.reader = reader
        self.job = job
        self.log_first = log_first
        self.log_every = log_every
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def note(self, reason: str, stream: str, offset: int | None, detail: object = "") -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= self.log_first or n % self.log_every == 0:
            log.warning("poison entry skipped reader=%s job=%s stream=%s offset=%s reason=%s count=%d detail=%s",
                        self.reader, self.job, stream, offset, reason, n, str(detail)[:200])

    def to_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# typed fields of event data (or any other sender-chosen map): the value, or None when it is missing
# or of the wrong type / out of bounds. A reader skips what is None; nothing here raises.

def _field(check: Any, data: Any, key: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        return None
    try:
        return check("event", key, data[key])
    except MalformedMessageError:
        return None


def field_int(data: Any, key: str, lo: int = 0, hi: int = MAX_INT) -> int | None:
    return _field(integer(lo, hi), data, key)  # type: ignore[no-any-return]


def field_float(data: Any, key: str, lo: float = -MAX_INT, hi: float = MAX_INT) -> float | None:
    """A finite number in [lo, hi], as a float (bools are not numbers here)."""
    value = _field(number(lo, hi), data, key)
    return None if value is None else float(value)


def field_text(data: Any, key: str, max_len: int = 256, pattern: re.Pattern[str] | None = None) -> str | None:
    return _field(text(pattern, max_len), data, key)  # type: ignore[no-any-return]


def field_id(data: Any, key: str) -> str | None:
    return field_text(data, key, 128, ID_RE)


def field_site(data: Any, key: str = "site") -> str | None:
    return field_text(data, key, 64, NAME_RE)


def field_list(data: Any, key: str, item: Callable[[Any], Any], max_items: int = MAX_LIST) -> list[Any] | None:
    """A list whose every item passes `item` (returning a non-None value); None otherwise."""
    value = data.get(key) if isinstance(data, dict) else None
    if type(value) is not list or len(value) > max_items:
        return None
    out = [item(v) for v in value]
    return None if any(v is None for v in out) else out


def as_id(value: Any) -> str | None:
    return value if type(value) is str and ID_RE.match(value) else None


def as_site(value: Any) -> str | None:
    return value if type(value) is str and NAME_RE.match(value) else None


def as_int(value: Any, lo: int = 0, hi: int = MAX_INT) -> int | None:
    return value if type(value) is int and lo <= value <= hi else None
