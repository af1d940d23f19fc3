"""Differential privacy in whole jobs on a real broker: coordinator, aggregator and workers on
threads. A spent site refuses and the others finish the job; central noise replays bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fedmq.aggregator.dp import add_releases, releases_epsilon
from fedmq.coordinator.service import Coordinator, JobResult
from fedmq.history import read_history
from fedmq.replay import replay
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import JobConfig, PrivacyMechanism, load_job_config
from fedmq.shared.datasets import write_partition
from fedmq.shared.messages import Event, EventKind
from fedmq.shared.privacy import NOISE_KEY_ENV, PrivacyLedger, new_spend
from fedmq.worker.service import Worker, WorkerOptions
from tests.jobkit import run_threaded_job, versions

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(400)]

SITES = [f"site-{i}" for i in range(3)]


def _config(job: str, tmp_path: Path, test_file: Path, privacy: dict[str, Any],
            strategy: dict[str, Any] | None = None, max_versions: int = 4) -> JobConfig:
    return load_job_config(overrides={
        "job": job, "data": {"test": str(test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0, **(strategy or {})},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.3},
        "coordinator": {"concurrency": 3, "max_versions": max_versions, "max_seconds": 240,
                        "out": str(tmp_path / "out")},
        "privacy": privacy,
    }, environ={})


def _run_job(url: str, cfg: JobConfig, site_files: list[Path], ledgers: list[Path]) -> tuple[JobResult, list[Worker]]:
    from fedmq.aggregator.service import Aggregator

    coord = Coordinator(url, cfg, stop=threading.Event())
    agg = Aggregator(url, cfg.job, stop=threading.Event(), name="agg-dp")
    workers = [Worker(url, cfg.job, s, f, options=WorkerOptions(device="cpu", ledger=str(led)))
               for s, f, led in zip(SITES, site_files, ledgers, strict=True)]
    result = run_threaded_job(coord, agg, workers)
    return result, workers


def _events(url: str, job: str) -> list[Event]:
    return [Event.decode(d.body) for d in read_stream(url, JobNames(job).events, "first")]


def test_a_site_at_its_budget_refuses_tasks_and_the_job_completes_with_the_others(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 3, scheme="iid", seed=0)
    ledgers = [tmp_path / f"{s}.ledger.json" for s in SITES]
    spent = PrivacyLedger(ledgers[2], "site-2")
    spent.charge(new_spend("earlier-job", "t-old", PrivacyMechanism.DP_SGD, (1.0, 0.2, 400)))
    before = spent.spends()
    cfg = _config(job, tmp_path, part.test_file,
                  {"mechanism": "dp_sgd", "epsilon": 8.0, "noise_multiplier": 1.2, "max_grad_norm": 1.0})

    result, workers = _run_job(broker_url, cfg, part.site_files, ledgers)

    assert result.stop_reason == "max_versions", result
    assert result.final_version >= 4
    events = _events(broker_url, job)
    refused = [e for e in events if e.event == EventKind.TASK_REFUSED]
    assert refused and {e.data["site"] for e in refused} == {"site-2"}
    assert refused[0].data["reason"] == "privacy_budget"
    assert refused[0].data["epsilon"] > 8.0
    published = [e for e in events if e.event == EventKind.UPDATE_PUBLISHED]
    assert {e.data["site"] for e in published} == {"site-0", "site-1"}
    eps = [e.data["epsilon"] for e in published]
    assert all(isinstance(x, float) and 0 < x <= 8.0 for x in eps)
    assert spent.spends() == before  # the refusal charged nothing
    assert workers[2].stats.tasks == 0 and workers[2].stop.is_set()
    # every task a worker trained is in its ledger, and the last reported epsilon is the ledger's
    for site, ledger in zip(SITES[:2], ledgers[:2], strict=True):
        mine = [e for e in published if e.data["site"] == site]
        assert len(PrivacyLedger(ledger, site).spends()) >= len(mine) > 0
    # each version carries the job's epsilon: the worst site's so far
    mvs = versions(broker_url, job)
    assert mvs[-1].meta["dp"]["epsilon"] == pytest.approx(max(eps))
    assert set(mvs[-1].meta["dp"]["site_epsilon"]) <= {"site-0", "site-1"}
    # and `fedmq history` shows both: per version and per site
    hist = read_history(broker_url, job).to_dict()
    assert hist["versions"][-1]["epsilon"] == pytest.approx(max(eps))
    for site in ("site-0", "site-1"):
        reported = [float(e.data["epsilon"]) for e in published if e.data["site"] == site]
        assert hist["sites"][site]["epsilon"] == pytest.approx(max(reported))


def test_central_noise_replays_bit_for_bit_and_the_aggregator_stops_every_site_at_its_budget(
        broker_url: str, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "dp-noise.key"
    key.write_text("5a" * 32)
    monkeypatch.setenv(NOISE_KEY_ENV, str(key))
    part = write_partition(tmp_path / "data", "digits", 3, scheme="iid", seed=1)
    ledgers = [tmp_path / f"{s}.ledger.json" for s in SITES]
    cfg = _config(job, tmp_path, part.test_file,
                  {"mechanism": "dp_fedavg", "noise_at": "aggregator", "epsilon": 6.0, "planned_tasks": 2,
                   "clip_norm": 0.5}, strategy={"sample_weighted": False}, max_versions=50)

    result, _ = _run_job(broker_url, cfg, part.site_files, ledgers)

    # each site affords ~2 releases: then its updates are dead-lettered and, once every site is
    # spent, the coordinator ends the job
    assert result.stop_reason == "privacy_budget", result
    dead = [e for e in _events(broker_url, job) if e.event == EventKind.DEAD_LETTERED]
    assert dead and {e.data["reason"] for e in dead} == {"privacy_budget"}
    mvs = versions(broker_url, job)
    v0, later = mvs[0], mvs[1:]
    assert v0.params["clip_norm"] == 0.5  # the strategy clips at the DP clip
    sigma = v0.meta["privacy"]["noise_multiplier"]
    releases: dict[str, dict[str, int]] = {}
    for mv in later:
        dp = mv.meta["dp"]
        assert dp["noise_std"] == pytest.approx(sigma * 0.5)
        assert {"noise_seed_sealed", "noise_scale"} <= set(dp) and "noise_seed" not in dp  # sealed only
        releases = add_releases(releases, [c["site"] for c in mv.contributions], central=True)
        assert dp["epsilon"] == pytest.approx(max(releases_epsilon(releases, sigma, 1e-5).values()))
    assert 0 < later[-1].meta["dp"]["epsilon"] <= 6.0
    # sites add no noise of their own and spend nothing in their ledgers
    assert all(not p.exists() for p in ledgers)

    report = replay(broker_url, job).to_dict()
    assert report["mismatches"] == 0, report
    assert report["versions_recomputed"] == len(later)

    monkeypatch.setenv(NOISE_KEY_ENV, str(tmp_path / "no-such-key"))
    without_key = replay(broker_url, job).to_dict()
    assert without_key["mismatches"] == 0
    assert without_key["versions_unverifiable"] == len(later)

