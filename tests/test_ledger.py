"""The ledger checker every chaos test relies on, on hand-built ledgers: it must catch each way
an update can go wrong (lost, doubled, both included and dead, a fork or gap in the versions) and
accept the one benign overlap (an included update whose stale copy hit the delivery limit)."""

from __future__ import annotations

from fedmq.shared.ledger import DELIVERY_LIMIT, DeadLetter, Ledger, VersionEntry


def _chain(*included: tuple[str, ...]) -> list[VersionEntry]:
    versions = [VersionEntry(0, -1, (), "0" * 64)]
    versions += [VersionEntry(i, i - 1, ids, f"{i:064x}") for i, ids in enumerate(included, start=1)]
    return versions


def test_a_clean_ledger_is_ok() -> None:
    ledger = Ledger(_chain(("u-a", "u-b"), ("u-c",)), ["u-a", "u-b", "u-c", "u-d"],
                    [DeadLetter("update", "u-d", "stale"), DeadLetter("task", "t-9", "rejected")])
    report = ledger.check()
    assert report.ok, report
    assert (report.logged, report.included, report.dead_lettered, report.versions) == (4, 3, 1, 3)


def test_an_update_neither_included_nor_dead_is_lost() -> None:
    report = Ledger(_chain(("u-a",)), ["u-a", "u-lost"], []).check()
    assert not report.ok and report.lost == ["u-lost"]


def test_an_update_in_two_versions_is_double_counted() -> None:
    report = Ledger(_chain(("u-a",), ("u-a", "u-b")), ["u-a", "u-b"], []).check()
    assert not report.ok and report.double_counted == ["u-a"]


def test_an_update_both_included_and_dead_lettered_by_the_aggregator_is_an_error() -> None:
    report = Ledger(_chain(("u-a",)), ["u-a"], [DeadLetter("update", "u-a", "shape_mismatch")]).check()
    assert not report.ok and report.included_and_dead == ["u-a"]


def test_an_included_update_whose_copy_hit_the_delivery_limit_is_redundant_not_an_error() -> None:
    report = Ledger(_chain(("u-a",)), ["u-a", "u-a"], [DeadLetter("update", "u-a", DELIVERY_LIMIT)]).check()
    assert report.ok and report.redundant_dead_letters == ["u-a"]


def test_an_id_twice_in_one_version_is_double_counted() -> None:
    report = Ledger(_chain(("u-a", "u-a")), ["u-a"], []).check()
    assert not report.ok and report.double_counted == ["u-a"]


def test_a_delivery_limit_copy_does_not_excuse_a_second_reason() -> None:
    """Included, hit the delivery limit *and* dead-lettered by the aggregator as invalid: an error."""
    dead = [DeadLetter("update", "u-a", DELIVERY_LIMIT), DeadLetter("update", "u-a", "stale")]
    report = Ledger(_chain(("u-a",)), ["u-a", "u-a"], dead).check()
    assert not report.ok and report.included_and_dead == ["u-a"] and report.redundant_dead_letters == []


def test_an_update_logged_twice_and_never_resolved_is_lost_once() -> None:
    report = Ledger(_chain(("u-a",)), ["u-a", "u-b", "u-b"], []).check()
    assert report.lost == ["u-b"] and report.logged == 2


def test_an_update_only_dead_lettered_is_accounted_for() -> None:
    report = Ledger(_chain(), ["u-a"], [DeadLetter("update", "u-a", DELIVERY_LIMIT)]).check()
    assert report.ok and report.dead_lettered == 1 and report.lost == []


def test_an_included_update_never_logged_is_an_error() -> None:
    report = Ledger(_chain(("u-ghost",)), [], []).check()
    assert not report.ok and report.never_logged == ["u-ghost"]


def test_a_fork_two_children_of_one_parent_is_a_version_error() -> None:
    versions = _chain(("u-a",))
    versions.append(VersionEntry(1, 0, ("u-b",), "f" * 64))  # a second v1
    report = Ledger(versions, ["u-a", "u-b"], []).check()
    assert not report.ok and any("version 1" in e for e in report.version_errors)


def test_a_gap_or_a_wrong_parent_is_a_version_error() -> None:
    gap = [VersionEntry(0, -1, (), "0" * 64), VersionEntry(2, 1, ("u-a",), "2" * 64)]
    assert Ledger(gap, ["u-a"], []).check().version_errors
    orphan = [VersionEntry(0, -1, (), "0" * 64), VersionEntry(1, 5, ("u-a",), "1" * 64)]
    assert Ledger(orphan, ["u-a"], []).check().version_errors


def test_lost_doubled_and_dead_at_once_are_each_reported() -> None:
    report = Ledger(_chain(("u-a",), ("u-a", "u-x")), ["u-a", "u-x", "u-l"],
                    [DeadLetter("update", "u-x", "non_finite")]).check()
    assert (report.lost, report.double_counted, report.included_and_dead) == (["u-l"], ["u-a"], ["u-x"])


def test_a_reason_the_sender_preset_does_not_override_the_brokers() -> None:
    from fedmq.shared.ledger import dead_reason

    preset = {"x-fedmq-reason": "stale", "x-first-death-reason": "expired"}
    broker = {"x-death": [{"reason": "delivery_limit", "queue": "q"}, {"reason": "forged"}]}
    assert dead_reason({**preset, **broker}) == "delivery_limit"
    assert dead_reason({"x-fedmq-reason": "unknown_task"}) == "unknown_task"  # the aggregator's own
    assert dead_reason({"x-death": "not a list", "x-fedmq-reason": b"\xff" * 10_000}) != ""


def test_broker_headers_a_publisher_can_preset_never_raise() -> None:
    from fedmq.shared.broker import Delivery

    d = Delivery(body=b"", headers={"x-delivery-count": "zz", "x-stream-offset": 1.5}, delivery_tag=1,
                 redelivered=False, routing_key="s", user_id=None, _channel=None, _url="")  # type: ignore[arg-type]
    assert d.delivery_count == 0 and d.stream_offset is None


def test_offsets_read_from_a_real_stream_are_ints(broker_url: str, job: str) -> None:
    """pika hands AMQP longs over as an int subclass: the header must still read as the offset."""
    from fedmq.shared.broker import Connection, JobNames, TopologyConfig, read_stream

    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-offsets").open() as conn:
        conn.declare_job(names, TopologyConfig())
        for _ in range(3):
            conn.publish(names.updates_exchange, "s", b"x", headers={"x-stream-offset": 10**6})
    try:
        assert [d.stream_offset for d in read_stream(broker_url, names.updates_log, "first")] == [0, 1, 2]
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(names)
