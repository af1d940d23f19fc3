"""Checks an update must pass before it is folded; each failure is a dead-letter reason."""

from __future__ import annotations

import numpy as np

from fedmq.aggregator.strategy import l2_norm
from fedmq.shared.codec import Weights
from fedmq.shared.compression import CompressionSpec, check_tag, decompress
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import (
    EncryptionMismatchError,
    FutureVersionError,
    NonFiniteError,
    NormBoundError,
    ShapeMismatchError,
    StaleUpdateError,
    WrongJobError,
)
from fedmq.shared.messages import Update
from fedmq.shared.signing import JobTrust


def check_delta(delta: Weights, template: Weights, update_id: str) -> None:
    """Same tensor names in the same order, same shapes and dtypes, only finite values."""
    if list(delta) != list(template):
        raise ShapeMismatchError(
            f"update {update_id} has tensors {sorted(delta)} but the model has {sorted(template)}"
        )
    for name, ref in template.items():
        got = delta[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ShapeMismatchError(
                f"update {update_id}: tensor {name} is {got.dtype}{list(got.shape)}, "
                f"model has {ref.dtype}{list(ref.shape)}"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise NonFiniteError(f"update {update_id}: tensor {name} has NaN or Inf values")


def check_header(update: Update, *, job: str, current_version: int, cfg: StrategyConfig,
                 trust: JobTrust | None = None, routing_key: str | None = None) -> int:
    """Checks shared by plaintext and encrypted jobs: job, sender (routing key = site), task proof
    and signature (as v0 requires), base version. Returns the staleness tau."""
    uid = update.update_id
    if update.job != job:
        raise WrongJobError(f"update {uid} is for job {update.job!r}, this aggregator serves {job!r}")
    if trust is not None:
        trust.verify(update, routing_key)  # over the wire form: the site signs what it sends
    check_tag(update.compression, CompressionSpec.of(cfg), uid)
    if update.base_version > current_version:
        raise FutureVersionError(
            f"update {uid} starts from version {update.base_version}, newest is {current_version}"
        )
    tau = current_version - update.base_version
    if tau > cfg.max_staleness:
        raise StaleUpdateError(uid, tau, cfg.max_staleness)
    return tau


def dense_delta(update: Update, template: Weights, cfg: StrategyConfig) -> Weights:
    """The update's delta as the model's dense tensors: decompressed (strategy.compression) when
    the job compresses, as received otherwise. CompressionError for a wire form that is not the
    job's; the caller still runs `check_delta` on the result (replay folds it without)."""
    if update.delta is None:
        raise EncryptionMismatchError(f"update {update.update_id} is encrypted but job {update.job} "
                                      "aggregates in plaintext")
    spec = CompressionSpec.of(cfg)
    check_tag(update.compression, spec, update.update_id)
    return decompress(update.delta, spec, template, update.update_id)


def validated_delta(update: Update, *, job: str, current_version: int, template: Weights,
                    cfg: StrategyConfig, trust: JobTrust | None = None,
                    routing_key: str | None = None) -> tuple[int, Weights]:
    """The update's staleness tau and its dense delta (decompressed after the signature check),
    or the InvalidUpdateError that dead-letters it."""
    uid = update.update_id
    tau = check_header(update, job=job, current_version=current_version, cfg=cfg, trust=trust,
                       routing_key=routing_key)
    delta = dense_delta(update, template, cfg)
    check_delta(delta, template, uid)
    if cfg.max_update_norm > 0:
        norm = l2_norm(delta)
        if norm > cfg.max_update_norm:
            raise NormBoundError(f"update {uid} has L2 norm {norm:.4g} > bound {cfg.max_update_norm:.4g}")
    return tau, delta


def validate_update(update: Update, *, job: str, current_version: int, template: Weights,
                    cfg: StrategyConfig, trust: JobTrust | None = None, routing_key: str | None = None) -> int:
    """Return the update's staleness tau, or raise the InvalidUpdateError that dead-letters it."""
    return validated_delta(update, job=job, current_version=current_version, template=template, cfg=cfg,
                           trust=trust, routing_key=routing_key)[0]
