"""SIGKILLs at exact points of the privacy paths, with real `fedmq` processes on the shared broker.

* CKKS: the aggregator frozen between an aggregate's confirm and its updates' acks, and the key
  holder frozen between a version's confirm and its aggregate's ack, are SIGKILLed and replaced.
  Every update must end in exactly one aggregate and one version, and every version must decrypt
  to what the plaintext accumulator makes of the same updates and replay bit for bit.
* Central DP-FedAvg: the aggregator is killed after a noised version's confirm; the replica that
  takes over must resume the epsilon account from the stream, so the account in the newest version
  is exactly the releases the models stream holds, and no site is released past its budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.dp import add_releases, releases_epsilon
from fedmq.aggregator.strategy import Accumulator
from fedmq.replay import replay
from fedmq.shared import he
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import PrivacyConfig, StrategyConfig, StrategyName
from fedmq.shared.ledger import read_dead_letter, read_ledger
from fedmq.shared.messages import EncryptedAggregate, ModelVersion, Update
from fedmq.shared.privacy import NOISE_KEY_ENV, resolve_options
from tests.chaos.harness import Fleet, wait_until
from tests.jobkit import declare_encrypted_job, declare_job_with_v0, make_update, publish_updates, versions

pytestmark = [pytest.mark.broker]


@pytest.fixture()
def fleet(broker_url: str, job: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker_url, job, tmp_path / "logs")
    yield f
    f.close()


@pytest.fixture(scope="module")
def pair() -> he.KeyPair:
    return he.generate()


def _aggregates(url: str, names: JobNames) -> list[EncryptedAggregate]:
    return [EncryptedAggregate.decode(d.body) for d in read_stream(url, names.aggregates_log, "first", idle=0.3)]


def _frozen(fleet: Fleet, name: str, what: str, timeout: float = 120) -> None:
    """Wait for `name` to stop itself at its armed point; fail with its log if it dies instead."""
    def check() -> bool:
        assert fleet.alive(name), fleet.tail(name)
        return fleet.state(name) == "T"

    wait_until(check, timeout, what, poll=0.1)


def _plaintext_versions(cfg: StrategyConfig, v0: ModelVersion, plain: list[Update],
                        models: list[ModelVersion]) -> list[dict[str, np.ndarray]]:
    """Each version as the plaintext accumulator computes it from its `included` updates."""
    by_id = {u.update_id: u for u in plain}
    weights = {k: np.asarray(v) for k, v in v0.weights.items()}
    out = []
    for mv in models[1:]:
        acc = Accumulator(cfg)
        for uid in mv.included:
            u = by_id[uid]
            acc.fold(update_id=uid, site=u.site, delta=u.delta or {}, tau=mv.parent - u.base_version,
                     num_samples=u.num_samples, base_version=u.base_version)
        weights = acc.flush(weights)[0]
        out.append(weights)
    return out


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_he_aggregator_and_keyholder_killed_between_confirm_and_ack_lose_and_double_nothing(
        broker_url: str, job: str, tmp_path: Path, fleet: Fleet, pair: he.KeyPair) -> None:
    names = JobNames(job)
    cfg = StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=2, flush_timeout=60.0)
    v0 = declare_encrypted_job(broker_url, job, cfg, pair.public)
    secret = tmp_path / f"{job}.secret.ctx"
    secret.write_bytes(pair.secret)
    secret.chmod(0o600)
    template = {k: np.asarray(v) for k, v in v0.weights.items()}
    plain = [make_update(job, f"u{i}", template, site=f"site-{i % 2}", seed=i, num_samples=10 + i)
             for i in range(4)]
    public = he.load_public(pair.public)
    ups = [he.encrypt_update(u, public, pair.sha256, 4096) for u in plain]

    # the aggregator: aggregate 1 confirmed, u0/u1 not acked -> SIGKILL; the next replica must
    # find both ids in the aggregates log (no key holder has run: the models stream ends at v0)
    arm_agg, arm_kh = tmp_path / "arm-aggregator", tmp_path / "arm-keyholder"
    arm_agg.touch()
    agg_faults = f"aggregator.before_ack=stop:{arm_agg}"
    fleet.start("agg-1", "aggregator", "--name", "agg-1", faults=agg_faults)
    publish_updates(broker_url, job, ups[:2])
    _frozen(fleet, "agg-1", "the aggregator to freeze between aggregate 1's confirm and its acks")
    assert [a.version for a in _aggregates(broker_url, names)] == [1]
    fleet.kill("agg-1")
    fleet.start("agg-2", "aggregator", "--name", "agg-2", faults=agg_faults)
    for uid in ("u0", "u1"):
        wait_until(lambda uid=uid: f"duplicate update dropped job={job} update={uid}" in fleet.log("agg-2"), 120,
                   f"the new replica to drop the redelivered {uid}")
    publish_updates(broker_url, job, ups[2:])
    wait_until(lambda: len(_aggregates(broker_url, names)) >= 2, 120, "aggregate 2")

    # the key holder: version 1 confirmed, aggregate 1 not acked -> SIGKILL; the next one must
    # drop the redelivered aggregate 1 and decrypt aggregate 2 onto the surviving version 1
    arm_kh.touch()
    kh_faults = f"keyholder.before_ack=stop:{arm_kh}"
    fleet.start("kh-1", "keyholder", "--secret", str(secret), "--name", "kh-1", faults=kh_faults)
    _frozen(fleet, "kh-1", "the key holder to freeze between version 1's confirm and its ack")
    assert [m.version for m in versions(broker_url, job)] == [0, 1]
    fleet.kill("kh-1")
    fleet.start("kh-2", "keyholder", "--secret", str(secret), "--name", "kh-2", faults=kh_faults)
    wait_until(lambda: versions(broker_url, job)[-1].version >= 2, 120, "version 2 from the second key holder")
    wait_until(lambda: f"aggregate already decrypted job={job} version=1" in fleet.log("kh-2"), 60,
               "the second key holder to drop the redelivered aggregate 1")

    aggs = _aggregates(broker_url, names)
    assert [(a.version, a.parent, a.included) for a in aggs] == [(1, 0, ("u0", "u1")), (2, 1, ("u2", "u3"))]
    models = versions(broker_url, job)
    assert [(m.version, m.parent, m.included) for m in models] == [
        (0, -1, ()), (1, 0, ("u0", "u1")), (2, 1, ("u2", "u3"))]
    report = read_ledger(broker_url, names).check()
    assert report.ok and report.included == 4 and report.dead_lettered == 0, report.to_dict()
    for mv, expected in zip(models[1:], _plaintext_versions(cfg, v0, plain, models), strict=True):
        for k in expected:
            np.testing.assert_allclose(mv.weights[k], expected[k], atol=1e-6)
    replayed = replay(broker_url, job, secret=str(secret)).to_dict()
    assert replayed["mismatches"] == 0 and replayed["versions_recomputed"] == 2, replayed
    assert not fleet.exited_unexpectedly()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_central_dp_aggregator_killed_mid_job_resumes_the_epsilon_account_of_what_was_released(
        broker_url: str, job: str, tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    names = JobNames(job)
    key = tmp_path / "dp-noise.key"
    key.write_text("3c" * 32)
    monkeypatch.setenv(NOISE_KEY_ENV, str(key))  # the aggregator children inherit it
    privacy = PrivacyConfig.from_options({"mechanism": "dp_fedavg", "noise_at": "aggregator", "epsilon": 4.0,
                                          "planned_tasks": 3, "clip_norm": 0.5})
    options = resolve_options(privacy)  # sigma calibrated so a site affords exactly 3 releases
    cfg = StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=2, flush_timeout=1.0, sample_weighted=False,
                         clip_norm=0.5, max_staleness=100)
    v0 = declare_job_with_v0(broker_url, job, cfg, meta={"privacy": options})
    sites = ["site-a", "site-b", "site-c"]
    ups = [make_update(job, f"u{i}", v0.weights, site=sites[i % 3], seed=i, scale=0.05) for i in range(15)]

    arm = tmp_path / "arm-aggregator"
    faults = f"aggregator.before_ack=stop:{arm}"
    fleet.start("agg-1", "aggregator", "--name", "agg-1", faults=faults)
    publish_updates(broker_url, job, ups[:2])
    wait_until(lambda: versions(broker_url, job)[-1].version >= 1, 120, "version 1")
    arm.touch()  # version 2 is published, then the replica freezes before acking its updates
    publish_updates(broker_url, job, ups[2:4])
    _frozen(fleet, "agg-1", "the aggregator to freeze between version 2's confirm and its acks")
    fleet.kill("agg-1")
    account_at_kill = versions(broker_url, job)[-1].meta["dp"]
    fleet.start("agg-2", "aggregator", "--name", "agg-2", faults=faults)
    publish_updates(broker_url, job, ups[4:])

    def resolved() -> bool:
        r = read_ledger(broker_url, names).check()
        return r.logged == len(ups) and not r.lost

    wait_until(resolved, 180, "every update folded or dead-lettered", poll=0.5)
    report = read_ledger(broker_url, names).check()
    assert report.ok, report.to_dict()
    for uid in (ups[2].update_id, ups[3].update_id):  # redelivered after the kill: dropped, not re-counted
        assert f"duplicate update dropped job={job} update={uid}" in fleet.log("agg-2")

    sigma, delta, budget = float(options["noise_multiplier"]), privacy.delta, privacy.epsilon
    mvs = versions(broker_url, job)
    assert mvs[2].meta["dp"] == account_at_kill
    releases: dict[str, dict[str, int]] = {}
    for mv in mvs[1:]:  # each version's account is its parent's plus its own release, across the kill
        releases = add_releases(releases, [c["site"] for c in mv.contributions], central=True)
        dp = mv.meta["dp"]
        assert dp["releases"] == releases, mv.version
        assert dp["site_epsilon"] == pytest.approx(releases_epsilon(releases, sigma, delta)), mv.version
    final = mvs[-1].meta["dp"]
    assert final["epsilon"] == pytest.approx(max(final["site_epsilon"].values()))
    refused = {dl.ident for d in read_stream(broker_url, names.dead_log, "first", idle=0.3)
               if (dl := read_dead_letter(d)).reason == "privacy_budget"}
    assert refused, "no update was refused: the budget was never reached"
    site_of = {u.update_id: u.site for u in ups}
    for site in sites:
        assert final["site_epsilon"][site] <= budget
        if any(site_of[uid] == site for uid in refused):  # refused only when one more release was too many
            more = add_releases({site: releases[site]}, [site], central=True)
            assert releases_epsilon(more, sigma, delta)[site] > budget, site
    assert sum(len(mv.included) for mv in mvs) + len(refused) == len(ups)
    assert re.search(r"aggregator active job=\S+ replica=agg-2", fleet.log("agg-2"))
    replayed = replay(broker_url, job).to_dict()
    assert replayed["mismatches"] == 0 and replayed["versions_recomputed"] == len(mvs) - 1, replayed
