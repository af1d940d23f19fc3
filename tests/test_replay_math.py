"""Replay's verdicts without a broker: versions built exactly as the aggregator builds them, then
checked (and tampered with) through `fedmq.replay.check_version` and the what-if simulator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest

from fedmq import replay
from fedmq.aggregator.strategy import Accumulator, Contribution, staleness_factor
from fedmq.replay import Status, WhatIf, check_version
from fedmq.shared.codec import Weights
from fedmq.shared.config import StalenessFn, StrategyConfig, StrategyName
from fedmq.shared.errors import ConfigError
from fedmq.shared.messages import ModelVersion, Update, make_version

JOB = "job-math"
SHAPES = {"w": (5, 3), "b": (3,)}
CFG = StrategyConfig(buffer_size=3)


def _weights(seed: int, scale: float = 1.0) -> Weights:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _update(uid: str, base: int, *, site: str = "site-0", n: int = 10, seed: int = 0,
            created_at: float = 0.0) -> Update:
    return Update(job=JOB, update_id=uid, task_id=uid, site=site, base_version=base, num_samples=n,
                  delta=_weights(seed, 0.01), created_at=created_at)


def _root(cfg: StrategyConfig = CFG) -> ModelVersion:
    return make_version(job=JOB, version=0, parent=-1, weights=_weights(99), included=[],
                        strategy=cfg.name.value, params=cfg.to_params(), model={"name": "test"})


def _child(parent: ModelVersion, updates: Sequence[Update], *, scale_first: float = 1.0,
           meta: Mapping[str, Any] | None = None, cfg: StrategyConfig = CFG) -> ModelVersion:
    """What aggregator.service does at a flush; `scale_first` != 1 forges the first delta."""
    acc = Accumulator(cfg)
    for i, u in enumerate(updates):
        assert u.delta is not None
        delta = {k: v * np.float32(scale_first) for k, v in u.delta.items()} if i == 0 else u.delta
        acc.fold(update_id=u.update_id, site=u.site, delta=delta, tau=parent.version - u.base_version,
                 num_samples=u.num_samples, base_version=u.base_version)
    weights, contributions = acc.flush(parent.weights)
    return make_version(job=JOB, version=parent.version + 1, parent=parent.version, weights=weights,
                        included=[c.update_id for c in contributions], strategy=cfg.name.value,
                        params=cfg.to_params(), model=parent.model,
                        contributions=[c.to_dict() for c in contributions], meta=dict(meta or {}))


def _by_id(updates: Sequence[Update]) -> dict[str, list[Update]]:
    out: dict[str, list[Update]] = {}
    for u in updates:
        out.setdefault(u.update_id, []).append(u)
    return out


def _wire(mv: ModelVersion) -> ModelVersion:
    return ModelVersion.decode(mv.encode())


# ------------------------------------------------------------------ determinism


def test_polynomial_staleness_matches_a_60_digit_reference_for_every_tau_and_exponent() -> None:
    """libm pow misses the correctly rounded value now and then (and differs across CPUs);
    the decimal computation must not, so a replay elsewhere reproduces each weight exactly."""
    for a in (0.3, 0.5, 0.7, 1.0, 1.5):
        for tau in range(200):
            with localcontext() as ctx:
                ctx.prec = 60
                reference = float(Decimal(1 + tau) ** -Decimal(a))
            assert staleness_factor(tau, StalenessFn.POLYNOMIAL, a=a) == reference, (tau, a)


def test_version_recomputed_from_wire_copies_is_bit_identical() -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1, n=7), _update("u2", 0, site="site-1", seed=2, n=30),
           _update("u3", 0, site="site-2", seed=3, n=12)]
    v1 = _child(v0, ups)
    wire_updates = [Update.decode(u.encode()) for u in ups]  # read-only zero-copy views
    verdict = check_version(_wire(v0), _wire(v1), _by_id(wire_updates))
    assert verdict.check.status is Status.OK, verdict.check.detail
    assert verdict.check.recomputed_sha256 == v1.sha256


def test_stale_updates_are_recomputed_with_tau_from_the_parent() -> None:
    v0 = _root()
    v1 = _child(v0, [_update("a", 0, seed=1), _update("b", 0, seed=2), _update("c", 0, seed=3)])
    late = [_update("d", 0, seed=4), _update("e", 1, seed=5), _update("f", 0, seed=6)]
    v2 = _child(v1, late)
    verdict = check_version(v1, v2, _by_id(late))
    assert verdict.check.status is Status.OK, verdict.check.detail
    assert [c["staleness"] for c in v2.contributions] == [1, 0, 1]


# ------------------------------------------------------------------ tampering


def test_a_scaled_delta_is_a_mismatch_naming_both_hashes() -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1), _update("u2", 0, seed=2), _update("u3", 0, seed=3)]
    forged = _child(v0, ups, scale_first=1.5)
    assert forged.verify_hash()  # a forger publishes a self-consistent hash
    check = check_version(v0, forged, _by_id(ups)).check
    assert check.status is Status.MISMATCH
    assert check.recomputed_sha256 == _child(v0, ups).sha256
    assert forged.sha256[:16] in check.detail and "largest difference" in check.detail


def test_weights_that_do_not_hash_to_their_sha256_are_a_mismatch() -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1)]
    v1 = _child(v0, ups, cfg=StrategyConfig(buffer_size=1))
    bad = ModelVersion(**{**{f: getattr(v1, f) for f in v1.__slots__}, "sha256": "0" * 64})  # type: ignore[attr-defined]
    check = check_version(v0, bad, _by_id(ups)).check
    assert check.status is Status.MISMATCH and "do not hash" in check.detail


def test_a_forged_contribution_record_is_a_mismatch() -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1), _update("u2", 0, site="site-1", seed=2), _update("u3", 0, seed=3)]
    v1 = _child(v0, ups)
    contributions = [dict(c) for c in v1.contributions]
    contributions[1]["site"] = "site-9"  # hide which site contributed
    forged = ModelVersion(**{**{f: getattr(v1, f) for f in v1.__slots__},  # type: ignore[attr-defined]
                             "contributions": tuple(contributions)})
    check = check_version(v0, forged, _by_id(ups)).check
    assert check.status is Status.MISMATCH
    assert "u2" in check.detail and "site" in check.detail


def test_an_included_update_the_aggregator_would_refuse_is_a_mismatch() -> None:
    cfg = StrategyConfig(buffer_size=1, max_update_norm=0.05)
    v0 = _root(cfg)
    big = _update("big", 0, seed=1)
    assert big.delta is not None
    big = Update(**{**{f: getattr(big, f) for f in big.__slots__},  # type: ignore[attr-defined]
                    "delta": {k: v * np.float32(100) for k, v in big.delta.items()}})
    v1 = _child(v0, [big], cfg=cfg)
    check = check_version(v0, v1, _by_id([big])).check
    assert check.status is Status.MISMATCH and "norm_bound" in check.detail


def test_missing_parent_or_update_is_incomplete_and_names_the_ids() -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1), _update("u2", 0, seed=2), _update("u3", 0, seed=3)]
    v1 = _child(v0, ups)
    check = check_version(v0, v1, _by_id(ups[:2])).check
    assert check.status is Status.INCOMPLETE and check.missing_updates == ("u3",)
    check = check_version(None, v1, _by_id(ups)).check
    assert check.status is Status.INCOMPLETE and check.missing_parent


def test_the_copy_of_a_redelivered_task_that_was_folded_is_found_by_its_site() -> None:
    v0 = _root()
    first = _update("u1", 0, site="site-0", seed=1)
    second = _update("u1", 0, site="site-5", seed=7)  # the task ran again elsewhere: same id
    others = [_update("u2", 0, seed=2), _update("u3", 0, seed=3)]
    v1 = _child(v0, [second, *others])
    check = check_version(v0, v1, _by_id([first, second, *others])).check
    assert check.status is Status.OK, check.detail


def test_an_update_published_twice_by_its_site_replays_clean() -> None:
    """A worker refused by the broker (its queue full), or reconnecting, publishes the same update
    again: two equal copies in the log. Comparing them with == (arrays inside) raised ValueError."""
    v0 = _root()
    ups = [_update("u1", 0, seed=1), _update("u2", 0, seed=2), _update("u3", 0, seed=3)]
    v1 = _child(v0, ups)
    again = [Update.decode(u.encode()) for u in ups]  # equal copies, other objects
    check = check_version(v0, v1, _by_id([*ups, *again])).check
    assert check.status is Status.OK, check.detail


# ------------------------------------------------------------------ encrypted and post-flush


def _encrypted(uid: str, base: int, context: str, site: str = "site-0", n: int = 10) -> Update:
    return Update(job=JOB, update_id=uid, task_id=uid, site=site, base_version=base, num_samples=n,
                  delta=None, ciphertext={"scheme": "ckks", "context_sha256": context, "chunks": [b"x"]})


def _encrypted_version(parent: ModelVersion, ups: Sequence[Update], context: str) -> ModelVersion:
    contributions = [Contribution(u.update_id, u.site, u.base_version, parent.version - u.base_version,
                                  1.0, u.num_samples).to_dict() for u in ups]
    return make_version(job=JOB, version=parent.version + 1, parent=parent.version, weights=_weights(5),
                        included=[u.update_id for u in ups], strategy="fedbuff", params=CFG.to_params(),
                        model={}, contributions=contributions,
                        meta={"encryption": {"scheme": "ckks", "context_sha256": context}})


def test_a_version_from_ciphertexts_is_chain_only_and_says_what_was_verified() -> None:
    v0 = _root()
    ups = [_encrypted("e1", 0, "ctx-a"), _encrypted("e2", 0, "ctx-a", site="site-1")]
    check = check_version(v0, _encrypted_version(v0, ups, "ctx-a"), _by_id(ups)).check
    assert check.status is Status.CHAIN_ONLY
    assert "not recomputed" in check.detail and "site, base version, samples, staleness" in check.detail


def test_a_ciphertext_under_another_context_is_a_mismatch() -> None:
    v0 = _root()
    ups = [_encrypted("e1", 0, "ctx-a"), _encrypted("e2", 0, "ctx-other")]
    check = check_version(v0, _encrypted_version(v0, ups, "ctx-a"), _by_id(ups)).check
    assert check.status is Status.MISMATCH and "e2" in check.detail


def seeded_noise(weights: Weights, *, job: str, version: int, meta: Mapping[str, Any], cfg: StrategyConfig,
                 contributions: Sequence[Contribution]) -> Weights:
    """A post-flush step like central DP noise: random, but seeded from the version's meta."""
    if "secret" not in meta["test_noise"]:
        raise ConfigError("no key to open the seed")
    rng = np.random.Generator(np.random.PCG64(int(meta["test_noise"]["secret"])))
    return {k: (np.asarray(w, np.float64) + 0.01 * rng.standard_normal(np.shape(w))).astype(np.asarray(w).dtype)
            for k, w in weights.items()}


def test_a_registered_post_flush_step_is_reapplied_and_its_failure_is_unverifiable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    v0 = _root()
    ups = [_update("u1", 0, seed=1), _update("u2", 0, seed=2), _update("u3", 0, seed=3)]
    plain = _child(v0, ups)
    meta = {"test_noise": {"secret": 1234}}
    noised = seeded_noise(plain.weights, job=JOB, version=1, meta=meta, cfg=CFG, contributions=[])
    v1 = make_version(job=JOB, version=1, parent=0, weights=noised, included=plain.included,
                      strategy=plain.strategy, params=plain.params, model=plain.model,
                      contributions=plain.contributions, meta=meta)
    assert check_version(v0, v1, _by_id(ups)).check.status is Status.MISMATCH  # step not registered
    monkeypatch.setitem(replay.POST_FLUSH_STEPS, "test_noise", f"{__name__}:seeded_noise")
    assert check_version(v0, v1, _by_id(ups)).check.status is Status.OK
    sealed = ModelVersion(**{**{f: getattr(v1, f) for f in v1.__slots__},  # type: ignore[attr-defined]
                             "meta": {"test_noise": {"sealed": "..."}}})
    check = check_version(v0, sealed, _by_id(ups)).check
    assert check.status is Status.UNVERIFIABLE and "no key" in check.detail


# ------------------------------------------------------------------ what-if


def _recorded_history(cfg: StrategyConfig) -> tuple[list[ModelVersion], list[list[Update]]]:
    """Three versions of K=2 whose updates arrive with growing staleness."""
    v0 = _root(cfg)
    batches = [[_update("a", 0, seed=1), _update("b", 0, seed=2)],
               [_update("c", 0, seed=3), _update("d", 1, seed=4)],
               [_update("e", 1, seed=5), _update("f", 2, seed=6)]]
    versions = [v0]
    for batch in batches:
        versions.append(_child(versions[-1], batch, cfg=cfg))
    return versions, batches


def test_what_if_under_the_recorded_strategy_reproduces_the_recorded_versions() -> None:
    cfg = StrategyConfig(buffer_size=2)
    versions, batches = _recorded_history(cfg)
    sha_of = {}
    wi = WhatIf(cfg, versions[0], lambda w: 0.0)
    for mv, batch in zip(versions[1:], batches, strict=True):
        for u in batch:
            wi.feed(u)
        wi.original_version_done(mv.version)
        sha_of[mv.version] = mv.sha256
    from fedmq.shared.codec import weights_sha256

    assert weights_sha256(wi.weights) == versions[-1].sha256
    assert [c.staleness for c in wi.contributions] == [c["staleness"] for v in versions[1:] for c in v.contributions]


def test_what_if_measures_staleness_in_its_own_versions() -> None:
    """FedAsync makes a version per update, so the same arrivals are staler in versions."""
    versions, batches = _recorded_history(StrategyConfig(buffer_size=2))
    wi = WhatIf(StrategyConfig(name=StrategyName.FEDASYNC), versions[0], lambda w: 0.5)
    for mv, batch in zip(versions[1:], batches, strict=True):
        for u in batch:
            wi.feed(u)
        wi.original_version_done(mv.version)
    # a,b from v0 (what-if v0, v1 current); c from v0 at what-if v2; d from v1 = what-if v2 at v3;
    # e from v1 (= what-if v2) at v4; f from v2 (= what-if v4) at v5
    assert [c.staleness for c in wi.contributions] == [0, 1, 2, 1, 2, 1]
    assert wi.version == 6 and [p.updates for p in wi.curve] == [0, 1, 2, 3, 4, 5, 6]


def test_what_if_skips_what_its_strategy_would_refuse_as_stale() -> None:
    versions, batches = _recorded_history(StrategyConfig(buffer_size=2))
    wi = WhatIf(StrategyConfig(name=StrategyName.FEDASYNC, max_staleness=1), versions[0], lambda w: 0.5)
    for mv, batch in zip(versions[1:], batches, strict=True):
        for u in batch:
            wi.feed(u)
        wi.original_version_done(mv.version)
    wi.finish()
    assert wi.skipped["stale"] >= 1
    assert all(c.staleness <= 1 for c in wi.contributions)


def test_what_if_flushes_a_partial_buffer_after_the_flush_timeout() -> None:
    cfg = StrategyConfig(buffer_size=4, flush_timeout=5.0)
    v0 = _root(cfg)
    wi = WhatIf(cfg, v0, lambda w: 0.0)
    wi.feed(_update("a", 0, seed=1, created_at=100.0))
    wi.feed(_update("b", 0, seed=2, created_at=101.0))
    wi.feed(_update("c", 0, seed=3, created_at=107.0))  # 7 s after the buffer's first: flush a, b first
    wi.finish()
    assert [p.updates for p in wi.curve] == [0, 2, 3]


# ------------------------------------------------------------------ signatures


def test_an_included_update_whose_signature_fails_against_the_registry_is_a_mismatch() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmq.shared.signing import META_REGISTRY, public_hex, sign_update

    site_key, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = {"site-0": public_hex(site_key)}
    cfg = StrategyConfig(buffer_size=2)
    v0 = make_version(job=JOB, version=0, parent=-1, weights=_weights(99), included=[], strategy="fedbuff",
                      params=cfg.to_params(), model={}, meta={META_REGISTRY: registry})
    honest = [sign_update(_update("u1", 0, seed=1), site_key), sign_update(_update("u2", 0, seed=2), site_key)]
    v1 = _child(v0, honest, cfg=cfg)
    assert check_version(v0, v1, _by_id(honest)).check.status is Status.OK
    forged = [honest[0], sign_update(_update("u2", 0, seed=2), impostor)]
    check = check_version(v0, _child(v0, forged, cfg=cfg), _by_id(forged)).check
    assert check.status is Status.MISMATCH and "bad_signature" in check.detail


def test_what_if_applies_centred_clipping_and_skips_outliers_with_its_own_history() -> None:
    import dataclasses

    from fedmq.aggregator.strategy import l2_norm
    from fedmq.shared.config import ClipCenter

    cfg = StrategyConfig(buffer_size=1, clip_median_factor=1.0, outlier_factor=3.0, clip_center=ClipCenter.LAST_STEP)
    v0 = _root(cfg)
    wi = WhatIf(cfg, v0, lambda w: 0.0)
    for i in range(6):  # history: five deviations make a running median
        wi.feed(_update(f"h{i}", 0, seed=i))
    honest = _update("h6", 0, seed=6)
    flip = dataclasses.replace(honest, update_id="evil", task_id="evil",
                               delta={k: -10 * v for k, v in (honest.delta or {}).items()})
    before = wi.weights
    wi.feed(flip)
    assert wi.skipped["outlier"] == 1 and wi.weights is before  # no version for the outlier
    assert all("deviation" in c.to_dict() for c in wi.contributions)
    wi.feed(honest)
    assert wi.version == 7 and l2_norm(wi.weights) != l2_norm(before)
