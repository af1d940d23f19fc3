"""A version's deliveries are acked after its confirm, each once, and nothing else with them
(aggregator/acks.py: one multiple ack per version where that is exact).

The unit tests hold `AckLedger` against a channel that keeps RabbitMQ's rules (a multiple ack
settles every outstanding tag up to its own; an ack of a tag that is not outstanding closes the
channel). The broker test runs the real aggregator on the real broker and records, beside the real
calls, every delivery, ack and confirmed publish, then replays them against the same rules."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from fedmq.aggregator import service
from fedmq.aggregator.acks import AckLedger
from fedmq.shared import broker
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import Event, EventKind, ModelVersion
from tests.jobkit import (
    declare_job_with_v0,
    make_update,
    publish_raw,
    publish_updates,
    running_aggregator,
    wait_for_version,
)


class UnknownTagError(AssertionError):
    """What RabbitMQ answers an ack of a tag that is not outstanding with (PRECONDITION_FAILED)."""


@dataclass
class RuleChannel:
    """Outstanding delivery tags with RabbitMQ's ack rules."""

    outstanding: set[int] = field(default_factory=set)
    next_tag: int = 1
    frames: int = 0

    def deliver(self) -> int:
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self.outstanding.add(tag)
        return tag

    def settle(self, tag: int, multiple: bool) -> set[int]:
        if tag not in self.outstanding:
            raise UnknownTagError(f"unknown delivery tag {tag}")
        done = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= done
        self.frames += 1
        return done


@dataclass
class FakeDelivery:
    delivery_tag: int
    channel: RuleChannel
    acked: list[int]

    @property
    def channel_key(self) -> object:
        return self.channel

    @property
    def delivery_tags(self) -> tuple[int, ...]:
        return (self.delivery_tag,)

    def ack(self, multiple: bool = False) -> None:
        self.acked.extend(sorted(self.channel.settle(self.delivery_tag, multiple)))


def _deliver(ch: RuleChannel, acked: list[int], n: int) -> list[FakeDelivery]:
    return [FakeDelivery(ch.deliver(), ch, acked) for _ in range(n)]


def test_a_version_of_consecutive_deliveries_is_acked_with_one_frame() -> None:
    ch, acked, ledger = RuleChannel(), [], AckLedger()
    ds = _deliver(ch, acked, 10)
    for d in ds:
        ledger.saw(d)
    ledger.ack(ds)
    assert ch.frames == 1 and sorted(acked) == list(range(1, 11)) and not ch.outstanding
    more = _deliver(ch, acked, 5)  # the floor moved: the next version is one frame too
    for d in more:
        ledger.saw(d)
    ledger.ack(more)
    assert ch.frames == 2 and sorted(acked) == list(range(1, 16))


def test_a_lower_delivery_not_handled_yet_is_never_acked_with_the_version() -> None:
    ch, acked, ledger = RuleChannel(), [], AckLedger()
    ds = _deliver(ch, acked, 6)
    waiting = ds[2]  # still in the fair queue behind another site's delivery
    version = [d for d in ds if d is not waiting]
    for d in version:
        ledger.saw(d)
    ledger.ack(version)
    assert waiting.delivery_tag in ch.outstanding and ch.outstanding == {3}
    assert sorted(acked) == [1, 2, 4, 5, 6]
    ledger.saw(waiting)  # ...handled later, in the next version: acked once
    ledger.ack([waiting])
    assert not ch.outstanding and sorted(acked) == [1, 2, 3, 4, 5, 6]


def test_deliveries_settled_on_their_own_do_not_stop_the_single_frame() -> None:
    ch, acked, ledger = RuleChannel(), [], AckLedger()
    ds = _deliver(ch, acked, 8)
    for d in ds:
        ledger.saw(d)
    ds[1].ack()  # a duplicate
    ds[4].ack()  # a dead letter
    ledger.ack([d for i, d in enumerate(ds) if i not in (1, 4)])
    assert not ch.outstanding and sorted(acked) == list(range(1, 9))
    assert ch.frames == 3  # two single acks, one multiple: no tag twice (the channel would refuse)


def test_deliveries_of_two_channels_are_acked_per_channel() -> None:
    a, b, acked, ledger = RuleChannel(), RuleChannel(), [], AckLedger()
    ds = _deliver(a, acked, 3) + _deliver(b, acked, 3)
    for d in ds:
        ledger.saw(d)
    ledger.ack(ds)
    assert not a.outstanding and not b.outstanding and a.frames == 1 and b.frames == 1


@pytest.mark.parametrize("seed", range(20))
def test_random_sessions_ack_each_delivery_once_and_only_after_its_flush(seed: int) -> None:
    """A fair queue that reorders, duplicates and dead letters settled on their own, flushes of
    K: every tag is settled exactly once, and never one still waiting or not yet flushed."""
    rng = random.Random(seed)
    ch, acked, ledger, k = RuleChannel(), [], AckLedger(), rng.randint(1, 6)
    waiting: list[FakeDelivery] = []
    buffered: list[FakeDelivery] = []
    delivered = 0
    for _step in range(400):
        while len(ch.outstanding) < 3 * k and delivered < 300:  # the prefetch window refills
            waiting.append(FakeDelivery(ch.deliver(), ch, acked))
            delivered += 1
        if not waiting:
            break
        d = waiting.pop(rng.randrange(min(len(waiting), 4)))  # out of order, as round-robin does
        ledger.saw(d)
        if rng.random() < 0.2:
            d.ack()  # duplicate or dead letter: settled on its own at once
        else:
            buffered.append(d)
        if len(buffered) >= k:
            before = set(acked)
            ledger.ack(buffered)
            newly = set(acked) - before
            assert newly == {b.delivery_tag for b in buffered}
            assert not newly & {w.delivery_tag for w in waiting}
            buffered = []
    ledger.ack(buffered)
    assert len(acked) == len(set(acked)) == delivered - len(waiting)
    assert ch.outstanding == {w.delivery_tag for w in waiting}


# ---------------------------------------------------------------------------- the real broker


@dataclass
class Record:
    """Beside the real calls: deliveries as they reach the fair queue, settles, confirmed publishes."""

    names: JobNames
    tag_uid: dict[tuple[int, int], str | None] = field(default_factory=dict)
    events: list[tuple[str, Any]] = field(default_factory=list)
    #: every channel seen, held so that no id() is reused for another during the test
    channels: list[object] = field(default_factory=list)

    def key(self, d: broker.Delivery) -> int:
        self.channels.append(d.channel_key)
        return id(d.channel_key)


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_the_aggregator_acks_each_update_once_after_the_confirm_of_its_version(
        broker_url: str, job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StrategyConfig(buffer_size=3, sample_weighted=False, flush_timeout=120.0, max_staleness=100)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    rec = Record(JobNames(job))

    real_append, real_ack = service.FairQueue.append, broker.Delivery.ack
    real_reject, real_publish = broker.Delivery.reject, broker.Connection.publish

    def append(self: service.FairQueue, d: broker.Delivery) -> None:
        rec.tag_uid[(rec.key(d), d.delivery_tag)] = broker.header_update_id(d.headers)
        rec.events.append(("delivered", (rec.key(d), d.delivery_tag)))
        real_append(self, d)

    def ack(self: broker.Delivery, multiple: bool = False) -> None:
        real_ack(self, multiple)
        rec.events.append(("ack", (rec.key(self), self.delivery_tag, multiple)))

    def reject(self: broker.Delivery) -> None:
        real_reject(self)
        rec.events.append(("ack", (rec.key(self), self.delivery_tag, False)))

    def publish(self: broker.Connection, exchange: str, routing_key: str, body: bytes, **kw: Any) -> None:
        real_publish(self, exchange, routing_key, body, **kw)  # returns once the broker confirmed
        if exchange == rec.names.models_exchange:
            rec.events.append(("confirmed", ModelVersion.decode(body).included))
        elif exchange == rec.names.dead_exchange:
            rec.events.append(("confirmed", ((kw.get("headers") or {}).get(broker.UPDATE_ID_HEADER),)))

    monkeypatch.setattr(service.FairQueue, "append", append)
    monkeypatch.setattr(broker.Delivery, "ack", ack)
    monkeypatch.setattr(broker.Delivery, "reject", reject)
    monkeypatch.setattr(broker.Connection, "publish", publish)

    upd = {f"u{i}": make_update(job, f"u{i}", v0.weights, site=f"site-{i % 3 if i >= 9 else 0}", seed=i)
           for i in range(21)}
    # one site's backlog (consecutive tags, a duplicate and a malformed body among them), then
    # three sites interleaved and uneven, which the fair queue reorders
    first = [upd[f"u{i}"] for i in range(9)]
    first.insert(4, upd["u1"])
    publish_updates(broker_url, job, first[:6])
    publish_raw(broker_url, job, b"\xc1 not msgpack", update_id="bad-1")
    publish_updates(broker_url, job, first[6:])
    rest = sorted((upd[f"u{i}"] for i in range(9, 21)), key=lambda u: (u.site != "site-1", u.update_id))
    publish_updates(broker_url, job, rest)
    with running_aggregator(broker_url, job) as agg:
        got = wait_for_version(broker_url, job, 7)
        with Connection(broker_url, name="fedmq-test-check").open() as conn:
            ready, _consumers = conn.queue_stats(rec.names.updates)
    assert ready == 0

    included = [uid for mv in got for uid in mv.included]
    assert sorted(included) == sorted(upd) and len(included) == len(set(included))
    assert agg.stats.duplicates == 1 and agg.stats.dead_lettered == {"malformed": 1}

    # replay the record against RabbitMQ's rules, on the updates consumer's channel (streams
    # read by the aggregator ack on channels of their own)
    updates_channels = {data[0] for kind, data in rec.events if kind == "delivered"}
    outstanding: set[tuple[int, int]] = set()
    confirmed: set[str | None] = set()
    multiple_acks = single_acks = 0
    for kind, data in rec.events:
        if kind == "delivered":
            outstanding.add(data)
        elif kind == "confirmed":
            confirmed.update(data)
        elif data[0] in updates_channels:
            chan, tag, multiple = data
            assert (chan, tag) in outstanding, f"tag {tag} acked twice"
            done = {o for o in outstanding if o[0] == chan and o[1] <= tag} if multiple else {(chan, tag)}
            for key in done:
                uid = rec.tag_uid[key]
                assert uid in confirmed, f"{uid} acked before the confirm of its version (or dead letter)"
            outstanding -= done
            multiple_acks += multiple
            single_acks += not multiple
    assert not outstanding
    assert multiple_acks >= 1, "no version was acked with one frame"
    assert single_acks >= 3, "the duplicate, the dead letter and a reordered version ack one by one"
    events = [e for e in _events(broker_url, job) if e == EventKind.AGGREGATOR_ACTIVE]
    assert len(events) == 1, "the session was rebuilt: a channel error (an ack of an unknown tag?)"


def _events(url: str, job: str) -> list[str]:
    return [Event.decode(d.body).event for d in broker.read_stream(url, JobNames(job).events, "first")]
