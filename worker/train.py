"""Local training at a site: plain PyTorch, no broker, so it can be tested and timed alone."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.codec import Weights
from shared.models import build_model, get_weights, set_weights


@dataclass(frozen=True)
class LocalResult:
    delta: Weights
    num_samples: int
    metrics: dict[str, Any]


def task_seed(task_id: str) -> int:
    """A seed fixed by the task, so a redelivered task trains the same way."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "little")


def train_local(model_spec: dict[str, Any], base: Weights, x: np.ndarray, y: np.ndarray, *,
                epochs: int, batch_size: int, lr: float, mu: float = 0.0, seed: int = 0,
                device: torch.device | None = None) -> LocalResult:
    """SGD for `epochs` over (x, y) from `base`; returns delta = local - base.

    mu > 0 adds FedProx's proximal term mu/2 * ||w - w_base||^2, which keeps heterogeneous sites
    from drifting far from the global model during long local work.
    """
    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    model = build_model(model_spec)
    set_weights(model, base)
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    n = len(xt)
    loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb, yb = xt[idx].to(device), yt[idx].to(device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            if mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * mu * prox
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
    local = get_weights(model)
    delta = {k: (local[k] - np.asarray(base[k])).astype(np.asarray(base[k]).dtype) for k in base}
    metrics = {"loss": loss_sum / max(seen, 1), "train_seconds": time.perf_counter() - t0, "epochs": epochs}
    return LocalResult(delta, n, metrics)
