"""The key holder: decrypts encrypted sums (never single updates) into model versions.

It consumes the job's aggregates queue (quorum, single active consumer: run a standby if you
like; it needs the same secret file). For aggregate n it reads version n - 1 (its own previous
output, or the coordinator's v0), computes ``w + lr * decrypt(sum) / denominator``, publishes
version n to the models stream with a confirm, and only then acks the aggregate:

* crash before the confirm -> the aggregate is redelivered and decrypted again (the result is
  bit-identical: ciphertext sums and CKKS decryption are deterministic);
* crash after it -> the redelivered aggregate's version already exists: acked and dropped.

The only updates it ever sees decrypted are sums of at least one update; with K = 1 (FedAsync)
that sum *is* one site's update, so privacy against the key holder needs K >= 2 (docs/privacy.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmq.aggregator.he import decrypt_step
from fedmq.shared import faults, he
from fedmq.shared.broker import DETAIL_HEADER, REASON_HEADER, Connection, Delivery, JobNames, run_forever
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import ConfigError, FedmqError, MalformedMessageError
from fedmq.shared.jobstate import as_int, as_site, emit, load_model_state
from fedmq.shared.messages import EncryptedAggregate, EventKind, ModelVersion, make_version
from fedmq.shared.parts import parts_for

log = logging.getLogger(__name__)


@dataclass
class KeyHolderStats:
    versions: int = 0
    duplicates: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    decrypt_seconds: list[float] = field(default_factory=list)


def version_meta(parent_meta: dict[str, Any], agg: EncryptedAggregate) -> dict[str, Any]:
    """The parent's meta without v0's public context, plus how this version was decrypted.

    ``meta["he"]`` (what `fedmq replay` reads, see docs/privacy.md): aggregate_id, context_sha256,
    ciphertext_sha256 (of the encrypted sum; recomputable from the updates log with the public
    context), denominator, sample_ref, slots, size. Per-update multipliers are in
    ``contributions[i]["multiplier"]``.
    """
    meta = {k: v for k, v in parent_meta.items() if k not in (he.META_PUBLIC_CONTEXT, he.META_AGGREGATE)}
    enc = parent_meta.get(he.META_ENCRYPTION)
    enc = enc if isinstance(enc, dict) else {}
    meta[he.META_AGGREGATE] = {
        "aggregate_id": agg.aggregate_id, "context_sha256": agg.context_sha256,
        "ciphertext_sha256": agg.ciphertext_sha256, "denominator": agg.denominator,
        "sample_ref": agg.sample_ref, "slots": enc.get("slots"), "size": agg.size,
    }
    return meta


def decrypt_aggregate(secret: Any, parent: ModelVersion, agg: EncryptedAggregate) -> ModelVersion:
    """Pure: the ModelVersion an aggregate becomes (the service and replay both call this)."""
    cfg = StrategyConfig.from_params(agg.params)
    weights = decrypt_step(secret, parent.weights, agg.chunks, agg.denominator, cfg)
    return make_version(job=agg.job, version=agg.version, parent=agg.parent, weights=weights,
                        included=agg.included, strategy=agg.strategy, params=agg.params, model=parent.model,
                        contributions=agg.contributions, meta=version_meta(dict(parent.meta), agg))


def _contribution_columns(contributions: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """`sites` and `staleness` of a version's contributions for its VERSION_PUBLISHED event. The
    aggregate's contributions are plain maps of any content: an entry without a well-typed site
    or staleness is left out (logged) instead of killing the key holder after its publish."""
    sites, staleness = [], []
    for i, c in enumerate(contributions):
        site, tau = as_site(c.get("site")), as_int(c.get("staleness"))
        if site is None or tau is None:
            log.warning("contribution without site/staleness left out of the event index=%d", i)
            continue
        sites.append(site)
        staleness.append(tau)
    return {"sites": sites, "staleness": staleness}


class KeyHolder:
    """One key-holder replica for one job."""

    def __init__(self, url: str, job: str, secret: bytes, *, stop: threading.Event | None = None,
                 heartbeat: int = 10, name: str = "keyholder") -> None:
        self.url = url
        self.names = JobNames(job)
        self.secret, self.context_sha256 = he.load_secret(secret)
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat
        self.name = name
        self.stats = KeyHolderStats()
        self._latest: ModelVersion | None = None

    def run(self) -> KeyHolderStats:
        run_forever(self._serve, stop=self.stop, what=f"keyholder job={self.names.job}")
        return self.stats

    def _check_job_key(self) -> None:
        """Refuse to serve a job whose public context is not ours: every decrypt would be garbage."""
        state = load_model_state(self.url, self.names, window=0, wait=60)
        enc = state.latest.meta.get(he.META_ENCRYPTION)
        if not he.is_encrypted(state.latest.meta) or not isinstance(enc, dict):
            raise ConfigError(f"job {self.names.job} is not encrypted (no [encryption] scheme = \"ckks\")")
        if enc.get("context_sha256") != self.context_sha256:
            raise ConfigError(f"this secret context ({self.context_sha256[:12]}…) is not job "
                              f"{self.names.job}'s key ({str(enc.get('context_sha256'))[:12]}…)")

    def _serve(self) -> None:
        conn = Connection(self.url, name=f"fedmq-{self.name}-{self.names.job}", heartbeat=self.heartbeat)
        conn.open(retries=3)
        self._latest = None
        try:
            self._check_job_key()
            pending: list[Delivery] = []
            # two aggregates in flight, each in as many deliveries as the largest one takes parts
            prefetch = 2 * parts_for(he.MAX_CIPHERTEXT_BYTES, conn.part_bytes)
            conn.consume(self.names.aggregates, pending.append, prefetch=prefetch, on_cancel=self.stop.set)
            log.info("keyholder ready job=%s context=%s", self.names.job, self.context_sha256[:12])
            while not self.stop.is_set():
                conn.process(0.1)
                while pending:
                    self._handle(conn, pending.pop(0))
        finally:
            conn.close()

    def _newest(self) -> ModelVersion:
        """State is read when the first aggregate arrives (a standby may have waited for hours)."""
        if self._latest is None:
            self._latest = load_model_state(self.url, self.names, window=0).latest
            log.info("keyholder active job=%s version=%d", self.names.job, self._latest.version)
        return self._latest

    def _handle(self, conn: Connection, d: Delivery) -> None:
        try:
            agg = EncryptedAggregate.decode(d.body)
        except MalformedMessageError as exc:
            self._dead_letter(conn, d, exc.reason, str(exc))
            return
        latest = self._newest()
        if agg.version <= latest.version:
            self.stats.duplicates += 1
            log.info("aggregate already decrypted job=%s version=%d", self.names.job, agg.version)
            d.ack()
            return
        if agg.parent != latest.version:
            self._latest = None  # maybe another replica moved on: look again once
            latest = self._newest()
            if agg.version <= latest.version:
                d.ack()
                return
            if agg.parent != latest.version:
                self._dead_letter(conn, d, "out_of_order", f"aggregate {agg.aggregate_id} builds on "
                                  f"version {agg.parent}, newest is {latest.version}")
                return
        if agg.job != self.names.job or agg.context_sha256 != self.context_sha256:
            self._dead_letter(conn, d, "encryption_mismatch",
                              f"aggregate {agg.aggregate_id} is for job {agg.job} / another key")
            return
        started = time.perf_counter()
        try:
            mv = decrypt_aggregate(self.secret, latest, agg)
        except (FedmqError, ValueError, TypeError, RuntimeError, ArithmeticError) as exc:  # TenSEAL raises these
            self._dead_letter(conn, d, "malformed", f"aggregate {agg.aggregate_id}: {exc}")
            return
        seconds = time.perf_counter() - started
        conn.publish(self.names.models_exchange, "", mv.encode(), message_id=f"v{mv.version}")
        faults.point("keyholder.before_ack")  # version n confirmed, aggregate n not yet acked
        d.ack()
        self._latest = mv
        self.stats.versions += 1
        self.stats.decrypt_seconds.append(seconds)
        log.info("version published", extra={"job": self.names.job, "version": mv.version,
                                               "folded": len(mv.included), "decrypt_seconds": round(seconds, 4)})
        emit(conn, self.names, "keyholder", EventKind.VERSION_PUBLISHED, version=mv.version,
             parent=mv.parent, included=list(mv.included), sha256=mv.sha256,
             **_contribution_columns(mv.contributions))

    def _dead_letter(self, conn: Connection, d: Delivery, reason: str, detail: str) -> None:
        conn.publish(self.names.dead_exchange, "aggregate", d.body,
                     headers={REASON_HEADER: reason, DETAIL_HEADER: detail[:1000]})
        d.ack()
        self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + 1
        log.error("aggregate dead-lettered", extra={"job": self.names.job, "reason": reason, "detail": detail})
        emit(conn, self.names, "keyholder", EventKind.DEAD_LETTERED, reason=reason, detail=detail[:300])
