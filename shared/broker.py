"""The only module that imports pika: connection, topology, confirms, reconnect, consume loop.

Facts this module is built on (each measured on RabbitMQ 3.10):

* every publish goes out with ``mandatory=True`` on a confirm channel, so a message is either
  routed to its queue(s) and persisted, or the publisher gets an exception and retries;
* stream readers get their own connection: closing a stream consumer can close its connection;
* quorum queues need an *int* ``x-delivery-limit`` and at-least-once dead-lettering needs
  ``x-overflow: reject-publish``; the DLX and its queues are declared before the queues using them;
* a connection is only serviced while `process` runs: long work runs in another thread and the
  owner keeps calling `process` (heartbeats), see `Connection.wait_for`;
* a broker "URL" may list the nodes of a RabbitMQ cluster, comma-separated: `Connection.open`
  tries them in turn, the node that answered last first, so every reconnect fails over;
* quorum queues and streams are declared with an initial replica count (`TopologyConfig.replicas`),
  which RabbitMQ caps at the cluster's node count (measured on 3.10: 5 on 3 nodes gives 3).

pika errors never leave this module: they become `ConnectionLostError` (transient: reconnect),
`BrokerAccessError` (credentials / permissions: never retried), `BrokerUnavailableError` or
`JobNotFoundError`.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from fedmq.shared.errors import (
    BrokerAccessError,
    BrokerUnavailableError,
    ConfigError,
    FedmqError,
    JobNotFoundError,
)
from fedmq.shared.messages import ID_RE, EventKind, ModelVersion
from fedmq.shared.parts import PART_HEADER, Assembler, Outcome, parse_header, part_bytes_from_env, split

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: headers fedmq sets on dead letters
REASON_HEADER = "x-fedmq-reason"
DETAIL_HEADER = "x-fedmq-detail"
UPDATE_ID_HEADER = "x-fedmq-update-id"


def header_update_id(headers: dict[str, Any]) -> str | None:
    """The sender's update-id header, only if it is a well-formed id: it is copied into dead-letter
    headers and logs, and a 200 KB value once pushed every frame past the broker's limit."""
    value = headers.get(UPDATE_ID_HEADER)
    return value if isinstance(value, str) and ID_RE.match(value) else None

T = TypeVar("T")


class ConnectionLostError(BrokerUnavailableError):
    """The connection dropped (broker restart, network, missed heartbeats): reconnect and resume."""


class PublishRefusedError(ConnectionLostError):
    """The broker refused a publish (basic.nack): above all a queue at its length limit, e.g. a
    site's own updates queue full. The connection is fine: wait and publish again on it (treated
    as a lost connection by callers that do not catch it, as before)."""


def broker_urls(text: str) -> list[str]:
    """The node URLs of a broker address: one AMQP URL, or several separated by commas (the nodes
    of one cluster). A comma inside a password must be written %2C. ConfigError when empty."""
    urls = [part.strip() for part in text.split(",")]
    if not any(urls):
        raise ConfigError("broker URL is empty (give amqp://user:password@host:5672/vhost)")
    if not all(urls):
        raise ConfigError(f"broker URL list {mask_url(text)} has an empty entry (separate URLs by one comma)")
    return urls


def mask_url(url: str) -> str:
    """The URL (or comma-separated URL list) with every password replaced by ***, for errors and logs.

    Never raises: the message saying that a URL is malformed (an unbalanced IPv6 bracket, a bad
    port) is built with it, so when urlsplit refuses the URL the password is cut out by hand. A
    text is masked as a list only when every part looks like a URL: an unescaped comma inside a
    password then masks the whole password, not half of it.
    """
    parts = url.split(",")
    if len(parts) > 1 and all("://" in p or not p.strip() for p in parts):  # empty entries too
        return ",".join(_mask_one(p) for p in parts)
    return _mask_one(url)


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        scheme, sep, rest = url.partition("://")
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        userinfo, at, host = rest[:end].rpartition("@")
        user, colon, _password = userinfo.partition(":")
        return f"{scheme}://{user}:***@{host}{rest[end:]}" if sep and at and colon else url
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def validate_job_id(job: str) -> str:
    if not JOB_ID_RE.match(job):
        raise ConfigError(f"job id {job!r} must be 1-64 letters, digits, '-' or '_'")
    return job


def validate_site(site: str) -> str:
    if not SITE_RE.match(site):
        raise ConfigError(f"site name {site!r} must be 1-64 letters, digits, '-' or '_'")
    return site


#: 404 texts that mean "exists, but not running yet" (measured right after a node restart)
_TRANSIENT_404 = re.compile(r"is down or inaccessible|process is stopped")


@contextmanager
def amqp_errors(url: str) -> Iterator[None]:
    """Translate pika's exceptions into fedmq's, so callers never import pika."""
    try:
        yield
    except pex.ProbableAuthenticationError as exc:
        if "ACCESS_REFUSED" not in str(exc):
            # the socket closed during the handshake without a refusal: a broker going down or
            # restarting (seen mid-chaos), not bad credentials, which RabbitMQ answers with 403
            raise ConnectionLostError(f"lost the broker at {mask_url(url)} during the handshake: {exc!r}") from exc
        raise BrokerAccessError(f"broker {mask_url(url)} refused the credentials: {exc}") from exc
    except pex.AuthenticationError as exc:
        raise BrokerAccessError(f"broker {mask_url(url)} refused the credentials: {exc}") from exc
    except pex.ProbableAccessDeniedError as exc:
        raise BrokerAccessError(f"broker {mask_url(url)} refused access to the vhost: {exc}") from exc
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404 and _TRANSIENT_404.search(str(exc.reply_text)):
            # a durable queue or stream whose process is not back yet after a broker restart
            raise ConnectionLostError(f"queue not available yet on {mask_url(url)}: {exc.reply_text}") from exc
        if exc.reply_code == 404:
            raise JobNotFoundError(f"not found on {mask_url(url)}: {exc.reply_text}") from exc
        if exc.reply_code == 403:
            raise BrokerAccessError(f"access refused on {mask_url(url)}: {exc.reply_text}") from exc
        if exc.reply_code == 406 and "inequivalent arg" in str(exc.reply_text):
            raise ConfigError(
                f"job topology exists with other settings ({exc.reply_text}); use a new job id "
                "or the settings the job was created with"
            ) from exc
        raise BrokerUnavailableError(f"channel closed by broker: {exc.reply_code} {exc.reply_text}") from exc
    except pex.UnroutableError as exc:
        raise JobNotFoundError(
            f"message unroutable on {mask_url(url)}: the job's queues are gone (job finished or deleted)"
        ) from exc
    except pex.NackError as exc:
        raise PublishRefusedError(f"broker {mask_url(url)} refused the publish (a queue is at its length "
                                  "limit, or has no quorum): try again later") from exc
    except (pex.AMQPConnectionError, pex.ConnectionWrongStateError, pex.ChannelWrongStateError,
            pex.ChannelClosed, ConnectionError, OSError) as exc:
        raise ConnectionLostError(f"lost the broker at {mask_url(url)}: {exc!r}") from exc


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Retention:
    """Stream retention; None = keep forever (the audit default)."""

    max_age: str | None = None  # e.g. "7D", "12h"
    max_bytes: int | None = None

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "stream"}
        if self.max_age:
            if not re.match(r"^\d+[YMDhms]$", self.max_age):
                raise ConfigError(f"retention max_age {self.max_age!r} must look like 7D, 12h, 30m")
            args["x-max-age"] = self.max_age
        if self.max_bytes:
            args["x-max-length-bytes"] = int(self.max_bytes)
            # segments are what retention drops; keep them small enough to matter
            args["x-stream-max-segment-size-bytes"] = int(min(self.max_bytes // 4 or 1, 500_000_000))
        return args


@dataclass(frozen=True)
class JobNames:
    """Every broker name of one job, prefixed so many jobs share one broker."""

    job: str

    def _n(self, suffix: str) -> str:
        return f"fedmq.{self.job}.{suffix}"

    def _x(self, suffix: str) -> str:
        """Exchanges never share a queue's name: a permission regex for one must not match the
        other (write on a queue name would also grant binding anything into that queue)."""
        return f"fedmq.{self.job}.{suffix}.x"

    @property
    def tasks_exchange(self) -> str:
        return self._x("tasks")

    @property
    def tasks(self) -> str:
        return self._n("tasks")

    @property
    def tasks_log(self) -> str:
        """Every task ever issued: the coordinator's journal, written by the same publish as the task."""
        return self._n("tasks.log")

    @property
    def updates_exchange(self) -> str:
        return self._x("updates")

    @property
    def updates(self) -> str:
        return self._n("updates")

    @property
    def updates_log(self) -> str:
        return self._n("updates.log")

    def site_updates(self, site: str) -> str:
        """One site's own updates queue: its length limit is that site's share (`declare_job`)."""
        return self._n(f"site.{site}.updates")

    @property
    def sites_exchange(self) -> str:
        """Internal: routes each listed site's updates to its own queue (no site may write it)."""
        return self._x("updates.sites")

    @property
    def unlisted_exchange(self) -> str:
        """Internal: the sites exchange's alternate exchange, into the shared `updates` queue."""
        return self._x("updates.unlisted")

    @property
    def aggregator_lock(self) -> str:
        """Holds one token; the replica it is delivered to is the active aggregator (`declare_job`)."""
        return self._n("aggregator.lock")

    def update_queues(self, sites: Iterable[str] = ()) -> list[str]:
        """Every queue an active aggregator consumes: the shared one, then one per listed site."""
        return [self.updates, *(self.site_updates(s) for s in sites)]

    @property
    def models_exchange(self) -> str:
        return self._x("models")

    @property
    def models(self) -> str:
        return self._n("models")

    @property
    def events_exchange(self) -> str:
        return self._x("events")

    @property
    def events(self) -> str:
        return self._n("events")

    @property
    def dead_exchange(self) -> str:
        return self._x("dead")

    @property
    def dead(self) -> str:
        return self._n("dead")

    @property
    def dead_log(self) -> str:
        return self._n("dead.log")

    @property
    def aggregates_exchange(self) -> str:
        return self._x("aggregates")

    @property
    def aggregates(self) -> str:
        """Homomorphic jobs: encrypted sums from the aggregator to the key holder."""
        return self._n("aggregates")

    @property
    def aggregates_log(self) -> str:
        return self._n("aggregates.log")

    def queues(self, sites: Iterable[str] = ()) -> list[str]:
        """The job's queues and streams; per-site queues only for the `sites` given (the registry)."""
        return [self.tasks, self.tasks_log, *self.update_queues(sites), self.updates_log, self.models,
                self.events, self.dead, self.dead_log, self.aggregates, self.aggregates_log,
                self.aggregator_lock]

    def exchanges(self) -> list[str]:
        return [self.tasks_exchange, self.updates_exchange, self.sites_exchange, self.unlisted_exchange,
                self.models_exchange, self.events_exchange, self.dead_exchange, self.aggregates_exchange]


#: the only events a site publishes, under the routing key ``site.<its name>.<event>``
SITE_EVENTS = frozenset({EventKind.UPDATE_PUBLISHED.value, EventKind.TASK_REFUSED.value,
                         EventKind.TASK_FAILED.value})


@dataclass(frozen=True)
class SitePermissions:
    """The least a site's broker user needs for one job (docs/security.md lists every operation).

    configure: nothing (the coordinator declares all topology). write: the updates and events
    exchanges, nothing else (no queue: writing a queue's name would allow binding into it). read:
    the tasks queue (consume; the broker also lets read purge it) and the models stream. Topic
    permissions pin the routing keys to the site's own name."""

    vhost: str
    user: str
    configure: str
    write: str
    read: str
    topics: tuple[tuple[str, str], ...]  # (exchange, write regex); read is always '^$'

    def commands(self) -> list[list[str]]:
        """The `rabbitmqctl` argument lists that grant exactly this."""
        cmds = [["set_permissions", "-p", self.vhost, self.user, self.configure, self.write, self.read]]
        cmds += [["set_topic_permissions", "-p", self.vhost, self.user, x, w, "^$"] for x, w in self.topics]
        return cmds


def site_permissions(job: str, site: str, vhost: str = "/") -> SitePermissions:
    names = JobNames(validate_job_id(job))
    validate_site(site)  # both are [A-Za-z0-9_-]: nothing in them needs escaping in a regex
    events = "|".join(sorted(SITE_EVENTS))
    return SitePermissions(
        vhost=vhost, user=site, configure="^$",
        write=rf"^fedmq\.{job}\.(updates|events)\.x$", read=rf"^fedmq\.{job}\.(tasks|models)$",
        topics=((names.updates_exchange, f"^{site}$"),
                (names.events_exchange, rf"^site\.{site}\.({events})$")),
    )


#: replicas of each quorum queue and stream unless the job says otherwise: survives one node lost
DEFAULT_REPLICAS = 3
#: an honest site has at most its outstanding tasks' updates waiting; the limit leaves ample room
DEFAULT_SITE_QUEUE_LIMIT = 64
#: the body of the aggregator lock's one token (the body means nothing, holding it does)
LOCK_TOKEN = b"fedmq-aggregator-lock"


@dataclass(frozen=True)
class TopologyConfig:
    task_delivery_limit: int = 20
    update_delivery_limit: int = 5
    retention: Retention = field(default_factory=Retention)
    #: initial members of every quorum queue and stream; RabbitMQ caps it at the cluster's node
    #: count (a single node: 1). 0 = send no argument: RabbitMQ's own default, every node. Part
    #: of the declare: a job re-declared with another value fails with 406 (ConfigError)
    replicas: int = DEFAULT_REPLICAS
    #: the job's listed sites (its signing registry): each gets its own updates queue
    sites: tuple[str, ...] = ()
    #: updates one listed site may have waiting (`x-max-length`); past it the broker refuses that
    #: site's publishes, so a flood fills only the flooder's own queue
    site_queue_limit: int = DEFAULT_SITE_QUEUE_LIMIT

    def quorum_size(self) -> dict[str, Any]:
        return {"x-quorum-initial-group-size": int(self.replicas)} if self.replicas else {}

    def stream_args(self) -> dict[str, Any]:
        size = {"x-initial-cluster-size": int(self.replicas)} if self.replicas else {}
        return {**self.retention.arguments(), **size}


def _quorum_args(names: JobNames, delivery_limit: int, cfg: TopologyConfig, **extra: Any) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": int(delivery_limit),
        "x-dead-letter-exchange": names.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        **cfg.quorum_size(),
        **extra,
    }


def declare_job(ch: BlockingChannel, names: JobNames, cfg: TopologyConfig) -> None:
    """Declare the whole per-job topology. Only the job's owner (coordinator) calls this.

    Dead-letter targets come first: a quorum queue whose DLX does not exist yet keeps its dead
    letters invisibly and retries only every 180 s.
    """
    stream_args = cfg.stream_args()
    ch.exchange_declare(names.dead_exchange, "fanout", durable=True)
    ch.queue_declare(names.dead, durable=True, arguments={"x-queue-type": "quorum", **cfg.quorum_size()})
    ch.queue_declare(names.dead_log, durable=True, arguments=stream_args)
    ch.queue_bind(names.dead, names.dead_exchange)
    ch.queue_bind(names.dead_log, names.dead_exchange)

    ch.exchange_declare(names.models_exchange, "fanout", durable=True)
    ch.queue_declare(names.models, durable=True, arguments=stream_args)
    ch.queue_bind(names.models, names.models_exchange)

    ch.exchange_declare(names.events_exchange, "topic", durable=True)
    ch.queue_declare(names.events, durable=True, arguments=stream_args)
    ch.queue_bind(names.events, names.events_exchange, routing_key="#")

    _declare_updates(ch, names, cfg)

    ch.exchange_declare(names.tasks_exchange, "direct", durable=True)
    ch.queue_declare(names.tasks, durable=True, arguments=_quorum_args(names, cfg.task_delivery_limit, cfg))
    ch.queue_bind(names.tasks, names.tasks_exchange, routing_key="task")
    # one publish reaches the queue and the journal: a coordinator that dies right after publishing
    # finds the task in the log on restart and does not issue that work a second time
    ch.queue_declare(names.tasks_log, durable=True, arguments=stream_args)
    ch.queue_bind(names.tasks_log, names.tasks_exchange, routing_key="task")


def _declare_updates(ch: BlockingChannel, names: JobNames, cfg: TopologyConfig) -> None:
    """Sites publish to the updates exchange under their own name (topic permissions pin it).

    Everything goes to the updates log. A listed site's updates go to its own queue, whose length
    limit is its share: a site flooding the job fills only that queue, then the broker refuses its
    publishes, while every other site's queue stays as short as its honest traffic. A name that is
    not listed (a job without a registry, or a sender the registry does not know) reaches the
    shared `updates` queue through the sites exchange's alternate exchange."""
    ch.exchange_declare(names.updates_exchange, "topic", durable=True)
    ch.queue_declare(names.updates_log, durable=True, arguments=cfg.stream_args())
    ch.queue_bind(names.updates_log, names.updates_exchange, routing_key="#")
    ch.exchange_declare(names.unlisted_exchange, "fanout", durable=True, internal=True)
    ch.exchange_declare(names.sites_exchange, "direct", durable=True, internal=True,
                        arguments={"alternate-exchange": names.unlisted_exchange})
    ch.queue_declare(names.updates, durable=True, arguments=_quorum_args(
        names, cfg.update_delivery_limit, cfg, **{"x-single-active-consumer": True}))
    ch.queue_bind(names.updates, names.unlisted_exchange)
    # a job created by an earlier release bound the shared queue straight to the updates exchange
    ch.queue_unbind(names.updates, names.updates_exchange, routing_key="#")
    for site in cfg.sites:
        queue = names.site_updates(validate_site(site))
        ch.queue_declare(queue, durable=True, arguments=_quorum_args(
            names, cfg.update_delivery_limit, cfg, **{"x-max-length": int(cfg.site_queue_limit)}))
        ch.queue_bind(queue, names.sites_exchange, routing_key=site)
    ch.exchange_bind(names.sites_exchange, names.updates_exchange, routing_key="#")
    # the aggregator lock (`Connection._ensure_lock_token` puts its one token in). Why not
    # single-active-consumer on the updates queues themselves: each queue picks its active
    # consumer on its own, so with one queue per site two replicas could each be active on some
    # of them. The replica holding the token consumes every updates queue; when its connection
    # ends, the broker hands the token to the next replica in line
    ch.queue_declare(names.aggregator_lock, durable=True, arguments={
        "x-queue-type": "quorum", "x-single-active-consumer": True, **cfg.quorum_size()})


def declare_encrypted(ch: BlockingChannel, names: JobNames, cfg: TopologyConfig) -> None:
    """Homomorphic jobs only, after `declare_job` (the DLX must exist): the aggregates queue the key
    holder consumes (quorum, single active consumer) and the aggregates log stream the aggregator
    reads its own last sums back from after a restart (its dedup state between versions)."""
    ch.exchange_declare(names.aggregates_exchange, "fanout", durable=True)
    ch.queue_declare(names.aggregates, durable=True, arguments=_quorum_args(
        names, cfg.update_delivery_limit, cfg, **{"x-single-active-consumer": True}))
    ch.queue_declare(names.aggregates_log, durable=True, arguments=cfg.stream_args())
    ch.queue_bind(names.aggregates, names.aggregates_exchange)
    ch.queue_bind(names.aggregates_log, names.aggregates_exchange)


# --------------------------------------------------------------------------- connection


@dataclass
class Delivery:
    """One message received from a queue or stream."""

    body: bytes
    headers: dict[str, Any]
    delivery_tag: int
    redelivered: bool
    routing_key: str
    user_id: str | None
    _channel: BlockingChannel
    _url: str
    #: a message published in parts (`Connection.publish`): every part's delivery, in part order;
    #: settling this delivery settles all of them. Empty for a message of one piece.
    _parts: tuple[Delivery, ...] = ()
    #: its parts were acked as they came (a stream's, whose acks only return credit)
    _settled: bool = False

    @property
    def stream_offset(self) -> int | None:
        """The broker's own header (it replaces one a publisher set; measured on 3.10). For a
        message in parts, its first part's offset: where a reader attaches to read it whole."""
        off = self.headers.get("x-stream-offset")
        # isinstance, not type(): pika hands AMQP longs over as pika.compat.long, an int subclass
        return int(off) if isinstance(off, int) and not isinstance(off, bool) else None

    @property
    def end_offset(self) -> int | None:
        """The offset of its last entry on the stream: the stream's tail is reached with it."""
        if not self._parts:
            return self.stream_offset
        offsets = [o for p in self._parts if (o := p.stream_offset) is not None]
        return max(offsets) if offsets else None

    @property
    def parts(self) -> int:
        """How many broker messages this one came in (1 unless it was published in parts)."""
        return max(1, len(self._parts))

    @property
    def delivery_tags(self) -> tuple[int, ...]:
        """Every delivery tag this message holds on its channel (one per part)."""
        return tuple(p.delivery_tag for p in self._parts) or (self.delivery_tag,)

    @property
    def delivery_count(self) -> int:
        """Redeliveries so far; a publisher may preset this header on a first delivery, so a value
        that is not a small int counts as 0 (it only ever feeds logs)."""
        count = self.headers.get("x-delivery-count", 0)
        ok = isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**31
        return int(count) if ok else 0

    @property
    def channel_key(self) -> object:
        """An opaque, hashable identity of the channel this came on: delivery tags are unique per
        channel only, so whoever reasons about tags (a multiple ack) groups them by this."""
        return self._channel

    def ack(self, multiple: bool = False) -> None:
        """Ack this message (every part of it); `multiple` also acks every lower tag of the channel."""
        if self._settled:
            return
        with amqp_errors(self._url):
            if multiple or not self._parts:  # a message in parts has its highest part's tag
                self._channel.basic_ack(self.delivery_tag, multiple=multiple)
            else:
                for tag in self.delivery_tags:
                    self._channel.basic_ack(tag)

    def reject(self) -> None:
        """Refuse a queue delivery for good: the queue dead-letters it (x-death reason "rejected"),
        each part of it, so that a dead-letter reader gets it whole again."""
        if self._settled:
            return
        with amqp_errors(self._url):
            for tag in self.delivery_tags:
                self._channel.basic_nack(tag, requeue=False)

    def requeue(self) -> None:
        """Give a queue delivery back (never a stream's: nack closes a stream consumer's connection).

        On a quorum queue this counts toward `x-delivery-limit`, so a message that fails every
        consumer ends in dead letters with reason ``delivery_limit`` instead of looping forever.
        """
        if self._settled:
            return
        with amqp_errors(self._url):
            for tag in self.delivery_tags:
                self._channel.basic_nack(tag, requeue=True)


@dataclass
class ChannelConsumer:
    """A consumer on a channel of its own (`Connection.open_consumer`)."""

    _channel: BlockingChannel

    def close(self) -> None:
        """Close the channel (idempotent): its unacked deliveries go back to the queue."""
        if self._channel.is_open:
            with suppress(Exception):
                self._channel.close()


#: seconds a publish waits for its confirm before the connection is given up (see _confirm_deadline)
CONFIRM_TIMEOUT = 30.0


class _ConfirmTimeout(Exception):
    """Raised from the I/O loop's timer to end a wait for a confirm that will not come."""


#: how often a consumer that has an `on_cancel` checks that its queue still exists
QUEUE_WATCH_SECONDS = 5.0


@dataclass
class _QueueWatch:
    """A consumed queue whose deletion must reach `on_cancel` exactly once."""

    queue: str
    on_cancel: Callable[[], None]
    next_check: float
    fired: bool = False

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            self.on_cancel()


def _sleep_backoff(attempt: int, base: float = 0.25, cap: float = 10.0) -> float:
    """Full-jitter exponential backoff, so many sites reconnecting do not stampede the broker."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    time.sleep(delay)
    return delay


def _node_parameters(url: str, *, name: str, heartbeat: int, connect_timeout: float) -> pika.URLParameters:
    """pika's parameters for one node URL; ConfigError (exit 2) for anything malformed."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # "Invalid IPv6 URL", a bracketed host that is no IP address
        raise ConfigError(f"broker URL {mask_url(url)} is not valid: {exc}") from exc
    if scheme not in ("amqp", "amqps"):
        raise ConfigError(f"broker URL {mask_url(url)} must start with amqp:// or amqps://")
    try:
        params = pika.URLParameters(url)
    except Exception as exc:  # pika raises ValueError/AttributeError/... on bad URLs
        raise ConfigError(f"broker URL {mask_url(url)} is not valid: {exc}") from exc
    try:  # pika validates these setters with ValueError/TypeError
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = 60
        params.socket_timeout = connect_timeout
        params.connection_attempts = 1
        params.client_properties = {"connection_name": name}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"connection settings for {mask_url(url)}: {exc}") from exc
    return params


#: basic.qos takes a 16-bit count
MAX_PREFETCH = 65535


def _part_index(d: Delivery) -> int:
    header = parse_header(d.headers.get(PART_HEADER))
    return 0 if isinstance(header, str) else header.index


class _Reassembly:
    """Between pika's callback and a consumer's: parts in, whole messages out (`fedmq.shared.parts`).

    A message that cannot complete reaches the consumer as one delivery with an empty body, which
    its decoder refuses like any poison entry: a queue consumer's reject then dead-letters every
    part, a stream reader counts it. On a stream each part is acked (credit returned) as it comes,
    so a message of more parts than the reader's prefetch still arrives; a fragment of a message
    that began before the reader attached is dropped quietly."""

    def __init__(self, on_message: Callable[[Delivery], None], *, stream: bool) -> None:
        self.on_message = on_message
        self.stream = stream
        self.assembler: Assembler[Delivery] = Assembler()
        #: the highest stream offset received, a fragment's too (where a stream's tail is)
        self.seen_offset: int | None = None

    def receive(self, d: Delivery) -> None:
        off = d.stream_offset
        if off is not None and (self.seen_offset is None or off > self.seen_offset):
            self.seen_offset = off
        raw = d.headers.get(PART_HEADER)
        if raw is None:
            self.on_message(d)
            return
        if self.stream:
            d.ack()
            d._settled = True
        header = parse_header(raw)
        outcomes = ([Outcome([d], header)] if isinstance(header, str)
                    else self.assembler.add(d.user_id, d.routing_key, header, d, len(d.body)))
        for outcome in outcomes:
            self._hand_on(outcome)

    def expire(self) -> None:
        for outcome in self.assembler.expire():
            self._hand_on(outcome)

    def _hand_on(self, outcome: Outcome[Delivery]) -> None:
        first, last = outcome.parts[0], outcome.parts[-1]
        if outcome.error is not None:
            if self.stream and not outcome.started:
                log.debug("fragment of a message begun before this reader dropped routing_key=%s parts=%d",
                          first.routing_key, len(outcome.parts))
                return
            log.warning("message in parts given up routing_key=%s user=%s parts=%d reason=%s",
                        first.routing_key, first.user_id, len(outcome.parts), outcome.error)
        body = b"".join(p.body for p in outcome.parts) if outcome.error is None else b""
        headers = {k: v for k, v in first.headers.items() if k != PART_HEADER}
        self.on_message(Delivery(
            body=body, headers=headers, delivery_tag=max(p.delivery_tag for p in outcome.parts),
            redelivered=any(p.redelivered for p in outcome.parts), routing_key=first.routing_key,
            user_id=first.user_id, _channel=last._channel, _url=last._url, _parts=tuple(outcome.parts),
            _settled=self.stream,
        ))


#: node list -> index of the node that answered last: a reconnect after losing a node goes
#: straight to a survivor instead of waiting on the dead one's connect timeout again
_LAST_GOOD: dict[str, int] = {}


class Connection:
    """One AMQP connection with a confirm channel for publishing and one for consuming.

    `url` may list several nodes of one cluster, comma-separated: `open` tries each once per
    attempt, the node that answered last first; `node_url` is the one connected to."""

    def __init__(self, url: str, *, name: str = "fedmq", heartbeat: int = 30,
                 connect_timeout: float = 5.0, part_bytes: int | None = None) -> None:
        self.url = url
        #: bodies over this go in parts (`fedmq.shared.parts`); FEDMQ_PART_BYTES when not given
        self.part_bytes = part_bytes if part_bytes is not None else part_bytes_from_env()
        self.name = name
        self.urls = broker_urls(url)
        self._params = [_node_parameters(u, name=name, heartbeat=heartbeat, connect_timeout=connect_timeout)
                        for u in self.urls]
        self.node_url = self.urls[0]
        self._conn: pika.BlockingConnection | None = None
        self._pub: BlockingChannel | None = None
        self._cons: BlockingChannel | None = None
        self._watches: list[_QueueWatch] = []
        self._reassemblies: list[_Reassembly] = []

    # -- lifecycle

    def open(self, *, retries: int = 0) -> Connection:
        """Connect; with retries > 0, retry transient failures with jittered backoff."""
        attempt = 0
        while True:
            try:
                self._connect_any()
                return self
            except ConnectionLostError as exc:
                if attempt >= retries:
                    raise BrokerUnavailableError(
                        f"cannot reach broker at {mask_url(self.url)}: {exc.__cause__!r}"
                    ) from exc
                _sleep_backoff(attempt)
                attempt += 1

    def _connect_any(self) -> None:
        """One pass over the node list; raises the last node's ConnectionLostError if none answers.

        Refused credentials or vhost access are raised at once: users and permissions are
        cluster-wide, so another node would refuse them too."""
        first = _LAST_GOOD.get(self.url, 0) % len(self.urls)
        order = [(first + k) % len(self.urls) for k in range(len(self.urls))]
        lost: ConnectionLostError | None = None
        for i in order:
            url = self.urls[i]
            try:
                with amqp_errors(url):
                    conn = pika.BlockingConnection(self._params[i])
                    try:
                        pub = conn.channel()
                        pub.confirm_delivery()
                    except BaseException:
                        with suppress(Exception):
                            conn.close()
                        raise
            except ConnectionLostError as exc:
                lost = exc
                if len(self.urls) > 1:
                    log.info("broker node not answering name=%s node=%s error=%r", self.name, mask_url(url),
                             exc.__cause__)
                continue
            self._conn, self._pub, self._cons, self.node_url = conn, pub, None, url
            if i != first:
                log.warning("failed over to another broker node name=%s node=%s", self.name, mask_url(url))
            _LAST_GOOD[self.url] = i
            log.debug("connected name=%s url=%s", self.name, mask_url(url))
            return
        assert lost is not None  # the list is never empty
        raise lost

    def close(self) -> None:
        self._watches, self._reassemblies = [], []
        conn, self._conn, self._pub, self._cons = self._conn, None, None, None
        if conn is not None and conn.is_open:
            with suppress(Exception):  # closing a stream consumer can fail server-side
                conn.close()

    def __enter__(self) -> Connection:
        return self if self._conn is not None else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.is_open

    @property
    def bytes_received(self) -> int:
        """Bytes read off the socket so far: grows while a large message is still arriving,
        before any delivery is dispatched (pika's connection counts every frame it parses)."""
        impl = getattr(self._conn, "_impl", None)
        return int(getattr(impl, "bytes_received", 0) or 0)

    def _require(self) -> pika.BlockingConnection:
        if self._conn is None or not self._conn.is_open:
            raise ConnectionLostError(f"connection {self.name} to {mask_url(self.url)} is not open")
        return self._conn

    def channel(self) -> BlockingChannel:
        with amqp_errors(self.url):
            return self._require().channel()

    @contextmanager
    def _scratch(self) -> Iterator[BlockingChannel]:
        """A channel for one management call, closed afterwards: a broker error (404, 406) closes
        only this channel, never the publish or consume channel."""
        ch = self.channel()
        try:
            with amqp_errors(self.url):
                yield ch
        finally:
            if ch.is_open:
                with suppress(Exception):
                    ch.close()

    @property
    def consumer_channel(self) -> BlockingChannel:
        if self._cons is None or not self._cons.is_open:
            with amqp_errors(self.url):
                self._cons = self._require().channel()
        return self._cons

    # -- topology

    def declare_job(self, names: JobNames, cfg: TopologyConfig) -> None:
        with self._scratch() as ch:
            declare_job(ch, names, cfg)
        self._ensure_lock_token(names)

    def _ensure_lock_token(self, names: JobNames) -> None:
        """Publish the aggregator lock's token unless it is there: waiting, or held by a consumer.

        Aggregators subscribe to the lock only once v0 exists, and the coordinator declares the
        job (and so puts the token in) before it publishes v0: an empty lock without consumers is
        a job whose coordinator died in between. A second token, put in while the holder's
        connection was just closing, is harmless: both go to the one active consumer."""
        ready, consumers = self.queue_stats(names.aggregator_lock)
        if not ready and not consumers:
            self.publish("", names.aggregator_lock, LOCK_TOKEN)

    def declare_encrypted(self, names: JobNames, cfg: TopologyConfig) -> None:
        with self._scratch() as ch:
            declare_encrypted(ch, names, cfg)

    def job_exists(self, names: JobNames) -> bool:
        """Passive check on the job's tasks queue.

        The tasks queue is declared after the updates queue and streams: a worker that sees it
        can consume it (checking `updates` let a worker start in between and die with a 404)."""
        try:
            self.queue_stats(names.tasks)
            return True
        except JobNotFoundError:
            return False

    def queue_stats(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) by passive declare; streams always answer (0, 0)."""
        with self._scratch() as ch:
            ok = ch.queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count

    def delete_job(self, names: JobNames, sites: Iterable[str] | None = None) -> None:
        """Remove every queue and exchange of a job that exists (tests, benchmarks, cleanup), the
        updates queue of each of the registry's `sites` too (None: read them from the models stream)."""
        if sites is None:
            sites = self._listed_sites(names)
        for q in names.queues(sites):
            with suppress(FedmqError):
                self.delete_queue(q)
        for x in names.exchanges():
            with suppress(FedmqError):
                self.delete_exchange(x)

    def _listed_sites(self, names: JobNames) -> list[str]:
        """The registry's sites from the newest version (every version carries v0's meta)."""
        try:
            last = read_last(self.url, names.models)
            sites = ModelVersion.decode(last.body).listed_sites if last is not None else []
        except (FedmqError, ValueError):  # no models stream, or an entry that is not a version
            return []
        return [s for s in sites if SITE_RE.match(s)]

    def delete_queue(self, queue: str) -> None:
        with self._scratch() as ch:
            ch.queue_delete(queue)

    def delete_exchange(self, exchange: str) -> None:
        """Delete an exchange (idempotent): publishes to it then fail with JobNotFoundError."""
        with self._scratch() as ch:
            ch.exchange_delete(exchange)

    def purge_queue(self, queue: str) -> None:
        with self._scratch() as ch:
            ch.queue_purge(queue)

    # -- publish

    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                headers: dict[str, Any] | None = None, message_id: str | None = None,
                user_id: str | None = None) -> None:
        """Publish persistently and wait for the broker's confirm (mandatory: unroutable raises).

        A body over `part_bytes` goes as parts, one confirmed publish each, every part with the
        same properties. A failure part-way raises like any failed publish; the parts already out
        never complete, and their consumers give them up (`fedmq.shared.parts`): a re-send is a
        new message with new parts, which receivers dedup by its id as always."""
        for part_header, part in split(body, self.part_bytes):
            part_headers = dict(headers or {}, **{PART_HEADER: part_header}) if part_header else headers
            props = pika.BasicProperties(
                delivery_mode=2, headers=part_headers or None, message_id=message_id, user_id=user_id,
                content_type="application/msgpack",
            )
            with amqp_errors(self.url):
                conn = self._require()
                if self._pub is None or not self._pub.is_open:
                    self._pub = conn.channel()
                    self._pub.confirm_delivery()
                pub = self._pub
            with self._confirm_deadline(conn):
                with amqp_errors(self.url):
                    pub.basic_publish(exchange, routing_key, part, props, mandatory=True)

    @contextmanager
    def _confirm_deadline(self, conn: pika.BlockingConnection) -> Iterator[None]:
        """Give up on a confirm after `CONFIRM_TIMEOUT` s: drop the connection, raise ConnectionLostError.

        Why: a worker's update published the moment the node leading the updates queue was
        SIGKILLed never got its confirm, and pika waits for one forever (measured on a 3.10
        cluster: the site hung, its task never acked). Callers already treat a lost connection
        as "re-send on a new one, receivers dedup by id". pika's own timers only fire inside
        `process_data_events`, so the deadline uses the I/O loop's timer, which also runs while
        `basic_publish` waits; the socket is then aborted, not closed politely.
        """
        impl: Any = getattr(conn, "_impl", None)
        if impl is None or not hasattr(impl, "_adapter_call_later"):
            yield  # another pika: no deadline rather than no publish
            return

        def _expire() -> None:
            raise _ConfirmTimeout

        timer = impl._adapter_call_later(CONFIRM_TIMEOUT, _expire)
        try:
            yield
        except _ConfirmTimeout:
            log.warning("no publisher confirm, dropping the connection name=%s node=%s waited=%.0f",
                        self.name, mask_url(self.node_url), CONFIRM_TIMEOUT)
            transport: Any = getattr(impl, "_transport", None)
            self._conn, self._pub, self._cons, self._watches, self._reassemblies = None, None, None, [], []
            with suppress(Exception):
                transport.abort()
            raise ConnectionLostError(f"no publisher confirm from {mask_url(self.node_url)} within "
                                      f"{CONFIRM_TIMEOUT:.0f} s (node lost mid-publish?): re-send it") from None
        finally:
            with suppress(Exception):
                impl._adapter_remove_timeout(timer)

    # -- consume

    def consume(self, queue: str, on_message: Callable[[Delivery], None], *, prefetch: int,
                arguments: dict[str, Any] | None = None,
                on_cancel: Callable[[], None] | None = None) -> str:
        """Start a manual-ack consumer; deliveries are dispatched while `process` runs."""
        return self._consume_on(self.consumer_channel, queue, on_message, prefetch=prefetch,
                                arguments=arguments, on_cancel=on_cancel)

    def open_consumer(self, queue: str, on_message: Callable[[Delivery], None], *, prefetch: int,
                      on_cancel: Callable[[], None] | None = None,
                      arguments: dict[str, Any] | None = None) -> ChannelConsumer:
        """A manual-ack consumer on a channel of its own, so its prefetch and acks are its own.

        Why: a fleet runs many sites over one connection (`fedmq.fleet`); each site must hold at
        most `prefetch` tasks and ack them itself, which per-channel QoS gives. Closing the returned
        consumer closes its channel: the broker requeues what it delivered and left unacked."""
        with amqp_errors(self.url):
            ch = self._require().channel()
        self._consume_on(ch, queue, on_message, prefetch=prefetch, on_cancel=on_cancel, arguments=arguments)
        return ChannelConsumer(ch)

    def _consume_on(self, ch: BlockingChannel, queue: str, on_message: Callable[[Delivery], None], *,
                    prefetch: int, arguments: dict[str, Any] | None = None,
                    on_cancel: Callable[[], None] | None = None) -> str:
        url = self.url
        parts = _Reassembly(on_message, stream=bool(arguments and "x-stream-offset" in arguments))
        self._reassemblies.append(parts)

        def _cb(channel: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
            parts.receive(Delivery(
                body=body, headers=dict(props.headers or {}), delivery_tag=method.delivery_tag,
                redelivered=method.redelivered, routing_key=method.routing_key,
                user_id=props.user_id, _channel=channel, _url=url,
            ))

        with amqp_errors(url):
            ch.basic_qos(prefetch_count=min(prefetch, MAX_PREFETCH))
            if on_cancel is not None:
                watch = _QueueWatch(queue, on_cancel, time.monotonic() + QUEUE_WATCH_SECONDS)
                ch.add_on_cancel_callback(lambda _frame: watch.fire())
                self._watches.append(watch)
            return ch.basic_consume(queue, _cb, auto_ack=False, arguments=arguments)

    def _check_watches(self) -> None:
        """Every QUEUE_WATCH_SECONDS, a passive declare of each queue consumed with `on_cancel`.

        Why: on a cluster that lost the node leading a quorum queue, deleting the queue later
        cancelled none of its consumers on the surviving nodes (measured on 3.10: workers and
        standby aggregators waited forever after their job ended). A missing queue fires the
        same callback the broker's basic.cancel would have, once."""
        now = time.monotonic()
        for watch in [w for w in self._watches if now >= w.next_check and not w.fired]:
            watch.next_check = now + QUEUE_WATCH_SECONDS
            try:
                self.queue_stats(watch.queue)
            except JobNotFoundError:
                log.warning("consumed queue is gone without a cancel from the broker queue=%s name=%s",
                            watch.queue, self.name)
                watch.fire()

    def process(self, time_limit: float = 0.0) -> None:
        """Service the connection (heartbeats, deliveries, confirms) for up to `time_limit` s."""
        with amqp_errors(self.url):
            self._require().process_data_events(time_limit=time_limit)
        if self._watches:
            self._check_watches()
        for parts in self._reassemblies:
            if parts.assembler:
                parts.expire()

    def sleep(self, seconds: float) -> None:
        """Like time.sleep, but keeps the connection alive."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.process(min(left, 0.5))

    def wait_for(self, future: Future[T], poll: float = 0.5) -> T:
        """Keep the connection serviced while work runs on another thread, then return its result.

        This is how a worker trains for minutes without its heartbeat timing out. The future's
        completion wakes the I/O loop, so the result is taken at once: a site waits four times per
        task (plan, evaluate, train, seal), and polling alone cost up to `poll` s at each (measured:
        0.41 s median per task with a 0.2 s poll, about the fast sites' whole compute).
        """
        conn = self._conn
        if conn is not None:
            def _wake(_f: Future[T]) -> None:
                with suppress(Exception):  # the connection closed meanwhile: nothing to wake
                    conn.add_callback_threadsafe(lambda: None)

            future.add_done_callback(_wake)
        while not future.done():
            self.process(poll)
        return future.result()


# --------------------------------------------------------------------------- streams


#: how long `StreamReader.read` waits for the next part of a message it has begun to receive
PART_IDLE = 10.0


class StreamReader:
    """Reads one stream over its own connection (closing a stream consumer may close it), or on a
    channel of a `StreamGroup`'s connection, which only ever carries stream consumers."""

    def __init__(self, url: str, stream: str, *, name: str = "fedmq-stream", prefetch: int = 64,
                 group: Connection | None = None) -> None:
        self.url = url
        self.stream = stream
        self.prefetch = prefetch
        self._shared = group is not None
        self._conn = group if group is not None else Connection(url, name=name)
        self._buffer: list[Delivery] = []
        self._started = False
        self.last_offset: int | None = None

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._shared:  # a group's readers go with the group's connection
            self._conn.close()
        self._started = False

    def start(self, offset: int | str = "first") -> None:
        """Attach at `offset`: "first", "last" (start of the last chunk), "next" or an int."""
        if not self._conn.is_open:
            self._conn.open()
        self._buffer = []
        if self._shared:
            self._conn.open_consumer(self.stream, self._buffer.append, prefetch=self.prefetch,
                                     arguments={"x-stream-offset": offset})
        else:
            self._conn.consume(self.stream, self._buffer.append, prefetch=self.prefetch,
                               arguments={"x-stream-offset": offset})
        self._started = True

    def _reassembly(self) -> _Reassembly | None:
        for parts in self._conn._reassemblies:
            if getattr(parts.on_message, "__self__", None) is self._buffer:
                return parts
        return None

    @property
    def seen_offset(self) -> int | None:
        """The highest offset received since `start`, counting parts of messages not complete yet."""
        parts = self._reassembly()
        return parts.seen_offset if parts is not None else None

    def _receiving_parts(self) -> bool:
        """A message whose first part came is still incomplete: its publisher is between parts
        (each is confirmed before the next), so the stream is not quiet yet."""
        parts = self._reassembly()
        return parts is not None and any(o.started for o in parts.assembler.incomplete())

    def fragment_starts(self) -> list[int]:
        """For each message in parts this reader has only the tail of, the offset its first part
        is at (stream of one writer) or before: where to attach to read it whole."""
        parts = self._reassembly()
        found = []
        for outcome in parts.assembler.incomplete() if parts is not None else []:
            offsets = [(p.stream_offset or 0) - _part_index(p) for p in outcome.parts]
            if not outcome.started and offsets:
                found.append(max(0, min(offsets)))
        return found

    def poll(self, timeout: float = 0.0) -> list[Delivery]:
        """Deliveries that arrived within `timeout` seconds (credit is returned at once)."""
        if not self._started:
            raise RuntimeError("StreamReader.poll before start")
        self._conn.process(timeout)
        return self.take()

    def take(self) -> list[Delivery]:
        """The deliveries received so far, without waiting (credit is returned at once)."""
        got, self._buffer[:] = list(self._buffer), []
        if got:
            unsettled = [d for d in got if not d._settled]
            if unsettled:
                unsettled[-1].ack(multiple=True)
            self.last_offset = got[-1].stream_offset
        return got

    def read(self, offset: int | str = "first", *, idle: float = 0.3,
             max_seconds: float = 60.0, first_wait: float | None = None) -> Iterator[Delivery]:
        """Everything from `offset` until the stream has been quiet for `idle` seconds
        (`first_wait` before anything arrived, when the caller knows an entry is there)."""
        self.start(offset)
        deadline = time.monotonic() + max_seconds
        quiet_since = time.monotonic()
        arrived = self._conn.bytes_received
        if first_wait is not None:
            while time.monotonic() < min(deadline, quiet_since + first_wait):
                if self._conn.bytes_received != arrived or self._buffer:
                    break
                self._conn.process(0.05)
        while time.monotonic() < deadline:
            got = self.poll(0.05)
            # quiet = no delivery and no bytes: a 40 MB version takes longer than `idle` to arrive
            # whole, and ending the read meanwhile found no version at all (measured, 10.7M params)
            if got or self._conn.bytes_received != arrived:
                arrived = self._conn.bytes_received
                quiet_since = time.monotonic()
                yield from got
            elif time.monotonic() - quiet_since >= (PART_IDLE if self._receiving_parts() else idle):
                return


class StreamGroup:
    """Several streams followed over one connection, one channel each: one `poll` waits for the
    first delivery on any of them.

    Why: a coordinator follows the models, events and dead-letter streams; polled one after the
    other, each with its own wait, an event (a site's update, which frees a task slot) was seen up
    to the other waits late (measured: 22 ms median between a site's update and its next task).
    The connection carries nothing but these consumers, since closing a stream consumer can
    close its connection (RabbitMQ 3.x over AMQP 0.9.1)."""

    def __init__(self, url: str, streams: dict[str, str], *, name: str = "fedmq-streams") -> None:
        self._conn = Connection(url, name=name)
        self.readers = {key: StreamReader(url, stream, group=self._conn) for key, stream in streams.items()}

    def __getitem__(self, key: str) -> StreamReader:
        return self.readers[key]

    def start(self, offsets: dict[str, int | str]) -> None:
        """Attach every reader, at `offsets[stream name]` or else the first entry."""
        for reader in self.readers.values():
            reader.start(offsets.get(reader.stream, "first"))

    def poll(self, timeout: float = 0.0) -> dict[str, list[Delivery]]:
        """Each stream's deliveries, waiting up to `timeout` s for the first on any of them."""
        self._conn.process(timeout)
        return {key: reader.take() for key, reader in self.readers.items()}

    def close(self) -> None:
        self._conn.close()
        for reader in self.readers.values():
            reader.close()


def read_stream(url: str, stream: str, offset: int | str = "first", *, idle: float = 0.3) -> list[Delivery]:
    """All entries from `offset` to the (current) end of `stream`."""
    with StreamReader(url, stream) as reader:
        return list(reader.read(offset, idle=idle))


#: how often `read_tail` steps further back for the start of a message in parts
READ_LAST_STEPS = 6
#: how long `read_tail` waits for the last chunk's first bytes (an empty stream costs this)
LAST_FIRST_WAIT = 1.0


def read_tail(url: str, stream: str, *, idle: float = 0.15) -> list[Delivery]:
    """The entries of a stream's last chunk ("last"), each whole.

    The last chunk may hold only the tail of a message in parts: then read again from where its
    first part can be (exact on a stream with one writer, whose parts are consecutive), further
    back each time parts of others were in between."""
    start: int | str = "last"
    with StreamReader(url, stream) as reader:
        for step in range(READ_LAST_STEPS):
            # past the first pass an entry is known to be there: a broker reading a large part
            # off disk sends nothing for longer than `idle` (measured: 64 MiB, > 0.15 s)
            entries = list(reader.read(start, idle=idle, first_wait=LAST_FIRST_WAIT if step == 0 else PART_IDLE))
            newest = (entries[-1].stream_offset or 0) if entries else -1
            begun = [o for o in reader.fragment_starts() if o > newest]
            if not begun:
                break
            start = max(0, min(begun) - (64 << step) + 64)
            reader.close()
    return entries


def read_last(url: str, stream: str, *, idle: float = 0.15) -> Delivery | None:
    """The newest entry of a stream (or None when empty)."""
    entries = read_tail(url, stream, idle=idle)
    return entries[-1] if entries else None


# --------------------------------------------------------------------------- reconnect


def run_forever(step: Callable[[], None], *, stop: threading.Event, what: str,
                on_reconnect: Callable[[int], None] | None = None, max_attempts: int | None = None) -> None:
    """Call `step` (connect + serve) until `stop` is set, reconnecting on transient failures.

    `step` must rebuild all of its state from the broker: unacked deliveries of a dead connection
    are redelivered, so anything buffered in memory is simply dropped.
    """
    attempt = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            step()
            return
        except (ConnectionLostError, BrokerUnavailableError) as exc:
            if isinstance(exc, BrokerAccessError | JobNotFoundError | ConfigError):
                raise
            if stop.is_set():
                return
            if time.monotonic() - started > 30:
                attempt = 0  # it was up for a while: this is a new outage, not the same one
            attempt += 1
            if max_attempts is not None and attempt > max_attempts:
                raise
            delay = _sleep_backoff(min(attempt, 6))
            log.warning("reconnecting what=%s attempt=%d delay=%.2f error=%s", what, attempt, delay, exc)
            if on_reconnect is not None:
                on_reconnect(attempt)
        except FedmqError:
            raise


# --------------------------------------------------------------------------- start-up wait

def _certificate_refused(exc: BaseException) -> bool:
    """True when the cause chain holds a failed TLS certificate check: no wait fixes that."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__
    return False


#: seconds a long-running role waits for its broker at start-up (FEDMQ_BROKER_WAIT, --broker-wait):
#: long enough for a broker container to boot or a maintenance restart to finish
DEFAULT_BROKER_WAIT = 300.0


def wait_for_broker(url: str, *, wait: float, name: str = "fedmq-wait",
                    stop: threading.Event | None = None, cap: float = 15.0) -> bool:
    """Connect once, retrying a broker that does not answer yet, for up to `wait` seconds.

    Why: a role started beside its broker (compose runners that ignore health conditions, a site
    whose broker restarts for maintenance) would otherwise exit 3 within seconds and use up its
    restart policy before the broker is up. Backoff doubles from 0.5 s to `cap` (jittered, so many
    sites do not reconnect in step); every attempt logs one line. Credentials or permissions the
    broker refuses and malformed URLs are raised at once: waiting cannot fix them.

    Returns True once connected, False when `stop` was set while waiting; raises
    BrokerUnavailableError (exit 3) when `wait` seconds have passed without an answer.
    """
    started = time.monotonic()
    deadline = started + max(wait, 0.0)
    attempt = 0
    while True:
        attempt += 1
        try:
            Connection(url, name=name).open().close()
        except BrokerAccessError:
            raise
        except BrokerUnavailableError as exc:
            left = deadline - time.monotonic()
            if _certificate_refused(exc):
                raise BrokerAccessError(f"TLS to broker {mask_url(url)} refused its certificate (check the CA "
                                        f"bundle, e.g. SSL_CERT_FILE, and the host name): {exc}") from exc
            if left <= 0:
                raise BrokerUnavailableError(
                    f"broker {mask_url(url)} did not answer within {wait:g}s "
                    f"({attempt} attempts; --broker-wait / FEDMQ_BROKER_WAIT): {exc}"
                ) from exc
            delay = min(left, min(cap, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.75, 1.0))
            log.warning("broker not reachable yet url=%s attempt=%d retry_in=%.1f waited=%.1f wait=%g error=%s",
                        mask_url(url), attempt, delay, time.monotonic() - started, wait, exc)
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)
            continue
        if attempt > 1:
            log.info("broker reachable url=%s attempt=%d waited=%.1f", mask_url(url), attempt,
                     time.monotonic() - started)
        return True
