"""Homomorphic aggregation (CKKS): math without a broker, then the two-hop pipeline on a real one.

What must hold: the aggregator's context cannot decrypt; only ciphertext crosses the updates
queue; an encrypted sum decrypts to what the plaintext accumulator computes; every update is
folded exactly once across aggregator and key-holder crashes; and an encrypted job on digits ends
within 0.3 accuracy points of the same job in plaintext.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
import torch

from fedmq.aggregator.he import (
    CiphertextAccumulator,
    JobKeys,
    check_ciphertext,
    decrypt_step,
    recompute_sum,
)
from fedmq.aggregator.keyholder import KeyHolder
from fedmq.aggregator.strategy import Accumulator
from fedmq.shared import he
from fedmq.shared.broker import Connection, JobNames, read_stream
from fedmq.shared.config import Robust, StalenessFn, StrategyConfig, StrategyName
from fedmq.shared.errors import ConfigError, EncryptionMismatchError, MalformedMessageError, ShapeMismatchError
from fedmq.shared.messages import EncryptedAggregate, Update
from fedmq.shared.models import build_model, evaluate, get_weights, model_spec, set_weights
from tests.chaos.harness import wait_until
from tests.jobkit import (
    declare_encrypted_job,
    make_update,
    publish_updates,
    run_threaded_job,
    running_aggregator,
    versions,
    wait_for_version,
)


@pytest.fixture(scope="module")
def keys() -> he.KeyPair:
    return he.generate()


def _template(seed: int = 0) -> dict[str, np.ndarray]:
    spec = model_spec("mlp", (64,), 10, hidden=32)
    return get_weights(build_model(spec, seed=seed))


def _job_keys(pair: he.KeyPair, template: dict[str, np.ndarray]) -> JobKeys:
    return JobKeys.of(he.load_public(pair.public), pair.sha256, 4096, he.Layout.of(template))


def _encrypted(update: Update, pair: he.KeyPair) -> Update:
    return he.encrypt_update(update, he.load_public(pair.public), pair.sha256, 4096)


# --------------------------------------------------------------------------- keys


def test_public_context_has_no_secret_key_and_cannot_decrypt(keys: he.KeyPair) -> None:
    public = he.load_public(keys.public)
    assert not public.has_secret_key()
    vec = ts.ckks_vector(public, [1.0, 2.0])
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    secret, sha = he.load_secret(keys.secret)
    assert sha == keys.sha256
    assert np.allclose(ts.ckks_vector_from(secret, vec.serialize()).decrypt(), [1.0, 2.0], atol=1e-6)


def test_a_context_with_a_secret_key_is_refused_where_a_public_one_belongs(keys: he.KeyPair) -> None:
    with pytest.raises(ConfigError, match="holds a secret key"):
        he.load_public(keys.secret)
    with pytest.raises(ConfigError, match="no secret key"):
        he.load_secret(keys.public)


def test_key_files_keep_the_secret_private(tmp_path: Path) -> None:
    files = he.write_keys(tmp_path, "job-1")
    assert files.secret.stat().st_mode & 0o077 == 0
    assert he.context_sha256(files.public.read_bytes()) == files.sha256
    assert he.encryption_meta(files.public.read_bytes())["slots"] == 4096
    with pytest.raises(ConfigError, match="exists already"):
        he.write_keys(tmp_path, "job-1")


@pytest.mark.parametrize("degree, bits, scale, message", [
    (4096, (60, 40, 60), 40, "not 128-bit secure"),
    (8192, (60, 60), 40, "needs >= 3 primes"),
    (8192, (60, 50, 60), 40, "inner primes"),
    (8192, (40, 40, 60), 40, "headroom"),
])
def test_ckks_parameters_are_checked_for_security_and_headroom(degree: int, bits: tuple[int, ...], scale: int,
                                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        he.CkksParams(degree, bits, scale)
    assert he.CkksParams(16384, (60, 40, 40, 60), 40).slots == 8192


def test_strategies_that_need_plaintext_are_refused_for_encrypted_jobs() -> None:
    for cfg in (StrategyConfig(robust=Robust.MEDIAN), StrategyConfig(clip_norm=1.0),
                StrategyConfig(max_update_norm=5.0)):
        with pytest.raises(ConfigError):
            CiphertextAccumulator(cfg)


# --------------------------------------------------------------------------- math


def _fold_both(cfg: StrategyConfig, pair: he.KeyPair, template: dict[str, np.ndarray],
               updates: list[tuple[Update, int]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[bytes]]:
    plain, enc = Accumulator(cfg), CiphertextAccumulator(cfg)
    jk = _job_keys(pair, template)
    for u, tau in updates:
        assert u.delta is not None
        plain.fold(update_id=u.update_id, site=u.site, delta=u.delta, tau=tau, num_samples=u.num_samples,
                   base_version=u.base_version)
        vectors = check_ciphertext(_encrypted(u, pair), jk)
        enc.fold(update_id=u.update_id, site=u.site, vectors=vectors, tau=tau, num_samples=u.num_samples,
                 base_version=u.base_version)
    expected = plain.flush(template)[0]
    total = enc.flush()
    secret, _ = he.load_secret(pair.secret)
    return expected, decrypt_step(secret, template, total.chunks, total.denominator, cfg), total.chunks


@pytest.mark.parametrize("cfg", [
    StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=4, server_lr=1.0),
    StrategyConfig(name=StrategyName.FEDASYNC, alpha=0.6, staleness=StalenessFn.HINGE),
    StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=3, sample_weighted=False, server_lr=0.5),
])
def test_decrypted_sum_equals_the_plaintext_accumulator(keys: he.KeyPair, cfg: StrategyConfig) -> None:
    template = _template()
    updates = [(make_update("j", f"u{i}", template, num_samples=n, seed=i, scale=0.05), tau)
               for i, (n, tau) in enumerate([(120, 0), (7, 3), (60000, 1), (1, 9)][:cfg.effective_buffer])]
    expected, got, _ = _fold_both(cfg, keys, template, updates)
    for k in template:
        assert got[k].dtype == expected[k].dtype
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6)


def test_encrypted_sum_is_bit_identical_in_any_fold_order(keys: he.KeyPair) -> None:
    template = _template()
    cts = [_encrypted(make_update("j", f"u{i}", template, seed=i), keys).ciphertext for i in range(3)]
    chunks = [list(c["chunks"]) for c in cts if c is not None]
    public = he.load_public(keys.public)
    forward = recompute_sum(public, chunks, [0.5, 1.25, 2.0])
    backward = recompute_sum(public, chunks[::-1], [2.0, 1.25, 0.5])
    assert he.chunks_sha256(forward) == he.chunks_sha256(backward)
    assert he.chunks_sha256(forward) != he.chunks_sha256(recompute_sum(public, chunks, [0.5, 1.25, 2.5]))


def test_ciphertext_under_another_key_or_of_another_size_is_refused(keys: he.KeyPair) -> None:
    template = _template()
    jk = _job_keys(keys, template)
    u = make_update("j", "u1", template)
    other = he.generate()
    with pytest.raises(EncryptionMismatchError):
        check_ciphertext(_encrypted(u, other), jk)  # claims the other key's fingerprint
    assert u.delta is not None
    smaller = dataclasses.replace(u, delta={k: v for k, v in list(u.delta.items())[:2]})
    with pytest.raises(ShapeMismatchError):
        check_ciphertext(_encrypted(smaller, keys), jk)
    with pytest.raises(EncryptionMismatchError):
        check_ciphertext(u, jk)  # plaintext in an encrypted job
    enc = _encrypted(u, keys)
    assert enc.ciphertext is not None
    garbage = dataclasses.replace(enc, ciphertext={**enc.ciphertext, "chunks": [b"x" * 100]})
    with pytest.raises(MalformedMessageError):
        check_ciphertext(garbage, jk)


# --------------------------------------------------------------------------- same job, HE vs plaintext


def _simulate(parts: list[tuple[np.ndarray, np.ndarray]], spec: dict[str, object], cfg: StrategyConfig,
              versions: int, pair: he.KeyPair | None) -> dict[str, np.ndarray]:
    """An asynchronous job without a broker: every site always has one task in flight, slow sites
    take 3x longer, each finished update is folded and the site starts again from the newest
    version. The schedule and the training seeds are fixed, so the only difference between a run
    with `pair` (encrypt -> sum ciphertexts -> decrypt) and one without is the encryption."""
    from fedmq.worker.train import train_local

    weights = get_weights(build_model(spec, seed=0))
    secret = he.load_secret(pair.secret)[0] if pair else None
    jk = _job_keys(pair, weights) if pair else None
    acc_plain, acc_he = Accumulator(cfg), CiphertextAccumulator(cfg)
    version, tick = 0, 0
    duration = [3 if i % 4 == 3 else 1 for i in range(len(parts))]
    in_flight = [(duration[i], i, 0, weights) for i in range(len(parts))]  # (done_at, site, base, w)
    while version < versions:
        in_flight.sort(key=lambda t: (t[0], t[1]))
        done_at, site, base, base_w = in_flight.pop(0)
        tick += 1
        x, y = parts[site]
        res = train_local(spec, base_w, x, y, epochs=1, batch_size=16, lr=0.1, seed=tick)
        u = Update(job="sim", update_id=f"u{tick}", task_id=f"t{tick}", site=f"s{site}", base_version=base,
                   num_samples=res.num_samples, delta=res.delta)
        if pair is None:
            acc_plain.fold(update_id=u.update_id, site=u.site, delta=res.delta, tau=version - base,
                           num_samples=u.num_samples, base_version=base)
            ready = acc_plain.ready()
        else:
            assert jk is not None
            acc_he.fold(update_id=u.update_id, site=u.site, vectors=check_ciphertext(_encrypted(u, pair), jk),
                        tau=version - base, num_samples=u.num_samples, base_version=base)
            ready = acc_he.ready()
        if ready:
            if pair is None:
                weights = acc_plain.flush(weights)[0]
            else:
                total = acc_he.flush()
                weights = decrypt_step(secret, weights, total.chunks, total.denominator, cfg)
            version += 1
        in_flight.append((done_at + duration[site], site, version, weights))
    return weights


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_encrypted_job_on_digits_ends_within_0_3_points_of_plaintext(keys: he.KeyPair, tmp_path: Path) -> None:
    from fedmq.shared.datasets import load_site, write_partition

    part = write_partition(tmp_path, "digits", 6, scheme="dirichlet", alpha=0.5, seed=0)
    parts = [load_site(f) for f in part.site_files]
    x_test, y_test = load_site(part.test_file)
    spec = model_spec("mlp", (64,), 10)
    cfg = StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=3)
    accuracy = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save on a busy machine
    try:
        for name, pair in (("plaintext", None), ("ckks", keys)):
            model = build_model(spec)
            set_weights(model, _simulate(parts, spec, cfg, 30, pair))
            accuracy[name] = evaluate(model, x_test, y_test)[0]
    finally:
        torch.set_num_threads(threads)
    assert accuracy["plaintext"] > 0.85, accuracy  # a trained model, not two equally bad ones
    assert abs(accuracy["ckks"] - accuracy["plaintext"]) <= 0.003, accuracy


# --------------------------------------------------------------------------- on a real broker


def _aggregates(url: str, job: str) -> list[EncryptedAggregate]:
    return [EncryptedAggregate.decode(d.body) for d in read_stream(url, JobNames(job).aggregates_log, "first")]


def _wait_aggregates(url: str, job: str, n: int, timeout: float = 60.0) -> list[EncryptedAggregate]:
    def enough() -> list[EncryptedAggregate] | None:
        got = _aggregates(url, job)
        return got if len(got) >= n else None

    return wait_until(enough, timeout, f"{n} aggregates", poll=0.2)


@contextmanager
def _running_keyholder(url: str, job: str, pair: he.KeyPair) -> Iterator[KeyHolder]:
    stop = threading.Event()
    holder = KeyHolder(url, job, pair.secret, stop=stop, name="keyholder-test")
    t = threading.Thread(target=holder.run, name="keyholder-test", daemon=True)
    t.start()
    try:
        yield holder
    finally:
        stop.set()
        t.join(30)


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_every_update_is_folded_once_across_aggregator_and_keyholder_restarts(
        broker_url: str, job: str, keys: he.KeyPair) -> None:
    cfg = StrategyConfig(buffer_size=2, flush_timeout=60.0)
    v0 = declare_encrypted_job(broker_url, job, cfg, keys.public)
    template = {k: np.asarray(v) for k, v in v0.weights.items()}
    plain = [make_update(job, f"u{i}", template, seed=i, num_samples=10 + i) for i in range(4)]
    ups = [_encrypted(u, keys) for u in plain]

    with running_aggregator(broker_url, job, name="agg-a"):
        publish_updates(broker_url, job, ups[:2])
        _wait_aggregates(broker_url, job, 1)
    # a new replica; no key holder has run, so the models stream still ends at v0: its state (next
    # version, dedup set) must come from the aggregates log, or u0/u1 would be folded a second time
    with running_aggregator(broker_url, job, name="agg-b") as agg_b:
        publish_updates(broker_url, job, ups)
        got = _wait_aggregates(broker_url, job, 2)
        wait_until(lambda: agg_b.stats.duplicates >= 2, 30, "the new replica to drop u0 and u1")
    assert [(a.version, a.parent, a.included) for a in got] == [(1, 0, ("u0", "u1")), (2, 1, ("u2", "u3"))]
    assert agg_b.stats.duplicates == 2

    # the key holder decrypts both; a redelivered aggregate (published again) is dropped
    with Connection(broker_url, name="fedmq-test-republish").open() as conn:
        conn.publish(JobNames(job).aggregates_exchange, "", got[0].encode())
    with _running_keyholder(broker_url, job, keys) as holder:
        wait_for_version(broker_url, job, 2)
        wait_until(lambda: holder.stats.duplicates >= 1, 30, "the key holder to drop the republished aggregate")
    models = versions(broker_url, job)
    assert [(m.version, m.included) for m in models] == [(0, ()), (1, ("u0", "u1")), (2, ("u2", "u3"))]
    assert holder.stats.duplicates == 1
    assert he.META_PUBLIC_CONTEXT not in models[1].meta and models[1].meta["he"]["aggregate_id"] == "agg-v1"

    # version 2 is what the plaintext accumulator makes of the same updates (u2, u3 are 2 versions stale)
    acc = Accumulator(cfg)
    for u in plain[:2]:
        acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=0, num_samples=u.num_samples,
                 base_version=0)
    v1 = acc.flush(template)[0]
    for u in plain[2:]:
        acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=1, num_samples=u.num_samples,
                 base_version=0)
    v2 = acc.flush(v1)[0]
    for k in template:
        np.testing.assert_allclose(models[2].weights[k], v2[k], atol=1e-6)


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_a_replica_never_publishes_a_second_aggregate_for_one_version(
        broker_url: str, job: str, keys: he.KeyPair, caplog: pytest.LogCaptureFixture) -> None:
    cfg = StrategyConfig(buffer_size=2, flush_timeout=60.0)
    v0 = declare_encrypted_job(broker_url, job, cfg, keys.public)
    template = {k: np.asarray(v) for k, v in v0.weights.items()}
    ups = [_encrypted(make_update(job, f"u{i}", template, seed=i), keys) for i in range(2)]
    foreign = EncryptedAggregate(job=job, aggregate_id="agg-v1", version=1, parent=0, included=("x",),
                                 contributions=(), strategy="fedbuff", params=cfg.to_params(), denominator=1.0,
                                 sample_ref=1.0, context_sha256=keys.sha256, size=0, chunks=(),
                                 ciphertext_sha256="0" * 64)
    caplog.set_level(logging.INFO, logger="fedmq.aggregator")
    caplog.set_level(logging.INFO, logger="fedmq.shared.broker")
    with running_aggregator(broker_url, job, name="agg-a"):
        publish_updates(broker_url, job, ups[:1])
        # active, with its state read (models stream, aggregates log, v0) and its fence attached
        wait_until(lambda: any(r.getMessage() == "encrypted aggregation ready" for r in caplog.records), 60,
                   "the replica to become active and read its encrypted state")
        # another replica, briefly active too, publishes version 1 first
        with Connection(broker_url, name="fedmq-test-other-replica").open() as conn:
            conn.publish(JobNames(job).aggregates_exchange, "", foreign.encode())
        wait_until(lambda: len(_aggregates(broker_url, job)) == 1, 30, "the foreign aggregate in the log")
        publish_updates(broker_url, job, ups[1:])
        got = _wait_aggregates(broker_url, job, 2)
    # the replica noticed it at its flush (rather than having read it at start)
    assert any("aggregate 1 was published by another replica" in r.getMessage() for r in caplog.records)
    assert [(a.version, a.parent, a.included) for a in got] == [(1, 0, ("x",)), (2, 1, ("u0", "u1"))]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_encrypted_signed_job_end_to_end(broker_url: str, job: str, tmp_path: Path) -> None:
    """Coordinator (hosting the key holder), one aggregator and three signing workers on threads."""
    from fedmq.aggregator.he import plaintext_equivalent, replay_encrypted_version
    from fedmq.aggregator.he_service import load_public_context
    from fedmq.aggregator.service import Aggregator
    from fedmq.coordinator.service import Coordinator
    from fedmq.shared.config import load_job_config
    from fedmq.shared.datasets import load_site, write_partition
    from fedmq.shared.signing import generate_site_key
    from fedmq.worker.service import Worker, WorkerOptions

    part = write_partition(tmp_path / "data", "digits", 3, scheme="iid", seed=0)
    files = he.write_keys(tmp_path / "keys", job)
    sites = [f"site-{i}" for i in range(3)]
    for s in sites:
        generate_site_key(tmp_path / "keys", s)
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "mlp"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "coordinator": {"concurrency": 3, "target_accuracy": 0.85, "max_seconds": 240, "max_versions": 80,
                        "out": str(tmp_path / "out")},
        "encryption": {"scheme": "ckks", "public_context": str(files.public),
                       "secret_context": str(files.secret)},
        "signing": {"registry": str(tmp_path / "keys" / "registry.json")},
    })
    coord = Coordinator(broker_url, cfg, stop=threading.Event())
    agg = Aggregator(broker_url, job, stop=threading.Event(), name="agg-e2e")
    workers = [Worker(broker_url, job, s, f, options=WorkerOptions(key=str(tmp_path / "keys" / f"{s}.key"),
                                                                  device="cpu"))
               for s, f in zip(sites, part.site_files, strict=True)]
    result = run_threaded_job(coord, agg, workers)
    assert result.stop_reason == "target_accuracy", result
    names = JobNames(job)

    # only ciphertext crossed the updates queue: every logged update is encrypted and signed
    logged = [Update.decode(d.body) for d in read_stream(broker_url, names.updates_log, "first")]
    assert logged and all(u.delta is None and u.ciphertext and u.signature for u in logged)
    assert all(u.ciphertext["context_sha256"] == files.sha256 for u in logged if u.ciphertext)
    assert read_stream(broker_url, names.dead_log, "first") == []

    # the aggregator's context is the public one from v0: it cannot decrypt
    models = versions(broker_url, job)
    keys_at_aggregator = load_public_context(broker_url, names, dict(models[-1].meta))
    assert not keys_at_aggregator.context.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(keys_at_aggregator.context, logged[0].ciphertext["chunks"][0]).decrypt()  # type: ignore[index]

    # replay with the key holder's help: every version bit for bit, and the same job aggregated in
    # plaintext (each update decrypted alone) lands within 0.3 points
    by_id = {u.update_id: u for u in logged}
    secret, _ = he.load_secret(files.secret.read_bytes())
    public = keys_at_aggregator.context
    plain = dict(models[0].weights)
    for parent, mv in zip(models, models[1:], strict=False):
        used = [by_id[i] for i in mv.included]
        taus = [parent.version - u.base_version for u in used]
        check = replay_encrypted_version(parent.weights, mv.sha256, mv.meta["he"], mv.params, used, taus,
                                         public, secret)
        assert check.sum_matches and check.weights_match, (mv.version, check.detail)
        cts = [list(u.ciphertext["chunks"]) for u in used if u.ciphertext]
        plain = plaintext_equivalent(secret, plain, cts, list(mv.contributions), StrategyConfig.from_params(mv.params))
    x_test, y_test = load_site(part.test_file)
    model = build_model(models[-1].model)
    set_weights(model, dict(models[-1].weights))
    acc_he = evaluate(model, x_test, y_test)[0]
    set_weights(model, plain)
    acc_plain = evaluate(model, x_test, y_test)[0]
    assert abs(acc_he - acc_plain) <= 0.003, (acc_he, acc_plain)


def test_a_non_finite_delta_is_never_encrypted(keys: he.KeyPair) -> None:
    from fedmq.shared.errors import NonFiniteError

    u = make_update("j", "u1", _template())
    assert u.delta is not None
    bad = dataclasses.replace(u, delta={k: np.full_like(v, np.nan) for k, v in u.delta.items()})
    with pytest.raises(NonFiniteError):
        _encrypted(bad, keys)


# --------------------------------------------------------------------------- command line


def test_fedmq_keys_writes_a_key_pair_and_site_keys(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_fedmq

    out = run_fedmq("keys", "--job", "j1", "--site", "a", "--out", str(tmp_path), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["context_sha256"] == he.context_sha256((tmp_path / "j1.public.ctx").read_bytes())
    assert set(got["sites"]) == {"a"} and Path(got["registry"]).is_file()
    again = run_fedmq("keys", "--job", "j1", "--out", str(tmp_path), timeout=120)
    assert again.returncode == 2 and "exists already" in again.stderr
    nothing = run_fedmq("keys", "--out", str(tmp_path), timeout=120)
    assert nothing.returncode == 2


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_with_homomorphic_aggregation(broker_url: str, tmp_path: Path) -> None:
    import json

    from tests.conftest import run_fedmq

    job = f"t-he-demo-{uuid.uuid4().hex[:8]}"
    try:
        out = run_fedmq("demo", "--privacy", "he", "--json", "--broker", broker_url, "--job", job, "--sites", "4",
                        "--slow", "1", "--target", "0.85", "--workdir", str(tmp_path), timeout=560)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["job"] == job
        assert result["encryption"] == "ckks" and result["signed"] is True
        # the target was reached; the final version (after in-flight updates are drained) may dip below
        assert result["seconds_to_target"] is not None and result["updates_dead_lettered"] == 0, result
        logged = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
        assert logged and all(u.delta is None and u.signature for u in logged)
        assert (tmp_path / "logs" / "keyholder.log").is_file()
    finally:  # on failure too: a demo that died half-way leaves its queues and streams
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def test_the_coordinator_refuses_encrypted_jobs_it_cannot_run(tmp_path: Path) -> None:
    from fedmq.coordinator.keys import genesis_meta
    from fedmq.shared.config import load_job_config

    a, b = he.write_keys(tmp_path, "a"), he.write_keys(tmp_path, "b")

    def meta(**sections: dict[str, object]) -> dict[str, Any]:
        enc = {"scheme": "ckks", "public_context": str(a.public), **sections.pop("encryption", {})}
        return genesis_meta(load_job_config(overrides={"encryption": enc, **sections}))

    ok = meta()
    assert ok[he.META_PUBLIC_CONTEXT] == a.public.read_bytes() and ok["encryption"]["context_sha256"] == a.sha256
    with pytest.raises(ConfigError, match="not one key pair"):
        meta(encryption={"secret_context": str(b.secret)})
    with pytest.raises(ConfigError, match="robust"):
        meta(strategy={"robust": "median"})
    with pytest.raises(ConfigError, match="noise_at"):
        meta(privacy={"mechanism": "dp_fedavg", "noise_at": "aggregator", "epsilon": 4.0})
