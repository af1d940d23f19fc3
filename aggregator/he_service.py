"""The aggregator's encrypted path: validate -> fold ciphertexts -> publish EncryptedAggregate
(confirmed) -> ack. The key holder turns each aggregate into the next ModelVersion.

Exactly-once with two hops (docs/privacy.md, "Homomorphic aggregation"):

* updates -> aggregate: the same rule as in plaintext, with the aggregates log playing the models
  stream's part. An aggregate is published with a confirm to an exchange that routes it to the
  key holder's queue *and* to the aggregates log stream; only then are its updates acked. A
  replica that becomes active reads its state back: current version = max(newest ModelVersion,
  newest aggregate), dedup set = ids in recent versions and recent aggregates. A crash before the
  confirm -> updates redelivered, aggregate recomputed; after it -> redelivered ids are dropped.
* aggregate -> version: the key holder publishes version n (confirmed), then acks aggregate n; a
  redelivered aggregate whose version already exists in the models stream is acked and dropped.

The replica reloads that state when it becomes active (the lock's token reaches it), not when it connects: a
standby may wait for hours while the active replica moves the job on. From then on it follows the
aggregates log and never publishes a second aggregate for a version another replica already sent.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fedmq.aggregator.he import CiphertextAccumulator, JobKeys, check_ciphertext
from fedmq.aggregator.service import SessionAbortedError, _Session
from fedmq.aggregator.validate import check_header
from fedmq.shared import faults, he
from fedmq.shared.broker import (
    Connection,
    JobNames,
    StreamReader,
    read_last,
    read_stream,
)
from fedmq.shared.errors import MalformedMessageError
from fedmq.shared.he import MAX_CIPHERTEXT_BYTES
from fedmq.shared.jobstate import emit, find_version, load_model_state
from fedmq.shared.messages import EncryptedAggregate, EventKind, ModelVersion, Update

if TYPE_CHECKING:
    from fedmq.aggregator.service import Aggregator

log = logging.getLogger(__name__)


def load_public_context(url: str, names: JobNames, meta: dict[str, object]) -> JobKeys:
    """The job's public context from v0 (pinned by the context_sha256 every version carries)."""
    enc = meta[he.META_ENCRYPTION]
    if not isinstance(enc, dict):
        raise MalformedMessageError("encryption meta is not a map")
    v0, _ = find_version(url, names, 0, 0)
    ctx = he.public_context_from_meta(v0.meta, str(enc["context_sha256"]))
    return JobKeys.of(ctx, str(enc["context_sha256"]), int(enc["slots"]), he.Layout.of(v0.weights))


def load_aggregate_state(url: str, names: JobNames, window: int = 8) -> tuple[int, set[str], int | None]:
    """(newest aggregate's version or -1, update ids in the last `window` aggregates, its offset).

    Ids of aggregates that are already versions are in the models stream too; the window only has
    to cover the key holder's lag, which is one or two aggregates while it keeps up.
    """
    last = read_last(url, names.aggregates_log)
    if last is None:
        return -1, set(), None
    version, ids = -1, set[str]()
    for d in read_stream(url, names.aggregates_log, max(0, (last.stream_offset or 0) - window * last.parts)):
        try:
            agg = EncryptedAggregate.decode(d.body)
        except MalformedMessageError as exc:
            log.error("unreadable aggregate job=%s offset=%s error=%s", names.job, d.stream_offset, exc)
            continue
        version = max(version, agg.version)
        ids.update(agg.included)
    return version, ids, last.stream_offset


class HeSession(_Session):
    """Like `_Session`, but the sum is encrypted and the output goes to the key holder."""

    def __init__(self, agg: Aggregator, conn: Connection, current: ModelVersion, seen: set[str]) -> None:
        super().__init__(agg, conn, current, seen)
        self.he_acc = CiphertextAccumulator(self.cfg)  # ConfigError for robust/clipping strategies
        self.version = current.version  # the version the next aggregate builds on
        self.keys: JobKeys | None = None

    @property
    def prefetch(self) -> int:
        """Ciphertexts are ~14x their plaintext: hold little more than one buffer in flight, in
        as many deliveries as a ciphertext takes parts."""
        ciphertext = min(MAX_CIPHERTEXT_BYTES, 16 * self.model_bytes)
        return (self.cfg.effective_buffer + 2) * self.deliveries_per_update(ciphertext)

    def activate(self, *, takeover: bool) -> None:
        super().activate(takeover=takeover)
        state = load_model_state(self.agg.url, self.names, window=self.agg.dedup_window)
        agg_version, agg_ids, agg_offset = load_aggregate_state(self.agg.url, self.names)
        # the fence: versions come from the key holder here, so watch the aggregates log instead
        self.close()
        self.fence = StreamReader(self.agg.url, self.names.aggregates_log,
                                  name=f"fedmq-{self.agg.name}-fence-{self.names.job}", prefetch=2)
        self.fence.start(agg_offset + 1 if agg_offset is not None else "first")
        self.current = state.latest
        self.version = max(state.latest.version, agg_version)
        self.seen = state.recent_included | agg_ids
        self.recent = [tuple(self.seen)]
        self.keys = load_public_context(self.agg.url, self.names, dict(state.latest.meta))
        log.info("encrypted aggregation ready", extra={
            "job": self.names.job, "version": self.version, "models_version": state.latest.version,
            "dedup": len(self.seen), "context": self.keys.context_sha256[:12]})

    def _fold(self, update: Update, routing_key: str | None) -> int:
        """Check the header and the ciphertext chunks, then add them to the encrypted sum."""
        if self.keys is None:  # activate sets it; keeps the type checker honest
            raise RuntimeError("encrypted session used before activation")
        tau = check_header(update, job=self.names.job, current_version=self.version, cfg=self.cfg,
                           trust=self.trust, routing_key=routing_key)
        vectors = check_ciphertext(update, self.keys)
        self.folding = True  # fold is all-or-nothing, but a crash here must drop the session
        self.he_acc.fold(update_id=update.update_id, site=update.site, vectors=vectors, tau=tau,
                         num_samples=update.num_samples, base_version=update.base_version)
        return tau

    def _ready(self) -> bool:
        return self.he_acc.ready()

    def _check_aggregate_fence(self) -> None:
        """Never publish a second aggregate for one version: another replica's aggregate newer than
        ours means two replicas were briefly active; drop this session (its updates return)."""
        if self.fence is None:
            return
        for d in self.fence.poll(0.0):
            try:
                version = EncryptedAggregate.decode(d.body).version
            except MalformedMessageError:
                continue
            if version > self.version:
                raise SessionAbortedError(f"aggregate {version} was published by another replica while "
                                          f"this one was at {self.version}")

    def flush(self) -> None:
        """Publish the encrypted sum (confirmed: queue + log), then ack what it includes."""
        if self.keys is None:
            raise RuntimeError("encrypted session used before activation")
        started = time.perf_counter()
        self._check_aggregate_fence()
        total = self.he_acc.flush()
        agg = EncryptedAggregate(
            job=self.names.job, aggregate_id=f"agg-v{self.version + 1}", version=self.version + 1,
            parent=self.version, included=tuple(c["update_id"] for c in total.contributions),
            contributions=tuple(total.contributions), strategy=self.current.strategy,
            params=dict(self.current.params), denominator=total.denominator, sample_ref=total.sample_ref,
            context_sha256=self.keys.context_sha256, size=self.keys.layout.size, chunks=tuple(total.chunks),
            ciphertext_sha256=total.sha256,
        )
        self.conn.publish(self.names.aggregates_exchange, "", agg.encode(), message_id=agg.aggregate_id)
        # the same point as the plaintext path: the aggregate is confirmed, its updates not yet acked
        faults.point("aggregator.before_ack")
        self.acks.ack(self.buffered)
        self.buffered, self.buffered_ids = [], set()
        self.version = agg.version
        self._remember(agg.included)
        self.agg.stats.versions += 1
        self.agg.stats.applied += len(agg.included)
        log.info("aggregate published", extra={"job": self.names.job, "version": agg.version,
                                                 "folded": len(agg.included),
                                                 "seconds": round(time.perf_counter() - started, 4)})
        emit(self.conn, self.names, "aggregator", EventKind.AGGREGATE_PUBLISHED, version=agg.version,
             parent=agg.parent, included=list(agg.included), ciphertext_sha256=agg.ciphertext_sha256,
             replica=self.agg.name,
             sites=[c["site"] for c in agg.contributions],
             staleness=[c["staleness"] for c in agg.contributions])
