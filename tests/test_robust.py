"""Byzantine-robust aggregation: clipping against the running median norm, trimmed mean, median.

Pure functions first, then jobs built by the real aggregator on the broker and audited by replay:
the bound a 10x update is clipped to comes from the norms recorded in the stream, so a restarted
aggregator and `fedmq replay` derive the same one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from fedmq.aggregator.strategy import (
    MIN_CLIP_NORMS,
    Accumulator,
    NormWindow,
    centred_clip,
    chain_window,
    clip_measure,
    l2_norm,
    last_step,
    median_clip_bound,
    recorded_norms,
)
from fedmq.replay import ClipHistoryUnknownError, Status, fold_version, replay
from fedmq.shared import he
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.codec import Weights, weights_sha256
from fedmq.shared.config import ClipCenter, Robust, StrategyConfig
from fedmq.shared.errors import ConfigError, OutlierError
from fedmq.shared.messages import ModelVersion, make_version
from tests.jobkit import (
    dead_letters,
    declare_job_with_v0,
    make_update,
    publish_updates,
    running_aggregator,
    wait_for_version,
)


def _delta(scale: float, seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {"w": (scale * rng.normal(size=(4, 3))).astype(np.float32),
            "b": (scale * rng.normal(size=3)).astype(np.float32)}


# ------------------------------------------------------------------ pure functions


def test_median_bound_needs_enough_history_and_a_factor() -> None:
    norms = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert median_clip_bound(norms[:MIN_CLIP_NORMS - 1], 2.0) is None  # too little history
    assert median_clip_bound(norms, 0.0) is None                       # off
    assert median_clip_bound(norms, 2.0) == 6.0                        # 2 x median, the outlier ignored
    assert median_clip_bound([*norms, 5.0], 1.5) == 1.5 * 3.5          # even count: mean of the middle two


def test_recorded_norms_skip_entries_without_a_usable_norm() -> None:
    contributions = [{"norm": 1.5}, {}, {"norm": float("nan")}, {"norm": -1.0}, {"norm": "3"}, {"norm": 2.0}]
    assert recorded_norms(contributions) == (1.5, 2.0)


def test_norm_window_keeps_the_last_versions_and_knows_when_it_is_complete() -> None:
    w = NormWindow(3, complete=False)
    assert not w.known
    for i in range(3):
        w = w.push([float(i), float(i) + 0.5])
    assert w.known and w.norms() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    w = w.push([9.0])
    assert w.versions == ((1.0, 1.5), (2.0, 2.5), (9.0,))
    assert NormWindow(3).push([1.0]).known  # from v0 on: short but complete


def test_chain_window_follows_parents_and_the_last_entry_of_a_fork() -> None:
    entries = [(0, -1, ()), (1, 0, ({"norm": 1.0},)), (2, 1, ({"norm": 2.0},)),
               (2, 1, ({"norm": 7.0},)),  # a fork: the later entry of v2 counts
               (3, 2, ({"norm": 3.0},))]
    w = chain_window(entries, 3, 10)
    assert w.complete and w.versions == ((), (1.0,), (7.0,), (3.0,))
    assert chain_window(entries, 3, 2).versions == ((7.0,), (3.0,))
    truncated = chain_window(entries[2:], 3, 10)  # v0 and v1 not read
    assert not truncated.known and truncated.versions == ((7.0,), (3.0,))


def test_fold_clips_to_the_median_bound_and_records_the_raw_norm() -> None:
    cfg = StrategyConfig(buffer_size=2, sample_weighted=False, staleness_a=0.0, clip_median_factor=2.0)
    honest, attack = _delta(0.01, 1), _delta(0.1, 2)
    bound = 1.5 * l2_norm(honest)
    acc = Accumulator(cfg)
    c1 = acc.fold(update_id="u1", site="a", delta=honest, tau=0, num_samples=1, base_version=0, median_bound=bound)
    c2 = acc.fold(update_id="u2", site="b", delta=attack, tau=0, num_samples=1, base_version=0, median_bound=bound)
    assert c1.norm == l2_norm(honest) and c2.norm == l2_norm(attack)
    assert c2.to_dict()["norm"] == c2.norm
    mean = acc.mean_delta()
    attack_part = {k: 2 * mean[k] - np.asarray(honest[k], np.float64) for k in mean}
    assert l2_norm(attack_part) == pytest.approx(bound, rel=1e-9)


def test_the_tighter_of_clip_norm_and_the_median_bound_wins() -> None:
    attack = _delta(0.1, 2)
    for clip_norm, median, expected in ((0.01, 0.05, 0.01), (0.05, 0.01, 0.01), (0.0, 0.02, 0.02)):
        cfg = StrategyConfig(buffer_size=1, clip_norm=clip_norm, clip_median_factor=1.0)
        acc = Accumulator(cfg)
        acc.fold(update_id="u", site="a", delta=attack, tau=0, num_samples=1, base_version=0, median_bound=median)
        assert l2_norm(acc.mean_delta()) == pytest.approx(expected, rel=1e-9)


def test_a_zero_median_admits_no_movement() -> None:
    acc = Accumulator(StrategyConfig(buffer_size=1, clip_median_factor=2.0))
    acc.fold(update_id="u", site="a", delta=_delta(0.1), tau=0, num_samples=1, base_version=0, median_bound=0.0)
    assert l2_norm(acc.mean_delta()) == 0.0


def test_clip_median_config_is_validated() -> None:
    assert StrategyConfig(clip_median_factor=3.0, clip_window=20).to_params()["clip_window"] == 20
    for bad in ({"clip_median_factor": 0.5}, {"clip_median_factor": -1.0}, {"clip_median_factor": float("nan")},
                {"clip_window": 0}, {"clip_window": 2.5}):
        with pytest.raises(ConfigError, match="strategy.clip_"):
            StrategyConfig.from_params(bad)


def test_centred_clip_bounds_the_deviation_from_the_centre_not_the_length() -> None:
    honest = _delta(0.01, 1)
    flipped = {k: -10.0 * np.asarray(v, np.float64) for k, v in honest.items()}
    center = {k: np.asarray(v, np.float64) for k, v in honest.items()}
    bound = 0.5 * l2_norm(honest)
    out, deviation = centred_clip(flipped, center, bound)
    assert deviation == pytest.approx(11 * l2_norm(honest), rel=1e-6)  # |-10 d - d|
    # the flip lands half a step short of the centre, still on the honest side
    for k in out:
        np.testing.assert_allclose(out[k], 0.5 * center[k], rtol=1e-5, atol=1e-12)
    # a zero (or missing) centre is a plain length clip; no bound yet clips nothing
    zero, size = centred_clip(flipped, {}, bound)
    assert size == pytest.approx(l2_norm(flipped)) and l2_norm(zero) == pytest.approx(bound, rel=1e-9)
    same, _ = centred_clip(flipped, center, None)
    assert all(np.array_equal(same[k], flipped[k]) for k in flipped)
    # a zero median: only the centre is left
    stay, _ = centred_clip(flipped, center, 0.0)
    assert all(np.array_equal(stay[k], center[k]) for k in center)


def test_a_centred_fold_records_the_deviation_and_medians_over_it() -> None:
    cfg = StrategyConfig(buffer_size=1, clip_median_factor=1.0, clip_center=ClipCenter.LAST_STEP)
    assert clip_measure(cfg) == "deviation" and clip_measure(StrategyConfig()) == "norm"
    honest, center = _delta(0.01, 1), {k: np.asarray(v, np.float64) for k, v in _delta(0.01, 2).items()}
    c = Accumulator(cfg).fold(update_id="u", site="a", delta=honest, tau=0, num_samples=1, base_version=3,
                              center=center)
    dev = l2_norm({k: np.asarray(v, np.float64) - center[k] for k, v in honest.items()})
    assert c.norm == l2_norm(honest) and c.deviation == dev
    assert recorded_norms([c.to_dict()], "deviation") == (dev,)
    assert "deviation" not in Accumulator(StrategyConfig(buffer_size=1)).fold(
        update_id="u", site="a", delta=honest, tau=0, num_samples=1, base_version=0).to_dict()


def test_last_step_is_the_published_difference_over_the_server_lr() -> None:
    parent = {"w": np.ones((2, 2), np.float32)}
    child = {"w": np.full((2, 2), 1.5, np.float32)}
    step = last_step(child, parent, StrategyConfig(server_lr=0.5))
    assert step["w"].dtype == np.float64 and np.all(step["w"] == 1.0)


def test_clip_center_needs_the_median_clip() -> None:
    with pytest.raises(ConfigError, match="strategy.clip_center"):
        StrategyConfig.from_params({"clip_center": "last_step"})
    with pytest.raises(ConfigError, match="strategy.clip_center"):
        StrategyConfig.from_params({"clip_center": "sideways", "clip_median_factor": 2.0})
    assert StrategyConfig.from_params({"clip_center": "last_step", "clip_median_factor": 2.0}).clip_center \
        is ClipCenter.LAST_STEP


def test_an_outlier_is_refused_before_the_accumulator_changes() -> None:
    honest, attack = _delta(0.01, 1), _delta(0.1, 2)
    for center in (ClipCenter.ZERO, ClipCenter.LAST_STEP):
        acc = Accumulator(StrategyConfig(buffer_size=3, clip_median_factor=1.0, outlier_factor=3.0,
                                         clip_center=center))
        limit = 3 * l2_norm(honest)
        acc.fold(update_id="h", site="a", delta=honest, tau=0, num_samples=1, base_version=0,
                 median_bound=l2_norm(honest), outlier_limit=limit)
        before = acc.mean_delta()
        with pytest.raises(OutlierError, match="outlier_factor") as exc:
            acc.fold(update_id="x", site="b", delta=attack, tau=0, num_samples=1, base_version=0,
                     median_bound=l2_norm(honest), outlier_limit=limit)
        assert exc.value.reason == "outlier" and len(acc) == 1
        assert all(np.array_equal(before[k], acc.mean_delta()[k]) for k in before)


def test_outlier_factor_refines_the_median_clip() -> None:
    assert StrategyConfig(clip_median_factor=1.0, outlier_factor=4.0).outlier_factor == 4.0
    for bad in ({"outlier_factor": 4.0}, {"outlier_factor": 1.5, "clip_median_factor": 2.0},
                {"outlier_factor": -1.0, "clip_median_factor": 1.0}):
        with pytest.raises(ConfigError, match="strategy.outlier_factor"):
            StrategyConfig.from_params(bad)


def test_encrypted_jobs_refuse_robust_settings() -> None:
    for cfg in (StrategyConfig(clip_median_factor=2.0), StrategyConfig(robust=Robust.MEDIAN),
                StrategyConfig(robust=Robust.TRIMMED_MEAN)):
        with pytest.raises(ConfigError, match="strategy\\."):
            he.check_strategy(cfg)


def _version(version: int, parent: int, params: dict[str, object], contributions: list[dict[str, object]],
             weights: Weights) -> ModelVersion:
    return make_version(job="j", version=version, parent=parent, weights=weights,
                        included=[str(c["update_id"]) for c in contributions], strategy="fedbuff", params=params,
                        model={"name": "logreg", "args": {}}, contributions=contributions)


def test_replay_fold_needs_the_parent_chain_norms() -> None:
    cfg = StrategyConfig(buffer_size=1, clip_median_factor=2.0, clip_window=2)
    w = {k: np.zeros_like(v) for k, v in _delta(1.0).items()}
    parent = _version(5, 4, cfg.to_params(), [{"update_id": "x", "norm": 1.0}], w)
    u = make_update("j", "u", w, base_version=5, scale=0.1)
    child = _version(6, 5, cfg.to_params(), [{"update_id": "u", "norm": 1.0}], w)
    with pytest.raises(ClipHistoryUnknownError):
        fold_version(parent, child, [u], NormWindow(2, ((1.0,),), complete=False))
    norms = NormWindow(2, ((0.01, 0.01, 0.01), (0.01, 0.01)))
    weights, contributions, _ = fold_version(parent, child, [u], norms)
    assert l2_norm(weights) == pytest.approx(0.02, rel=1e-6)  # clipped to 2 x median
    assert contributions[0].norm == l2_norm(u.delta or {})


def test_replay_of_a_centred_fold_needs_the_parent_step() -> None:
    cfg = StrategyConfig(buffer_size=1, clip_median_factor=2.0, clip_window=2, clip_center=ClipCenter.LAST_STEP)
    w = {k: np.zeros_like(v) for k, v in _delta(1.0).items()}
    parent = _version(5, 4, cfg.to_params(), [{"update_id": "x", "deviation": 1.0}], w)
    u = make_update("j", "u", w, base_version=5, scale=0.1)
    child = _version(6, 5, cfg.to_params(), [{"update_id": "u", "deviation": 1.0}], w)
    norms = NormWindow(2, ((0.01, 0.01, 0.01), (0.01, 0.01)))
    with pytest.raises(ClipHistoryUnknownError, match="centre"):
        fold_version(parent, child, [u], norms)  # the window has no step: v4 was not read
    step = {k: np.full(np.shape(v), 0.001) for k, v in w.items()}
    weights, contributions, _ = fold_version(parent, child, [u], NormWindow(2, norms.versions, step=step))
    deviation = {k: np.asarray(weights[k], np.float64) - step[k] for k in weights}
    assert l2_norm(deviation) == pytest.approx(0.02, rel=1e-5)  # 2 x median deviation, around the step
    assert contributions[0].deviation is not None


def test_replay_of_a_version_written_before_norms_compares_what_was_recorded() -> None:
    cfg = StrategyConfig(buffer_size=1)
    w = {k: np.zeros_like(v) for k, v in _delta(1.0).items()}
    parent = _version(0, -1, cfg.to_params(), [], w)
    u = make_update("j", "u", w, scale=0.1)
    old = _version(1, 0, cfg.to_params(), [{"update_id": "u", "site": "site-0"}], w)
    _, contributions, _ = fold_version(parent, old, [u])
    assert "norm" not in contributions[0].to_dict()


# ------------------------------------------------------------------ jobs on the broker

@pytest.fixture()
def robust_job(broker_url: str) -> Iterator[str]:
    job = f"t-robust-{uuid.uuid4().hex[:8]}"
    yield job
    try:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))
    except Exception:
        pass


@pytest.mark.broker
@pytest.mark.timeout(240)
def test_a_10x_update_is_clipped_to_the_running_median_across_a_restart(broker_url: str, robust_job: str) -> None:
    job = robust_job
    cfg = StrategyConfig(buffer_size=2, flush_timeout=120.0, clip_median_factor=2.0, clip_window=3)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    honest = [make_update(job, f"h{i}", v0.weights, site=f"site-{i % 3}", seed=i, scale=0.01) for i in range(6)]
    with running_aggregator(broker_url, job):
        for i in range(3):
            publish_updates(broker_url, job, honest[2 * i:2 * i + 2])
            wait_for_version(broker_url, job, i + 1)
    # a new replica: the norm history comes from the models stream only
    with running_aggregator(broker_url, job, name="aggregator-2"):
        attacker = make_update(job, "evil", v0.weights, site="site-9", seed=99, scale=0.1, base_version=3)
        honest4 = make_update(job, "h6", v0.weights, site="site-1", seed=6, scale=0.01, base_version=3)
        publish_updates(broker_url, job, [attacker, honest4])
        got = wait_for_version(broker_url, job, 4)
        v3, v4 = got[3], got[4]
        assert v4.included == ("evil", "h6")
        norms = [c["norm"] for v in got[1:4] for c in v.contributions]
        bound = median_clip_bound(norms, 2.0)
        assert bound is not None
        raw = v4.contributions[0]["norm"]
        assert raw == l2_norm(attacker.delta or {}) and raw > 5 * bound  # the raw norm is recorded
        # the same fold by hand: the attacker's share is clipped to exactly the bound
        acc = Accumulator(cfg)
        for u in (attacker, honest4):
            acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=0, num_samples=u.num_samples,
                     base_version=3, median_bound=bound)
        expected, _ = acc.flush(v3.weights)
        assert weights_sha256(expected) == v4.sha256
        # and one more version after the restart, with the 10x update now in the history
        publish_updates(broker_url, job, [make_update(job, f"h{i}", v0.weights, seed=i, scale=0.01,
                                                      base_version=4) for i in (7, 8)])
        wait_for_version(broker_url, job, 5)
    report = replay(broker_url, job)
    statuses = [c.status for c in report.checks]
    assert statuses == [Status.ROOT] + [Status.OK] * 5, [c.to_dict() for c in report.checks]
    assert report.to_dict()["mismatches"] == 0


@pytest.mark.broker
@pytest.mark.timeout(240)
@pytest.mark.parametrize("robust", [Robust.TRIMMED_MEAN, Robust.MEDIAN])
def test_trimmed_mean_and_median_end_to_end(broker_url: str, robust_job: str, robust: Robust) -> None:
    job = robust_job
    cfg = StrategyConfig(buffer_size=5, flush_timeout=120.0, robust=robust, trim_fraction=0.2, staleness_a=0.0)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    ups = [make_update(job, f"h{i}", v0.weights, site=f"site-{i}", seed=i, scale=0.01) for i in range(4)]
    ups.append(make_update(job, "evil", v0.weights, site="site-9", seed=9, scale=100.0))
    with running_aggregator(broker_url, job):
        publish_updates(broker_url, job, ups)
        v1 = wait_for_version(broker_url, job, 1)[1]
    step = {k: np.asarray(v1.weights[k], np.float64) - np.asarray(v0.weights[k], np.float64) for k in v0.weights}
    assert max(float(np.max(np.abs(s))) for s in step.values()) < 0.1  # the 100x-scale update is cut away
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT, Status.OK]


@pytest.mark.broker
@pytest.mark.timeout(240)
def test_a_sign_flip_is_clipped_around_the_last_step_across_a_restart(broker_url: str, robust_job: str) -> None:
    job = robust_job
    cfg = StrategyConfig(buffer_size=2, flush_timeout=120.0, clip_median_factor=1.0, clip_window=3,
                         clip_center=ClipCenter.LAST_STEP, staleness_a=0.0)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    honest = [make_update(job, f"h{i}", v0.weights, site=f"site-{i % 3}", seed=i, scale=0.01) for i in range(6)]
    with running_aggregator(broker_url, job):
        for i in range(3):
            publish_updates(broker_url, job, [dataclasses.replace(u, base_version=i) for u in honest[2 * i:2 * i + 2]])
            wait_for_version(broker_url, job, i + 1)
    # a new replica: the deviations and the centre (v3 - v2) come from the models stream only
    with running_aggregator(broker_url, job, name="aggregator-2"):
        got = wait_for_version(broker_url, job, 3)
        v2, v3 = got[2], got[3]
        center = last_step(v3.weights, v2.weights, cfg)
        good = make_update(job, "h6", v0.weights, site="site-1", seed=6, scale=0.01, base_version=3)
        flip = dataclasses.replace(good, update_id="evil", task_id="evil", site="site-9",
                                   delta={k: -10 * v for k, v in (good.delta or {}).items()})
        publish_updates(broker_url, job, [flip, good])
        v4 = wait_for_version(broker_url, job, 4)[4]
        assert v4.included == ("evil", "h6")
        deviations = [c["deviation"] for v in got[1:4] for c in v.contributions]
        bound = median_clip_bound(deviations, 1.0)
        assert bound is not None and v4.contributions[0]["deviation"] > 5 * bound
        acc = Accumulator(cfg)
        for u in (flip, good):
            acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=0, num_samples=u.num_samples,
                     base_version=3, median_bound=bound, center=center)
        expected, _ = acc.flush(v3.weights)
        assert weights_sha256(expected) == v4.sha256
        # the flipped update moved the mean by at most bound / K away from the centre
        good_share, _ = centred_clip(good.delta or {}, center, bound)
        step = last_step(v4.weights, v3.weights, cfg)
        off = {k: 2 * step[k] - good_share[k] - center[k] for k in step}
        assert l2_norm(off) == pytest.approx(bound, rel=1e-4)
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT] + [Status.OK] * 4, [c.to_dict() for c in report.checks]


@pytest.mark.broker
@pytest.mark.timeout(240)
def test_an_outlier_is_dead_lettered_and_replay_agrees(broker_url: str, robust_job: str) -> None:
    job = robust_job
    cfg = StrategyConfig(buffer_size=2, flush_timeout=120.0, clip_median_factor=1.0, clip_window=3,
                         clip_center=ClipCenter.LAST_STEP, outlier_factor=3.0, staleness_a=0.0)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    with running_aggregator(broker_url, job):
        for i in range(3):
            publish_updates(broker_url, job, [make_update(job, f"h{2 * i + j}", v0.weights, site=f"site-{j}",
                                                          seed=2 * i + j, scale=0.01, base_version=i)
                                              for j in range(2)])
            wait_for_version(broker_url, job, i + 1)
        good = [make_update(job, f"h{i}", v0.weights, site="site-1", seed=i, scale=0.01, base_version=3)
                for i in (6, 7)]
        flip = dataclasses.replace(good[0], update_id="evil", task_id="evil", site="site-9",
                                   delta={k: -10 * v for k, v in (good[0].delta or {}).items()})
        publish_updates(broker_url, job, [good[0], flip, good[1]])
        v4 = wait_for_version(broker_url, job, 4)[4]
        assert v4.included == ("h6", "h7")  # the flip took no slot in the buffer
    dead = [d for d in dead_letters(broker_url, job) if d.update_id == "evil"]
    assert [d.reason for d in dead] == ["outlier"] and "outlier_factor" in dead[0].detail
    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT] + [Status.OK] * 4, [c.to_dict() for c in report.checks]
