"""A CNN on MNIST digits, trained at each site with SGD + momentum and a cosine learning-rate
schedule over the task's steps."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmq.site import TrainContext, TrainResult


def train(ctx: TrainContext) -> TrainResult:
    x, y = ctx.tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=ctx.batch_size, shuffle=True, generator=ctx.generator())
    opt = torch.optim.SGD(ctx.model.parameters(), lr=ctx.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, ctx.epochs * len(loader)))
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for _ in range(ctx.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            opt.zero_grad()
            loss = loss_fn(ctx.model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(yb), seen + len(yb)
    return TrainResult(model=ctx.model, metrics={"loss": total / max(seen, 1), "last_lr": sched.get_last_lr()[0]})
