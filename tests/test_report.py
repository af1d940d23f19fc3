"""`fedmq report`: plots and an HTML page from a job's streams alone, with the right number of
points per plot; dead letters counted from the dead-letter stream, broker-parked ones included."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from fedmq.report import collect, fold, write_report
from fedmq.shared.broker import REASON_HEADER, UPDATE_ID_HEADER, Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.jobstate import emit, emit_site
from fedmq.shared.messages import Event, EventKind
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0

pytestmark = pytest.mark.timeout(120)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("clinic-a", "clinic-b", "lab-c")


def _simulate_job(url: str, job: str) -> dict[str, int]:
    """A small finished job written to the real streams: what each plot must then show."""
    names = JobNames(job)
    declare_job_with_v0(url, job, StrategyConfig(buffer_size=2))
    published, staleness, evaluated = 0, 0, 0
    with Connection(url, name="fedmq-test-writer").open() as conn:
        emit(conn, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={"buffer_size": 2})
        emit(conn, names, "coordinator", EventKind.VERSION_EVALUATED, version=0, accuracy=0.1, t=0.5)
        evaluated += 1
        for v in range(1, 6):
            ids, sites = [], []
            for k in range(2):
                site = SITES[(v + k) % len(SITES)]
                uid = f"u-{v}-{k}"
                emit_site(conn, names, site, EventKind.UPDATE_PUBLISHED, update_id=uid, base_version=v - 1,
                          task_seconds=0.5 + k, num_samples=10)
                ids.append(uid)
                sites.append(site)
                published += 1
            # a redelivered task publishes the same update id again: counted once
            emit_site(conn, names, sites[0], EventKind.UPDATE_PUBLISHED, update_id=ids[0],
                      base_version=v - 1, task_seconds=0.5)
            emit(conn, names, "aggregator", EventKind.VERSION_PUBLISHED, version=v, parent=v - 1, included=ids,
                 sites=sites, staleness=[0, v % 3])
            staleness += 2
            emit(conn, names, "coordinator", EventKind.VERSION_EVALUATED, version=v, accuracy=0.1 + 0.15 * v, t=v)
            evaluated += 1
        # the sites' reports on the last version: two federated metrics, one point each
        emit(conn, names, "coordinator", EventKind.VERSION_EVALUATED, version=5, t=5.5, scope="federated",
             metrics={"auc": 0.9, "f1": 0.8}, sites=2, samples=40)
        emit_site(conn, names, "lab-c", EventKind.UPDATE_PUBLISHED, update_id="u-late", base_version=5,
                  task_seconds=1.0)  # never folded: the job ended first
        published += 1
        for reason in ("norm_bound", "norm_bound", "stale"):
            conn.publish(names.dead_exchange, "lab-c", b"x", headers={REASON_HEADER: reason,
                                                                      UPDATE_ID_HEADER: uuid.uuid4().hex})
        conn.publish(names.dead_exchange, "task", b"y", headers={"x-first-death-reason": "delivery_limit"})
        emit(conn, names, "coordinator", EventKind.JOB_FINISHED, stop_reason="max_versions", wall_seconds=6.0,
             seconds_to_target=None)
    # central events carry accuracy only: one metric series of `evaluated` points, plus the two federated
    return {"accuracy_time": evaluated, "accuracy_version": evaluated, "metrics": evaluated + 2,
            "staleness": staleness,
            "sites": len(SITES), "timeline": published, "dead_letters": 4}


def test_report_writes_every_plot_with_the_points_the_streams_hold(broker_url: str, job: str,
                                                                    tmp_path: Path) -> None:
    expected = _simulate_job(broker_url, job)
    result = write_report(collect(broker_url, job), tmp_path / "r")
    assert {n: p.points for n, p in result.plots.items()} == expected
    for name in expected:
        png = (tmp_path / "r" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
    page = result.html.read_text()
    assert all(f'src="{name}.png"' in page for name in expected)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["summary"]["updates_published"] == expected["timeline"]
    assert data["summary"]["updates_applied"] == 10
    assert data["summary"]["updates_dead_lettered"] == 4
    assert data["plots"]["dead_letters"]["series"] == {"reason": ["delivery_limit", "norm_bound", "stale"],
                                                       "count": [1, 2, 1]}
    timeline = data["plots"]["timeline"]["series"]
    assert len(timeline["site"]) == expected["timeline"]
    assert timeline["applied"].count(False) == 1
    assert data["plots"]["accuracy_version"]["series"]["version"] == list(range(6))


def test_report_cli_prints_one_json_object_naming_the_files(broker_url: str, job: str, tmp_path: Path) -> None:
    expected = _simulate_job(broker_url, job)
    res = run_fedmq("report", "--broker", broker_url, "--job", job, "--out", str(tmp_path / "out"), "--json",
                    timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["job"] == job and Path(out["html"]).is_file()
    assert {n: p["points"] for n, p in out["plots"].items()} == expected
    assert all(Path(p["file"]).stat().st_size > 0 for p in out["plots"].values())


def test_report_of_an_unknown_job_exits_4(broker_url: str, tmp_path: Path) -> None:
    res = run_fedmq("report", "--broker", broker_url, "--job", f"absent-{uuid.uuid4().hex[:8]}", "--out",
                    str(tmp_path), timeout=60)
    assert res.returncode == 4 and "not found" in res.stderr


def test_fold_counts_a_redelivered_update_once_and_keeps_the_first_publish() -> None:
    t = time.time()
    events = [Event(job="j", event=EventKind.UPDATE_PUBLISHED, source="s", ts=t + i,
                    data={"update_id": "u1", "site": "s", "task_seconds": 1.0 + i}) for i in range(3)]
    data = fold("j", events)
    assert len(data.updates) == 1 and data.updates["u1"].ts == t and data.updates["u1"].seconds == 1.0


def test_a_report_of_1000_sites_and_1000_versions_draws_40_sites_and_keeps_all_in_json(tmp_path: Path) -> None:
    from fedmq.report import MAX_SITES_DRAWN

    t = time.time()
    events = [Event(job="j", event=EventKind.JOB_STARTED, source="coordinator", ts=t, data={"strategy": "fedbuff"})]
    for i in range(3000):  # 3 updates per site, more from low site numbers
        site = f"site-{(i * i) % 1000}"
        events.append(Event(job="j", event=EventKind.UPDATE_PUBLISHED, source=site, ts=t + i * 0.01,
                            data={"update_id": f"u{i}", "site": site, "task_seconds": 0.5, "base_version": i // 3}))
        if i % 3 == 2:
            v = i // 3 + 1
            events.append(Event(job="j", event=EventKind.VERSION_PUBLISHED, source="aggregator", ts=t + i * 0.01,
                                data={"version": v, "included": [f"u{i - 2}", f"u{i - 1}", f"u{i}"],
                                      "sites": [f"site-{((i - k) ** 2) % 1000}" for k in (2, 1, 0)],
                                      "staleness": [0, 1, 2]}))
            events.append(Event(job="j", event=EventKind.VERSION_EVALUATED, source="coordinator", ts=t + i * 0.01,
                                data={"version": v, "t": i * 0.01, "accuracy": min(0.99, v / 1000)}))
    data = fold("j", events)
    assert len(data.sites()) > MAX_SITES_DRAWN and data.versions == 1000
    started = time.perf_counter()
    result = write_report(data, tmp_path / "out")
    assert time.perf_counter() - started < 120
    sites = result.plots["sites"]
    assert f"the {MAX_SITES_DRAWN // 2} that published most" in sites.caption
    assert len(sites.series["site"]) == len(data.sites())  # report.json keeps every site
    assert "report.json has them all" in result.plots["timeline"].caption
    assert all((tmp_path / "out" / f"{name}.png").stat().st_size > 0 for name in result.plots)


def test_without_matplotlib_the_report_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    import sys

    from fedmq.shared.errors import ConfigError

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as in the site image: import fails
    with pytest.raises(ConfigError, match="needs matplotlib"):
        write_report(fold("j", []), tmp_path / "out")
