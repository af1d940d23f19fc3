"""Update validation: each defect raises the error whose `reason` becomes the dead-letter header."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedmq.aggregator.validate import validate_update
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import (
    EncryptionMismatchError,
    FutureVersionError,
    InvalidUpdateError,
    NonFiniteError,
    NormBoundError,
    ShapeMismatchError,
    StaleUpdateError,
    WrongJobError,
)
from fedmq.shared.messages import Update

TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _update(**over: Any) -> Update:
    fields: dict[str, Any] = dict(job="j1", update_id="u-1", task_id="1", site="s", base_version=5,
                                  num_samples=10, delta={k: np.ones_like(v) for k, v in TEMPLATE.items()})
    fields.update(over)
    return Update(**fields)


def _validate(u: Update, cfg: StrategyConfig | None = None, current: int = 7) -> int:
    return validate_update(u, job="j1", current_version=current, template=TEMPLATE, cfg=cfg or StrategyConfig())


def test_a_good_update_returns_its_staleness() -> None:
    assert _validate(_update()) == 2


@pytest.mark.parametrize("update, error, reason", [
    (_update(job="other"), WrongJobError, "wrong_job"),
    (_update(base_version=8), FutureVersionError, "future_version"),
    (_update(base_version=0), StaleUpdateError, "stale"),
    (_update(delta={"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}),
     ShapeMismatchError, "shape_mismatch"),
    (_update(delta={"w": np.ones((2, 3), np.float64), "b": np.ones(3, np.float32)}),
     ShapeMismatchError, "shape_mismatch"),
    (_update(delta={"b": np.ones(3, np.float32), "w": np.ones((2, 3), np.float32)}),
     ShapeMismatchError, "shape_mismatch"),
    (_update(delta={"w": np.ones((2, 3), np.float32)}), ShapeMismatchError, "shape_mismatch"),
    (_update(delta={"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}),
     NonFiniteError, "non_finite"),
    (_update(delta={"w": np.ones((2, 3), np.float32), "b": np.array([1, np.inf, 1], np.float32)}),
     NonFiniteError, "non_finite"),
    (_update(delta=None, ciphertext={"scheme": "ckks", "chunks": []}), EncryptionMismatchError,
     "encryption_mismatch"),
])
def test_each_defect_has_its_own_error_and_reason(update: Update, error: type[InvalidUpdateError],
                                                  reason: str) -> None:
    cfg = StrategyConfig(max_staleness=4)
    with pytest.raises(error) as info:
        _validate(update, cfg)
    assert type(info.value) is error
    assert info.value.reason == reason


def test_the_norm_bound_dead_letters_only_larger_deltas() -> None:
    cfg = StrategyConfig(max_update_norm=2.0)
    small = _update(delta={"w": np.full((2, 3), 0.1, np.float32), "b": np.zeros(3, np.float32)})
    assert _validate(small, cfg) == 2
    with pytest.raises(NormBoundError, match="L2 norm"):
        _validate(_update(), cfg)  # norm sqrt(9) = 3


def test_an_update_exactly_at_max_staleness_is_accepted() -> None:
    assert _validate(_update(base_version=3), StrategyConfig(max_staleness=4)) == 4
