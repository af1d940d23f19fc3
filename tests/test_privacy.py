"""Differential privacy: accounting against an independent library, noise that is really there,
budgets that hold across restarts, and sealed central-noise seeds. No broker here."""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedmq.aggregator.dp import (
    DpAggregation,
    add_releases,
    central_noise_step,
    releases_epsilon,
    replay_central_noise,
)
from fedmq.aggregator.strategy import Accumulator, Contribution, learning_rate
from fedmq.shared.config import JobConfig, PrivacyConfig, StrategyConfig, TrainingConfig, build
from fedmq.shared.errors import ConfigError, PrivacyBudgetError, SealedSeedError
from fedmq.shared.messages import Task, Update, make_version
from fedmq.shared.models import build_model, get_weights, model_spec
from fedmq.shared.privacy import (
    NOISE_KEY_ENV,
    PrivacyLedger,
    check_privacy,
    dp_sgd_epsilon,
    dp_sgd_noise_multiplier,
    fresh_rng,
    gaussian_noise_multiplier,
    new_spend,
    open_seed,
    privacy_strategy,
    resolve_options,
    seal_seed,
)
from fedmq.worker.privacy import SitePrivacy, clip_and_noise, dp_sgd_shape, train_dp_sgd

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's fractional-order warnings

DELTA = 1e-5


def _task(options: dict[str, Any], *, epochs: int = 1, batch_size: int = 8, job: str = "j") -> Task:
    return Task(job=job, task_id=uuid.uuid4().hex[:16], version=0, epochs=epochs, batch_size=batch_size,
                lr=0.1, issued_at=0.0, deadline=1e12, options={"privacy": options})


def _site_data(n: int = 40, dim: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)


def _dp_sgd_reference(sigma: float, q: float, steps: int, *, pld: bool = False) -> float:
    """The same mechanism, composed by Google's dp-accounting instead of Opacus."""
    acc = PLDAccountant() if pld else RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(DELTA))


# ---------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_after_real_dp_sgd_tasks_matches_dp_accounting_within_one_percent(
        tmp_path: Path, accountant: str) -> None:
    x, y = _site_data(n=40)
    spec = model_spec("logreg", (8,), 3)
    base = get_weights(build_model(spec, seed=0))
    opts = PrivacyConfig.from_options({"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                                       "accountant": accountant, "delta": DELTA}).to_options()
    ledger = tmp_path / "site.ledger.json"
    site = SitePrivacy("site-0", ledger)
    for _ in range(3):
        task = _task(opts, epochs=2, batch_size=8)
        plan = site.plan(task, len(y))
        assert plan is not None
        site.train(plan, task, spec, base, x, y)
    # a restarted worker reads the same file
    eps = SitePrivacy("site-0", ledger).ledger.epsilon(DELTA, PrivacyConfig.from_options(opts).accountant)
    q, steps = dp_sgd_shape(40, 8, 2)
    assert (q, steps) == (0.2, 10)
    reference = _dp_sgd_reference(1.1, q, 3 * steps, pld=accountant == "prv")
    assert eps == pytest.approx(reference, rel=0.01)
    assert len(PrivacyLedger(ledger, "site-0").spends()) == 3


def test_opacus_and_dp_accounting_agree_on_a_mixed_history_within_one_percent() -> None:
    history = [(1.5, 0.1, 100), (0.9, 0.05, 300), (4.0, 1.0, 10)]
    acc = RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    assert dp_sgd_epsilon(history, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=0.01)


def test_calibrated_sigma_spends_the_budget_in_exactly_the_planned_tasks(tmp_path: Path) -> None:
    opts = resolve_options(PrivacyConfig.from_options(
        {"mechanism": "dp_sgd", "epsilon": 3.0, "planned_tasks": 4, "delta": DELTA}))
    site = SitePrivacy("site-0", tmp_path / "l.json")
    n = 40
    for _ in range(4):
        task = _task(opts)
        plan = site.plan(task, n)
        assert plan is not None and plan.entry is not None
        site.ledger.charge(new_spend("j", task.task_id, plan.cfg.mechanism, plan.entry))
    spent = site.ledger.epsilon(DELTA)
    assert 0.97 * 3.0 <= spent <= 3.0
    with pytest.raises(PrivacyBudgetError) as exc:
        site.plan(_task(opts), n)
    assert exc.value.spent == pytest.approx(spent)
    assert exc.value.would_be > 3.0


def test_dp_sgd_sigma_calibration_agrees_with_opacus_own_search() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    ours = dp_sgd_noise_multiplier(4.0, DELTA, 0.1, 200)
    theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.1, steps=200,
                                  epsilon_tolerance=0.001)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert dp_sgd_epsilon([(ours, 0.1, 200)], DELTA) <= 4.0


def test_dp_fedavg_version_epsilon_matches_dp_accounting() -> None:
    sigma = gaussian_noise_multiplier(2.0, DELTA, 10)
    # site a: twice alone, once twice in the same version; site b: three single releases
    releases: dict[str, dict[str, int]] = {}
    for sites in (["a", "b"], ["a"], ["a", "a", "b"], ["b"]):
        releases = add_releases(releases, sites, central=True)
    assert releases == {"a": {"1": 2, "2": 1}, "b": {"1": 3}}
    eps = releases_epsilon(releases, sigma, DELTA)
    ref_a = RdpAccountant()
    ref_a.compose(dp_event.GaussianDpEvent(sigma), 2)
    ref_a.compose(dp_event.GaussianDpEvent(sigma / 2))
    ref_b = RdpAccountant()
    ref_b.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), 3))
    assert eps["a"] == pytest.approx(ref_a.get_epsilon(DELTA), rel=1e-9)
    assert eps["b"] == pytest.approx(ref_b.get_epsilon(DELTA), rel=1e-9)
    # 10 single releases is what sigma was calibrated for
    assert releases_epsilon({"c": {"1": 10}}, sigma, DELTA)["c"] == pytest.approx(2.0, rel=1e-3)


def test_local_noise_counts_every_update_as_its_own_release() -> None:
    assert add_releases({}, ["a", "a", "b"], central=False) == {"a": {"1": 2}, "b": {"1": 1}}


# ---------------------------------------------------------------------------- noise is applied


def test_local_dp_fedavg_noise_has_variance_sigma_squared_c_squared() -> None:
    rng = np.random.default_rng(1)
    delta = {"w": rng.normal(size=(50, 40)).astype(np.float32), "b": rng.normal(size=40).astype(np.float32)}
    sigma, c = 0.8, 0.5
    scale = c / math.sqrt(sum(float(np.square(v).sum()) for v in delta.values()))
    clipped = np.concatenate([(v * scale).ravel() for v in delta.values()])
    residuals = []
    for _ in range(50):
        noised = clip_and_noise(delta, c, sigma, fresh_rng())
        assert all(noised[k].dtype == np.float32 for k in delta)
        residuals.append(np.concatenate([v.ravel() for v in noised.values()]) - clipped)
    r = np.concatenate(residuals)  # 102,000 draws: the variance is known to ~0.5 %
    assert r.var() == pytest.approx((sigma * c) ** 2, rel=0.03)
    assert abs(r.mean()) < 5 * sigma * c / math.sqrt(len(r))


def test_dp_sgd_noise_has_variance_lr2_steps_sigma2_c2_over_batch2() -> None:
    """With all-zero inputs a linear layer's weight gradient is exactly 0, so its delta is pure
    DP-SGD noise: lr * sum over steps of N(0, sigma^2 C^2) / expected batch size."""
    n, dim, classes, batch, lr, sigma, c = 64, 16, 4, 16, 0.2, 1.5, 0.7
    spec = model_spec("logreg", (dim,), classes)
    base = get_weights(build_model(spec, seed=0))
    x = np.zeros((n, dim), dtype=np.float32)
    y = np.random.default_rng(0).integers(0, classes, n).astype(np.int64)
    draws = [train_dp_sgd(spec, base, x, y, epochs=2, batch_size=batch, lr=lr, noise_multiplier=sigma,
                          max_grad_norm=c, seed=s).delta["1.weight"].ravel() for s in range(8)]
    q, steps = dp_sgd_shape(n, batch, 2)
    expected = lr ** 2 * steps * (sigma * c) ** 2 / (n * q) ** 2
    assert np.concatenate(draws).var() == pytest.approx(expected, rel=0.1)  # 512 draws


def test_central_noise_has_variance_of_scaled_sigma_c_and_is_reproducible_from_its_seed() -> None:
    w = {"a": np.zeros((100, 100), dtype=np.float32)}
    noised = central_noise_step(w, seed=7, std=1.2, scale=0.25)
    assert noised["a"].dtype == np.float32
    assert noised["a"].var() == pytest.approx((1.2 * 0.25) ** 2, rel=0.05)
    again = central_noise_step(w, seed=7, std=1.2, scale=0.25)
    assert np.array_equal(noised["a"], again["a"])
    assert not np.array_equal(noised["a"], central_noise_step(w, seed=8, std=1.2, scale=0.25)["a"])


# ---------------------------------------------------------------------------- budgets


def test_site_at_its_budget_refuses_and_charges_nothing(tmp_path: Path) -> None:
    opts = PrivacyConfig.from_options({"mechanism": "dp_sgd", "epsilon": 2.0, "noise_multiplier": 1.0}).to_options()
    site = SitePrivacy("site-3", tmp_path / "l.json")
    site.ledger.charge(new_spend("old-job", "t0", PrivacyConfig().mechanism, (1.0, 0.2, 60)))
    before = site.ledger.spends()
    with pytest.raises(PrivacyBudgetError) as exc:
        site.plan(_task(opts), 40)
    assert exc.value.reason == "privacy_budget"
    assert exc.value.spent > 2.0
    assert site.ledger.spends() == before


def test_site_operator_budget_caps_the_jobs(tmp_path: Path) -> None:
    opts = PrivacyConfig.from_options({"mechanism": "dp_sgd", "epsilon": 50.0, "noise_multiplier": 1.0}).to_options()
    site = SitePrivacy("site-0", tmp_path / "l.json", site_budget=0.5)
    with pytest.raises(PrivacyBudgetError):
        site.plan(_task(opts), 40)
    assert SitePrivacy("site-0", tmp_path / "m.json").plan(_task(opts), 40) is not None


def test_unreadable_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyLedger(path, "s").spends()


def test_task_without_privacy_options_has_no_plan(tmp_path: Path) -> None:
    task = Task(job="j", task_id="t", version=0, epochs=1, batch_size=8, lr=0.1, issued_at=0, deadline=1)
    assert SitePrivacy("s", tmp_path / "l.json").plan(task, 10) is None


def test_central_aggregator_dead_letters_updates_past_the_budget(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("ab" * 32)
    monkeypatch.setenv(NOISE_KEY_ENV, str(key))
    sigma = gaussian_noise_multiplier(1.0, DELTA, 2)
    dp = _central(sigma, epsilon=1.0)
    upd = Update(job="j", update_id="u", task_id="t", site="s1", base_version=0, num_samples=1,
                 delta={"w": np.zeros(2, np.float32)})
    dp.admit(upd, upd.delta or {}, [])
    dp.finish(1, {"w": np.zeros(2, np.float32)}, [_contribution("s1")], 1.0)
    dp.admit(upd, upd.delta or {}, [])  # the second release still fits
    with pytest.raises(PrivacyBudgetError):
        dp.admit(upd, upd.delta or {}, ["s1"])  # twice in one version: sensitivity 2C, too much


# ---------------------------------------------------------------------------- sealed seeds


def test_sealed_seed_opens_only_with_its_key_job_and_version() -> None:
    key, other = bytes(range(32)), bytes(32)
    sealed = seal_seed(key, "job-a", 5, 2 ** 100 + 3)
    assert open_seed(key, "job-a", 5, sealed) == 2 ** 100 + 3
    for args in ((other, "job-a", 5), (key, "job-b", 5), (key, "job-a", 6)):
        with pytest.raises(SealedSeedError):
            open_seed(*args, sealed)


def test_central_version_is_recomputed_bit_for_bit_by_the_replay_step(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("cd" * 32)
    monkeypatch.setenv(NOISE_KEY_ENV, str(key))
    strategy = StrategyConfig(sample_weighted=False, clip_norm=1.0, buffer_size=2)
    parent = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    deltas = [{"w": np.full((4, 3), 0.5, np.float32), "b": np.ones(3, np.float32)},
              {"w": np.full((4, 3), -0.1, np.float32), "b": np.zeros(3, np.float32)}]

    def flush() -> tuple[dict[str, np.ndarray], list[Contribution]]:
        acc = Accumulator(strategy)
        for i, d in enumerate(deltas):
            acc.fold(update_id=f"u{i}", site=f"s{i}", delta=d, tau=0, num_samples=5, base_version=0)
        return acc.flush(parent)

    weights, contributions = flush()
    dp = _central(2.0, epsilon=0.0)
    published, meta_dp = dp.finish(1, weights, contributions, learning_rate(strategy))
    assert not np.array_equal(published["w"], weights["w"])
    assert "noise_seed_sealed" in meta_dp and meta_dp["noise_std"] == 2.0
    mv = make_version(job="j", version=1, parent=0, weights=published, included=["u0", "u1"],
                      strategy="fedbuff", params=strategy.to_params(), model={}, meta={"dp": meta_dp})
    again, _ = flush()
    replayed = replay_central_noise(again, job="j", version=1, meta=mv.meta)
    assert make_version(job="j", version=1, parent=0, weights=replayed, included=[], strategy="fedbuff",
                        params={}, model={}).sha256 == mv.sha256
    monkeypatch.setenv(NOISE_KEY_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        replay_central_noise(again, job="j", version=1, meta=mv.meta)


def test_central_aggregation_without_a_noise_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NOISE_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=NOISE_KEY_ENV):
        _central(1.0, epsilon=0.0)


# ---------------------------------------------------------------------------- config


def test_config_combinations_that_would_void_the_guarantee_are_refused() -> None:
    dp_sgd = PrivacyConfig.from_options({"mechanism": "dp_sgd", "epsilon": 4.0})
    with pytest.raises(ConfigError, match="training.mu"):
        check_privacy(JobConfig(privacy=dp_sgd, training=TrainingConfig(mu=0.1)))
    central = PrivacyConfig.from_options({"mechanism": "dp_fedavg", "epsilon": 4.0, "noise_at": "aggregator"})
    with pytest.raises(ConfigError, match="sample_weighted"):
        check_privacy(JobConfig(privacy=central))
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        PrivacyConfig.from_options({"mechanism": "dp_sgd"})
    with pytest.raises(ConfigError, match="privacy.delta"):
        PrivacyConfig.from_options({"mechanism": "dp_sgd", "epsilon": 1.0, "delta": 0})
    with pytest.raises(ConfigError, match="privacy.stop_when_spent"):
        PrivacyConfig.from_options({"mechanism": "dp_sgd", "epsilon": 1.0, "stop_when_spent": 0})


def test_central_noise_makes_the_strategy_clip_at_the_dp_clip() -> None:
    central = PrivacyConfig.from_options({"mechanism": "dp_fedavg", "epsilon": 4.0, "noise_at": "aggregator",
                                          "clip_norm": 0.5})
    cfg = privacy_strategy(JobConfig(privacy=central, strategy=StrategyConfig(sample_weighted=False)))
    assert cfg.strategy.clip_norm == 0.5
    tighter = JobConfig(privacy=central, strategy=StrategyConfig(sample_weighted=False, clip_norm=0.2))
    assert privacy_strategy(tighter).strategy.clip_norm == 0.2


def test_privacy_section_reads_from_toml_and_env() -> None:
    cfg = build(JobConfig, {"privacy": {"mechanism": "dp_fedavg", "epsilon": "8", "noise_at": "site"}}, "config")
    assert cfg.privacy.epsilon == 8.0 and not cfg.privacy.central
    opts = resolve_options(cfg.privacy)
    assert opts["noise_multiplier"] == pytest.approx(gaussian_noise_multiplier(8.0, DELTA, 20))


# ---------------------------------------------------------------------------- helpers


def _contribution(site: str) -> Contribution:
    return Contribution(update_id="u", site=site, base_version=0, staleness=0, weight=1.0, num_samples=1)


def _central(sigma: float, *, epsilon: float) -> DpAggregation:
    opts = PrivacyConfig.from_options({"mechanism": "dp_fedavg", "noise_at": "aggregator", "epsilon": epsilon,
                                       "noise_multiplier": sigma}).to_options()
    strategy = StrategyConfig(sample_weighted=False, clip_norm=1.0)
    v0 = make_version(job="j", version=0, parent=-1, weights={"w": np.zeros(2, np.float32)}, included=[],
                      strategy="fedbuff", params=strategy.to_params(), model={}, meta={"privacy": opts})
    dp = DpAggregation.from_version(v0)
    assert dp is not None
    return dp
