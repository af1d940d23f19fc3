"""User strategies as a researcher writes them (`strategy.name = "tests.user_strategy:fedavgm"`).

Each is a pure function of (parent weights, StrategyConfig, buffered updates, parent state), see
fedmq.aggregator.strategy.Strategy; any memory it keeps travels in the returned state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmq.aggregator.strategy import BufferedUpdate
from fedmq.shared.codec import Weights
from fedmq.shared.config import StrategyConfig

MOMENTUM = 0.5


def fedavgm(current: Weights, cfg: StrategyConfig, updates: Sequence[BufferedUpdate],
            state: Weights | None) -> tuple[Weights, Weights | None]:
    """FedAvgM (Hsu et al., 2019): ``u = beta u + mean_delta``, ``w + server_lr * u``; u is the state."""
    total = sum(u.weight for u in updates)
    new: Weights = {}
    out: Weights = {}
    for k, w in current.items():
        dtype = np.asarray(w).dtype
        mean = np.zeros(np.shape(w), np.float64)
        for u in updates:
            if total > 0:
                mean += (u.staleness * u.weight / total) * np.asarray(u.delta[k], np.float64)
        prev = np.asarray(state[f"u:{k}"], np.float64) if state else np.zeros(np.shape(w), np.float64)
        velocity = MOMENTUM * prev + mean
        new[k] = (np.asarray(w, np.float64) + cfg.server_lr * velocity).astype(dtype)
        out[f"u:{k}"] = velocity.astype(dtype)
    return new, out


def median_of_deltas(current: Weights, cfg: StrategyConfig, updates: Sequence[BufferedUpdate],
                     state: Weights | None) -> tuple[Weights, Weights | None]:
    """Coordinate-wise median of the buffered deltas, stateless."""
    return {k: (np.asarray(w, np.float64) + cfg.server_lr * np.median(
        np.stack([np.asarray(u.delta[k], np.float64) for u in updates]), axis=0)).astype(np.asarray(w).dtype)
        for k, w in current.items()}, None


not_callable = 42
