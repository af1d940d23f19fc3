"""Reading a job's state back from its streams; what every role needs after a (re)start."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from shared.broker import Connection, JobNames, StreamReader, read_last
from shared.errors import JobNotFoundError, MalformedMessageError
from shared.messages import Event, ModelVersion

log = logging.getLogger(__name__)


def emit(conn: Connection, names: JobNames, source: str, event: str, **data: Any) -> None:
    """Append an Event to the job's events stream (confirmed); routing key = event name."""
    ev = Event(job=names.job, event=event, source=source, data=data)
    conn.publish(names.events_exchange, event, ev.encode())


@dataclass
class ModelState:
    """The newest version plus the update ids of recent versions (the dedup set)."""

    latest: ModelVersion
    offset: int
    recent_included: set[str] = field(default_factory=set)
    #: (version, parent, contributions) of every version read, in stream order: the running-median
    #: clip rebuilds its norm history from these (aggregator.strategy.chain_window)
    recent_contributions: list[tuple[int, int, tuple[dict[str, Any], ...]]] = field(default_factory=list)


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
    # stop at the offset "last" found instead of waiting for the stream to go quiet: this read is
    # on the takeover path, and the idle wait would be most of a standby's takeover time
    with StreamReader(url, names.models, name=f"fedmq-state-{names.job}") as reader:
        for d in reader.read(max(0, last_offset - window), idle=2.0):
            try:
                mv = ModelVersion.decode(d.body)
            except MalformedMessageError as exc:
                log.error("unreadable model version job=%s offset=%s error=%s", names.job, d.stream_offset, exc)
                mv = None
            if mv is not None:
                included.update(mv.included)
                contributions.append((mv.version, mv.parent, mv.contributions))
                if best is None or mv.version >= best.version:
                    best, best_offset = mv, d.stream_offset or 0
            if (d.stream_offset or 0) >= last_offset:
                break
    if best is None:
        raise JobNotFoundError(f"job {names.job}: models stream has no readable version")
    return ModelState(best, best_offset, included, contributions)


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
