"""Differential privacy at the site: DP-SGD with Opacus, local DP-FedAvg noise, the budget check.

`SitePrivacy.plan` runs before a task is trained: it works out the task's spend (sigma, sample
rate, steps) and refuses it with `PrivacyBudgetError` when the site's ledger would go past its
budget. `SitePrivacy.train` charges the ledger first (write-ahead, see `PrivacyLedger`), then
trains. Noise seeds come from `secrets`, never from the task id: a seed anyone can derive lets
them subtract the noise. (Opacus' secure_mode, which also hardens the sampler against
floating-point attacks, needs torchcsprng and is not used.)
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmq.shared.codec import Weights
from fedmq.shared.config import NoisePlacement, PrivacyConfig, PrivacyMechanism
from fedmq.shared.evaluation import loss_fn, task_of
from fedmq.shared.messages import Task
from fedmq.shared.models import build_model, get_weights, set_weights
from fedmq.shared.privacy import (
    HistoryEntry,
    PrivacyLedger,
    check_budget,
    clip,
    dp_sgd_noise_multiplier,
    fresh_rng,
    gaussian_noise,
    new_spend,
)
from fedmq.worker.train import LocalResult, task_seed, train_local

# Opacus' per-sample hooks fire on every backward with inputs that need no gradient (always, here),
# and it warns once per engine that secure RNG is off (said in the docstring above instead)
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)


@dataclass(frozen=True)
class DpPlan:
    """One task's privacy spend, decided before training."""

    cfg: PrivacyConfig
    entry: HistoryEntry | None  # (sigma, q, steps) charged to the ledger; None = central noise
    budget: float               # the site's effective budget; 0 = none
    epsilon_before: float
    epsilon_after: float

    @property
    def noise_multiplier(self) -> float:
        return self.entry[0] if self.entry else self.cfg.noise_multiplier

    def privacy_record(self) -> dict[str, Any]:
        """What travels in Update.privacy (and `epsilon` in the UPDATE_PUBLISHED event)."""
        c = self.cfg
        rec: dict[str, Any] = {"mechanism": c.mechanism.value, "delta": c.delta,
                               "epsilon": self.epsilon_after if self.entry else None,
                               "epsilon_budget": self.budget, "noise_multiplier": self.noise_multiplier}
        if c.mechanism is PrivacyMechanism.DP_SGD and self.entry is not None:
            rec.update(max_grad_norm=c.max_grad_norm, sample_rate=self.entry[1], steps=self.entry[2],
                       accountant=c.accountant.value)
        else:
            rec.update(clip_norm=c.clip_norm, noise_at=c.noise_at.value, accountant="rdp")
        return rec


def dp_sgd_shape(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, steps) of a DP-SGD task, as Opacus' Poisson loader makes them."""
    batches = max(1, math.ceil(num_samples / batch_size))
    return 1.0 / batches, epochs * batches


class SitePrivacy:
    """The site's side of DP: its ledger, its own budget cap and the per-job sigma cache."""

    def __init__(self, site: str, ledger_path: str | Path, *, site_budget: float = 0.0) -> None:
        self.site = site
        self.ledger = PrivacyLedger(ledger_path, site)
        self.site_budget = site_budget
        self._sigma: dict[tuple[str, float, int], float] = {}

    def budget(self, cfg: PrivacyConfig) -> float:
        """The tighter of the job's budget and the site operator's own (0 = none set)."""
        caps = [b for b in (cfg.epsilon, self.site_budget) if b > 0]
        return min(caps) if caps else 0.0

    def plan(self, task: Task, num_samples: int) -> DpPlan | None:
        """None for a task without DP; raises PrivacyBudgetError for one the site must refuse,
        ConfigError for options it cannot read."""
        raw = task.options.get("privacy")
        if not raw:
            return None
        cfg = PrivacyConfig.from_options(raw)
        if cfg.mechanism is PrivacyMechanism.NONE:
            return None
        budget = self.budget(cfg)
        if cfg.central:
            return DpPlan(cfg, None, budget, 0.0, 0.0)
        entry = self._entry(task, cfg, num_samples)
        before = self.ledger.epsilon(cfg.delta, cfg.accountant)
        after = self.ledger.epsilon(cfg.delta, cfg.accountant, extra=[entry])
        check_budget(self.site, before, after, budget)
        return DpPlan(cfg, entry, budget, before, after)

    def _entry(self, task: Task, cfg: PrivacyConfig, num_samples: int) -> HistoryEntry:
        if cfg.mechanism is PrivacyMechanism.DP_FEDAVG:
            return (cfg.noise_multiplier, 1.0, 1)  # one Gaussian release, no sampling
        q, steps = dp_sgd_shape(num_samples, task.batch_size, task.epochs)
        sigma = cfg.noise_multiplier
        if sigma == 0:
            key = (task.job, q, steps)
            if key not in self._sigma:
                self._sigma[key] = dp_sgd_noise_multiplier(cfg.epsilon, cfg.delta, q,
                                                           steps * cfg.planned_tasks)
            sigma = self._sigma[key]
        return (sigma, q, steps)

    def train(self, plan: DpPlan, task: Task, model_spec: dict[str, Any], base: Weights, x: np.ndarray,
              y: np.ndarray, device: torch.device | None = None,
              local: Callable[[], LocalResult] | None = None) -> LocalResult:
        """Charge the ledger, then train privately; `plan.entry` is what gets charged. `local` is a
        site's own trainer for DP-FedAvg (the bundled loop when None); DP-SGD always runs Opacus."""
        if plan.entry is not None:
            self.ledger.charge(new_spend(task.job, task.task_id, plan.cfg.mechanism, plan.entry))
        cfg = plan.cfg
        if cfg.mechanism is PrivacyMechanism.DP_SGD:
            return train_dp_sgd(model_spec, base, x, y, epochs=task.epochs, batch_size=task.batch_size,
                                lr=task.lr, noise_multiplier=plan.noise_multiplier,
                                max_grad_norm=cfg.max_grad_norm, device=device)
        result = local() if local is not None else train_local(
            model_spec, base, x, y, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, mu=task.mu,
            seed=task_seed(task.task_id), device=device)
        if cfg.noise_at is NoisePlacement.SITE:
            delta = clip_and_noise(result.delta, cfg.clip_norm, plan.noise_multiplier, fresh_rng())
            return LocalResult(delta, result.num_samples, result.metrics)
        return result


def clip_and_noise(delta: Weights, clip_norm: float, noise_multiplier: float,
                   rng: np.random.Generator) -> Weights:
    """Local DP-FedAvg: clip to L2 norm C, add N(0, sigma^2 C^2) per coordinate, keep dtypes."""
    clipped = clip(delta, clip_norm)
    noise = gaussian_noise(delta, rng, noise_multiplier * clip_norm)
    return {k: (np.asarray(clipped[k], dtype=np.float64) + noise[k]).astype(np.asarray(delta[k]).dtype)
            for k in delta}


def train_dp_sgd(model_spec: dict[str, Any], base: Weights, x: np.ndarray, y: np.ndarray, *,
                 epochs: int, batch_size: int, lr: float, noise_multiplier: float, max_grad_norm: float,
                 device: torch.device | None = None, seed: int | None = None) -> LocalResult:
    """DP-SGD from `base` with Opacus: Poisson-sampled batches at q = 1/ceil(n/batch_size),
    per-sample clipping to `max_grad_norm`, N(0, sigma^2 C^2) on every batch sum.

    `seed` exists for tests only: production noise must be unpredictable (see module docstring).
    """
    from opacus import PrivacyEngine

    device = device or torch.device("cpu")
    seed = secrets.randbits(63) if seed is None else seed
    model = build_model(model_spec)
    set_weights(model, base)
    model.to(device).train()
    data = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    loader = DataLoader(data, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant="rdp")
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1))
    criterion = loss_fn(task_of(model_spec))
    loss_sum, seen, steps, t0 = 0.0, 0, 0, time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            # an empty Poisson batch must still take its (pure-noise) step, or "no step" would
            # reveal that no record was drawn; its NaN mean loss has zero per-sample gradients
            loss = criterion(private(xb.to(device)), yb.to(device))
            loss.backward()
            opt.step()
            if len(yb):
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
            steps += 1
    local = get_weights(private._module)
    delta = {k: (local[k] - np.asarray(base[k])).astype(np.asarray(base[k]).dtype) for k in base}
    metrics = {"loss": loss_sum / max(seen, 1), "train_seconds": time.perf_counter() - t0, "epochs": epochs,
               "dp_steps": steps}
    return LocalResult(delta, len(y), metrics)
