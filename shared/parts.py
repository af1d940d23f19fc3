"""Messages bigger than the broker takes in one piece: split into parts, put back together.

Why: RabbitMQ refuses a body over its ``max_message_size`` (128 MiB by default; the channel is
closed with 406), and a 50M-parameter model is 200 MB in float32. A publisher splits such a body
into parts of at most `part_bytes` (`split`), each a broker message of its own carrying the
`PART_HEADER` ``part id/index/count/total bytes``; every consumer of a queue or a stream puts
them back together (`Assembler`) before anything above the broker module sees a delivery. So the
roles, replay, the ledger and HE see whole messages only, and exactly-once is unchanged: a message
is settled (acked, rejected, requeued) only as a whole, when all its parts are.

The parts are written by whoever holds a site's credentials, so the header is hostile input: it
is parsed totally (`parse_header`), sizes are checked before anything is kept, a part only ever
joins parts of the same sender and routing key, and what a consumer holds incomplete is bounded
in count, bytes and time; a message that cannot be completed is handed on as one poison delivery
(empty body) that the reader skips and reports like any other.

Pure bookkeeping, no pika: `fedmq.shared.broker` glues it to deliveries.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedmq.shared.errors import ConfigError

#: the header of a part: "<part id>/<index>/<count>/<total bytes of the whole message>" (a string:
#: a stream drops array headers on its way through, measured on 3.10)
PART_HEADER = "x-fedmq-part"
#: environment variable to lower the part size for a broker configured below 128 MiB
PART_BYTES_ENV = "FEDMQ_PART_BYTES"
MB = 2**20
#: a body over this many bytes goes in parts: half the broker's default limit, so a part with its
#: headers and framing is always far from it
DEFAULT_PART_BYTES = 64 * MB
MIN_PART_BYTES = 4096
MAX_PART_BYTES = 127 * MB
#: the largest message a receiver assembles (it holds it whole in memory)
MAX_MESSAGE_BYTES = 2**30
#: incomplete messages one consumer holds at once, their bytes, and how long one may wait for
#: its next part before it is given up (parts are published back to back, each confirmed)
MAX_PENDING = 8
MAX_PENDING_BYTES = 2 * MAX_MESSAGE_BYTES
PART_TIMEOUT = 120.0

def part_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The part size: `PART_BYTES_ENV` when set (a broker with a lower max_message_size), else 64 MiB."""
    raw = (os.environ if environ is None else environ).get(PART_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_PART_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PART_BYTES_ENV}={raw!r} is not a whole number of bytes") from None
    if not MIN_PART_BYTES <= value <= MAX_PART_BYTES:
        raise ConfigError(f"{PART_BYTES_ENV}={value} is outside [{MIN_PART_BYTES}, {MAX_PART_BYTES}]: "
                          "keep it under the broker's max_message_size")
    return value


def parts_for(nbytes: int, part_bytes: int) -> int:
    """How many broker messages a body of `nbytes` takes (a consumer's prefetch must hold them)."""
    return 1 if nbytes <= part_bytes else math.ceil(nbytes / part_bytes)


def split(body: bytes, part_bytes: int) -> list[tuple[str, bytes]]:
    """(part header, part body) for each part of `body`; one part, header-less, when it fits."""
    if len(body) <= part_bytes:
        return [("", body)]
    if len(body) > MAX_MESSAGE_BYTES:
        raise ConfigError(f"a message of {len(body)} bytes is over the {MAX_MESSAGE_BYTES} a receiver "
                          "assembles: make the model smaller or compress its updates")
    pid = uuid.uuid4().hex
    count = parts_for(len(body), part_bytes)
    view = memoryview(body)
    return [(f"{pid}/{i}/{count}/{len(body)}", bytes(view[i * part_bytes:(i + 1) * part_bytes]))
            for i in range(count)]


@dataclass(frozen=True)
class PartHeader:
    pid: str
    index: int
    count: int
    total: int


_HEADER_RE = re.compile(r"([0-9a-f]{32})/(0|[1-9][0-9]{0,9})/([1-9][0-9]{0,9})/([1-9][0-9]{0,9})")


def parse_header(value: object) -> PartHeader | str:
    """The part header, or why it is not one (never an exception: the sender chose every byte)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or len(value) > 80:
        return "part header is not a short string"
    match = _HEADER_RE.fullmatch(value)
    if match is None:
        return "part header is not <32 hex digits>/<index>/<count>/<size>"
    pid, index, count, total = match[1], int(match[2]), int(match[3]), int(match[4])
    if not 0 < total <= MAX_MESSAGE_BYTES:
        return f"message size {total} is outside (0, {MAX_MESSAGE_BYTES}]"
    if not 2 <= count <= math.ceil(total / MIN_PART_BYTES):
        return f"part count {count} is impossible for {total} bytes"
    if not 0 <= index < count:
        return f"part index {index} is outside [0, {count})"
    return PartHeader(pid, index, count, total)


P = TypeVar("P")


@dataclass
class Outcome(Generic[P]):
    """A message done with: complete (`error` is None: `parts` in order) or given up on."""

    parts: list[P]
    error: str | None = None
    #: its first part was seen: a stream reader that attached after it starts with a fragment of
    #: a message, which is no one's fault and is dropped quietly
    started: bool = True


@dataclass
class _Pending(Generic[P]):
    header: PartHeader
    since: float
    parts: dict[int, tuple[P, int]] = field(default_factory=dict)
    received: int = 0
    last: float = 0.0

    def outcome(self, error: str | None = None) -> Outcome[P]:
        ordered = [p for _, (p, _) in sorted(self.parts.items())]
        return Outcome(ordered, error, 0 in self.parts)


class Assembler(Generic[P]):
    """The incomplete messages of one consumer, keyed by (sender, routing key, part id).

    `add` takes each part as it arrives and returns what is done: the complete message, a message
    that can no longer complete (a contradicting part), and whatever had to be evicted to keep
    within `MAX_PENDING` / `MAX_PENDING_BYTES`; `expire` gives up on those idle for `PART_TIMEOUT`.
    On a queue, given-up parts must still be settled (rejected), or they hold the prefetch window.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 timeout: float | None = None) -> None:
        self._pending: dict[tuple[object, object, str], _Pending[P]] = {}
        self._bytes = 0
        self._clock = clock
        self._timeout = PART_TIMEOUT if timeout is None else timeout

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def add(self, sender: object, routing_key: object, header: PartHeader, part: P,
            size: int) -> list[Outcome[P]]:
        now = self._clock()
        key = (sender, routing_key, header.pid)
        pending = self._pending.get(key)
        out: list[Outcome[P]] = []
        if pending is None:
            out.extend(self._make_room(size))
            pending = self._pending[key] = _Pending(header, now)
        error = self._contradiction(pending, header, size)
        duplicate = header.index in pending.parts
        if not duplicate:  # kept even when it contradicts: it is given up with the rest
            pending.parts[header.index] = (part, size)
            pending.received += size
            self._bytes += size
        pending.last = now
        if error is not None:
            if duplicate:
                out.append(Outcome([part], error))
            out.append(self._drop(key, error))
        elif len(pending.parts) == header.count:
            if pending.received != header.total:
                out.append(self._drop(key, f"parts add up to {pending.received} bytes, "
                                           f"not the {header.total} announced"))
            else:
                out.append(self._drop(key, None))
        return out

    def expire(self) -> list[Outcome[P]]:
        """Give up on messages whose next part has not come for the timeout."""
        cutoff = self._clock() - self._timeout
        stale = [k for k, p in self._pending.items() if p.last <= cutoff]
        return [self._drop(k, f"incomplete after {self._timeout:g} s without a part") for k in stale]

    def incomplete(self) -> list[Outcome[P]]:
        """What is still waiting for parts, kept (a stream reader that stops reading asks)."""
        return [p.outcome("incomplete") for p in self._pending.values()]

    def clear(self) -> None:
        """Forget everything (the channel closed: the broker requeued or forgot what it sent)."""
        self._pending.clear()
        self._bytes = 0

    @staticmethod
    def _contradiction(pending: _Pending[P], header: PartHeader, size: int) -> str | None:
        first = pending.header
        if (header.count, header.total) != (first.count, first.total):
            return "parts of one message disagree on its count or size"
        if header.index in pending.parts:
            return f"part {header.index} came twice"
        if pending.received + size > first.total:
            return f"parts exceed the {first.total} bytes announced"
        return None

    def _make_room(self, size: int) -> list[Outcome[P]]:
        out = []
        while self._pending and (len(self._pending) >= MAX_PENDING or self._bytes + size > MAX_PENDING_BYTES):
            oldest = min(self._pending, key=lambda k: self._pending[k].since)
            out.append(self._drop(oldest, "evicted: too many incomplete messages at once"))
        return out

    def _drop(self, key: tuple[object, object, str], error: str | None) -> Outcome[P]:
        pending = self._pending.pop(key)
        self._bytes -= pending.received
        return pending.outcome(error)
