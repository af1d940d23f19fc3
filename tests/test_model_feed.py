"""The worker's models feed: one reader for the whole job, versions read ahead of their tasks,
and a direct read (`find_version`) for what it passed, a fork and a lost connection."""

from __future__ import annotations

import dataclasses

import pytest

from fedmq.shared.broker import Connection, JobNames, read_stream
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import JobNotFoundError
from fedmq.shared.jobstate import ModelFeed
from fedmq.shared.messages import ModelVersion, make_version
from tests.jobkit import declare_job_with_v0

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _publish(url: str, job: str, parent: ModelVersion, version: int, scale: float = 1.0) -> ModelVersion:
    weights = {k: v + scale * version for k, v in parent.weights.items()}
    mv = make_version(job=job, version=version, parent=parent.version, weights=weights, included=[f"u{version}"],
                      strategy=parent.strategy, params=parent.params, model=parent.model)
    with Connection(url, name="fedmq-test-publisher").open() as conn:
        conn.publish(JobNames(job).models_exchange, "", mv.encode(), message_id=f"v{version}-{scale}")
    return mv


def _offsets(url: str, job: str) -> list[int]:
    return [d.stream_offset or 0 for d in read_stream(url, JobNames(job).models, "first")]


def test_the_feed_reads_ahead_on_one_connection(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
    feed = ModelFeed(broker_url, JobNames(job), cache=3)
    try:
        assert feed.get(0, 0).sha256 == v0.sha256
        chain = [v0]
        for v in range(1, 6):
            chain.append(_publish(broker_url, job, chain[-1], v))
            assert feed.get(v).sha256 == chain[-1].sha256  # waits for it, on the same reader
        assert feed.attached == 1
        # v1 was passed and dropped from the cache (3 kept): read directly, the reader stays
        offsets = _offsets(broker_url, job)
        assert feed.get(1, offsets[1]).sha256 == chain[1].sha256 and feed.attached == 1
    finally:
        feed.close()


def test_a_fork_is_told_apart_by_the_task_offset(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
    first = _publish(broker_url, job, v0, 1, scale=1.0)
    second = _publish(broker_url, job, v0, 1, scale=2.0)  # another v1 (two replicas around a lost connection)
    assert first.sha256 != second.sha256
    offsets = _offsets(broker_url, job)
    feed = ModelFeed(broker_url, JobNames(job))
    try:
        assert feed.get(1, offsets[2]).sha256 == second.sha256
        assert feed.get(1, offsets[1]).sha256 == first.sha256
    finally:
        feed.close()


def test_a_lost_reader_falls_back_and_reattaches(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
    feed = ModelFeed(broker_url, JobNames(job))
    try:
        feed.get(0, 0)
        assert feed._reader is not None
        feed._reader._conn.close()  # as if the broker dropped an idle connection
        v1 = _publish(broker_url, job, v0, 1)
        assert feed.get(1).sha256 == v1.sha256
        v2 = _publish(broker_url, job, v1, 2)
        assert feed.get(2).sha256 == v2.sha256 and feed.attached == 2
    finally:
        feed.close()


def test_junk_on_the_models_stream_is_skipped(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
    with Connection(broker_url, name="fedmq-test-publisher").open() as conn:
        conn.publish(JobNames(job).models_exchange, "", b"\x93junk", message_id="junk")
    v1 = _publish(broker_url, job, dataclasses.replace(v0), 1)
    feed = ModelFeed(broker_url, JobNames(job))
    try:
        assert feed.get(0, 0).sha256 == v0.sha256
        assert feed.get(1).sha256 == v1.sha256
    finally:
        feed.close()


def test_a_feed_that_could_not_attach_attaches_on_the_next_task(broker_url: str, job: str) -> None:
    """The first attach fails (no models stream yet: as when the broker restarts under a site);
    a reader that never started must not be kept, or every later task fails with it."""
    feed = ModelFeed(broker_url, JobNames(job))
    try:
        with pytest.raises(JobNotFoundError):
            feed.get(0, 0, timeout=2)
        v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
        assert feed.get(0, 0).sha256 == v0.sha256 and feed.attached == 1
    finally:
        feed.close()
