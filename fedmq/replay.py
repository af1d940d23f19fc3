"""`fedmq replay`: prove that every published version is exactly what its updates produce.

For each entry of the models stream, in order, replay takes the parent version and the updates
its `included` list names (from the updates-log stream), folds them with `aggregator.strategy.
Accumulator` -- the aggregator's own code, in the recorded order, with tau = parent.version -
base_version -- and compares the sha256 of the result with the recorded one. Equality is bit for
bit: the determinism rules are in aggregator/strategy.py and docs/replay.md.

What each status means (`Status`):

* ``ok`` -- recomputed bit for bit; the recorded contributions (site, base version, staleness,
  weight, samples) match the recomputation too.
* ``mismatch`` -- the first kind of evidence of tampering or a bug: the recomputed hash differs, the
  weights do not hash to their own sha256, an included update is missing from an untruncated log
  or fails the aggregator's validation, or a parent is missing mid-stream.
* ``root`` -- v0 has no parent; only the hash of its weights is checked.
* ``chain_only`` -- built from CKKS ciphertexts: replay recomputes the encrypted sum from the
  logged ciphertexts with the job's public context (aggregator.he), but without the key holder's
  secret context (``--secret``) it cannot redo the decryption, and says so (`check_encrypted`).
  With ``--secret`` such a version is re-decrypted and is ``ok`` or ``mismatch`` like any other.
* ``truncated`` -- retention dropped the parent or an update; only a leading run of versions can
  be truncated (retention drops the oldest segments), so `verifiable_from` is where proof starts.
* ``unverifiable`` -- a post-flush step (central DP noise) cannot be re-applied here, e.g. without
  the noise key; never reported as ``ok``.
* ``duplicate`` -- the same version number with the same sha256 again (a republish); skipped.

What-if replay (`--strategy`, `--param`) feeds the same updates, in the same arrival order, to an
Accumulator configured otherwise, evaluates its versions on the job's test data, and prints both
accuracy curves. It only reads streams: nothing is ever published into the job.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fedmq.aggregator.strategy import (
    Accumulator,
    Contribution,
    NormWindow,
    clip_measure,
    l2_norm,
    last_step,
    recorded_norms,
    strategy_source_sha256,
)
from fedmq.aggregator.validate import check_header, dense_delta, validate_update
from fedmq.history import StreamCursor, decode_or_none
from fedmq.shared.broker import JobNames, read_tail
from fedmq.shared.codec import Weights, weights_sha256
from fedmq.shared.compression import CompressionSpec, check_tag, decompress
from fedmq.shared.config import ClipCenter, StrategyConfig, StrategyName
from fedmq.shared.errors import (
    ConfigError,
    FedmqError,
    InvalidUpdateError,
    JobNotFoundError,
    OutlierError,
    ServerStateError,
)
from fedmq.shared.messages import ModelVersion, Update
from fedmq.shared.plugins import import_callable
from fedmq.shared.signing import JobTrust

log = logging.getLogger(__name__)

#: an update based on version b can be folded into version b + max_staleness + 1 at the latest; an
#: update logged from version v + HORIZON on was published after every update of version v.
HORIZON = 2
#: how many other copies of a redelivered update id replay tries before calling a version a mismatch
MAX_ALTERNATIVES = 8
#: versions kept as possible parents, and versions a folded update is kept for: a fork (two
#: replicas briefly both active) re-includes the same ids in a second entry of the same version
RECENT_VERSIONS = 4

# ---------------------------------------------------------------------------- post-flush hook

#: Steps the aggregator applies to the weights *after* `Accumulator.flush` and before publishing,
#: keyed by the ModelVersion.meta entry that records each step's randomness, as
#: ``"package.module:function"`` (imported lazily, applied in this order when the key is in a
#: version's meta). The function is called as::
#:
#:     fn(weights, *, job=..., version=..., meta=version.meta, cfg=StrategyConfig,
#:        contributions=[Contribution, ...]) -> Weights
#:
#: Central DP noise (shared/privacy.py, ``noise_at = "aggregator"``) plugs in here: put the noising
#: in one such function, call it from the aggregator right after its flush (with the meta of the
#: version it is building, holding the sealed seed), and add ``"<meta key>": "fedmq.shared.privacy:<fn>"``
#: below. Replay then re-applies the very same function to the recomputed sum. Without the noise
#: key the function should raise a FedmqError (ConfigError / SealedSeedError): the version is then
#: reported ``unverifiable`` with that message -- never ``ok``, never a false ``mismatch``.
POST_FLUSH_STEPS: dict[str, str] = {"dp": "fedmq.aggregator.dp:replay_central_noise"}

PostFlushStep = Callable[..., Weights]


def _load_step(target: str) -> PostFlushStep:
    return import_callable(target, "post-flush step")


def apply_post_flush(weights: Weights, version: ModelVersion, cfg: StrategyConfig,
                     contributions: Sequence[Contribution]) -> Weights:
    """Re-apply the registered steps whose meta key the version carries (FedmqError: cannot)."""
    for key, target in POST_FLUSH_STEPS.items():
        if key in version.meta:
            weights = _load_step(target)(weights, job=version.job, version=version.version,
                                         meta=version.meta, cfg=cfg, contributions=list(contributions))
    return weights


# ---------------------------------------------------------------------------- verdicts


class Status(StrEnum):
    OK = "ok"
    MISMATCH = "mismatch"
    ROOT = "root"
    CHAIN_ONLY = "chain_only"
    TRUNCATED = "truncated"
    UNVERIFIABLE = "unverifiable"
    DUPLICATE = "duplicate"
    INCOMPLETE = "incomplete"  # internal: parent or updates not found; the replayer decides which


CONCLUSIVE = (Status.OK, Status.MISMATCH, Status.ROOT, Status.CHAIN_ONLY)


@dataclass(frozen=True)
class VersionCheck:
    version: int
    parent: int
    status: Status
    sha256: str
    recomputed_sha256: str | None = None
    updates: int = 0
    detail: str = ""
    missing_parent: bool = False
    missing_updates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "parent": self.parent, "status": self.status.value,
                "sha256": self.sha256, "recomputed_sha256": self.recomputed_sha256,
                "updates": self.updates, "detail": self.detail,
                "missing_updates": list(self.missing_updates)}


@dataclass(frozen=True)
class Verdict:
    check: VersionCheck
    used: tuple[Update, ...] = ()  # the log copies the verdict rests on, in `included` order


def _annotate(verdict: Verdict, note: str) -> Verdict:
    detail = f"{verdict.check.detail}; {note}" if verdict.check.detail else note
    return Verdict(dataclasses.replace(verdict.check, detail=detail), verdict.used)


def _verdict(version: ModelVersion, status: Status, detail: str, *, recomputed: str | None = None,
             used: Sequence[Update] = (), **extra: Any) -> Verdict:
    check = VersionCheck(version.version, version.parent, status, version.sha256, recomputed,
                         len(version.included), detail, **extra)
    return Verdict(check, tuple(used))


# ---------------------------------------------------------------------------- pure checks


@dataclass(frozen=True)
class HeKeys:
    """TenSEAL contexts for encrypted versions: the job's public context (published in v0's meta)
    and, only for the key holder's own audit, its secret context."""

    public: Any
    secret: Any | None = None


class ClipHistoryUnknownError(FedmqError):
    """The running-median clip bound of a version needs norms of versions that were not read."""


_WARNED_STRATEGIES: set[tuple[str, str]] = set()


def _warn_changed_strategy(cfg: StrategyConfig, version: ModelVersion) -> None:
    """Warn (once per job and strategy) when the user strategy's source file differs from the one
    the aggregator ran (v1.. meta's user_strategy.source_sha256): mismatches are then expected."""
    recorded = version.meta.get("user_strategy")
    if not cfg.name.is_user or not isinstance(recorded, dict) or (version.job, cfg.name.value) in _WARNED_STRATEGIES:
        return
    here = strategy_source_sha256(cfg)
    if recorded.get("source_sha256") != here:
        _WARNED_STRATEGIES.add((version.job, cfg.name.value))
        log.warning("user strategy changed job=%s strategy=%s recorded_sha256=%s local_sha256=%s",
                    version.job, cfg.name.value, recorded.get("source_sha256"), here)


def fold_version(parent: ModelVersion, version: ModelVersion, updates: Sequence[Update],
                 norms: NormWindow | None = None) -> tuple[Weights, list[Contribution], StrategyConfig]:
    """The aggregator's computation of `version`: Accumulator(version's params), each update
    folded in order with tau = parent.version - base_version, flushed onto the parent's weights.

    `norms` is the parent chain's NormWindow (the recorded norms of the clip_window versions up to
    `parent`): the running-median clip bound is recomputed from it, never read from the version.
    Raises ClipHistoryUnknownError when clipping is on and that window was not (fully) read."""
    cfg = StrategyConfig.from_params(version.params)
    bound = limit = None
    if cfg.clip_median_factor > 0:
        if norms is None or not norms.known:
            raise ClipHistoryUnknownError(
                f"the running-median clip bound needs the norms of the {cfg.clip_window} versions up to "
                f"v{parent.version}, and the older ones were not read (truncated models stream)")
        window = NormWindow(cfg.clip_window, norms.versions, norms.complete)
        bound, limit = window.bound(cfg), window.limit(cfg)
    center = norms.step if norms is not None else None
    if cfg.clip_center is ClipCenter.LAST_STEP and center is None:
        raise ClipHistoryUnknownError(
            f"the centred clip's centre is the step v{parent.version} took from its parent, which was not read")
    _warn_changed_strategy(cfg, version)
    acc = Accumulator(cfg)
    for u in updates:
        if u.delta is None:
            raise ValueError(f"update {u.update_id} is encrypted")
        # the aggregator's own decompression (shared/compression.py): deterministic, so bit for bit
        acc.fold(update_id=u.update_id, site=u.site, delta=dense_delta(u, parent.weights, cfg),
                 tau=parent.version - u.base_version,
                 num_samples=u.num_samples, base_version=u.base_version, median_bound=bound, center=center,
                 outlier_limit=limit)
    weights, contributions, state = acc.step(parent.weights, parent.server_state)
    if weights_sha256(state or {}) != weights_sha256(version.server_state or {}):
        raise ValueError("the recomputed server-optimizer state differs from the one the version records")
    if version.contributions and not any("norm" in c for c in version.contributions):
        # written before norms were recorded: compare what was recorded (the math is unchanged)
        contributions = [dataclasses.replace(c, norm=None) for c in contributions]
    return weights, contributions, cfg


def _ordered_candidates(version: ModelVersion, candidates: Mapping[str, Sequence[Update]]) -> list[list[Update]]:
    """Per included id, its log copies; those matching the recorded contribution first.

    A task redelivered to another site yields a second update with the same id; the contribution
    records which site's copy the aggregator folded.
    """
    recorded = list(version.contributions) if len(version.contributions) == len(version.included) else []
    out = []
    for i, uid in enumerate(version.included):
        copies = list(candidates.get(uid, ()))
        if recorded:
            c = recorded[i]
            match = [u for u in copies if (u.site, u.base_version, u.num_samples)
                     == (c.get("site"), c.get("base_version"), c.get("num_samples"))]
            # by identity: two copies of one update (a site that published it twice) compare
            # their tensors under ==, which is ambiguous for arrays
            copies = match + [u for u in copies if not any(u is m for m in match)]
        out.append(copies)
    return out


def _attempts(options: list[list[Update]]) -> list[list[Update]]:
    """The first copy of each id, then single substitutions of the other copies (bounded)."""
    first = [o[0] for o in options]
    tries = [first]
    for i, opts in enumerate(options):
        for alt in opts[1:]:
            if len(tries) > MAX_ALTERNATIVES:
                return tries
            tries.append(first[:i] + [alt] + first[i + 1:])
    return tries


def _contribution_diff(recorded: Sequence[dict[str, Any]], recomputed: Sequence[Contribution]) -> str:
    if not recorded:
        return ""  # versions written before contributions were recorded
    mine = [c.to_dict() for c in recomputed]
    if len(recorded) != len(mine):
        return f"{len(recorded)} contributions recorded, {len(mine)} recomputed"
    for i, (r, m) in enumerate(zip(recorded, mine, strict=True)):
        for k, v in m.items():
            if r.get(k) != v:
                return f"contribution {i} ({m['update_id']}): recorded {k}={r.get(k)!r}, recomputed {v!r}"
    return ""


def _weights_diff(recorded: Weights, recomputed: Weights) -> str:
    worst, where = 0.0, ""
    for k, v in recomputed.items():
        r = recorded.get(k)
        if r is None or np.shape(r) != np.shape(v):
            return f"tensor {k} missing or reshaped in the published weights"
        d = float(np.max(np.abs(np.asarray(r, np.float64) - np.asarray(v, np.float64)), initial=0.0))
        if d > worst:
            worst, where = d, k
    return f"largest difference {worst:.3g} in {where}" if where else "weights equal, names or dtypes differ"


def check_encrypted(parent: ModelVersion, version: ModelVersion, used: Sequence[Update],
                    he_keys: HeKeys | None = None) -> Verdict:
    """What replay can prove about a version the CKKS key holder decrypted.

    Always (the caller has run the aggregator's header checks: job, signature against the site
    registry, staleness bound): the parent link; the published weights hash to the recorded
    sha256; every included update is in the log, encrypted under the job's context (the
    fingerprint in meta["encryption"], shared.he.META_ENCRYPTION), with the recorded site, base
    version, samples and staleness. With the public context (`he_keys`): the encrypted sum of
    those ciphertexts with the strategy's weights, recomputed by `aggregator.he.
    replay_encrypted_version`, hashes to the one the key holder decrypted (meta["he"]). With the
    secret context too: the decryption is redone and the weights compared bit for bit.
    """
    problems = []
    enc = version.meta.get("encryption")
    context = enc.get("context_sha256") if isinstance(enc, Mapping) else None
    recorded = list(version.contributions)
    for i, u in enumerate(used):
        tau = parent.version - u.base_version
        if u.ciphertext is None:
            problems.append(f"{u.update_id} is plaintext in a version built from ciphertexts")
        elif context and u.ciphertext.get("context_sha256") != context:
            problems.append(f"{u.update_id} is encrypted under another context")
        if tau < 0:
            problems.append(f"{u.update_id} starts from v{u.base_version}, after its parent v{parent.version}")
        if i < len(recorded):
            c = recorded[i]
            got = (c.get("site"), c.get("base_version"), c.get("num_samples"), c.get("staleness"))
            if got != (u.site, u.base_version, u.num_samples, tau):
                problems.append(f"{u.update_id}: recorded (site, base, samples, tau) {got} but the log "
                                f"says {(u.site, u.base_version, u.num_samples, tau)}")
    if problems:
        return _verdict(version, Status.MISMATCH, "; ".join(problems), used=used)
    chain = ("parent link, sha256 of the published weights and the included ciphertexts (context, "
             "site, base version, samples, staleness) verified")
    meta_he = version.meta.get("he")  # shared.he.META_AGGREGATE, written by the key holder
    if he_keys is None or not isinstance(meta_he, Mapping):
        why = ("without the job's public context (published in v0, which was not read)" if he_keys is None
               else "the version records no encrypted sum (meta['he'])")
        return _verdict(version, Status.CHAIN_ONLY, f"CKKS version: {chain}; {why}, so the encrypted sum is "
                        "not recomputed and the decryption is not re-done", used=used)
    from fedmq.aggregator.he import replay_encrypted_version

    taus = [parent.version - u.base_version for u in used]
    try:
        res = replay_encrypted_version(parent.weights, version.sha256, meta_he, version.params, used, taus,
                                       he_keys.public, he_keys.secret)
    except (FedmqError, ValueError, RuntimeError) as exc:  # TenSEAL raises ValueError/RuntimeError
        return _verdict(version, Status.MISMATCH, f"cannot recompute the encrypted sum: {exc}", used=used)
    if not res.sum_matches or res.weights_match is False:
        return _verdict(version, Status.MISMATCH, res.detail, used=used)
    if res.weights_match:
        return _verdict(version, Status.OK, f"CKKS version: {res.detail}", recomputed=version.sha256,
                        used=used)
    return _verdict(version, Status.CHAIN_ONLY, f"CKKS version: {chain}; the encrypted sum recomputed bit "
                    "for bit with the public context; the decryption needs the key holder's secret "
                    "context (--secret) and is not re-done", used=used)


def check_version(parent: ModelVersion | None, version: ModelVersion,
                  candidates: Mapping[str, Sequence[Update]], *, he_keys: HeKeys | None = None,
                  norms: NormWindow | None = None) -> Verdict:
    """Verify one version against its parent and the log copies of its included updates
    (`norms`: the parent chain's recorded norms, for the running-median clip; fold_version)."""
    if not version.verify_hash():
        return _verdict(version, Status.MISMATCH, "the published weights do not hash to the recorded sha256")
    if version.parent < 0:
        return _verdict(version, Status.ROOT, "no parent: the hash of the published weights is checked")
    missing = tuple(uid for uid in version.included if not candidates.get(uid))
    if parent is None or missing:
        return _verdict(version, Status.INCOMPLETE, "", missing_parent=parent is None, missing_updates=missing)
    if not version.included:
        return _verdict(version, Status.MISMATCH, "a version with no included updates")
    options = _ordered_candidates(version, candidates)
    if any(o[0].delta is None for o in options):
        used = [o[0] for o in options]
        try:
            invalid = _refused_by_validation(parent, version, used)
        except ConfigError as exc:
            invalid = f"cannot recompute: {exc}"
        if invalid:
            return _verdict(version, Status.MISMATCH, invalid, used=used)
        return check_encrypted(parent, version, used, he_keys)
    tried: list[tuple[str, Weights, list[Contribution]]] = []
    for attempt in _attempts(options):
        try:
            invalid = _refused_by_validation(parent, version, attempt)
            if invalid:
                return _verdict(version, Status.MISMATCH, invalid, used=attempt)
            weights, contributions, cfg = fold_version(parent, version, attempt, norms)
        except ClipHistoryUnknownError as exc:
            return _verdict(version, Status.UNVERIFIABLE, str(exc), used=attempt)
        except InvalidUpdateError as exc:  # an included outlier: the aggregator should have refused it
            return _verdict(version, Status.MISMATCH, f"included update refused ({exc.reason}): {exc}", used=attempt)
        except (ConfigError, ServerStateError, ValueError, KeyError) as exc:
            return _verdict(version, Status.MISMATCH, f"cannot recompute: {exc}", used=attempt)
        try:
            weights = apply_post_flush(weights, version, cfg, contributions)
        except FedmqError as exc:
            return _verdict(version, Status.UNVERIFIABLE, str(exc), used=attempt)
        sha = weights_sha256(weights)
        contribution_note = _contribution_diff(version.contributions, contributions)
        if sha == version.sha256 and not contribution_note:
            return _verdict(version, Status.OK, "", recomputed=sha, used=attempt)
        tried.append((sha, weights, contributions))
    sha, weights, contributions = tried[0]  # the diagnosis is about the first-choice copies
    notes = [n for n in (_contribution_diff(version.contributions, contributions),) if n]
    if sha != version.sha256:
        notes.insert(0, f"recomputed sha256 {sha[:16]} != recorded {version.sha256[:16]}; "
                        + _weights_diff(version.weights, weights))
    return _verdict(version, Status.MISMATCH, "; ".join(notes), recomputed=sha,
                    used=[o[0] for o in options])


def _refused_by_validation(parent: ModelVersion, version: ModelVersion, updates: Sequence[Update]) -> str:
    """The aggregator's own validation, as at fold time (task proofs and signatures included, as
    v0 requires them): an included update it refuses is evidence. The sender check (routing key
    = site) was made when the update was read from the log (`UpdateLog`)."""
    cfg = StrategyConfig.from_params(version.params)
    trust = JobTrust.from_meta(parent.meta)
    for u in updates:
        try:
            if u.delta is None:
                check_header(u, job=version.job, current_version=parent.version, cfg=cfg, trust=trust)
            else:
                validate_update(u, job=version.job, current_version=parent.version,
                                template=parent.weights, cfg=cfg, trust=trust)
        except InvalidUpdateError as exc:
            return f"included update {u.update_id} fails the aggregator's validation ({exc.reason}): {exc}"
    return ""


# ---------------------------------------------------------------------------- the updates log


class UpdateLog:
    """Updates from the log, pulled lazily in log order as versions ask for them.

    Memory stays bounded: an id is dropped once folded, and an update that can no longer be
    folded (its base version is more than max_staleness + 1 behind) is evicted.
    """

    def __init__(self, cursor: StreamCursor) -> None:
        self.cursor = cursor
        self.pending: dict[str, list[Update]] = {}
        self.folded: set[str] = set()
        self.recently_folded: dict[str, tuple[int, list[Update]]] = {}  # id -> (version, copies)
        self.max_base_seen = -1
        #: what may advance the look-ahead (`_credible`): v0's trust, the newest version number
        self.trust: JobTrust | None = None
        self.newest_version: int | None = None
        self.read = 0
        self.unreadable = 0
        self.not_credible = 0  # decoded, but no proof of an issued task or a base beyond the newest
        self.duplicates = 0
        self.evicted = 0
        self.exhausted = False

    @property
    def truncated(self) -> bool:
        return (self.cursor.first_offset or 0) > 0

    def _known(self, uid: str) -> bool:
        return uid in self.pending or uid in self.recently_folded

    def candidates(self, version: ModelVersion) -> dict[str, list[Update]]:
        want = [uid for uid in version.included if not self._known(uid)]
        while want and not self.exhausted and self.max_base_seen < version.version + HORIZON:
            d = self.cursor.next()
            if d is None:
                d = self.cursor.extend()  # the tail snapshot may be a little behind
            if d is None:
                self.exhausted = True
                break
            u = decode_or_none(Update, d)
            self._add(u if u is None or u.site == d.routing_key else None)  # a body lying about its sender
            want = [uid for uid in want if not self._known(uid)]
        return {uid: self.pending.get(uid) or self.recently_folded.get(uid, (0, []))[1]
                for uid in version.included}

    def _add(self, u: Update | None) -> None:
        self.read += 1
        if u is None:
            self.unreadable += 1
            return
        if u.update_id in self.folded:
            self.duplicates += 1
            return
        if self.newest_version is not None and u.base_version > self.newest_version:
            # based on a version that does not exist: no version can fold it, and kept it would
            # never be evicted; a version that includes it anyway is a mismatch (update missing)
            self.not_credible += 1
            log.warning("update not credible job=%s update=%s base_version=%d newest=%d", u.job,
                        u.update_id, u.base_version, self.newest_version)
            return
        self.pending.setdefault(u.update_id, []).append(u)
        if self._credible(u):
            self.max_base_seen = max(self.max_base_seen, u.base_version)

    def _credible(self, u: Update) -> bool:
        """May `u` advance the look-ahead? Its base version is sender-chosen: one unsigned body based
        on version 10**9 once ended the read early and made every later version a mismatch. Only an
        update that answers an issued task (JobTrust of v0) counts; any other is kept as a candidate
        (the aggregator's validation judges it if a version includes it)."""
        try:
            (self.trust or JobTrust()).verify(u, None)  # the sender (routing key) was checked on read
        except InvalidUpdateError as exc:
            self.not_credible += 1
            log.warning("update not credible job=%s update=%s reason=%s", u.job, u.update_id, exc.reason)
            return False
        return True

    def folded_into(self, version: ModelVersion, max_staleness: int) -> None:
        for uid in version.included:
            copies = self.pending.pop(uid, None)
            if copies is not None:
                self.recently_folded[uid] = (version.version, copies)
            self.folded.add(uid)
        old = [uid for uid, (v, _) in self.recently_folded.items() if v <= version.version - RECENT_VERSIONS]
        for uid in old:
            del self.recently_folded[uid]
        limit = version.version - max_staleness - 1
        for uid in [uid for uid, copies in self.pending.items() if all(u.base_version < limit for u in copies)]:
            del self.pending[uid]
            self.evicted += 1


# ---------------------------------------------------------------------------- what-if


@dataclass(frozen=True)
class CurvePoint:
    version: int
    updates: int  # position in the recorded arrival order when the version was made
    accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "updates": self.updates, "accuracy": self.accuracy}


class Evaluator:
    """Test accuracy of a weight set, with the job's model spec (shared.models) and test file."""

    def __init__(self, spec: dict[str, Any], test_path: str) -> None:
        from fedmq.shared.datasets import load_site
        from fedmq.shared.models import build_model

        self.x, self.y = load_site(test_path)
        self.model = build_model(spec)

    def __call__(self, weights: Weights) -> float:
        from fedmq.shared.models import evaluate, set_weights

        try:
            set_weights(self.model, {k: np.asarray(v) for k, v in weights.items()})
            acc, _ = evaluate(self.model, self.x, self.y)
        except RuntimeError as exc:  # torch: test data that does not fit the model
            raise ConfigError(f"--test data does not fit the job's model: {exc}") from exc
        return acc


def what_if_config(recorded: Mapping[str, Any], strategy: str | None, params: Mapping[str, str]) -> StrategyConfig:
    """The recorded params with `--strategy` and `--param k=v` on top (validated like a job TOML)."""
    merged: dict[str, Any] = dict(recorded)
    if strategy:
        merged["name"] = strategy
    merged.update(params)
    return StrategyConfig.from_params(merged)


class WhatIf:
    """Replays the recorded arrival order into another Accumulator.

    Staleness is measured in what-if versions: an update based on original version b is treated as
    based on the what-if version that was current when b was (same arrival position). A partial
    buffer is flushed when an update was created more than flush_timeout after the buffer's first
    one, which is how the live aggregator's flush timeout fires. Updates the what-if strategy would
    refuse as stale, over the norm bound or as outliers are skipped and counted; so are encrypted
    ones. Running-median and centred clipping build their history from the what-if's own versions,
    from the start version on, as a new job would.
    """

    def __init__(self, cfg: StrategyConfig, start: ModelVersion, evaluate: Callable[[Weights], float]) -> None:
        self.cfg = cfg
        #: how the recorded updates travelled (the job's compression, whatever the what-if's params say)
        self.wire = CompressionSpec.of(StrategyConfig.from_params(start.params))
        self.acc = Accumulator(cfg)
        self.start = start.version
        self.weights: Weights = {k: np.asarray(v) for k, v in start.weights.items()}
        self.server_state: Weights | None = None  # a server optimizer starts afresh, as a new job would
        self.evaluate = evaluate
        self.position = 0
        self.flush_positions: list[int] = []
        self.original_positions: dict[int, int] = {start.version: 0}
        self.first_created: float | None = None
        self.skipped: dict[str, int] = {"stale": 0, "norm_bound": 0, "outlier": 0, "encrypted": 0, "missing": 0,
                                        "bad_compression": 0}
        self.contributions: list[Contribution] = []  # every fold, in order (staleness as re-measured)
        self.norms = NormWindow(cfg.clip_window, step={})
        self.curve = [CurvePoint(start.version, 0, evaluate(self.weights))]

    @property
    def version(self) -> int:
        return self.start + len(self.flush_positions)

    def original_version_done(self, version: int) -> None:
        self.original_positions[version] = self.position

    def feed(self, u: Update) -> None:
        if u.delta is None:
            self.skipped["encrypted"] += 1
            self.position += 1
            return
        try:
            check_tag(u.compression, self.wire, u.update_id)
            delta = decompress(u.delta, self.wire, self.weights, u.update_id)
        except InvalidUpdateError:
            self.skipped["bad_compression"] += 1
            self.position += 1
            return
        if self.first_created is not None and u.created_at - self.first_created >= self.cfg.flush_timeout:
            self._flush()
        base_position = self.original_positions.get(u.base_version, 0)
        tau = self.version - (self.start + bisect.bisect_right(self.flush_positions, base_position))
        if tau > self.cfg.max_staleness:
            self.skipped["stale"] += 1
        elif self.cfg.max_update_norm > 0 and l2_norm(delta) > self.cfg.max_update_norm:
            self.skipped["norm_bound"] += 1
        else:
            try:
                self.contributions.append(self.acc.fold(
                    update_id=u.update_id, site=u.site, delta=delta, tau=tau, num_samples=u.num_samples,
                    base_version=u.base_version, median_bound=self.norms.bound(self.cfg), center=self.norms.step,
                    outlier_limit=self.norms.limit(self.cfg)))
            except OutlierError:
                self.skipped["outlier"] += 1
            else:
                if self.first_created is None:
                    self.first_created = u.created_at
        self.position += 1
        if self.acc.ready():
            self._flush()

    def skip_missing(self, n: int) -> None:
        self.skipped["missing"] += n
        self.position += n

    def finish(self) -> None:
        if len(self.acc):
            self._flush()

    def _flush(self) -> None:
        if not len(self.acc):
            self.first_created = None
            return
        before = self.weights
        self.weights, contributions, self.server_state = self.acc.step(self.weights, self.server_state)
        self.norms = self.norms.folded(contributions, self.weights, before, self.cfg)
        self.first_created = None
        self.flush_positions.append(self.position)
        self.curve.append(CurvePoint(self.version, self.position, self.evaluate(self.weights)))

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.cfg.name.value, "params": self.cfg.to_params(), "start_version": self.start,
                "versions": len(self.flush_positions), "updates_folded": self.position - sum(self.skipped.values()),
                "skipped": dict(self.skipped), "final_accuracy": self.curve[-1].accuracy,
                "curve": [p.to_dict() for p in self.curve]}


# ---------------------------------------------------------------------------- the replayer


@dataclass
class ReplayReport:
    job: str
    checks: list[VersionCheck] = field(default_factory=list)
    models_first_offset: int | None = None
    updates_first_offset: int | None = None
    models_truncated: bool = False
    updates_truncated: bool = False
    updates_read: int = 0
    updates_replayed: int = 0
    seconds: float = 0.0
    what_if: WhatIf | None = None
    original_curve: list[CurvePoint] = field(default_factory=list)
    original_params: dict[str, Any] = field(default_factory=dict)
    forks: list[int] = field(default_factory=list)  # version numbers with two different entries
    models_unreadable: int = 0
    #: log entries that are no update from the site they name (skipped), and updates that may not
    #: advance the read-ahead (no proof of an issued task, or based on a version that never existed)
    updates_unreadable: int = 0
    updates_not_credible: int = 0

    def count(self, *statuses: Status) -> int:
        return sum(c.status in statuses for c in self.checks)

    @property
    def mismatches(self) -> list[VersionCheck]:
        return [c for c in self.checks if c.status is Status.MISMATCH]

    @property
    def verifiable_from(self) -> int | None:
        """First version after the leading run of truncated ones (None: nothing verifiable)."""
        rest = [c for c in self.checks if c.status not in (Status.TRUNCATED, Status.DUPLICATE)]
        return rest[0].version if rest else None

    def to_dict(self) -> dict[str, Any]:
        mism = self.mismatches
        out: dict[str, Any] = {
            "job": self.job,
            "versions_checked": self.count(*CONCLUSIVE),
            "mismatches": len(mism),
            "first_mismatch": mism[0].version if mism else None,
            "versions_read": len(self.checks),
            "versions_recomputed": self.count(Status.OK),
            "versions_chain_only": self.count(Status.CHAIN_ONLY),
            "versions_unverifiable": self.count(Status.UNVERIFIABLE),
            "versions_truncated": self.count(Status.TRUNCATED),
            "truncated": self.models_truncated or self.updates_truncated,
            "first_version": self.checks[0].version if self.checks else None,
            "verifiable_from": self.verifiable_from,
            "updates_read": self.updates_read,
            "updates_replayed": self.updates_replayed,
            "seconds": round(self.seconds, 3),
            "forks": sorted(set(self.forks)),
            "poison": {"models_unreadable": self.models_unreadable, "updates_unreadable": self.updates_unreadable,
                       "updates_not_credible": self.updates_not_credible},
            "versions": [c.to_dict() for c in self.checks],
        }
        if self.what_if is not None:
            out["what_if"] = self.what_if.to_dict()
            out["original"] = {"strategy": self.original_params.get("name"), "params": self.original_params,
                               "final_accuracy": self.original_curve[-1].accuracy if self.original_curve else None,
                               "curve": [p.to_dict() for p in self.original_curve]}
        return out


@dataclass(frozen=True)
class WhatIfRequest:
    strategy: str | None
    params: dict[str, str]
    test: str


class Replayer:
    """Streams the models stream and the updates log side by side; memory O(model x in-flight)."""

    def __init__(self, url: str, job: str, what_if: WhatIfRequest | None = None, *,
                 secret: str | None = None) -> None:
        self.url = url
        self.secret_path = secret
        self.he_public: bytes | None = None  # the public context v0 of an encrypted job carries
        self.he_keys: HeKeys | None = None
        self.names = JobNames(job)
        self.request = what_if
        self.report = ReplayReport(job)
        self.recent: dict[int, list[ModelVersion]] = {}  # the last few versions: parents to come
        #: (version, sha256) of each entry in `recent` -> its chain's recorded norms (median clip)
        self.norms: dict[tuple[int, str], NormWindow] = {}
        self.seen_sha: dict[int, list[str]] = {}
        self.first_version: int | None = None
        self.proven = False  # a version has been verified: truncation can no longer explain a gap
        self.evaluate: Evaluator | None = None

    def run(self) -> ReplayReport:
        started = time.perf_counter()
        job = self.names.job
        # models tail first: every update a version in this snapshot includes is logged before it
        with StreamCursor(self.url, self.names.models, name=f"fedmq-replay-models-{job}", prefetch=4) as models, \
                StreamCursor(self.url, self.names.updates_log, name=f"fedmq-replay-updates-{job}",
                             prefetch=32) as log_cursor:
            updates = UpdateLog(log_cursor)
            updates.newest_version = newest_version(self.url, self.names)  # after the models tail
            for d in models:
                mv = decode_or_none(ModelVersion, d)
                if mv is None:
                    self.report.models_unreadable += 1
                    log.error("unreadable model version job=%s offset=%s", job, d.stream_offset)
                    continue
                if self.report.models_first_offset is None:
                    self.report.models_first_offset = d.stream_offset
                if updates.trust is None:  # v0's (every version carries its parent's meta)
                    updates.trust = JobTrust.from_meta(mv.meta)
                self._step(mv, updates)
            self.report.updates_first_offset = log_cursor.first_offset
            self.report.updates_truncated = updates.truncated
            self.report.updates_read = updates.read
            self.report.updates_unreadable = updates.unreadable
            self.report.updates_not_credible = updates.not_credible
        if not self.report.checks:
            raise JobNotFoundError(f"job {job} has no model version on the broker")
        if self.report.what_if is not None:
            self.report.what_if.finish()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _step(self, mv: ModelVersion, updates: UpdateLog) -> None:
        if self.first_version is None:
            self._begin(mv)
        earlier = self.seen_sha.get(mv.version, [])
        if mv.sha256 in earlier:
            self._record(_verdict(mv, Status.DUPLICATE, "republished: same version, same sha256").check)
            return
        candidates = updates.candidates(mv) if mv.parent >= 0 else {}
        verdict = self._check_against_parents(mv, candidates)
        if earlier:
            self.report.forks.append(mv.version)
            verdict = _annotate(verdict, f"fork: another v{mv.version} ({earlier[-1][:16]}) precedes this entry")
        if verdict.check.status is Status.INCOMPLETE:
            verdict = self._classify_gap(mv, verdict.check, updates)
        if verdict.check.status is Status.OK:
            self.report.updates_replayed += len(mv.included)
        if verdict.check.status in (Status.OK, Status.CHAIN_ONLY):
            self.proven = True
        self._record(verdict.check)
        if not earlier:
            self._feed_what_if(mv, candidates, verdict)
        updates.folded_into(mv, self._max_staleness(mv))
        self.seen_sha.setdefault(mv.version, []).append(mv.sha256)
        self.recent.setdefault(mv.version, []).append(mv)
        self._remember_norms(mv)
        for v in sorted(self.recent)[:-RECENT_VERSIONS]:
            del self.recent[v]
        self.norms = {k: w for k, w in self.norms.items() if k[0] in self.recent}

    def _remember_norms(self, mv: ModelVersion) -> None:
        """mv's NormWindow: its parent's (the newest entry of that number, as an aggregator reloading
        would pick) plus mv's own recorded norms; unknown history before the first version read."""
        try:
            cfg = StrategyConfig.from_params(mv.params)
        except ConfigError:
            cfg = StrategyConfig()
        window = cfg.clip_window
        parents = self.recent.get(mv.parent, [])
        centred = cfg.clip_center is ClipCenter.LAST_STEP  # only then keep a step (one model) per version
        step: Mapping[str, Any] | None = None
        if mv.parent < 0:
            base, step = NormWindow(window), {}
        elif parents:
            base = self.norms.get((mv.parent, parents[-1].sha256), NormWindow(window, complete=False))
            step = last_step(mv.weights, parents[-1].weights, cfg) if centred else None
        else:
            base = NormWindow(window, complete=False)
        base = NormWindow(window, base.versions, base.complete)
        self.norms[(mv.version, mv.sha256)] = base.push(recorded_norms(mv.contributions, clip_measure(cfg)), step)

    def _check_against_parents(self, mv: ModelVersion, candidates: Mapping[str, Sequence[Update]]) -> Verdict:
        """Against the parent entry; after a fork, against each entry of the parent's number."""
        parents = self.recent.get(mv.parent, [])
        if not parents:
            return check_version(None, mv, candidates, he_keys=self._he_keys(mv))
        tried: list[tuple[ModelVersion, Verdict]] = []
        for parent in reversed(parents):  # the newest entry first
            tried.append((parent, check_version(parent, mv, candidates, he_keys=self._he_keys(mv),
                                                norms=self.norms.get((parent.version, parent.sha256)))))
            if tried[-1][1].check.status in (Status.OK, Status.CHAIN_ONLY):
                break
        parent, verdict = tried[-1] if tried[-1][1].check.status in (Status.OK, Status.CHAIN_ONLY) else tried[0]
        if len(parents) > 1:
            verdict = _annotate(verdict, f"the models stream holds {len(parents)} entries for parent "
                                f"v{mv.parent} (a fork); checked against sha256 {parent.sha256[:16]}")
        return verdict

    def _he_keys(self, mv: ModelVersion) -> HeKeys | None:
        """The job's CKKS contexts, loaded once (TenSEAL is imported only for encrypted jobs)."""
        raw = mv.meta.get("he_public_context")  # shared.he.META_PUBLIC_CONTEXT: in v0 only
        if isinstance(raw, bytes):
            self.he_public = raw
        enc = mv.meta.get("encryption")
        if self.he_keys is not None or self.he_public is None or not isinstance(enc, Mapping):
            return self.he_keys
        from fedmq.shared import he

        expected = str(enc.get("context_sha256"))
        public = he.public_context_from_meta({he.META_PUBLIC_CONTEXT: self.he_public}, expected)
        secret = None
        if self.secret_path:
            secret, fingerprint = he.load_secret(he.read_file(self.secret_path, "secret context"))
            if fingerprint != expected:
                raise ConfigError(f"--secret {self.secret_path} is not job {self.names.job}'s key "
                                  f"({fingerprint[:12]}... != {expected[:12]}...)")
        self.he_keys = HeKeys(public, secret)
        return self.he_keys

    def _begin(self, mv: ModelVersion) -> None:
        self.first_version = mv.version
        self.report.models_truncated = mv.version != 0 or bool(self.report.models_first_offset)
        self.report.original_params = dict(mv.params)
        if self.request is not None:
            cfg = what_if_config(mv.params, self.request.strategy, self.request.params)
            self.evaluate = Evaluator(mv.model, self.request.test)
            self.report.what_if = WhatIf(cfg, mv, self.evaluate)
            self.report.original_curve.append(CurvePoint(mv.version, 0, self.evaluate(mv.weights)))

    def _classify_gap(self, mv: ModelVersion, check: VersionCheck, updates: UpdateLog) -> Verdict:
        """Missing parent or updates: retention (a leading run only) or evidence (a mismatch)."""
        self.report.updates_truncated = updates.truncated
        reasons = []
        if check.missing_parent:
            reasons.append(f"parent v{mv.parent} is not in the models stream")
        if check.missing_updates:
            ids = ", ".join(check.missing_updates[:5]) + (" ..." if len(check.missing_updates) > 5 else "")
            reasons.append(f"{len(check.missing_updates)} included update(s) not in the updates log: {ids}")
        parent_gone = not check.missing_parent or (
            self.report.models_truncated and self.first_version is not None and mv.parent < self.first_version)
        updates_gone = not check.missing_updates or updates.truncated
        explained = parent_gone and updates_gone and not self.proven
        status = Status.TRUNCATED if explained else Status.MISMATCH
        detail = "; ".join(reasons) + (" (dropped by stream retention)" if explained else "")
        return _verdict(mv, status, detail, missing_parent=check.missing_parent,
                        missing_updates=check.missing_updates)

    def _record(self, check: VersionCheck) -> None:
        self.report.checks.append(check)
        level = logging.WARNING if check.status is Status.MISMATCH else logging.DEBUG
        log.log(level, "version replayed", extra={"job": self.names.job, "version": check.version,
                                                   "status": check.status.value})

    def _feed_what_if(self, mv: ModelVersion, candidates: Mapping[str, Sequence[Update]], verdict: Verdict) -> None:
        wi = self.report.what_if
        if wi is None or mv.version == self.first_version or self.evaluate is None:
            return  # the first version read is the what-if's start: its updates are in its weights
        used = list(verdict.used) or [c[0] for c in _ordered_candidates(mv, candidates) if c]
        for u in used:
            wi.feed(u)
        wi.skip_missing(len(mv.included) - len(used))
        wi.original_version_done(mv.version)
        self.report.original_curve.append(CurvePoint(mv.version, wi.position, self.evaluate(mv.weights)))

    @staticmethod
    def _max_staleness(mv: ModelVersion) -> int:
        try:
            return StrategyConfig.from_params(mv.params).max_staleness
        except ConfigError:
            return StrategyConfig().max_staleness


def newest_version(url: str, names: JobNames) -> int | None:
    """The highest version number in the models stream's last chunk (None: none readable). Only
    trusted roles write the models stream; an update based beyond it answers no task."""
    try:
        entries = read_tail(url, names.models, idle=0.15)
    except JobNotFoundError:
        return None
    found = [mv.version for d in entries if (mv := decode_or_none(ModelVersion, d)) is not None]
    return max(found, default=None)


def replay(url: str, job: str, what_if: WhatIfRequest | None = None, *,
           secret: str | None = None) -> ReplayReport:
    return Replayer(url, job, what_if, secret=secret).run()


# ---------------------------------------------------------------------------- output


def render(report: ReplayReport) -> None:
    """Human report on stdout: a line per version, the verdict, the curves of a what-if run."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    style = {Status.OK: "green", Status.MISMATCH: "bold red", Status.TRUNCATED: "yellow",
             Status.UNVERIFIABLE: "yellow", Status.CHAIN_ONLY: "cyan"}
    for c in report.checks:
        s = style.get(c.status, "")
        status = f"[{s}]{c.status.value:<12}[/]" if s else f"{c.status.value:<12}"
        console.print(f"v{c.version:<5} parent {c.parent:<5} {status} {c.sha256[:16]}  "
                      f"{c.updates} updates  {c.detail}")
    d = report.to_dict()
    if d["truncated"]:
        console.print(f"[yellow]history truncated by retention: models stream starts at v{d['first_version']} "
                      f"(offset {report.models_first_offset}), updates log at offset "
                      f"{report.updates_first_offset}; verifiable from v{d['verifiable_from']}[/]")
    verdict = (f"[bold red]{d['mismatches']} mismatch(es), first at v{d['first_mismatch']}[/]"
               if d["mismatches"] else "[green]0 mismatches[/]")
    console.print(f"job {report.job}: {d['versions_read']} versions read, {d['versions_recomputed']} recomputed "
                  f"bit for bit ({d['updates_replayed']} updates), {d['versions_chain_only']} chain-only, "
                  f"{d['versions_truncated']} truncated, {d['versions_unverifiable']} unverifiable in "
                  f"{d['seconds']:.2f}s: {verdict}")
    poison = {k: v for k, v in d["poison"].items() if v}
    if poison:
        console.print("[yellow]skipped: " + ", ".join(f"{k} {v}" for k, v in poison.items()) + "[/]")
    if report.what_if is not None:
        _render_curves(console, report, report.what_if)


def _render_curves(console: Any, report: ReplayReport, wi: WhatIf) -> None:
    from rich.table import Table

    t = Table(title=f"accuracy: recorded {report.original_params.get('name')} vs what-if "
                    f"{wi.cfg.name.value} (x = updates in arrival order)")
    for col in ("updates", "recorded version", "recorded acc", "what-if version", "what-if acc"):
        t.add_column(col, justify="right")
    marks = sorted({p.updates for p in report.original_curve} | {p.updates for p in wi.curve})
    if len(marks) > 40:  # keep the table readable; the JSON has every point
        step = len(marks) / 40
        marks = sorted({marks[int(i * step)] for i in range(40)} | {marks[-1]})
    for m in marks:
        o = _at(report.original_curve, m)
        w = _at(wi.curve, m)
        t.add_row(str(m), f"v{o.version}", f"{o.accuracy:.4f}", f"v{w.version}", f"{w.accuracy:.4f}")
    console.print(t)
    skipped = ", ".join(f"{k} {v}" for k, v in wi.skipped.items() if v) or "none"
    console.print(f"final accuracy: recorded {report.original_curve[-1].accuracy:.4f}, what-if "
                  f"{wi.curve[-1].accuracy:.4f} ({len(wi.flush_positions)} what-if versions; skipped: {skipped})")


def _at(curve: list[CurvePoint], position: int) -> CurvePoint:
    """The newest point made at or before `position` updates."""
    i = bisect.bisect_right([p.updates for p in curve], position) - 1
    return curve[max(i, 0)]


def _parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {pair!r} must look like key=value (e.g. alpha=0.6)")
        out[key.strip()] = value.strip()
    return out


def cmd_replay(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json

    request = None
    if args.strategy or args.param:
        if not args.test:
            raise ConfigError("a what-if replay (--strategy / --param) needs --test PATH, the job's test data")
        request = WhatIfRequest(args.strategy, _parse_params(args.param), args.test)
    elif args.test:
        raise ConfigError("--test is only used by a what-if replay: add --strategy or --param")
    report = replay(args.broker, args.job, request, secret=args.secret)
    if args.json:
        print_json(report.to_dict())
    else:
        render(report)
    return 1 if report.mismatches else 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("replay", help="recompute every version from the streams; report the first mismatch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (the last stdout line)")
    p.add_argument("--strategy", choices=[s.value for s in StrategyName],
                   help="what-if: re-run the recorded updates under this strategy")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="what-if: a strategy parameter (repeatable), e.g. alpha=0.6 buffer_size=8")
    p.add_argument("--test", help="what-if: the job's test data (the coordinator's data.test)")
    p.add_argument("--secret", default=os.environ.get("FEDMQ_KEYHOLDER_SECRET"),
                   help="CKKS jobs: the key holder's secret context file, to re-decrypt encrypted "
                        "versions bit for bit (env FEDMQ_KEYHOLDER_SECRET)")
    p.set_defaults(run=cmd_replay)
