"""Stream reads that end on a quiet stream must not end while a large entry is still arriving:
a ~43 MB version (10.7M float32 parameters) took longer than the read's idle time to arrive whole,
and an aggregator taking over found "no model version" at all."""

from __future__ import annotations

import pytest

from fedmq.shared.broker import Connection, JobNames, read_last, read_stream
from fedmq.shared.config import StrategyConfig
from tests.jobkit import declare_job_with_v0

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

BIG = 64 * 2**20  # bytes: well past what arrives within the 0.15 s idle of read_last on loopback


def test_the_newest_entry_is_read_whole_however_long_it_takes_to_arrive(broker_url: str, job: str) -> None:
    names = JobNames(job)
    declare_job_with_v0(broker_url, job, StrategyConfig(buffer_size=2))
    body = bytes(range(256)) * (BIG // 256)
    with Connection(broker_url, name="fedmq-test-big").open() as conn:
        conn.publish(names.models_exchange, "version", body)
    last = read_last(broker_url, names.models)
    assert last is not None and len(last.body) == BIG and last.body[:256] == bytes(range(256))
    entries = read_stream(broker_url, names.models, "first")
    assert [len(d.body) for d in entries][-1] == BIG and len(entries) == 2  # v0, then the big one
