"""Aggregation math, without a broker: each strategy against its textbook formula."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.strategy import Accumulator, aggregate, clip, l2_norm, learning_rate, staleness_factor
from fedmq.shared.codec import Weights
from fedmq.shared.config import Robust, StalenessFn, StrategyConfig, StrategyName

SHAPES = {"w": (3, 4), "b": (4,)}


def _weights(rng: np.random.Generator, dtype: Any = np.float32) -> Weights:
    return {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


def _fold_all(cfg: StrategyConfig, current: Weights, deltas: list[Weights], taus: list[int],
              ns: list[int]) -> Weights:
    rows = [(f"u{i}", f"s{i}", d, t, n, 0) for i, (d, t, n) in enumerate(zip(deltas, taus, ns, strict=True))]
    return aggregate(current, cfg, rows)


def _close(a: Weights, b: Weights, tol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                                   rtol=tol, atol=tol)


# ------------------------------------------------------------------ staleness functions


@pytest.mark.parametrize("tau", [0, 1, 3, 10, 100])
def test_constant_staleness_never_discounts(tau: int) -> None:
    assert staleness_factor(tau, StalenessFn.CONSTANT, a=0.9, b=0) == 1.0


@pytest.mark.parametrize("tau, a", [(0, 0.5), (3, 0.5), (8, 0.5), (4, 1.0), (9, 2.0)])
def test_polynomial_staleness_is_one_over_one_plus_tau_to_the_a(tau: int, a: float) -> None:
    assert math.isclose(staleness_factor(tau, StalenessFn.POLYNOMIAL, a=a), (1 + tau) ** -a)


def test_fedbuff_default_staleness_is_one_over_sqrt_one_plus_tau() -> None:
    cfg = StrategyConfig()
    for tau in range(20):
        s = staleness_factor(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        assert math.isclose(s, 1 / math.sqrt(1 + tau))


@pytest.mark.parametrize("tau, expected", [(0, 1.0), (4, 1.0), (5, 1 / 1.5), (8, 1 / 3.0), (14, 1 / 6.0)])
def test_hinge_staleness_is_flat_up_to_b_then_decays(tau: int, expected: float) -> None:
    assert math.isclose(staleness_factor(tau, StalenessFn.HINGE, a=0.5, b=4), expected)


@pytest.mark.parametrize("fn", list(StalenessFn))
def test_every_staleness_function_is_non_increasing_and_in_zero_one(fn: StalenessFn) -> None:
    values = [staleness_factor(t, fn, a=0.7, b=3) for t in range(60)]
    assert all(0 < v <= 1 for v in values)
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        staleness_factor(-1)


# ------------------------------------------------------------------ FedBuff / FedAvg / FedAsync


def test_fedbuff_at_zero_staleness_is_the_plain_mean_of_the_deltas() -> None:
    rng = np.random.default_rng(1)
    w, deltas = _weights(rng), [_weights(rng) for _ in range(5)]
    cfg = StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=5, sample_weighted=False)
    got = _fold_all(cfg, w, deltas, [0] * 5, [10, 20, 30, 40, 50])
    _close(got, {k: w[k] + np.mean([d[k] for d in deltas], axis=0) for k in w})


def test_fedbuff_server_lr_scales_the_mean_step() -> None:
    rng = np.random.default_rng(2)
    w, deltas = _weights(rng), [_weights(rng) for _ in range(3)]
    cfg = StrategyConfig(buffer_size=3, server_lr=0.25, sample_weighted=False)
    got = _fold_all(cfg, w, deltas, [0, 0, 0], [1, 1, 1])
    _close(got, {k: w[k] + 0.25 * np.mean([d[k] for d in deltas], axis=0) for k in w})


def test_fedbuff_discounts_stale_updates_by_one_over_sqrt_one_plus_tau() -> None:
    rng = np.random.default_rng(3)
    w, deltas, taus = _weights(rng), [_weights(rng) for _ in range(3)], [0, 3, 8]
    cfg = StrategyConfig(buffer_size=3, sample_weighted=False)
    got = _fold_all(cfg, w, deltas, taus, [1, 1, 1])
    want = {k: w[k] + sum(d[k] / math.sqrt(1 + t) for d, t in zip(deltas, taus, strict=True)) / 3 for k in w}
    _close(got, want)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=8), st.integers(0, 2**31))
def test_fedavg_is_the_sample_weighted_average_of_the_local_models(ns: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = _weights(rng, np.float64)
    local = [_weights(rng, np.float64) for _ in ns]  # w_k: each site's model after local training
    deltas = [{k: lk[k] - w[k] for k in w} for lk in local]
    cfg = StrategyConfig(name=StrategyName.FEDAVG, buffer_size=len(ns), max_staleness=0)
    got = _fold_all(cfg, w, deltas, [0] * len(ns), ns)
    n = sum(ns)
    _close(got, {k: np.sum([nk / n * lk[k] for nk, lk in zip(ns, local, strict=True)], axis=0) for k in w},
           tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 30), st.floats(0.05, 1.0), st.sampled_from(list(StalenessFn)), st.integers(0, 2**31))
def test_fedbuff_with_a_buffer_of_one_equals_fedasync(tau: int, alpha: float, fn: StalenessFn,
                                                      seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, delta = _weights(rng, np.float64), _weights(rng, np.float64)
    common: dict[str, Any] = dict(staleness=fn, staleness_a=0.5, staleness_b=2)
    fedasync = StrategyConfig(name=StrategyName.FEDASYNC, buffer_size=7, alpha=alpha, **common)
    fedbuff = StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=1, server_lr=alpha, **common)
    a = _fold_all(fedasync, w, [delta], [tau], [37])
    b = _fold_all(fedbuff, w, [delta], [tau], [37])
    for k in w:
        assert a[k].tobytes() == b[k].tobytes()


def test_fedasync_mixes_the_local_model_with_alpha_times_staleness() -> None:
    rng = np.random.default_rng(4)
    w, local = _weights(rng, np.float64), _weights(rng, np.float64)
    alpha, tau = 0.6, 3
    cfg = StrategyConfig(name=StrategyName.FEDASYNC, alpha=alpha)
    got = _fold_all(cfg, w, [{k: local[k] - w[k] for k in w}], [tau], [50])
    a_t = alpha / math.sqrt(1 + tau)
    _close(got, {k: (1 - a_t) * w[k] + a_t * local[k] for k in w}, tol=1e-12)


def test_fedasync_is_ready_after_every_update_whatever_the_buffer_size() -> None:
    acc = Accumulator(StrategyConfig(name=StrategyName.FEDASYNC, buffer_size=9))
    assert not acc.ready()
    acc.fold(update_id="u", site="s", delta={"w": np.ones(2)}, tau=0, num_samples=1, base_version=0)
    assert acc.ready()
    assert learning_rate(acc.cfg) == acc.cfg.alpha


def test_updates_without_samples_do_not_move_the_model() -> None:
    w = {"w": np.ones(3, np.float32)}
    got = _fold_all(StrategyConfig(buffer_size=2), w, [{"w": np.full(3, 5.0, np.float32)}] * 2, [0, 0], [0, 0])
    np.testing.assert_array_equal(got["w"], w["w"])


# ------------------------------------------------------------------ accumulator mechanics


def test_the_accumulator_keeps_one_running_sum_not_the_buffer() -> None:
    rng = np.random.default_rng(5)
    acc = Accumulator(StrategyConfig(buffer_size=50))
    for i in range(50):
        acc.fold(update_id=f"u{i}", site="s", delta=_weights(rng), tau=0, num_samples=3, base_version=0)
    assert acc._buffer == []  # mean-type strategies: memory O(model), not O(K x model)
    assert acc._sum is not None and set(acc._sum) == set(SHAPES)
    assert acc.ready()


def test_flush_keeps_the_model_dtype_records_contributions_and_empties_the_accumulator() -> None:
    rng = np.random.default_rng(6)
    acc = Accumulator(StrategyConfig(buffer_size=2))
    w = _weights(rng, np.float32)
    acc.fold(update_id="a", site="s1", delta=_weights(rng), tau=0, num_samples=10, base_version=4)
    acc.fold(update_id="b", site="s2", delta=_weights(rng), tau=3, num_samples=30, base_version=1)
    new, contributions = acc.flush(w)
    assert all(new[k].dtype == np.float32 for k in new)
    assert [c.update_id for c in contributions] == ["a", "b"]
    assert contributions[1].staleness == 3 and contributions[1].weight == pytest.approx(30 / 2)
    assert contributions[1].to_dict()["site"] == "s2"
    assert len(acc) == 0 and not acc.ready()
    with pytest.raises(ValueError, match="empty"):
        acc.flush(w)


def test_the_same_updates_in_the_same_order_give_a_bit_identical_version() -> None:
    rng = np.random.default_rng(7)
    w, deltas = _weights(rng), [_weights(rng) for _ in range(6)]
    cfg = StrategyConfig(buffer_size=6)
    a = _fold_all(cfg, w, deltas, [0, 1, 2, 0, 5, 1], [3, 9, 27, 1, 4, 8])
    b = _fold_all(cfg, w, deltas, [0, 1, 2, 0, 5, 1], [3, 9, 27, 1, 4, 8])
    assert all(a[k].tobytes() == b[k].tobytes() for k in w)


# ------------------------------------------------------------------ clipping and robust variants


def test_clip_scales_a_long_delta_to_the_bound_and_leaves_a_short_one_alone() -> None:
    long = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}  # norm 13
    clipped = clip(long, 6.5)
    assert l2_norm(clipped) == pytest.approx(6.5)
    np.testing.assert_allclose(clipped["a"], [1.5, 2.0])
    assert clip(long, 20.0) is long
    assert clip(long, 0.0) is long


def test_clip_norm_bounds_each_update_before_folding() -> None:
    w = {"w": np.zeros(2)}
    cfg = StrategyConfig(buffer_size=2, clip_norm=1.0, sample_weighted=False)
    got = _fold_all(cfg, w, [{"w": np.array([100.0, 0.0])}, {"w": np.array([0.0, 0.5])}], [0, 0], [1, 1])
    np.testing.assert_allclose(got["w"], [0.5, 0.25])


def test_coordinate_median_ignores_a_single_poisoned_update() -> None:
    w = {"w": np.zeros(3)}
    deltas = [{"w": np.array([1.0, 2.0, 3.0])}, {"w": np.array([1.1, 2.1, 2.9])},
              {"w": np.array([1e6, -1e6, 1e6])}]
    cfg = StrategyConfig(buffer_size=3, robust=Robust.MEDIAN)
    got = _fold_all(cfg, w, deltas, [0, 0, 0], [1, 1, 1])
    np.testing.assert_allclose(got["w"], [1.1, 2.0, 3.0])


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    w = {"w": np.zeros(1)}
    values = [-1000.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1000.0]
    cfg = StrategyConfig(buffer_size=10, robust=Robust.TRIMMED_MEAN, trim_fraction=0.1)
    got = _fold_all(cfg, w, [{"w": np.array([v])} for v in values], [0] * 10, [1] * 10)
    np.testing.assert_allclose(got["w"], [4.5])


def test_robust_variants_also_discount_stale_updates() -> None:
    w = {"w": np.zeros(1)}
    cfg = StrategyConfig(buffer_size=1, robust=Robust.MEDIAN)
    got = _fold_all(cfg, w, [{"w": np.array([2.0])}], [3], [1])
    np.testing.assert_allclose(got["w"], [1.0])  # 2 / sqrt(1 + 3)
