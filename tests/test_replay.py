"""`fedmq replay`, `history` and `export` on a real broker.

One job is built by the real aggregator (on a thread) and then audited; other jobs are written by
hand onto the streams, the way a forger or a retention policy would leave them."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator.strategy import Accumulator
from fedmq.export import export_version
from fedmq.history import read_history, stream_tail
from fedmq.replay import Status, replay
from fedmq.shared.broker import Connection, JobNames, Retention, TopologyConfig
from fedmq.shared.codec import weights_sha256
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import JobNotFoundError
from fedmq.shared.messages import BASE_SCHEMA, FRAMED_SCHEMA, ModelVersion, Update, make_version
from fedmq.shared.models import build_model, get_weights, model_spec
from fedmq.shared.signing import META_REGISTRY, public_hex, sign_update
from tests.conftest import run_fedmq
from tests.jobkit import (
    declare_job_with_v0,
    make_update,
    publish_raw,
    publish_updates,
    running_aggregator,
    wait_for_version,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

CFG = StrategyConfig(buffer_size=2, flush_timeout=120.0)


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ a job built by the aggregator


@pytest.fixture(scope="module")
def aggregated_job(broker_url: str) -> Iterator[str]:
    """Three versions of two updates each (one stale), plus one dead-lettered update."""
    job = f"t-replay-{uuid.uuid4().hex[:8]}"
    try:
        v0 = declare_job_with_v0(broker_url, job, CFG)
        with running_aggregator(broker_url, job):
            publish_updates(broker_url, job, [make_update(job, "u1", v0.weights, seed=1, num_samples=30),
                                              make_update(job, "u2", v0.weights, site="site-1", seed=2)])
            wait_for_version(broker_url, job, 1)
            bad = make_update(job, "bad", {"other": np.zeros(3, np.float32)}, site="site-1", seed=9)
            publish_updates(broker_url, job, [bad, make_update(job, "u3", v0.weights, seed=3),
                                              make_update(job, "u4", v0.weights, base_version=1, seed=4)])
            wait_for_version(broker_url, job, 2)
            publish_updates(broker_url, job, [
                make_update(job, "u5", v0.weights, base_version=1, site="site-1", seed=5, num_samples=3),
                make_update(job, "u6", v0.weights, base_version=2, seed=6)])
            wait_for_version(broker_url, job, 3)
        yield job
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def test_replay_of_a_job_built_by_the_aggregator_has_no_mismatch(broker_url: str, aggregated_job: str) -> None:
    report = replay(broker_url, aggregated_job)
    assert [c.status for c in report.checks] == [Status.ROOT, Status.OK, Status.OK, Status.OK]
    d = report.to_dict()
    assert (d["mismatches"], d["first_mismatch"], d["versions_checked"]) == (0, None, 4)
    assert d["updates_replayed"] == 6 and d["truncated"] is False


def test_replay_cli_prints_the_json_contract_and_exits_0(broker_url: str, aggregated_job: str) -> None:
    res = run_fedmq("replay", "--broker", broker_url, "--job", aggregated_job, "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    out = _last_json(res.stdout)
    assert {"job", "versions_checked", "mismatches", "first_mismatch"} <= set(out)
    assert out["job"] == aggregated_job and out["mismatches"] == 0 and out["first_mismatch"] is None


def test_history_lists_versions_updates_and_dead_letters_with_reasons(broker_url: str,
                                                                      aggregated_job: str) -> None:
    res = run_fedmq("history", "--broker", broker_url, "--job", aggregated_job, "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    out = _last_json(res.stdout)
    assert [v["version"] for v in out["versions"]] == [0, 1, 2, 3]
    assert {"version", "parent", "included", "sha256"} <= set(out["versions"][0])
    assert [uid for v in out["versions"] for uid in v["included"]] == ["u1", "u2", "u3", "u4", "u5", "u6"]
    v2 = out["versions"][2]["contributions"]
    assert [(c["update_id"], c["base_version"], c["staleness"]) for c in v2] == [("u3", 0, 1), ("u4", 1, 0)]
    assert {"update_id": "bad", "reason": "shape_mismatch"}.items() <= out["dead_letters"][0].items()
    assert sorted(out["updates_logged"]) == ["bad", "u1", "u2", "u3", "u4", "u5", "u6"]
    assert out["sites"]["site-1"]["updates_included"] == 2 and out["sites"]["site-1"]["dead_lettered"] == 1
    assert out["sites"]["site-0"]["samples_included"] == 30 + 10 + 10 + 10


def test_export_writes_a_state_dict_that_hashes_like_the_version(broker_url: str, aggregated_job: str,
                                                                 tmp_path: Path) -> None:
    done = export_version(broker_url, aggregated_job, 2, tmp_path / "model.pt")
    state = torch.load(done.path)
    assert weights_sha256({k: v.numpy() for k, v in state.items()}) == done.sha256
    meta = json.loads(done.meta_path.read_text())
    assert meta["version"] == 2 and meta["sha256"] == done.sha256
    build_model(meta["model"]).load_state_dict(state)  # fits the model the version names


def test_what_if_replay_evaluates_both_curves_and_publishes_nothing(broker_url: str, aggregated_job: str,
                                                                    tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    test = tmp_path / "test.npz"
    np.savez(test, x=rng.normal(size=(50, 64)).astype(np.float32), y=rng.integers(0, 10, 50))
    names = JobNames(aggregated_job)
    tails = [stream_tail(broker_url, s) for s in (names.models, names.events, names.updates_log)]
    res = run_fedmq("replay", "--broker", broker_url, "--job", aggregated_job, "--strategy", "fedasync",
                    "--param", "alpha=0.5", "--test", str(test), "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    out = _last_json(res.stdout)
    assert out["what_if"]["strategy"] == "fedasync" and out["what_if"]["params"]["alpha"] == 0.5
    assert [p["version"] for p in out["original"]["curve"]] == [0, 1, 2, 3]
    assert [p["updates"] for p in out["what_if"]["curve"]] == [0, 1, 2, 3, 4, 5, 6]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in out["what_if"]["curve"])
    assert [stream_tail(broker_url, s) for s in (names.models, names.events, names.updates_log)] == tails
    human = run_fedmq("replay", "--broker", broker_url, "--job", aggregated_job, "--strategy", "fedasync",
                      "--test", str(test), timeout=120)
    assert human.returncode == 0 and "what-if" in human.stdout and "final accuracy" in human.stdout


def test_what_if_without_test_data_is_a_usage_error(broker_url: str, aggregated_job: str) -> None:
    res = run_fedmq("replay", "--broker", broker_url, "--job", aggregated_job, "--strategy", "fedasync")
    assert res.returncode == 2 and "--test" in res.stderr


# ------------------------------------------------------------------ hand-written histories


def _declare(url: str, job: str, retention: Retention | None = None) -> ModelVersion:
    names = JobNames(job)
    spec = model_spec("logreg", (64,), 10)
    v0 = make_version(job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                      included=[], strategy=CFG.name.value, params=CFG.to_params(), model=spec)
    with Connection(url, name="fedmq-test-setup").open() as conn:
        conn.declare_job(names, TopologyConfig(retention=retention or Retention()))
        conn.publish(names.models_exchange, "", v0.encode())
    return v0


def _next(parent: ModelVersion, updates: Sequence[Update], *, forge: float = 1.0,
          extra_ids: Sequence[str] = ()) -> ModelVersion:
    """The aggregator's flush; `forge` scales the first delta, `extra_ids` claims unlogged updates."""
    acc = Accumulator(CFG)
    for i, u in enumerate(updates):
        assert u.delta is not None
        delta = {k: v * np.float32(forge) for k, v in u.delta.items()} if i == 0 else u.delta
        acc.fold(update_id=u.update_id, site=u.site, delta=delta, tau=parent.version - u.base_version,
                 num_samples=u.num_samples, base_version=u.base_version)
    weights, contributions = acc.flush(parent.weights)
    return make_version(job=parent.job, version=parent.version + 1, parent=parent.version, weights=weights,
                        included=[*(c.update_id for c in contributions), *extra_ids], strategy=parent.strategy,
                        params=parent.params, model=parent.model,
                        contributions=[c.to_dict() for c in contributions])


def _write(url: str, job: str, v0: ModelVersion, n: int, *, forge_at: int = -1,
           unlogged_at: int = -1) -> list[ModelVersion]:
    names = JobNames(job)
    chain = [v0]
    with Connection(url, name="fedmq-test-writer").open() as conn:
        for v in range(1, n + 1):
            ups = [make_update(job, f"u{v}a", v0.weights, base_version=v - 1, seed=2 * v),
                   make_update(job, f"u{v}b", v0.weights, base_version=max(v - 2, 0), site="site-1",
                               seed=2 * v + 1)]
            for u in ups:
                conn.publish(names.updates_exchange, u.site, u.encode())
            mv = _next(chain[-1], ups, forge=1.5 if v == forge_at else 1.0,
                       extra_ids=["ghost"] if v == unlogged_at else ())
            conn.publish(names.models_exchange, "", mv.encode())
            chain.append(mv)
    return chain


def test_a_job_the_previous_release_wrote_replays_and_resumes_framed(broker_url: str, job: str) -> None:
    """v0-v2 and their signed updates in the previous release's map form (schema 1, signed over
    the whole map), v3-v4 framed as this release writes when it resumes the job: replay reads both
    forms, verifies every signature against v0's registry and recomputes every version; a map-form
    update altered after signing is caught like a framed one."""
    names = JobNames(job)
    keys = {s: Ed25519PrivateKey.generate() for s in ("site-0", "site-1")}
    spec = model_spec("logreg", (64,), 10)
    v0 = dataclasses.replace(make_version(
        job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)), included=[],
        strategy=CFG.name.value, params=CFG.to_params(), model=spec,
        meta={META_REGISTRY: {s: public_hex(k) for s, k in keys.items()}}), schema=BASE_SCHEMA)
    chain, forms = [v0], []
    with Connection(broker_url, name="fedmq-test-writer").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode())
        for v in range(1, 5):
            schema = BASE_SCHEMA if v <= 2 else FRAMED_SCHEMA
            ups = [sign_update(dataclasses.replace(make_update(job, f"u{v}{s[-1]}", v0.weights, base_version=v - 1,
                                                               site=s, seed=10 * v + i), schema=schema), keys[s])
                   for i, s in enumerate(keys)]
            for u in ups:
                conn.publish(names.updates_exchange, u.site, u.encode())
                forms.append(u.encode()[:1])
            mv = dataclasses.replace(_next(chain[-1], ups), schema=schema, meta=v0.meta)  # the registry, forward
            conn.publish(names.models_exchange, "", mv.encode())
            chain.append(mv)
        # a map-form update altered after signing, then a version that includes it
        tampered = dataclasses.replace(ups[0], update_id="u5x", task_id="u5x", num_samples=999)
        tampered = dataclasses.replace(sign_update(dataclasses.replace(
            tampered, schema=BASE_SCHEMA, num_samples=1), keys["site-0"]), num_samples=999)
        conn.publish(names.updates_exchange, tampered.site, tampered.encode())
        v5 = dataclasses.replace(_next(chain[-1], [tampered]), meta=v0.meta)
        conn.publish(names.models_exchange, "", v5.encode())
    assert [f == b"\xc1" for f in forms] == [False] * 4 + [True] * 4  # the two forms, in that order
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT] + [Status.OK] * 4 + [Status.MISMATCH], \
        report.to_dict()
    assert "bad_signature" in report.checks[-1].detail
    assert report.to_dict()["updates_replayed"] >= 8


def test_a_forged_version_is_the_first_mismatch_and_replay_exits_1(broker_url: str, job: str) -> None:
    v0 = _declare(broker_url, job)
    _write(broker_url, job, v0, 4, forge_at=2)
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT, Status.OK, Status.MISMATCH, Status.OK, Status.OK]
    assert report.to_dict()["first_mismatch"] == 2 and report.to_dict()["mismatches"] == 1
    res = run_fedmq("replay", "--broker", broker_url, "--job", job, "--json", timeout=120)
    assert res.returncode == 1
    assert _last_json(res.stdout)["first_mismatch"] == 2
    human = run_fedmq("replay", "--broker", broker_url, "--job", job, timeout=120)
    assert human.returncode == 1 and "first at v2" in human.stdout


def test_an_included_update_missing_from_the_log_is_reported(broker_url: str, job: str) -> None:
    v0 = _declare(broker_url, job)
    _write(broker_url, job, v0, 3, unlogged_at=3)
    report = replay(broker_url, job)
    last = report.checks[-1]
    assert last.status is Status.MISMATCH and last.missing_updates == ("ghost",)
    assert "not in the updates log" in last.detail and report.to_dict()["first_mismatch"] == 3


def test_truncated_history_says_from_which_version_it_can_still_verify(broker_url: str, job: str) -> None:
    # ~2.7 kB per model or update: 30 versions are far more than 60 kB of retained stream
    v0 = _declare(broker_url, job, Retention(max_bytes=60_000))
    chain = _write(broker_url, job, v0, 30)
    report = replay(broker_url, job)
    d = report.to_dict()
    assert d["truncated"] is True and d["mismatches"] == 0
    assert d["first_version"] > 0 and d["verifiable_from"] is not None
    assert d["verifiable_from"] >= d["first_version"]
    assert all(c.status is Status.TRUNCATED for c in report.checks if c.version < d["verifiable_from"])
    assert all(c.status is Status.OK for c in report.checks if c.version >= d["verifiable_from"])
    assert report.checks[-1].version == chain[-1].version
    hist = read_history(broker_url, job)
    assert hist.truncated and hist.versions[0].version == d["first_version"]
    with pytest.raises(JobNotFoundError, match="retention"):
        export_version(broker_url, job, 0, Path("/tmp/never-written.pt"))
    human = run_fedmq("replay", "--broker", broker_url, "--job", job, timeout=120)
    assert human.returncode == 0 and f"verifiable from v{d['verifiable_from']}" in human.stdout


def test_history_reads_the_brokers_own_delivery_limit_dead_letters(broker_url: str, job: str) -> None:
    v0 = _declare(broker_url, job)
    poison = make_update(job, "poison", v0.weights, site="site-3")
    headers = {"x-death": [{"reason": "delivery_limit", "queue": JobNames(job).updates, "count": 1}],
               "x-first-death-reason": "delivery_limit"}
    with Connection(broker_url, name="fedmq-test-dead").open() as conn:
        conn.publish(JobNames(job).dead_exchange, "site-3", poison.encode(), headers=headers)
    publish_raw(broker_url, job, b"\x01 not msgpack", site="site-3")  # logged, unreadable
    hist = read_history(broker_url, job)
    assert [(d.update_id, d.reason, d.site) for d in hist.dead_letters] == [("poison", "delivery_limit", "site-3")]
    assert hist.unreadable_updates == 1


def test_replay_of_an_unknown_job_exits_4(broker_url: str) -> None:
    res = run_fedmq("replay", "--broker", broker_url, "--job", f"t-none-{uuid.uuid4().hex[:6]}", timeout=60)
    assert res.returncode == 4, res.stderr


def test_a_fork_and_a_republished_version_are_reported_without_mismatch(broker_url: str, job: str) -> None:
    """Two replicas briefly active: two different v2 entries share an update id; v3 builds on the first."""
    v0 = _declare(broker_url, job)
    names = JobNames(job)
    u = {n: make_update(job, n, v0.weights, base_version=b, seed=i)
         for i, (n, b) in enumerate([("u1a", 0), ("u1b", 0), ("u2a", 1), ("u2b", 1), ("u2c", 1),
                                     ("u3a", 2), ("u3b", 2)])}
    v1 = _next(v0, [u["u1a"], u["u1b"]])
    v2a = _next(v1, [u["u2a"], u["u2b"]])
    v2b = _next(v1, [u["u2a"], u["u2c"]])
    v3 = _next(v2a, [u["u3a"], u["u3b"]])
    with Connection(broker_url, name="fedmq-test-writer").open() as conn:
        for upd in u.values():
            conn.publish(names.updates_exchange, upd.site, upd.encode())
        for mv in (v1, v1, v2a, v2b, v3):  # v1 twice: a republish after a lost confirm
            conn.publish(names.models_exchange, "", mv.encode())
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT, Status.OK, Status.DUPLICATE, Status.OK,
                                                Status.OK, Status.OK]
    d = report.to_dict()
    assert d["forks"] == [2] and d["mismatches"] == 0
    assert "fork" in report.checks[4].detail and v2a.sha256[:16] in report.checks[5].detail
