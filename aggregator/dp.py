"""Differential privacy at the aggregator: DP-FedAvg's central noise and each version's epsilon.

The job's [privacy] options travel in v0's ``meta["privacy"]``; every version carries the running
accounting in ``meta["dp"]`` (copied forward, so a replica that takes over resumes it from the
newest version like everything else). ``meta["dp"]`` holds:

* ``epsilon``: the job's epsilon after this version = the worst site's (at ``delta``);
* ``site_epsilon``: {site: epsilon};
* ``releases`` (DP-FedAvg): {site: {m: count}}, how often the site entered a noised release with
  m updates at once (sensitivity m C, so a Gaussian of multiplier sigma / m); local noise makes
  each update its own release (m = 1);
* central noise only: ``noise_seed_sealed`` (AES-GCM, see `shared.privacy.seal_seed`),
  ``noise_std`` = sigma C and ``noise_scale`` = lr / denominator: the exact inputs of
  `central_noise_step`.

DP-SGD sites report their own ledger's epsilon in each Update; the version keeps the highest
seen per site.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.aggregator.strategy import Contribution
from fedmq.shared.codec import Weights
from fedmq.shared.config import PrivacyConfig, PrivacyMechanism, StrategyConfig
from fedmq.shared.errors import ConfigError, PrivacyBudgetError
from fedmq.shared.messages import ModelVersion, Update
from fedmq.shared.privacy import gaussian_epsilon, gaussian_noise, load_noise_key, open_seed, seal_seed

META_PRIVACY = "privacy"
META_DP = "dp"

Releases = dict[str, dict[str, int]]  # site -> {str(m): count}; msgpack maps need str keys


def central_noise_step(weights: Weights, *, seed: int, std: float, scale: float) -> Weights:
    """Central DP-FedAvg's noise, applied after `Accumulator.flush`: pure and bit-reproducible.

    ``w' = cast(float64(w) + scale * z)``, z = N(0, std^2) drawn by numpy's PCG64(seed) with
    `standard_normal` (float64) tensor by tensor in `weights`' order (non-float tensors: zeros).
    With scale = lr / denominator this equals noising the buffered sum before the mean
    (``w + lr (sum + z) / denominator``), up to float64 rounding. Replay re-applies it with
    ``seed = open_seed(key, job, version, meta["dp"]["noise_seed_sealed"])`` and ``std`` and
    ``scale`` from ``meta["dp"]``; the result hashes like the published version.
    """
    z = gaussian_noise(weights, np.random.Generator(np.random.PCG64(seed)), std)
    return {k: (np.asarray(w, dtype=np.float64) + scale * z[k]).astype(np.asarray(w).dtype)
            for k, w in weights.items()}


def replay_central_noise(weights: Weights, *, job: str, version: int, meta: Mapping[str, Any],
                         **_: Any) -> Weights:
    """`fedmq replay`'s post-flush step for key "dp" (fedmq.replay.POST_FLUSH_STEPS): re-applies
    `central_noise_step` from the version's sealed seed; versions without one pass unchanged.
    Without the noise key it raises ConfigError, and replay reports the version unverifiable."""
    dp = meta.get(META_DP) or {}
    if "noise_seed_sealed" not in dp:
        return weights
    seed = open_seed(load_noise_key(), job, version, dp["noise_seed_sealed"])
    return central_noise_step(weights, seed=seed, std=float(dp["noise_std"]), scale=float(dp["noise_scale"]))


def add_releases(releases: Mapping[str, Mapping[str, int]], sites: Sequence[str], *,
                 central: bool) -> Releases:
    """The releases after one version that folded updates from `sites` (one entry per update)."""
    out: Releases = {s: dict(h) for s, h in releases.items()}
    counts: dict[str, int] = {}
    for s in sites:
        counts[s] = counts.get(s, 0) + 1
    for s, m in counts.items():
        hist = out.setdefault(s, {})
        if central:
            hist[str(m)] = hist.get(str(m), 0) + 1
        else:
            hist["1"] = hist.get("1", 0) + m
    return out


def releases_epsilon(releases: Mapping[str, Mapping[str, int]], noise_multiplier: float,
                     delta: float) -> dict[str, float]:
    """{site: epsilon} of DP-FedAvg releases, each site composed with dp-accounting's RDP."""
    return {s: gaussian_epsilon(noise_multiplier, {int(m): c for m, c in h.items()}, delta)
            for s, h in releases.items()}


@dataclass
class DpAggregation:
    """The aggregator's DP state between two versions; rebuilt from the newest version on start."""

    job: str
    cfg: PrivacyConfig
    releases: Releases = field(default_factory=dict)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    key: bytes | None = None

    @classmethod
    def from_version(cls, mv: ModelVersion) -> DpAggregation | None:
        """None for a job without DP. Central noise needs the sealing key now (ConfigError if absent),
        not at the first flush."""
        raw = mv.meta.get(META_PRIVACY)
        if not raw:
            return None
        cfg = PrivacyConfig.from_options(raw)
        if cfg.mechanism is PrivacyMechanism.NONE:
            return None
        strategy = StrategyConfig.from_params(mv.params)
        if cfg.central and not 0 < strategy.clip_norm <= cfg.clip_norm:
            raise ConfigError(f"job {mv.job}: central DP-FedAvg needs strategy.clip_norm in (0, "
                              f"{cfg.clip_norm}], v0 has {strategy.clip_norm} (see privacy_strategy)")
        state = mv.meta.get(META_DP) or {}
        return cls(job=mv.job, cfg=cfg, releases={s: dict(h) for s, h in state.get("releases", {}).items()},
                   site_epsilon=dict(state.get("site_epsilon", {})),
                   key=load_noise_key() if cfg.central else None)

    @property
    def fedavg(self) -> bool:
        return self.cfg.mechanism is PrivacyMechanism.DP_FEDAVG

    def admit(self, update: Update, delta: Weights, buffered_sites: Sequence[str]) -> Weights:
        """The delta to fold. Central noise: refused (PrivacyBudgetError) when including it would
        take its site past the budget (the clip to C is the strategy's, `clip_norm` in v0's params,
        so replay clips the same way); DP-SGD: its reported epsilon is kept."""
        if self.cfg.mechanism is PrivacyMechanism.DP_SGD:
            eps = update.privacy.get("epsilon")
            if isinstance(eps, int | float):
                self.site_epsilon[update.site] = max(float(eps), self.site_epsilon.get(update.site, 0.0))
            return delta
        if not self.cfg.central:
            return delta
        if self.cfg.epsilon > 0:
            site = update.site
            sites = [s for s in buffered_sites if s == site] + [site]
            now = self.site_epsilon.get(site, 0.0)
            after = releases_epsilon(add_releases({site: self.releases.get(site, {})}, sites, central=True),
                                     self.cfg.noise_multiplier, self.cfg.delta)[site]
            if after > self.cfg.epsilon:
                raise PrivacyBudgetError(site, now, after, self.cfg.epsilon)
        return delta

    def finish(self, version: int, weights: Weights, contributions: Sequence[Contribution],
               lr: float) -> tuple[Weights, dict[str, Any]]:
        """Noise the flushed weights (central) and account the version: (weights, meta["dp"])."""
        cfg = self.cfg
        meta: dict[str, Any] = {"mechanism": cfg.mechanism.value, "delta": cfg.delta,
                                "epsilon_budget": cfg.epsilon}
        if self.fedavg:
            self.releases = add_releases(self.releases, [c.site for c in contributions], central=cfg.central)
            self.site_epsilon = releases_epsilon(self.releases, cfg.noise_multiplier, cfg.delta)
            meta.update(noise_at=cfg.noise_at.value, noise_multiplier=cfg.noise_multiplier,
                        clip_norm=cfg.clip_norm, releases=self.releases)
        if cfg.central:
            if self.key is None:
                raise ConfigError("central DP-FedAvg without a noise key (DpAggregation.from_version loads it)")
            seed = secrets.randbits(128)
            std, scale = cfg.noise_multiplier * cfg.clip_norm, lr / len(contributions)
            weights = central_noise_step(weights, seed=seed, std=std, scale=scale)
            meta.update(noise_seed_sealed=seal_seed(self.key, self.job, version, seed), noise_std=std,
                        noise_scale=scale)
        meta["site_epsilon"] = dict(self.site_epsilon)
        meta["epsilon"] = max(self.site_epsilon.values(), default=0.0)
        return weights, meta
