"""Trainers as a site operator would write them, for tests/test_trainer_api.py (imported as
``tests.user_trainer:<name>`` by `fedmq worker --trainer` in child processes, and called directly).

`adam_trainer` is ordinary PyTorch: a DataLoader, Adam, a StepLR schedule, a class-weighted loss,
FedProx's proximal term and autocast where the device supports it. The others return what no
update may be made of, as broken user code would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmq.site import TrainContext, TrainResult


def adam_trainer(ctx: TrainContext) -> TrainResult:
    model = ctx.model
    x, y = ctx.tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=ctx.batch_size, shuffle=True, generator=ctx.generator())
    opt = torch.optim.Adam(model.parameters(), lr=ctx.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, len(loader)), gamma=0.5)
    # a site's labels are skewed: weight each class by the inverse of its frequency here
    counts = np.bincount(ctx.y, minlength=ctx.num_classes).astype(np.float32)
    weights = np.where(counts > 0, len(ctx.y) / (ctx.num_classes * np.maximum(counts, 1)), 1.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32, device=ctx.device))
    amp = ctx.device.type == "cuda"
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(ctx.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            opt.zero_grad()
            with torch.autocast(device_type=ctx.device.type, enabled=amp):
                loss = loss_fn(model(xb), yb)
            (loss + ctx.proximal_term()).backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
            seen += len(yb)
            steps += 1
    return TrainResult(model=model, num_samples=seen // max(ctx.epochs, 1),
                       metrics={"loss": loss_sum / max(seen, 1), "trainer": "adam", "steps": steps,
                                "last_lr": sched.get_last_lr()[0]})


def delta_trainer(ctx: TrainContext) -> TrainResult:
    """Returns a delta of torch tensors (in reverse order) on half of the data, instead of a model."""
    half = max(1, len(ctx.y) // 2)
    x, y = ctx.tensors()
    opt = torch.optim.SGD(ctx.model.parameters(), lr=ctx.lr)
    for _ in range(ctx.epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(ctx.model(x[:half].to(ctx.device)), y[:half].to(ctx.device)).backward()
        opt.step()
    state = ctx.model.state_dict()
    delta = {k: state[k].detach() - torch.from_numpy(ctx.base[k]).to(ctx.device) for k in reversed(list(state))}
    return TrainResult(delta=delta, num_samples=half, metrics={"trainer": "delta"})


def nan_trainer(ctx: TrainContext) -> TrainResult:
    """Diverged: every weight NaN."""
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.fill_(float("nan"))
    return TrainResult(model=ctx.model, metrics={"loss": 1.0})


def wrong_shape_trainer(ctx: TrainContext) -> TrainResult:
    """A delta for another model: one tensor's shape is off by a row."""
    delta = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype) if i == 0 else np.zeros_like(v)
             for i, (k, v) in enumerate(ctx.base.items())}
    return TrainResult(delta=delta)


def dict_trainer(ctx: TrainContext) -> Any:
    """Forgot the contract: returns a plain dict."""
    return {"model": ctx.model}


def two_args(ctx: TrainContext, extra: int) -> TrainResult:
    raise AssertionError("never called: --trainer refuses it at start-up")


NOT_CALLABLE = 42
