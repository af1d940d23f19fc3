"""Aggregation math: pure functions and a small accumulator, no I/O.

The service and `fedmq replay` both call `Accumulator`, so a replayed version is bit-identical to
the published one, on any machine. Determinism rules (docs/replay.md):

* updates are folded in `included` order (arrival order at the aggregator), never re-sorted;
* every sum is kept in float64 and the result is cast back to the model's dtype once, at flush;
* only IEEE-754 basic operations touch the numbers (+, -, *, /, sqrt: correctly rounded on every
  platform) and numpy's pairwise sum over a fresh contiguous float64 array (fixed order for a shape);
* no libm transcendental: glibc's ``pow`` picks an FMA or a non-FMA variant per CPU and may round
  the last bit differently, so the polynomial staleness factor is computed in decimal software
  arithmetic (`staleness_factor`) and a replay on another machine gets the same float;
* no randomness and no threads; anything random a future step adds (central DP noise) must be
  seeded from the version it produces and re-applied by replay (see `fedmq.replay.POST_FLUSH_STEPS`).

Strategies (all as ``w_next = w + lr * sum_k(s(tau_k) * m_k * delta_k) / sum_k(m_k)``, with
m_k = n_k when sample_weighted else 1):

* FedBuff (Nguyen et al., 2022): K buffered updates, lr = server_lr, s = 1/sqrt(1+tau) by default.
* FedAsync (Xie et al., 2019): K = 1, lr = alpha, s constant / polynomial / hinge. In delta form
  ``w + alpha_t * delta`` equals ``(1 - alpha_t) w + alpha_t (w + delta)``.
* FedAvg (McMahan et al., 2017): K = cohort, tau = 0, lr = 1: ``sum_k n_k/n * w_k``.
* Robust variants (trimmed mean, coordinate median) need the whole buffer in memory and ignore m_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

import numpy as np

from shared.codec import Weights
from shared.config import Robust, StalenessFn, StrategyConfig, StrategyName


def staleness_factor(tau: int, fn: StalenessFn = StalenessFn.POLYNOMIAL, a: float = 0.5, b: int = 4) -> float:
    """s(tau): constant 1; polynomial (1+tau)^-a; hinge 1 up to b, then 1/(a(tau-b)+1)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if fn is StalenessFn.CONSTANT:
        return 1.0
    if fn is StalenessFn.POLYNOMIAL:
        return _decimal_power(1 + tau, -a)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def _decimal_power(base: int, exponent: float) -> float:
    """base ** exponent without libm: libmpdec is pure integer arithmetic, so every platform gets
    the same float (40 digits, then one correctly rounded conversion). ~60 us per update."""
    with localcontext() as ctx:
        ctx.prec = 40
        return float(Decimal(base) ** Decimal(exponent))


def l2_norm(delta: Weights) -> float:
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values())))


def clip(delta: Weights, max_norm: float) -> Weights:
    """Scale `delta` to L2 norm <= max_norm (no-op when max_norm <= 0 or already inside)."""
    if max_norm <= 0:
        return delta
    norm = l2_norm(delta)
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}


@dataclass(frozen=True)
class Contribution:
    """How one update entered a version; stored in ModelVersion.contributions for audit."""

    update_id: str
    site: str
    base_version: int
    staleness: int
    weight: float
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "site": self.site, "base_version": self.base_version,
                "staleness": self.staleness, "weight": self.weight, "num_samples": self.num_samples}


def learning_rate(cfg: StrategyConfig) -> float:
    return cfg.alpha if cfg.name is StrategyName.FEDASYNC else cfg.server_lr


class Accumulator:
    """Folds deltas into a float64 running sum: memory O(model) for mean-type strategies."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self._sum: dict[str, np.ndarray] | None = None
        self._denominator = 0.0
        self._buffer: list[Weights] = []  # robust strategies only
        self.contributions: list[Contribution] = []

    def __len__(self) -> int:
        return len(self.contributions)

    def ready(self) -> bool:
        return len(self) >= self.cfg.effective_buffer

    def fold(self, *, update_id: str, site: str, delta: Weights, tau: int, num_samples: int,
             base_version: int) -> Contribution:
        cfg = self.cfg
        s = staleness_factor(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        m = float(num_samples) if cfg.sample_weighted else 1.0
        delta = clip(delta, cfg.clip_norm)
        if cfg.robust is Robust.NONE:
            if self._sum is None:
                self._sum = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in delta.items()}
            w = s * m
            for k, v in delta.items():
                self._sum[k] += w * np.asarray(v, dtype=np.float64)
            self._denominator += m
        else:
            self._buffer.append({k: s * np.asarray(v, dtype=np.float64) for k, v in delta.items()})
        c = Contribution(update_id, site, base_version, tau, s * m, num_samples)
        self.contributions.append(c)
        return c

    def mean_delta(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if cfg.robust is Robust.NONE:
            if self._sum is None or self._denominator <= 0:
                # every update had 0 samples: nothing to move the model by
                return {k: np.zeros_like(v) for k, v in (self._sum or {}).items()}
            return {k: v / self._denominator for k, v in self._sum.items()}
        out = {}
        for k in self._buffer[0]:
            stack = np.stack([d[k] for d in self._buffer])
            if cfg.robust is Robust.MEDIAN:
                out[k] = np.median(stack, axis=0)
            else:
                cut = int(np.floor(cfg.trim_fraction * len(stack)))
                srt = np.sort(stack, axis=0)
                out[k] = srt[cut:len(stack) - cut].mean(axis=0)
        return out

    def flush(self, current: Weights) -> tuple[Weights, list[Contribution]]:
        """New weights from `current` and the folded updates; empties the accumulator."""
        if not self.contributions:
            raise ValueError("flush of an empty accumulator")
        lr = learning_rate(self.cfg)
        mean = self.mean_delta()
        new: Weights = {}
        for k, w in current.items():
            step = mean.get(k)
            base = np.asarray(w, dtype=np.float64)
            new[k] = (base + lr * step if step is not None else base).astype(np.asarray(w).dtype)
        contributions = self.contributions
        self._sum, self._denominator, self._buffer, self.contributions = None, 0.0, [], []
        return new, contributions


def aggregate(current: Weights, cfg: StrategyConfig, updates: list[tuple[str, str, Weights, int, int, int]]) -> Weights:
    """One version from (update_id, site, delta, tau, num_samples, base_version) tuples, in order."""
    acc = Accumulator(cfg)
    for update_id, site, delta, tau, n, base in updates:
        acc.fold(update_id=update_id, site=site, delta=delta, tau=tau, num_samples=n, base_version=base)
    return acc.flush(current)[0]
