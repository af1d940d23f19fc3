"""The aggregator's exactly-once rule on a real broker: an update delivered twice is folded once,
whether the copy arrives in the same buffer, after its version, or after an aggregator restart;
invalid updates are dead-lettered with their reason and never stop the service."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.aggregator.strategy import aggregate
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.codec import Weights, pack
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import Update, make_version
from tests.jobkit import (
    dead_letters,
    declare_job_with_v0,
    make_update,
    publish_raw,
    publish_updates,
    running_aggregator,
    versions,
    wait_for_version,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

# K = 2 and a long flush timeout: a version appears only when two distinct valid updates arrived
CFG = StrategyConfig(buffer_size=2, sample_weighted=False, flush_timeout=120.0)


def _rows(updates: list[Update]) -> list[tuple[str, str, Weights, int, int, int]]:
    """What `aggregate` takes, for updates all based on v0 with the aggregator at v0 (tau = 0)."""
    return [(u.update_id, u.site, u.delta or {}, 0, u.num_samples, u.base_version) for u in updates]


def _included(url: str, job: str) -> list[str]:
    return [uid for mv in versions(url, job) for uid in mv.included]


def test_an_update_delivered_twice_is_counted_once(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, CFG)
    u = {i: make_update(job, f"u{i}", v0.weights, seed=i) for i in range(1, 5)}
    with running_aggregator(broker_url, job) as agg:
        publish_updates(broker_url, job, [u[1], u[1], u[2]])  # duplicate inside one buffer
        got = wait_for_version(broker_url, job, 1)
        publish_updates(broker_url, job, [u[1], u[3], u[4]])  # duplicate of an already folded one
        got = wait_for_version(broker_url, job, 2)
    assert [mv.included for mv in got] == [(), ("u1", "u2"), ("u3", "u4")]
    assert agg.stats.duplicates == 2 and agg.stats.applied == 4
    expected = aggregate(v0.weights, CFG, _rows([u[1], u[2]]))
    assert got[1].sha256 == make_version(job=job, version=1, parent=0, weights=expected, included=[],
                                         strategy="", params={}, model={}).sha256


def test_updates_redelivered_after_their_version_was_published_are_dropped(broker_url: str, job: str) -> None:
    """The crash window between the version's confirm and the acks: the version is on the stream,
    the updates come back. A fresh aggregator must find them in `included` and fold nothing twice."""
    v0 = declare_job_with_v0(broker_url, job, CFG)
    u1, u2 = (make_update(job, f"u{i}", v0.weights, seed=i) for i in (1, 2))
    v1 = make_version(job=job, version=1, parent=0, weights=aggregate(v0.weights, CFG, _rows([u1, u2])),
                      included=["u1", "u2"], strategy=v0.strategy, params=v0.params, model=v0.model)
    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-crashed-aggregator").open() as conn:
        conn.publish(names.models_exchange, "", v1.encode(), message_id="v1")
    publish_updates(broker_url, job, [u1, u2])  # ... and they are delivered again
    with running_aggregator(broker_url, job) as agg:
        publish_updates(broker_url, job, [make_update(job, f"u{i}", v0.weights, base_version=1, seed=i)
                                          for i in (3, 4)])
        got = wait_for_version(broker_url, job, 2)
    assert got[2].parent == 1 and got[2].included == ("u3", "u4")
    assert agg.stats.duplicates == 2
    assert sorted(_included(broker_url, job)) == ["u1", "u2", "u3", "u4"]


def test_a_restarted_aggregator_rebuilds_its_dedup_set_from_the_models_stream(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, CFG)
    u = {i: make_update(job, f"u{i}", v0.weights, seed=i) for i in range(1, 5)}
    with running_aggregator(broker_url, job, name="first"):
        publish_updates(broker_url, job, [u[1], u[2]])
        wait_for_version(broker_url, job, 1)
    publish_updates(broker_url, job, [u[2], u[3], u[4]])
    with running_aggregator(broker_url, job, name="second") as agg:
        got = wait_for_version(broker_url, job, 2)
    assert got[-1].included == ("u3", "u4")
    assert agg.stats.duplicates == 1
    assert sorted(_included(broker_url, job)) == ["u1", "u2", "u3", "u4"]


def test_malformed_updates_are_dead_lettered_with_their_reason_and_the_service_goes_on(
        broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, CFG)
    good = [make_update(job, f"good{i}", v0.weights, seed=i) for i in (1, 2)]
    wrong_shape = make_update(job, "bad-shape", {k: np.zeros((2, 2), np.float32) for k in v0.weights})
    nan = make_update(job, "bad-nan", v0.weights)
    assert nan.delta is not None
    first = next(iter(nan.delta))
    nan.delta[first][...] = np.nan  # make_update built writable arrays
    wrong_job = make_update("some-other-job", "bad-job", v0.weights)
    with running_aggregator(broker_url, job) as agg:
        publish_updates(broker_url, job, [wrong_shape, nan, wrong_job])
        publish_raw(broker_url, job, b"\xc1 this is not msgpack", update_id="bad-msgpack")
        publish_raw(broker_url, job, pack({"schema": 1, "job": job}))
        publish_updates(broker_url, job, good)
        got = wait_for_version(broker_url, job, 1)
    assert got[1].included == ("good1", "good2")
    dl = {d.update_id: d for d in dead_letters(broker_url, job)}
    assert {k: v.reason for k, v in dl.items()} == {
        "bad-shape": "shape_mismatch", "bad-nan": "non_finite", "bad-job": "wrong_job",
        "bad-msgpack": "malformed", None: "malformed"}
    assert "some-other-job" in dl["bad-job"].detail and "missing" in dl[None].detail
    assert dl["bad-msgpack"].body == b"\xc1 this is not msgpack"  # the original bytes are kept
    assert agg.stats.dead_lettered == {"shape_mismatch": 1, "non_finite": 1, "wrong_job": 1, "malformed": 2}
    with Connection(broker_url, name="fedmq-test-check").open() as conn:
        assert conn.queue_stats(JobNames(job).dead)[0] == 5
        assert conn.queue_stats(JobNames(job).updates)[0] == 0
