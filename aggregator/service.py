"""The aggregator: consume -> validate -> fold -> publish version (confirmed) -> ack.

Stateless by construction (docs/guarantees.md, "What is exactly-once"): everything it knows
comes from the models stream at (re)start, so any replica can take over at any moment.

* A crash before the version's confirm: the buffered updates were never acked, the broker
  redelivers them (to the standby that the aggregator lock's token passes to) and the version is
  recomputed.
* A crash after the confirm but before the acks: the redelivered ids are in the newest versions'
  `included` lists and are acked and dropped.

A replica reads the state again when it becomes active (the lock's token reaches it): a standby may
have waited for hours while another replica moved the job on. Before each publish it checks that no
other replica appended a version meanwhile (docs/guarantees.md).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.aggregator.acks import AckLedger
from fedmq.aggregator.dp import DpAggregation
from fedmq.aggregator.strategy import (
    Accumulator,
    NormWindow,
    chain_window,
    clip_measure,
    last_step,
    learning_rate,
    recorded_norms,
    strategy_source_sha256,
)
from fedmq.aggregator.validate import validated_delta
from fedmq.shared import faults, metrics
from fedmq.shared.broker import (
    DETAIL_HEADER,
    REASON_HEADER,
    UPDATE_ID_HEADER,
    Connection,
    ConnectionLostError,
    Delivery,
    JobNames,
    StreamReader,
    header_update_id,
    run_forever,
)
from fedmq.shared.config import ClipCenter, StrategyConfig
from fedmq.shared.errors import FedmqError, InvalidUpdateError, JobNotFoundError, MalformedMessageError
from fedmq.shared.he import is_encrypted
from fedmq.shared.jobstate import emit, load_model_state
from fedmq.shared.messages import EventKind, ModelVersion, Update, make_version
from fedmq.shared.parts import parts_for
from fedmq.shared.signing import JobTrust

log = logging.getLogger(__name__)

#: bodies beyond the version being filled that may be prefetched, in bytes (see _Session.prefetch)
PREFETCH_BYTES = 64 * 2**20
#: an update's bytes beyond its tensors (ids, signature, norms, framing), generously
UPDATE_OVERHEAD_BYTES = 2**20


class SessionAbortedError(ConnectionLostError):
    """This connection's view can no longer be trusted (another replica published, or a fold
    failed half-way): drop it, so its unacked updates return to the queue, and rebuild."""


@dataclass
class AggregatorStats:
    versions: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    takeovers: int = 0


class Aggregator:
    """One replica. Run several: the aggregator lock (one token, single-active-consumer) makes
    exactly one of them active, and only that one consumes the updates queues."""

    def __init__(self, url: str, job: str, *, stop: threading.Event | None = None,
                 heartbeat: int = 10, dedup_window: int = 64, name: str = "aggregator") -> None:
        self.url = url
        self.names = JobNames(job)
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat
        self.dedup_window = dedup_window
        self.name = name
        self.stats = AggregatorStats()
        self.active = False

    def run(self) -> AggregatorStats:
        run_forever(self._serve, stop=self.stop, what=f"aggregator job={self.names.job}",
                    on_reconnect=lambda _attempt: metrics.reconnected(self.names.job, "aggregator"))
        return self.stats

    # ---------------------------------------------------------------- one connection's life

    def _serve(self) -> None:
        conn = Connection(self.url, name=f"fedmq-{self.name}-{self.names.job}", heartbeat=self.heartbeat)
        conn.open(retries=3)
        session: _Session | None = None
        try:
            state = load_model_state(self.url, self.names, window=self.dedup_window, wait=60)
            session = _session_class(state.latest)(self, conn, state.latest, state.recent_included)
            metrics.aggregator_active(self.names.job, False)  # a standby until the lock's token comes
            token = self._wait_for_lock(conn)
            if token is None:
                return
            session.activate(takeover=token.redelivered)
            pending = FairQueue()
            try:
                # deleting the shared queue is the coordinator's "job finished"
                conn.consume(self.names.updates, pending.append, prefetch=session.prefetch,
                             on_cancel=self._job_finished)
            except JobNotFoundError:
                self._job_finished()  # v0 exists, so the queue did: the coordinator deleted it
                return
            for queue in self._site_queues(conn, session.sites):
                conn.consume(queue, pending.append, prefetch=session.prefetch)
            log.info("aggregator ready job=%s version=%d dedup=%d sites=%d", self.names.job,
                     session.current.version, len(session.seen), len(session.sites))
            while not self.stop.is_set():
                conn.process(0.1)
                while pending and not self.stop.is_set():
                    self._handle(session, pending.pop())
                session.maybe_flush()
        finally:
            self.active = False
            metrics.aggregator_active(self.names.job, False)
            if session is not None:
                session.close()
            conn.close()

    def _site_queues(self, conn: Connection, sites: list[str]) -> list[str]:
        """The per-site queues that exist. A registry site without one (a job declared without
        its registry, by hand or by an earlier release) has its updates routed to the shared
        queue instead (the sites exchange's alternate exchange), so skipping it loses nothing;
        consuming a missing queue would close the channel the other consumers share."""
        queues, missing = [], []
        for site in sites:
            queue = self.names.site_updates(site)
            try:
                conn.queue_stats(queue)
            except JobNotFoundError:
                missing.append(site)
                continue
            queues.append(queue)
        if missing:
            log.warning("registry sites without an updates queue, theirs come through the shared queue "
                        "job=%s count=%d first=%s", self.names.job, len(missing), missing[0])
        return queues

    def _wait_for_lock(self, conn: Connection) -> Delivery | None:
        """Stand by until the aggregator lock's token is delivered to this replica (it is then the
        only one consuming updates, until its connection ends); None when the job ended first."""
        tokens: list[Delivery] = []
        try:
            conn.open_consumer(self.names.aggregator_lock, tokens.append, prefetch=1,
                               on_cancel=self._job_finished)
        except JobNotFoundError:
            self._job_finished()  # v0 exists, so the lock did: the coordinator deleted it
            return None
        log.info("aggregator standing by for the lock job=%s replica=%s", self.names.job, self.name)
        while not tokens and not self.stop.is_set():
            conn.process(0.1)
        return tokens[0] if tokens else None

    def _handle(self, session: _Session, d: Delivery) -> None:
        """One delivery. An unexpected exception before the fold gives just this one back.

        A message that crashes every consumer then ends in dead letters through the quorum queue's
        delivery limit (reason ``delivery_limit``), and the updates buffered beside it are not
        redelivered with it. Once a fold has started the running sum is suspect: the whole session
        is dropped instead (its deliveries return, the state is read again).
        """
        session.folding = False
        try:
            session.handle(d)
        except FedmqError:
            raise
        except Exception as exc:
            if session.folding:
                raise SessionAbortedError(f"fold failed, rebuilding the aggregator state: {exc!r}") from exc
            log.exception("update crashed the aggregator, returned to the queue", extra={
                "job": self.names.job, "update": header_update_id(d.headers),
                "deliveries": d.delivery_count + 1})
            d.requeue()

    def _job_finished(self) -> None:
        log.info("updates queue deleted, job finished: aggregator leaving job=%s replica=%s",
                 self.names.job, self.name)
        self.stop.set()


class FairQueue:
    """Prefetched deliveries, handed out round-robin by routing key (= the sending site).

    A flooding site fills the prefetch window with its bodies; served in arrival order, every
    honest update behind them would wait for all of them. Round-robin gives each site with a
    delivery waiting one turn in each round, so a flood costs the others at most one hostile
    delivery per honest one. Order within a site is kept."""

    def __init__(self) -> None:
        self._by_site: OrderedDict[str, deque[Delivery]] = OrderedDict()

    def append(self, d: Delivery) -> None:
        self._by_site.setdefault(d.routing_key, deque()).append(d)

    def pop(self) -> Delivery:
        site, queue = next(iter(self._by_site.items()))
        d = queue.popleft()
        del self._by_site[site]
        if queue:
            self._by_site[site] = queue  # to the back of the round
        return d

    def __bool__(self) -> bool:
        return bool(self._by_site)

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_site.values())


class DeadLetterBudget:
    """Per sending site: which dead letters take the precise path, and which the bulk one.

    Precise: the body goes to dead letters with the reason in a header (a confirmed publish, ~1 ms
    of waiting), then a DEAD_LETTERED event (another one). A flooding site would buy two round trips
    of the aggregator's time per hostile body, so past `burst` dead letters a site gets the precise
    path at most once per `every` seconds and the rest are rejected: the broker dead-letters them
    itself (the updates queue's at-least-once DLX, x-death reason "rejected"), with no round trip,
    and the next precise event says how many of each reason were rejected in bulk since."""

    def __init__(self, burst: int = 20, every: float = 1.0) -> None:
        self.burst, self.every = burst, every
        self._sent: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._bulk: dict[str, Counter[str]] = {}

    def precise(self, site: str) -> bool:
        now = time.monotonic()
        if self._sent.get(site, 0) < self.burst or now - self._last.get(site, 0.0) >= self.every:
            self._sent[site] = self._sent.get(site, 0) + 1
            self._last[site] = now
            return True
        return False

    def bulk(self, site: str, reason: str) -> None:
        self._bulk.setdefault(site, Counter())[reason] += 1

    def take_bulk(self, site: str) -> dict[str, int]:
        """The reasons of `site`'s dead letters rejected in bulk since its last precise one."""
        return dict(self._bulk.pop(site, Counter()))


def _session_class(latest: ModelVersion) -> type[_Session]:
    """Encrypted jobs (CKKS context in v0) fold ciphertexts and hand sums to the key holder."""
    if is_encrypted(latest.meta):
        from fedmq.aggregator.he_service import HeSession

        return HeSession
    return _Session


class _Session:
    """State rebuilt for each connection: the current version, the dedup set and the buffer."""

    def __init__(self, agg: Aggregator, conn: Connection, current: ModelVersion, seen: set[str]) -> None:
        self.agg = agg
        self.conn = conn
        self.names = agg.names
        self.current = current
        self.seen = set(seen)
        self.recent: list[tuple[str, ...]] = [current.included]
        self.cfg = StrategyConfig.from_params(current.params)
        self.acc = Accumulator(self.cfg)
        self.buffered: list[Delivery] = []
        self.buffered_ids: set[str] = set()
        #: the delivery tags handled, so a version's acks can go as one frame (aggregator/acks.py)
        self.acks = AckLedger()
        self.first_fold_at = 0.0
        #: site registry and task key from v0: what every update must prove (shared/signing.py)
        self.trust = JobTrust.from_meta(current.meta)
        #: follows the models stream while active, to notice another replica's version
        self.fence: StreamReader | None = None
        #: set just before the running sum is touched (see Aggregator._handle)
        self.folding = False
        #: differential privacy of the job (v0's meta): central noise, per-version epsilon
        self.dp = DpAggregation.from_version(current)
        self.dead_budget = DeadLetterBudget()
        #: recorded norms of the last clip_window versions (running-median clip), rebuilt by
        #: _reload from the stream before the first fold, then extended by each flush
        self.norm_window = NormWindow(self.cfg.clip_window, complete=False)
        #: the current version's clip bound and outlier limit, from norm_window: they change only
        #: when the version does, so they are computed once per version, not once per update
        self.clip_bound: float | None = None
        self.outlier_limit: float | None = None

    @property
    def prefetch(self) -> int:
        """Deliveries the broker may have out to us: the K of the version being filled (unacked
        until its confirm) plus up to K more to work on meanwhile, at least 16 in all, fewer when
        bodies are large: prefetched bodies sit in memory, whole, until they are folded (measured:
        with 40 MB updates, a 2K window was most of the aggregator's peak RSS). One beyond K is
        the least that lets a version fill up."""
        k = self.cfg.effective_buffer
        ahead = max(k, 16 - k)
        model_bytes = self.model_bytes
        if model_bytes > 0:
            ahead = min(ahead, max(1, PREFETCH_BYTES // model_bytes))
        return (k + ahead) * self.deliveries_per_update(model_bytes)

    @property
    def model_bytes(self) -> int:
        return sum(int(np.asarray(v).nbytes) for v in self.current.weights.values())

    def deliveries_per_update(self, payload_bytes: int) -> int:
        """Prefetch slots one update takes: one per part, when it is over the broker's part size."""
        return parts_for(payload_bytes + UPDATE_OVERHEAD_BYTES, self.conn.part_bytes)

    def close(self) -> None:
        if self.fence is not None:
            self.fence.close()
            self.fence = None

    def _bounds_from_window(self) -> None:
        self.clip_bound = self.norm_window.bound(self.cfg)
        self.outlier_limit = self.norm_window.limit(self.cfg)

    def _reload(self) -> None:
        """Read the newest version and the dedup set again, and follow the stream from there."""
        # the running-median clip needs clip_window versions of the chain; a few entries spare for
        # republished or forked ones
        window = self.agg.dedup_window
        if self.cfg.clip_median_factor > 0:
            window = max(window, 2 * self.cfg.clip_window + 4)
        state = load_model_state(self.agg.url, self.names, window=window)
        self.current = state.latest
        self.seen = set(state.recent_included)
        self.recent = [state.latest.included]
        self.dp = DpAggregation.from_version(state.latest)
        chain = chain_window(state.recent_contributions, state.latest.version, self.cfg.clip_window,
                             clip_measure(self.cfg))
        self.norm_window = dataclasses.replace(chain, step=self._step_of(state.latest, state.parent))
        self._bounds_from_window()
        if self.cfg.clip_median_factor > 0 and not self.norm_window.known:
            log.warning("clip history incomplete (models stream truncated?): bound from what is left",
                        extra={"job": self.names.job, "version": state.latest.version,
                               "versions": len(self.norm_window.versions)})
        self.close()
        self.fence = StreamReader(self.agg.url, self.names.models,
                                  name=f"fedmq-{self.agg.name}-fence-{self.names.job}", prefetch=8)
        self.fence.start(state.offset + 1)

    def _step_of(self, version: ModelVersion, parent: ModelVersion | None) -> dict[str, Any] | None:
        """Centred clipping's centre for the child of `version`: {} (zero) for v0, None when not
        centred, or when the parent was not read (the centre is then zero and replay says so)."""
        if self.cfg.clip_center is not ClipCenter.LAST_STEP:
            return None
        if version.parent < 0:
            return {}
        if parent is None:
            log.warning("centred clip: the parent of the newest version was not read, centre is zero",
                        extra={"job": self.names.job, "version": version.version})
            return None
        return last_step(version.weights, parent.weights, self.cfg)

    def _check_fence(self) -> None:
        """Never publish a second child of the same parent: if a version newer than ours appeared
        (two replicas briefly active around a lost connection), drop this session instead."""
        if self.fence is None:
            return
        for d in self.fence.poll(0.0):
            try:
                version = ModelVersion.decode(d.body).version
            except MalformedMessageError:
                continue
            if version > self.current.version:
                raise SessionAbortedError(f"version {version} was published by another replica while "
                                          f"this one was at {self.current.version}")

    @property
    def sites(self) -> list[str]:
        """The listed sites, each with its own updates queue (the job's registry; none without)."""
        return sorted(self.trust.registry or ())

    def activate(self, *, takeover: bool) -> None:
        """This replica holds the lock now (`takeover`: another one held it before)."""
        # the state read at connect time may be many versions old: a standby waits while the
        # active replica moves the job on, so read it again now that it is the one to move it
        self._reload()
        self.agg.active = True
        if takeover:
            self.agg.stats.takeovers += 1
        log.info("aggregator active job=%s replica=%s version=%d", self.names.job, self.agg.name,
                 self.current.version)
        metrics.aggregator_active(self.names.job, True)
        emit(self.conn, self.names, self.agg.name, EventKind.AGGREGATOR_ACTIVE, replica=self.agg.name,
             takeover=takeover)

    def handle(self, d: Delivery) -> None:
        """Decode, drop duplicates, validate and fold one delivery; dead-letter what is invalid."""
        self.acks.saw(d)  # first: from here on this session settles or buffers it
        try:
            update = Update.decode(d.body)
        except MalformedMessageError as exc:
            self.dead_letter(d, exc.reason, str(exc), header_update_id(d.headers))
            return
        uid = update.update_id
        faults.point("aggregator.handle", uid)
        if uid in self.seen or uid in self.buffered_ids:
            self.agg.stats.duplicates += 1
            metrics.update_duplicate(self.names.job)
            log.info("duplicate update dropped job=%s update=%s", self.names.job, uid)
            d.ack()
            return
        started = time.perf_counter()
        try:
            tau = self._fold(update, d.routing_key)
        except (InvalidUpdateError, MalformedMessageError) as exc:
            self.dead_letter(d, exc.reason, str(exc), uid)
            return
        metrics.update_folded(self.names.job, tau, time.perf_counter() - started)
        if not self.buffered:
            self.first_fold_at = time.monotonic()
        # the running sum holds the update now: keep only what acking needs, so memory is O(model).
        # The body goes from the delivery itself (its caller holds it while we flush) and the
        # decoded tensors with `update`, before the flush allocates the new version: two copies of
        # an update less at the peak (measured with 40 MB updates, bench/aggregator.py)
        d.body = b""
        del update
        self.buffered.append(d)
        self.buffered_ids.add(uid)
        if self._ready():
            self.flush()

    def _fold(self, update: Update, routing_key: str | None) -> int:
        """Validate and fold one plaintext update; returns its staleness, raises what dead-letters it."""
        uid = update.update_id
        # the dense delta: decompressed (strategy.compression) after the signature check, then validated
        tau, delta = validated_delta(update, job=self.names.job, current_version=self.current.version,
                                     template=self.current.weights, cfg=self.cfg, trust=self.trust,
                                     routing_key=routing_key)
        if self.dp is not None:  # central noise: an update past its site's budget is refused here
            delta = self.dp.admit(update, delta, [c.site for c in self.acc.contributions])
        self.folding = True
        self.acc.fold(update_id=uid, site=update.site, delta=delta, tau=tau,
                      num_samples=update.num_samples, base_version=update.base_version,
                      median_bound=self.clip_bound, center=self.norm_window.step,
                      outlier_limit=self.outlier_limit)
        return tau

    def _ready(self) -> bool:
        return self.acc.ready()

    def maybe_flush(self) -> None:
        if self.buffered and time.monotonic() - self.first_fold_at >= self.cfg.flush_timeout:
            self.flush()

    def flush(self) -> None:
        """Publish the next version with a confirm, then ack what it includes (never the reverse)."""
        flush_started = time.perf_counter()
        self._check_fence()
        cur = self.current
        new_weights, contributions, server_state = self.acc.step(cur.weights, cur.server_state)
        meta = dict(cur.meta)
        if self.cfg.name.is_user:  # replay warns when the strategy's source differs (fedmq/replay.py)
            meta["user_strategy"] = {"name": self.cfg.name.value, "source_sha256": strategy_source_sha256(self.cfg)}
        if self.dp is not None:  # central noise goes on after the flush (aggregator/dp.py)
            new_weights, meta["dp"] = self.dp.finish(cur.version + 1, new_weights, contributions,
                                                     learning_rate(self.cfg))
        mv = make_version(
            job=self.names.job, version=cur.version + 1, parent=cur.version, weights=new_weights,
            included=[c.update_id for c in contributions], strategy=cur.strategy, params=cur.params,
            model=cur.model, contributions=[c.to_dict() for c in contributions], meta=meta,
            server_state=server_state,
        )
        self.conn.publish(self.names.models_exchange, "", mv.encode(), message_id=f"v{mv.version}")
        metrics.version_published(self.names.job, mv.version, len(mv.included),
                                  time.perf_counter() - flush_started)
        faults.point("aggregator.before_ack")
        self.acks.ack(self.buffered)
        self.buffered, self.buffered_ids = [], set()
        self.current = mv
        self._remember(mv.included)
        # the next version's clip bound: from the norms as published (the same floats replay reads)
        self.norm_window = self.norm_window.push(recorded_norms(mv.contributions, clip_measure(self.cfg)),
                                                 self._step_of(mv, cur))
        self._bounds_from_window()
        self.agg.stats.versions += 1
        self.agg.stats.applied += len(mv.included)
        log.info("version published", extra={"job": self.names.job, "version": mv.version,
                                               "folded": len(mv.included)})
        emit(self.conn, self.names, "aggregator", EventKind.VERSION_PUBLISHED, version=mv.version,
             parent=mv.parent, included=list(mv.included), sha256=mv.sha256, replica=self.agg.name,
             sites=[c.site for c in contributions], staleness=[c.staleness for c in contributions],
             epsilon=mv.meta.get("dp", {}).get("epsilon"))

    def _remember(self, ids: tuple[str, ...]) -> None:
        self.recent.append(ids)
        self.seen.update(ids)
        if len(self.recent) > self.agg.dedup_window * 4:
            # keep memory bounded on endless jobs; ids older than the window cannot be redelivered
            self.recent = self.recent[-self.agg.dedup_window:]
            self.seen = {i for ids_ in self.recent for i in ids_}

    def dead_letter(self, d: Delivery, reason: str, detail: str, update_id: str | None) -> None:
        """Park the message with its reason (confirmed), then ack: nothing is dropped silently.

        A site past its budget (`DeadLetterBudget`) is rejected in bulk instead: the broker parks
        the body itself, so a flood costs the others no more than a decode per hostile body."""
        counts = self.agg.stats.dead_lettered
        counts[reason] = counts.get(reason, 0) + 1
        metrics.update_dead_lettered(self.names.job, reason)
        site = d.routing_key
        if not self.dead_budget.precise(site):
            self.dead_budget.bulk(site, reason)
            d.reject()
            return
        headers = {REASON_HEADER: reason, DETAIL_HEADER: detail[:1000]}
        if update_id:
            headers[UPDATE_ID_HEADER] = update_id
        self.conn.publish(self.names.dead_exchange, site, d.body, headers=headers)
        d.ack()
        bulk = self.dead_budget.take_bulk(site)
        log.warning("update dead-lettered", extra={"job": self.names.job, "update": update_id, "site": site,
                                                    "reason": reason, "detail": detail,
                                                    "rejected_in_bulk": sum(bulk.values())})
        emit(self.conn, self.names, "aggregator", EventKind.DEAD_LETTERED, update_id=update_id,
             reason=reason, detail=detail[:300], site=site, rejected_in_bulk=bulk)
