"""The Byzantine-robustness benchmark in quick mode: one job per strategy and per attack, so a
broken attack, strategy or report fails CI (BENCHMARKS.md is not written)."""

from __future__ import annotations

import pytest

from bench import byzantine

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]


def test_quick_mode_runs_every_attack_and_strategy_and_replays_clean(broker_url: str) -> None:
    body = byzantine.run(broker_url, quick=True)
    for label in byzantine.ATTACK_LABELS.values():
        assert label in body
    for strategy in byzantine.STRATEGIES:
        assert f"| {strategy} |" in body
    assert " 0 mismatches" in body and "mismatches |" not in body.replace(" 0 mismatches |", "")


def test_attacks_change_the_delta_as_documented() -> None:
    import numpy as np

    delta = {"w": np.full((2, 2), 0.01, np.float32), "b": np.array([0.02, -0.02], np.float32)}
    flipped = byzantine.sign_flip("s", "t", delta)
    assert np.allclose(flipped["w"], -0.1) and flipped["b"].dtype == np.float32
    noise = byzantine.gaussian("s", "t", delta)
    assert noise["w"].shape == (2, 2) and not np.allclose(noise["w"], delta["w"])
    alie = byzantine.LittleIsEnough(z=1.0)
    first = alie("s", "t1", delta)
    assert np.allclose(first["w"], delta["w"])  # one delta in the pool: sigma 0
    second = alie("s", "t2", {k: 3 * v for k, v in delta.items()})
    assert np.allclose(second["w"], 0.02 - 0.01)  # mean 0.02, sigma 0.01
