"""Replay of CKKS versions, without a broker: versions made by the real ciphertext accumulator and
key holder code, then checked with the public context alone and with the secret context."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.he import CiphertextAccumulator, JobKeys, check_ciphertext
from fedmq.aggregator.keyholder import decrypt_aggregate
from fedmq.replay import HeKeys, Status, check_version
from fedmq.shared import he
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import EncryptedAggregate, ModelVersion, Update, make_version
from fedmq.shared.models import build_model, get_weights, model_spec

JOB = "job-he"
CFG = StrategyConfig(buffer_size=2)
SLOTS = 4096


@pytest.fixture(scope="module")
def pair() -> he.KeyPair:
    return he.generate()


def _root(pair: he.KeyPair) -> ModelVersion:
    spec = model_spec("logreg", (64,), 10)
    meta = {he.META_ENCRYPTION: he.encryption_meta(pair.public), he.META_PUBLIC_CONTEXT: pair.public}
    return make_version(job=JOB, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                        included=[], strategy="fedbuff", params=CFG.to_params(), model=spec, meta=meta)


def _encrypted(pair: he.KeyPair, v0: ModelVersion, uid: str, seed: int, site: str = "site-0") -> Update:
    rng = np.random.default_rng(seed)
    delta = {k: (0.01 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in v0.weights.items()}
    plain = Update(job=JOB, update_id=uid, task_id=uid, site=site, base_version=0, num_samples=10 + seed,
                   delta=delta)
    return he.encrypt_update(plain, he.load_public(pair.public), pair.sha256, SLOTS)


def _version(pair: he.KeyPair, v0: ModelVersion, ups: list[Update]) -> ModelVersion:
    """What the HE aggregator session and the key holder do for one version."""
    keys = JobKeys.of(he.load_public(pair.public), pair.sha256, SLOTS, he.Layout.of(v0.weights))
    acc = CiphertextAccumulator(CFG)
    for u in ups:
        acc.fold(update_id=u.update_id, site=u.site, vectors=check_ciphertext(u, keys), tau=0,
                 num_samples=u.num_samples, base_version=0)
    total = acc.flush()
    agg = EncryptedAggregate(job=JOB, aggregate_id="agg-v1", version=1, parent=0,
                             included=tuple(c["update_id"] for c in total.contributions),
                             contributions=tuple(total.contributions), strategy="fedbuff", params=CFG.to_params(),
                             denominator=total.denominator, sample_ref=total.sample_ref,
                             context_sha256=pair.sha256, size=keys.layout.size, chunks=tuple(total.chunks),
                             ciphertext_sha256=total.sha256)
    secret, _ = he.load_secret(pair.secret)
    return decrypt_aggregate(secret, v0, agg)


def test_an_encrypted_version_is_recomputed_up_to_the_decryption_with_the_public_context(pair: he.KeyPair) -> None:
    v0 = _root(pair)
    ups = [_encrypted(pair, v0, "e1", 1), _encrypted(pair, v0, "e2", 2, site="site-1")]
    v1 = _version(pair, v0, ups)
    check = check_version(v0, v1, {u.update_id: [u] for u in ups},
                          he_keys=HeKeys(he.load_public(pair.public))).check
    assert check.status is Status.CHAIN_ONLY, check.detail
    assert "recomputed bit for bit" in check.detail and "--secret" in check.detail


def test_with_the_secret_context_an_encrypted_version_is_verified_bit_for_bit(pair: he.KeyPair) -> None:
    v0 = _root(pair)
    ups = [_encrypted(pair, v0, "e1", 1), _encrypted(pair, v0, "e2", 2)]
    v1 = _version(pair, v0, ups)
    secret, _ = he.load_secret(pair.secret)
    check = check_version(v0, v1, {u.update_id: [u] for u in ups},
                          he_keys=HeKeys(he.load_public(pair.public), secret)).check
    assert check.status is Status.OK, check.detail


def test_a_ciphertext_swapped_after_aggregation_is_a_mismatch(pair: he.KeyPair) -> None:
    v0 = _root(pair)
    ups = [_encrypted(pair, v0, "e1", 1), _encrypted(pair, v0, "e2", 2)]
    v1 = _version(pair, v0, ups)
    # the same delta encrypted again: valid, same metadata, different ciphertext than the one summed
    again = _encrypted(pair, v0, "e2", 2)
    assert again.ciphertext != ups[1].ciphertext
    check = check_version(v0, v1, {"e1": [ups[0]], "e2": [again]},
                          he_keys=HeKeys(he.load_public(pair.public))).check
    assert check.status is Status.MISMATCH and "encrypted sum" in check.detail


def test_without_the_public_context_replay_says_it_checked_the_chain_only(pair: he.KeyPair) -> None:
    v0 = _root(pair)
    ups = [_encrypted(pair, v0, "e1", 1), _encrypted(pair, v0, "e2", 2)]
    v1 = _version(pair, v0, ups)
    check = check_version(v0, v1, {u.update_id: [u] for u in ups}).check
    assert check.status is Status.CHAIN_ONLY and "not recomputed" in check.detail
    lying = dataclasses.replace(v1, contributions=tuple({**c, "num_samples": 999} for c in v1.contributions))
    assert check_version(v0, lying, {u.update_id: [u] for u in ups}).check.status is Status.MISMATCH


# ------------------------------------------------------------------ a real encrypted job


@pytest.mark.broker
@pytest.mark.timeout(240)
@pytest.mark.parametrize("part_bytes", ["", "65536"], ids=["whole", "in-parts"])
def test_replay_of_an_encrypted_job_from_the_cli_with_and_without_the_secret(
        broker_url: str, job: str, pair: he.KeyPair, tmp_path: Path, part_bytes: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In parts: each ciphertext update and aggregate crosses the broker as parts."""
    monkeypatch.setenv("FEDMQ_PART_BYTES", part_bytes)
    import threading

    from fedmq.aggregator.keyholder import KeyHolder
    from fedmq.shared.broker import Connection, JobNames, TopologyConfig
    from tests.conftest import run_fedmq
    from tests.jobkit import make_update, publish_updates, running_aggregator, wait_for_version

    names = JobNames(job)
    v0 = dataclasses.replace(_root(pair), job=job)
    with Connection(broker_url, name="fedmq-test-setup").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.declare_encrypted(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode())
    public = he.load_public(pair.public)
    ups = [he.encrypt_update(make_update(job, f"u{i}", v0.weights, seed=i, num_samples=10 + i), public,
                             pair.sha256, SLOTS) for i in range(4)]
    stop = threading.Event()
    holder = KeyHolder(broker_url, job, pair.secret, stop=stop, name="keyholder-test")
    t = threading.Thread(target=holder.run, daemon=True)
    t.start()
    try:
        with running_aggregator(broker_url, job):
            publish_updates(broker_url, job, ups[:2])
            wait_for_version(broker_url, job, 1)
            publish_updates(broker_url, job, ups[2:])
            wait_for_version(broker_url, job, 2)
    finally:
        stop.set()
        t.join(30)

    res = run_fedmq("replay", "--broker", broker_url, "--job", job, "--json", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [v["status"] for v in out["versions"]] == ["root", "chain_only", "chain_only"]
    assert out["mismatches"] == 0 and out["versions_chain_only"] == 2
    secret_file = tmp_path / "job.secret.ctx"
    secret_file.write_bytes(pair.secret)
    res = run_fedmq("replay", "--broker", broker_url, "--job", job, "--secret", str(secret_file), "--json",
                    timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [v["status"] for v in out["versions"]] == ["root", "ok", "ok"]
