"""Homomorphic aggregation (CKKS): math without a broker, then the two-hop pipeline on a real one.

What must hold: the aggregator's context cannot decrypt; only ciphertext crosses the updates
queue; an encrypted sum decrypts to what the plaintext accumulator computes; every update is
folded exactly once across aggregator and key-holder crashes; and an encrypted job on digits ends
within 0.3 accuracy points of the same job in plaintext.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from aggregator.he import (
    CiphertextAccumulator,
    JobKeys,
    check_ciphertext,
    decrypt_step,
    recompute_sum,
)
from aggregator.strategy import Accumulator
from shared import he
from shared.config import Robust, StalenessFn, StrategyConfig, StrategyName
from shared.errors import ConfigError, EncryptionMismatchError, MalformedMessageError, ShapeMismatchError
from shared.messages import Update
from shared.models import build_model, get_weights, model_spec
from tests.jobkit import make_update


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
