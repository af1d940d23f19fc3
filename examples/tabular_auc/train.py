"""A hospital network's tabular classifier: each site trains with Adam and class weights of its
own labels (its case mix differs from the others'), a plain PyTorch loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmq.site import TrainContext, TrainResult


def train(ctx: TrainContext) -> TrainResult:
    x, y = ctx.tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=ctx.batch_size, shuffle=True, generator=ctx.generator())
    counts = np.bincount(ctx.y, minlength=ctx.num_classes).astype(np.float32)
    weights = np.where(counts > 0, len(ctx.y) / (ctx.num_classes * np.maximum(counts, 1)), 1.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32, device=ctx.device))
    opt = torch.optim.Adam(ctx.model.parameters(), lr=ctx.lr)
    total, seen = 0.0, 0
    for _ in range(ctx.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            opt.zero_grad()
            loss = loss_fn(ctx.model(xb), yb) + ctx.proximal_term()
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(yb), seen + len(yb)
    return TrainResult(model=ctx.model, metrics={"loss": total / max(seen, 1)})
