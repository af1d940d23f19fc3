"""Messages over the part size travel as parts and reach every consumer whole (`fedmq.shared.parts`).

A real broker throughout: queues (settled as a whole, dead-lettered part by part), streams (read
from the first part's offset, `read_last` on a tail that began in an earlier chunk), interleaved
publishers, and hostile parts: one field of a valid header broken, parts of another sender,
parts that never complete. The end-to-end runs (a demo job and its replay, an encrypted job) in
parts are in test_replay_demo.py and test_replay_he.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from fedmq.shared import parts
from fedmq.shared.broker import PART_HEADER, Connection, Delivery, read_last, read_stream
from fedmq.shared.errors import ConfigError
from fedmq.shared.parts import Assembler, parse_header, split

pytestmark = pytest.mark.broker

PART = 4096


def _body(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


@pytest.fixture()
def queue(broker_url: str) -> Iterator[str]:
    """A classic queue of the test's own, with a dead-letter queue `<name>.dead`."""
    name = f"t-parts-{uuid.uuid4().hex[:10]}"
    with Connection(broker_url, name="fedmq-test-setup").open() as conn:
        ch = conn.channel()
        ch.queue_declare(f"{name}.dead", durable=True)
        ch.queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": "",
                                                        "x-dead-letter-routing-key": f"{name}.dead"})
        ch.close()
    yield name
    with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
        conn.delete_queue(name)
        conn.delete_queue(f"{name}.dead")


@pytest.fixture()
def stream(broker_url: str) -> Iterator[str]:
    name = f"t-parts-s-{uuid.uuid4().hex[:10]}"
    with Connection(broker_url, name="fedmq-test-setup").open() as conn:
        ch = conn.channel()
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        ch.close()
    yield name
    with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
        conn.delete_queue(name)


def _collect(conn: Connection, queue: str, until: Callable[[list[Delivery]], bool], *,
             prefetch: int = 64, deadline: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    conn.consume(queue, got.append, prefetch=prefetch)
    end = time.monotonic() + deadline
    while not until(got):
        assert time.monotonic() < end, f"only {len(got)} deliveries within {deadline} s"
        conn.process(0.05)
    return got


def _wait_depth(conn: Connection, queue: str, ready: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while conn.queue_stats(queue)[0] != ready:
        assert time.monotonic() < end, f"{queue} has {conn.queue_stats(queue)} not {ready} ready"
        conn.sleep(0.05)


def _raw_publish(conn: Connection, queue: str, body: bytes, header: object) -> None:
    """A part as a hostile site would write it: any header, any body (no splitting)."""
    big = conn.part_bytes
    conn.part_bytes = parts.MAX_PART_BYTES
    try:
        conn.publish("", queue, body, headers={PART_HEADER: header})
    finally:
        conn.part_bytes = big


# ----------------------------------------------------------------------------- pure


def test_the_part_size_comes_from_the_environment_and_a_bad_one_is_a_one_line_error() -> None:
    assert parts.part_bytes_from_env({}) == parts.DEFAULT_PART_BYTES
    assert parts.part_bytes_from_env({parts.PART_BYTES_ENV: "65536"}) == 65536
    for bad in ("64MiB", "12", str(200 * 2**20)):
        with pytest.raises(ConfigError, match=parts.PART_BYTES_ENV):
            parts.part_bytes_from_env({parts.PART_BYTES_ENV: bad})


def test_split_keeps_small_bodies_whole_and_numbers_the_parts_of_big_ones() -> None:
    assert split(b"x" * PART, PART) == [("", b"x" * PART)]
    body = _body(3 * PART + 5)
    pieces = split(body, PART)
    assert [len(p) for _, p in pieces] == [PART, PART, PART, 5]
    assert b"".join(p for _, p in pieces) == body
    headers = [parse_header(h) for h, _ in pieces]
    assert {h.pid for h in headers} == {headers[0].pid} and [h.index for h in headers] == [0, 1, 2, 3]
    assert all(h.count == 4 and h.total == len(body) for h in headers)


@pytest.mark.parametrize("field, value", [
    ("pid", "../../etc"), ("pid", "A" * 32), ("pid", ""), ("index", "-1"), ("index", "4"), ("index", "01"),
    ("index", "1.0"), ("count", "1"), ("count", "99999999999"), ("total", "0"), ("total", str(2**31)),
    ("total", "1e9"), ("shape", ["a", 1]), ("shape", b"\xff" * 100), ("shape", "x" * 500), ("shape", None),
    ("shape", "{pid}/1/4/16384\n"), ("shape", "{pid}/1/4/16384/5"),
])
def test_a_part_header_with_one_field_broken_is_a_reason_never_an_exception(field: str, value: object) -> None:
    pid = uuid.uuid4().hex
    valid = {"pid": pid, "index": "1", "count": "4", "total": str(4 * PART)}
    if field == "shape":
        header = value.replace("{pid}", pid) if isinstance(value, str) else value
    else:
        header = "/".join(value if k == field else v for k, v in valid.items())
    assert isinstance(parse_header(header), str)
    assert not isinstance(parse_header("/".join(valid.values())), str)


def test_the_assembler_bounds_what_it_holds_and_gives_up_on_idle_messages() -> None:
    now = [0.0]
    asm: Assembler[str] = Assembler(clock=lambda: now[0], timeout=10.0)
    for i in range(parts.MAX_PENDING):
        assert asm.add("site", "rk", parse_header(f"{uuid.uuid4().hex}/0/2/{2 * PART}"), f"m{i}", PART) == []
        now[0] += 1
    out = asm.add("site", "rk", parse_header(f"{uuid.uuid4().hex}/0/2/{2 * PART}"), "new", PART)
    assert [(o.parts, o.error is not None) for o in out] == [(["m0"], True)]  # the oldest went
    assert len(asm) == parts.MAX_PENDING
    now[0] = 14.5  # m_i's part came at i, "new" at 8: idle for 10 s are m1..m4
    assert sorted(o.parts[0] for o in asm.expire()) == ["m1", "m2", "m3", "m4"]
    assert len(asm) == 4 and asm.pending_bytes == 4 * PART


# ----------------------------------------------------------------------------- queues


def test_a_body_over_the_part_size_reaches_a_queue_consumer_whole_and_is_acked_as_a_whole(
        broker_url: str, queue: str) -> None:
    body = _body(5 * PART + 123)
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        conn.publish("", queue, body, headers={"x-fedmq-update-id": "u1"}, message_id="m1")
        conn.publish("", queue, b"small")
        got = _collect(conn, queue, lambda g: len(g) == 2)
        assert [d.body for d in got] == [body, b"small"]
        assert got[0].parts == 6 and len(set(got[0].delivery_tags)) == 6
        assert got[0].headers == {"x-fedmq-update-id": "u1"}  # the part header stays below
        got[0].ack()
        got[1].ack()
    with Connection(broker_url, name="fedmq-test-check").open() as conn:
        assert conn.queue_stats(queue)[0] == 0  # closing requeued nothing: no part was left unacked


def test_a_rejected_message_in_parts_is_dead_lettered_part_by_part_and_reads_whole_again(
        broker_url: str, queue: str) -> None:
    body = _body(3 * PART)
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        conn.publish("", queue, body)
        got = _collect(conn, queue, lambda g: len(g) == 1)
        got[0].reject()
        _wait_depth(conn, f"{queue}.dead", 3)
    with Connection(broker_url, name="fedmq-test-dead").open() as conn:
        dead = _collect(conn, f"{queue}.dead", lambda g: len(g) == 1)
        assert dead[0].body == body
        dead[0].ack()


def test_parts_of_concurrent_publishers_interleave_on_a_queue_and_each_message_arrives_whole(
        broker_url: str, queue: str) -> None:
    bodies = {f"p{k}-{i}": _body(4 * PART + k * 7 + i, seed=k * 10 + i) for k in range(3) for i in range(4)}

    def publish(k: int) -> None:
        with Connection(broker_url, name=f"fedmq-test-{k}", part_bytes=PART).open() as conn:
            for i in range(4):
                conn.publish("", queue, bodies[f"p{k}-{i}"], message_id=f"p{k}-{i}")

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with Connection(broker_url, name="fedmq-test").open() as conn:
        got = _collect(conn, queue, lambda g: len(g) == len(bodies), prefetch=len(bodies) * 5)
        for d in got:
            d.ack()
    assert sorted(d.body for d in got) == sorted(bodies.values())


def test_hostile_parts_reach_the_consumer_as_poison_and_settle_without_joining_honest_ones(
        broker_url: str, queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts, "PART_TIMEOUT", 0.5)
    honest = _body(2 * PART, seed=1)
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        pid = uuid.uuid4().hex
        _raw_publish(conn, queue, b"z" * PART, f"{pid}/0/2/{2 * PART}")         # never completed
        _raw_publish(conn, queue, b"y" * 10, f"{pid}/0/2/{2 * PART}")           # its part 0 again
        _raw_publish(conn, queue, b"w" * PART, f"{'x' * 32}/0/2/{2 * PART}")    # a broken header
        _raw_publish(conn, queue, b"v" * (3 * PART), f"{uuid.uuid4().hex}/0/2/{2 * PART}")  # over its size
        _raw_publish(conn, queue, b"t" * PART, f"{uuid.uuid4().hex}/0/2/{2 * PART}")    # its rest never comes
    with Connection(broker_url, name="fedmq-test-other", part_bytes=PART).open() as conn:
        _raw_publish(conn, queue, honest[PART:], f"{pid}/1/2/{2 * PART}")  # another sender's part for `pid`
        conn.publish("", queue, honest)
    with Connection(broker_url, name="fedmq-test") as conn:
        got = _collect(conn, queue, lambda g: len(g) == 7)
        assert [d.body for d in got if d.body] == [honest]
        poison = [d for d in got if not d.body]
        assert [d.parts for d in poison] == [1] * 6  # each settles all it holds: here one part each
        for d in got:
            (d.ack if d.body else d.reject)()
        _wait_depth(conn, f"{queue}.dead", 6)
    with Connection(broker_url, name="fedmq-test-check").open() as conn:
        assert conn.queue_stats(queue)[0] == 0


# ----------------------------------------------------------------------------- streams


def test_a_stream_is_read_whole_from_the_first_and_from_a_message_s_own_offset(
        broker_url: str, stream: str) -> None:
    bodies = [_body(PART * (k % 3 + 1) + k, seed=k) for k in range(6)]
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        for b in bodies:
            conn.publish("", stream, b)
    entries = read_stream(broker_url, stream, "first")
    assert [d.body for d in entries] == bodies
    third = entries[3]
    again = read_stream(broker_url, stream, third.stream_offset)
    assert [d.body for d in again] == bodies[3:]
    resumed = read_stream(broker_url, stream, (third.stream_offset or 0) + 1)  # mid-message: its tail is dropped
    assert [d.body for d in resumed] == bodies[4:]


def test_read_last_finds_the_newest_message_whose_first_parts_are_in_earlier_chunks(
        broker_url: str, stream: str) -> None:
    newest = _body(9 * PART + 1, seed=9)
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        conn.publish("", stream, b"older")
        conn.publish("", stream, newest)
    last = read_last(broker_url, stream)
    assert last is not None and last.body == newest and last.parts == 10


def test_a_message_with_more_parts_than_the_stream_prefetch_still_arrives(broker_url: str, stream: str) -> None:
    from fedmq.shared.broker import StreamReader

    body = _body(20 * PART)
    with Connection(broker_url, name="fedmq-test", part_bytes=PART).open() as conn:
        conn.publish("", stream, body)
    with StreamReader(broker_url, stream, prefetch=2) as reader:
        assert [d.body for d in reader.read("first")] == [body]


def test_the_cli_refuses_a_bad_part_size_in_one_line(broker_url: str) -> None:
    from tests.conftest import run_fedmq

    res = run_fedmq("jobs", "--broker", broker_url, timeout=60, FEDMQ_PART_BYTES="huge")
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "FEDMQ_PART_BYTES" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
