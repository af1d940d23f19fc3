"""`fedmq monitor`: event folding and alerts (pure), snapshots of a job on the real broker while
its queues fill, drain and disappear, the --once --json contract, and the rendered dashboard."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from fedmq.monitor import (
    SPARK_BLOCKS,
    JobView,
    Monitor,
    QueueState,
    Snapshot,
    Status,
    Thresholds,
    alerts,
    render_text,
    silent_sites,
    sparkline,
)
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import ConfigError
from fedmq.shared.jobstate import emit
from fedmq.shared.messages import Event, EventKind, Task
from fedmq.shared.signing import META_REGISTRY
from tests.chaos.harness import wait_until
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0, make_update, publish_updates, running_aggregator, wait_for_version

pytestmark = pytest.mark.timeout(120)


def ev(kind: EventKind, ts: float, source: str = "test", **data: object) -> Event:
    return Event(job="j", event=kind, source=source, data=dict(data), ts=ts)


def running_view(now: float) -> JobView:
    view = JobView("j")
    view.apply(ev(EventKind.JOB_STARTED, now - 30, strategy="fedbuff", params={"buffer_size": 2}))
    for i in range(4):  # the monitor counts a site's update only as the answer to an issued task
        view.apply(ev(EventKind.TASK_ISSUED, now - 29, task={"task_id": f"t{i}"}))
    return view


def queues(tasks: tuple[int, int] | None = (0, 1), updates: tuple[int, int] | None = (0, 1),
           dead: tuple[int, int] = (0, 0)) -> dict[str, QueueState]:
    def q(name: str, v: tuple[int, int] | None) -> QueueState:
        return QueueState(f"fedmq.j.{name}", v is not None, *(v or (None, None)))

    return {"tasks": q("tasks", tasks), "updates": q("updates", updates), "dead": q("dead", dead)}


def codes(found: list) -> set[str]:
    return {a.code for a in found}


# ----------------------------------------------------------------------------- pure


def test_site_rows_count_each_update_id_once_and_average_staleness_of_applied_updates() -> None:
    now = time.time()
    view = running_view(now)
    for i, site in enumerate(["a", "a", "b"]):
        view.apply(ev(EventKind.UPDATE_PUBLISHED, now - 10 + i, source=site, site=site, update_id=f"u-t{i}"))
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now - 5, source="a", site="a", update_id="u-t0"))  # redelivery
    view.apply(ev(EventKind.VERSION_PUBLISHED, now - 4, version=1, included=["u-t0", "u-t1", "u-t2"],
                  sites=["a", "a", "b"], staleness=[0, 3, 1]))
    assert view.sites["a"].updates == 2
    assert view.sites["a"].applied == 2
    assert view.sites["a"].mean_staleness == pytest.approx(1.5)
    assert view.sites["b"].mean_staleness == pytest.approx(1.0)
    assert view.sites["a"].last_seen == pytest.approx(now - 5)
    assert view.latest_version == 1
    assert view.updates_applied == 3


def test_a_site_event_for_a_task_never_issued_is_not_counted() -> None:
    now = time.time()
    view = running_view(now)
    for i in range(100):
        view.apply(ev(EventKind.UPDATE_PUBLISHED, now, site="flooder", update_id=f"u-junk{i}"))
    assert "flooder" not in view.sites and len(view.update_ids) == 0 and view.poison["bad_field"] == 100


def test_epsilon_is_shown_only_when_a_site_reports_it() -> None:
    now = time.time()
    view = running_view(now)
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now, site="dp", update_id="u-t1", epsilon=0.5))
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now, site="dp", update_id="u-t2", epsilon=0.8))
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now, site="plain", update_id="u-t3"))
    rows = Snapshot("j", now, view, queues(), {}, [], 60.0).to_dict()["sites"]
    assert rows["dp"]["epsilon"] == pytest.approx(0.8)
    assert rows["plain"]["epsilon"] is None


def test_healthy_running_job_raises_no_alert() -> None:
    now = time.time()
    view = running_view(now)
    view.apply(ev(EventKind.VERSION_PUBLISHED, now - 2, version=1, included=["u"], sites=["a"], staleness=[0]))
    assert alerts(view, queues(tasks=(3, 2), updates=(1, 1)), now, Thresholds()) == []


def test_updates_without_consumer_alert_no_active_aggregator() -> None:
    now = time.time()
    found = alerts(running_view(now), queues(updates=(7, 0)), now, Thresholds(stall_seconds=1e6))
    assert codes(found) == {"no_active_aggregator"}
    assert "7 updates waiting" in found[0].message


def test_tasks_piling_up_without_worker_alerts_but_an_empty_tasks_queue_does_not() -> None:
    now = time.time()
    limits = Thresholds(stall_seconds=1e6)
    assert codes(alerts(running_view(now), queues(tasks=(4, 0)), now, limits)) == {"tasks_without_consumer"}
    assert alerts(running_view(now), queues(tasks=(0, 0)), now, limits) == []


def test_dead_letters_alert_only_within_the_window() -> None:
    now = time.time()
    view = running_view(now)
    view.apply(ev(EventKind.DEAD_LETTERED, now - 500, reason="stale"))
    limits = Thresholds(stall_seconds=1e6, window=60)
    assert alerts(view, queues(), now, limits) == []
    view.apply(ev(EventKind.DEAD_LETTERED, now - 5, reason="norm_bound"))
    found = alerts(view, queues(), now, limits)
    assert codes(found) == {"dead_letters_growing"}
    assert "norm_bound: 1" in found[0].message
    # poison messages dead-lettered by the broker's delivery limit emit no event: queue growth counts
    assert codes(alerts(running_view(now), queues(), now, limits, dead_growth=3)) == {"dead_letters_growing"}


def test_job_without_a_new_version_for_longer_than_the_limit_is_stalled() -> None:
    now = time.time()
    view = running_view(now)  # started 30 s ago, no version since
    assert codes(alerts(view, queues(), now, Thresholds(stall_seconds=20))) == {"job_stalled"}
    assert alerts(view, queues(), now, Thresholds(stall_seconds=40)) == []


def test_a_roster_site_never_heard_of_and_a_site_gone_quiet_are_silent() -> None:
    now = time.time()
    view = running_view(now)  # started 30 s ago
    view.roster = {"site-a", "site-b"}
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now - 25, source="site-c", update_id="u-t0", site="site-c",
                  task_id="t0"))
    limits = Thresholds(stall_seconds=1e6, silent_seconds=20)
    found = [a for a in alerts(view, queues(), now, limits) if a.code == "site_silent"]
    assert len(found) == 1 and "3 site(s)" in found[0].message and "site-a, site-b, site-c" in found[0].message
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now - 1, source="site-a", update_id="u-t1", site="site-a",
                  task_id="t1"))
    assert silent_sites(view, now, 20) == ["site-b", "site-c"]
    assert silent_sites(view, now, 60) == []  # the job is younger than that: nobody is late yet
    with pytest.raises(ConfigError, match="--silent-seconds"):
        Thresholds(silent_seconds=0)


def test_finished_job_with_deleted_queues_is_reported_not_alarmed() -> None:
    now = time.time()
    view = running_view(now)
    view.apply(ev(EventKind.JOB_FINISHING, now - 3, reason="target_accuracy"))
    view.apply(ev(EventKind.JOB_FINISHED, now - 1, stop_reason="target_accuracy"))
    found = alerts(view, queues(tasks=None, updates=None), now, Thresholds(stall_seconds=1))
    assert [(a.level.value, a.code) for a in found] == [("info", "job_finished")]
    assert view.status is Status.FINISHED


def test_queue_missing_while_running_is_critical() -> None:
    now = time.time()
    found = alerts(running_view(now), queues(tasks=None), now, Thresholds(stall_seconds=1e6))
    assert codes(found) == {"queue_missing"}


def test_versions_per_minute_counts_the_window_while_running_and_the_whole_run_when_finished() -> None:
    now = time.time()
    view = JobView("j")
    view.apply(ev(EventKind.JOB_STARTED, now - 600))
    for i in range(30):  # one version every 2 s over the last minute
        view.apply(ev(EventKind.VERSION_PUBLISHED, now - 59 + 2 * i, version=i + 1))
    assert view.versions_per_minute(now, 60) == pytest.approx(30.0)
    view.apply(ev(EventKind.JOB_FINISHED, now, stop_reason="max_versions"))
    assert view.versions_per_minute(now, 60) == pytest.approx(3.0)  # 30 versions in 10 min


def test_sparkline_spans_lowest_to_highest_block_and_keeps_the_last_values() -> None:
    assert sparkline([0.1, 0.5, 0.9]) == SPARK_BLOCKS[0] + SPARK_BLOCKS[4] + SPARK_BLOCKS[-1]
    assert len(sparkline(list(range(100)), width=10)) == 10
    assert sparkline([]) == ""
    assert len(set(sparkline([0.7, 0.7]))) == 1


def test_dashboard_renders_queues_sites_accuracy_and_alerts() -> None:
    now = time.time()
    view = running_view(now)
    view.apply(ev(EventKind.AGGREGATOR_ACTIVE, now - 20, replica="agg-blue", takeover=False))
    view.apply(ev(EventKind.UPDATE_PUBLISHED, now - 12, site="clinic-7", update_id="u-t1", epsilon=1.25))
    view.apply(ev(EventKind.VERSION_PUBLISHED, now - 10, version=1, included=["u-t1"], sites=["clinic-7"],
                  staleness=[2]))
    view.apply(ev(EventKind.VERSION_EVALUATED, now - 9, version=1, accuracy=0.8765, t=21.0))
    qs = queues(tasks=(5, 0), updates=(0, 1))
    snap = Snapshot("j", now, view, qs, {}, alerts(view, qs, now, Thresholds()), 60.0)
    text = render_text(snap, width=140)
    for expected in ("fedmq.j.tasks", "fedmq.j.updates", "fedmq.j.dead", "clinic-7", "agg-blue", "0.8765",
                     "1.250", "2.00", "tasks_without_consumer", "version v1"):
        assert expected in text, expected


# ----------------------------------------------------------------------------- real broker


def _publish_tasks(conn: Connection, names: JobNames, n: int) -> None:
    now = time.time()
    for _ in range(n):
        task = Task(job=names.job, task_id=uuid.uuid4().hex[:16], version=0, epochs=1, batch_size=8, lr=0.1,
                    issued_at=now, deadline=now + 60)
        conn.publish(names.tasks_exchange, "task", task.encode(), message_id=task.task_id)


def test_snapshots_follow_queue_depths_of_a_running_job(broker_url: str, job: str) -> None:
    names = JobNames(job)
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig(buffer_size=2))
    template = {k: v for k, v in v0.weights.items()}
    with Connection(broker_url, name="fedmq-test-coordinator").open() as coord, \
            Monitor(broker_url, job, limits=Thresholds(stall_seconds=600)) as mon:
        emit(coord, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={})
        _publish_tasks(coord, names, 3)
        snap = mon.snapshot().to_dict()
        assert snap["status"] == "running"
        assert (snap["queues"]["tasks"]["messages"], snap["queues"]["tasks"]["consumers"]) == (3, 0)
        assert snap["latest_version"] == 0
        assert {"tasks_without_consumer", "no_active_aggregator"} <= {a["code"] for a in snap["alerts"]}

        # a worker takes one task (prefetch 1): ready drops to 2, one consumer
        worker = Connection(broker_url, name="fedmq-test-worker").open()
        try:
            worker.consume(names.tasks, lambda d: None, prefetch=1)

            def tasks_queue() -> tuple[int, int]:
                worker.process(0.05)
                q = mon.snapshot().to_dict()["queues"]["tasks"]
                return q["messages"], q["consumers"]

            wait_until(lambda: tasks_queue() == (2, 1), 20, "tasks ready 2, consumers 1")
            assert tasks_queue() == (2, 1)
        finally:
            worker.close()

        publish_updates(broker_url, job, [make_update(job, f"u{i}", template, site=f"site-{i}", seed=i)
                                          for i in range(2)])
        assert mon.snapshot().to_dict()["queues"]["updates"]["messages"] == 2

        with running_aggregator(broker_url, job, name="agg-under-test"):
            wait_for_version(broker_url, job, 1, timeout=60)
            snap = wait_until(lambda: (s := mon.snapshot().to_dict())["active_aggregator"] and s, 20,
                              "the monitor to see the active aggregator", poll=0.2)
            assert snap["queues"]["updates"]["messages"] == 0
            assert snap["queues"]["updates"]["consumers"] == 1
            assert snap["active_aggregator"] == "agg-under-test"
            assert snap["latest_version"] == 1
            assert set(snap["sites"]) == {"site-0", "site-1"}
            assert all(row["applied"] == 1 and row["mean_staleness"] == 0 for row in snap["sites"].values())
            assert "no_active_aggregator" not in {a["code"] for a in snap["alerts"]}

        # the coordinator ends the job: tasks and updates queues are deleted
        emit(coord, names, "coordinator", EventKind.JOB_FINISHING, reason="max_versions")
        coord.delete_queue(names.tasks)
        coord.delete_queue(names.updates)
        emit(coord, names, "coordinator", EventKind.JOB_FINISHED, stop_reason="max_versions")
        snap = mon.snapshot().to_dict()
    assert snap["status"] == "finished"
    assert snap["queues"]["tasks"]["exists"] is False and snap["queues"]["updates"]["exists"] is False
    assert snap["queues"]["dead"]["exists"] is True
    assert [a["code"] for a in snap["alerts"]] == ["job_finished"]


def test_once_json_prints_one_snapshot_with_the_design_fields(broker_url: str, job: str) -> None:
    names = JobNames(job)
    declare_job_with_v0(broker_url, job, StrategyConfig())
    with Connection(broker_url, name="fedmq-test-coordinator").open() as conn:
        emit(conn, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={})
        _publish_tasks(conn, names, 4)
    res = run_fedmq("monitor", "--broker", broker_url, "--job", job, "--once", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"job", "queues", "latest_version", "sites"} <= set(snap)
    assert snap["job"] == job
    assert snap["queues"]["tasks"]["messages"] == 4
    assert snap["queues"]["updates"]["consumers"] == 0


@pytest.mark.broker
def test_the_roster_comes_from_the_signing_registry_and_expect_sites(broker_url: str, job: str) -> None:
    declare_job_with_v0(broker_url, job, StrategyConfig(), meta={META_REGISTRY: {"site-a": "k", "site-b": "k"}})
    out = run_fedmq("monitor", "--broker", broker_url, "--job", job, "--once", "--json", "--expect-sites",
                    "site-z, site-a")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout.strip().splitlines()[-1])
    assert snap["roster"] == ["site-a", "site-b", "site-z"]
    bad = run_fedmq("monitor", "--broker", broker_url, "--job", job, "--once", "--expect-sites", "a b")
    assert bad.returncode == 2 and "--expect-sites" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_job_exits_4_with_one_line(broker_url: str) -> None:
    res = run_fedmq("monitor", "--broker", broker_url, "--job", f"absent-{uuid.uuid4().hex[:8]}", "--once",
                    "--json", timeout=60)
    assert res.returncode == 4
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "not found" in res.stderr
