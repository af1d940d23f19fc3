"""A live job flooded by a hostile site (bench/flood.py's attack, smaller): nothing hostile is
accepted, no role crashes, the job reaches its target and replay finds every version clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.flood import ATTACKER, _classes, run_flooded_demo
from fedmq.aggregator.service import FairQueue
from fedmq.replay import replay
from fedmq.shared.broker import Connection, Delivery, JobNames
from fedmq.shared.errors import InvalidUpdateError, MalformedMessageError
from fedmq.shared.messages import Update, make_version
from fedmq.shared.signing import JobTrust


def _delivery(site: str, tag: int) -> Delivery:
    return Delivery(body=b"", headers={}, delivery_tag=tag, redelivered=False, routing_key=site, user_id=None,
                    _channel=None, _url="")  # type: ignore[arg-type]


def test_fair_queue_serves_sites_round_robin_in_order_within_each() -> None:
    q = FairQueue()
    for tag in range(6):
        q.append(_delivery("flooder", tag))
    q.append(_delivery("honest-a", 100))
    q.append(_delivery("honest-b", 200))
    got = []
    while q:
        d = q.pop()
        got.append((d.routing_key, d.delivery_tag))
    assert got[:3] == [("flooder", 0), ("honest-a", 100), ("honest-b", 200)]
    assert [t for s, t in got if s == "flooder"] == list(range(6))
    assert len(q) == 0 and not q


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_flooded_job_accepts_nothing_hostile_and_replays_clean(broker_url: str, tmp_path: Path) -> None:
    per_class = 6
    n = per_class * 17
    res = run_flooded_demo(broker_url, n, ["--target", "0.85", "--max-seconds", "180"], workdir=tmp_path,
                           keep_job=True)
    try:
        assert len(res.sent) == 17 and sum(res.sent.values()) == n  # every class went out
        assert res.demo["seconds_to_target"] is not None  # the job reached its target (exit 0: no crash)
        assert res.accepted_hostile == 0
        # each one dead-lettered, or refused at publish (the attacker's own queue full) ...
        assert sum(res.hostile_dead.values()) + sum(res.refused.values()) == n, (res.hostile_dead, res.refused)
        assert "unknown" not in res.hostile_dead  # ... with a reason
        assert res.honest_stale - res.attacker_site_stale == 0  # the flooding site may only hurt itself
        report = replay(broker_url, res.job)
        summary = report.to_dict()
        assert summary["mismatches"] == 0 and summary["versions_recomputed"] == res.demo["versions"], summary
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(res.job))


def test_every_attack_class_is_a_body_the_decoder_refuses_or_an_update_the_trust_check_refuses() -> None:
    v0 = make_version(job="j1", version=0, parent=-1, weights={"w": np.zeros(3, np.float32)}, included=[],
                      strategy="fedbuff", params={}, model={})
    trust = JobTrust(task_key="00" * 32)
    for name, build in _classes("j1", v0):
        try:
            u = Update.decode(build())
        except MalformedMessageError:
            continue
        with pytest.raises(InvalidUpdateError):
            trust.verify(u, ATTACKER)
        assert name in ("forged_task_proof", "reused_task_id", "other_site_in_body", "huge_base_version")
