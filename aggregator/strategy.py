"""Aggregation math: pure functions and a small accumulator, no I/O.

The service and `fedmq replay` both call `Accumulator`, so a replayed version is bit-identical to
the published one, on any machine. Determinism rules (docs/replay.md):

* updates are folded in `included` order (arrival order at the aggregator), never re-sorted;
* every sum is kept in float64 and the result is cast back to the model's dtype once, at flush;
* only IEEE-754 basic operations touch the numbers (+, -, *, /, sqrt: correctly rounded on every
  platform) and numpy's pairwise sum over a fresh contiguous float64 array (fixed order for a shape);
* no libm transcendental: glibc's ``pow`` picks an FMA or a non-FMA variant per CPU and may round
  the last bit differently, so the polynomial staleness factor is computed in decimal software
  arithmetic (`staleness_factor`) and a replay on another machine gets the same float;
* no randomness and no threads; anything random a future step adds (central DP noise) must be
  seeded from the version it produces and re-applied by replay (see `fedmq.replay.POST_FLUSH_STEPS`).

Strategies (all as ``w_next = w + lr * sum_k(s(tau_k) * m_k * delta_k) / sum_k(m_k)``, with
m_k = n_k when sample_weighted else 1):

* FedBuff (Nguyen et al., 2022): K buffered updates, lr = server_lr, s = 1/sqrt(1+tau) by default.
* FedAsync (Xie et al., 2019): K = 1, lr = alpha, s constant / polynomial / hinge. In delta form
  ``w + alpha_t * delta`` equals ``(1 - alpha_t) w + alpha_t (w + delta)``.
* FedAvg (McMahan et al., 2017): K = cohort, tau = 0, lr = 1: ``sum_k n_k/n * w_k``.
* Robust variants (trimmed mean, coordinate median) need the whole buffer in memory and ignore m_k.

Running-median clipping (``clip_median_factor`` > 0): every contribution records the raw L2 norm
of its delta (``norm``), and each delta folded into version v is scaled to at most
``factor x median(norms recorded in the last clip_window versions of v's parent chain)``. The bound
is a pure function of what the models stream holds (`NormWindow`, `median_clip_bound`), so a
replica taking over and `fedmq replay` derive the same bound; it does not look at the buffer being
filled, so the fold stays O(model) and its order does not matter for the bound. Until the window
holds `MIN_CLIP_NORMS` norms there is no median bound (only ``clip_norm``, if set).

Centred clipping (``clip_center = "last_step"``, after Karimireddy, He and Jaggi, ICML 2021): a
length bound alone lets an attacker pull against the honest direction with a full-length update
(a sign flip clipped to the median norm still cancels an honest one). Centred, each delta is
replaced by ``c + clip(delta - c, bound)``, where c is the step the previous version took
(`last_step`: its weights minus its parent's, over the server lr) and the bound is factor x the
running median of recorded *deviations* ``|delta - c|``. An update can then move the mean at most
``bound / K`` away from where the honest majority was already heading, whatever its direction.
c is computed from published weights only, so a replica taking over and replay get the same bits.
Before any deviation is recorded (the job's first version) there is no running median, and an
unclipped first version would hand attackers the centre: those folds are held until the flush and
clipped against factor x the median of that version's own deviations (K deltas in memory, once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from fedmq.shared.codec import Weights
from fedmq.shared.config import ClipCenter, Robust, ServerOptimizer, StalenessFn, StrategyConfig, StrategyName
from fedmq.shared.errors import OutlierError, ServerStateError
from fedmq.shared.plugins import import_callable
from fedmq.shared.privacy import clip, l2_norm


def staleness_factor(tau: int, fn: StalenessFn = StalenessFn.POLYNOMIAL, a: float = 0.5, b: int = 4) -> float:
    """s(tau): constant 1; polynomial (1+tau)^-a; hinge 1 up to b, then 1/(a(tau-b)+1)."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if fn is StalenessFn.CONSTANT:
        return 1.0
    if fn is StalenessFn.POLYNOMIAL:
        return _decimal_power(1 + tau, -a)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


@lru_cache(maxsize=1024)
def _decimal_power(base: int, exponent: float) -> float:
    """base ** exponent without libm: libmpdec is pure integer arithmetic, so every platform gets
    the same float (40 digits, then one correctly rounded conversion). ~60 us per call, and an
    aggregator calls it once per update with few distinct (base, exponent) pairs: a pure function
    of its arguments, so it is cached (measured: 7% of the aggregator's time at 19 KB updates)."""
    with localcontext() as ctx:
        ctx.prec = 40
        return float(Decimal(base) ** Decimal(exponent))


@dataclass(frozen=True)
class Contribution:
    """How one update entered a version; stored in ModelVersion.contributions for audit."""

    update_id: str
    site: str
    base_version: int
    staleness: int
    weight: float
    num_samples: int
    #: L2 norm of the delta as received, before any clipping: the running-median clip's history.
    #: None only for contributions rebuilt from versions written before norms were recorded.
    norm: float | None = None
    #: centred clipping only: L2 norm of the delta's deviation from the centre, before clipping
    deviation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"update_id": self.update_id, "site": self.site, "base_version": self.base_version,
                               "staleness": self.staleness, "weight": self.weight, "num_samples": self.num_samples}
        if self.norm is not None:
            out["norm"] = self.norm
        if self.deviation is not None:
            out["deviation"] = self.deviation
        return out


#: norms the window must hold before the running median bounds anything: with fewer, one or two
#: attackers would be the median. Odd, so the median is one recorded norm times the factor.
MIN_CLIP_NORMS = 5


def median_clip_bound(norms: Sequence[float], factor: float) -> float | None:
    """factor x median(norms), or None (no bound) when off (factor <= 0) or the history is short.

    np.median on float64 sorts and averages at most two middle values: basic IEEE operations only,
    the same bits on every machine (determinism rules above)."""
    if factor <= 0 or len(norms) < MIN_CLIP_NORMS:
        return None
    return factor * float(np.median(np.asarray(norms, dtype=np.float64)))


def clip_measure(cfg: StrategyConfig) -> str:
    """The contribution field the running median is taken over: raw norms, or deviations when centred."""
    return "deviation" if cfg.clip_center is ClipCenter.LAST_STEP else "norm"


def recorded_norms(contributions: Sequence[Mapping[str, Any]], measure: str = "norm") -> tuple[float, ...]:
    """The norms (field `measure`, see `clip_measure`) a version's recorded contributions carry, in
    `included` order.

    Entries without a finite non-negative float there (versions written before norms were
    recorded, CKKS versions) add nothing: the bound uses only what the stream actually says."""
    out = []
    for c in contributions:
        n = c.get(measure)
        if isinstance(n, float) and np.isfinite(n) and n >= 0:
            out.append(n)
    return tuple(out)


@dataclass(frozen=True)
class NormWindow:
    """The recorded norms of the last `window` versions of one parent chain, oldest first.

    `complete` is False when the chain's older versions were not read (the models stream was
    truncated by retention, or a reader started mid-stream) and fewer than `window` versions are
    known: such a window cannot say what bound the aggregator used (`known`).

    `step` is the newest version's `last_step`, the centre of centred clipping: empty for v0 (a
    zero centre), None when not known (its parent was not read) or not needed.
    """

    window: int
    versions: tuple[tuple[float, ...], ...] = ()
    complete: bool = True
    step: Mapping[str, np.ndarray] | None = field(default=None, compare=False)

    @property
    def known(self) -> bool:
        return self.complete or len(self.versions) >= self.window

    def norms(self) -> list[float]:
        return [n for v in self.versions[-self.window:] for n in v]

    def push(self, norms: Sequence[float], step: Mapping[str, np.ndarray] | None = None) -> NormWindow:
        """The window of a child version: this one plus the child's own norms (and step), oldest dropped."""
        versions = (*self.versions, tuple(norms))[-self.window:]
        return NormWindow(self.window, versions, self.complete or len(versions) >= self.window, step)

    def folded(self, contributions: Sequence[Contribution], weights: Weights, parent: Weights,
               cfg: StrategyConfig) -> NormWindow:
        """The window after a flush took `parent` to `weights` with `contributions`, for readers that
        fold in memory (what-if, simulate); the live aggregator pushes the norms as published."""
        step = last_step(weights, parent, cfg) if cfg.clip_center is ClipCenter.LAST_STEP else None
        return self.push(recorded_norms([c.to_dict() for c in contributions], clip_measure(cfg)), step)

    def bound(self, cfg: StrategyConfig) -> float | None:
        """The running-median clip bound for a version built on top of this window's newest one."""
        return median_clip_bound(self.norms(), cfg.clip_median_factor)

    def limit(self, cfg: StrategyConfig) -> float | None:
        """Beyond this an update is an outlier (dead-lettered), for the same version; None = off/short."""
        return median_clip_bound(self.norms(), cfg.outlier_factor)


def chain_window(entries: Sequence[tuple[int, int, Sequence[Mapping[str, Any]]]], head: int,
                 window: int, measure: str = "norm") -> NormWindow:
    """The NormWindow of version `head` from (version, parent, contributions) entries in stream order.

    Walks parent links back from `head`; where a version number has several entries (a fork), the
    last one in the stream counts, as for the aggregator's choice of its current version. The
    window is complete when the walk reaches v0 (parent -1) or `window` versions."""
    by_version: dict[int, tuple[int, Sequence[Mapping[str, Any]]]] = {}
    for version, parent, contributions in entries:
        by_version[version] = (parent, contributions)
    chain: list[tuple[float, ...]] = []
    v, complete = head, False
    while len(chain) < window:
        entry = by_version.get(v)
        if entry is None:
            break
        parent, contributions = entry
        chain.append(recorded_norms(contributions, measure))
        if parent < 0:
            complete = True
            break
        v = parent
    chain.reverse()
    return NormWindow(window, tuple(chain), complete or len(chain) >= window)


def _refuse_outlier(update_id: str, what: str, size: float, limit: float | None, cfg: StrategyConfig) -> None:
    if limit is not None and size > limit:
        raise OutlierError(f"update {update_id}: {what} {size:.4g} > {cfg.outlier_factor:g} x the running median "
                           f"({limit:.4g}); dead-lettered, not folded (strategy.outlier_factor)")


def learning_rate(cfg: StrategyConfig) -> float:
    return cfg.alpha if cfg.name is StrategyName.FEDASYNC else cfg.server_lr


#: elements per slice of the element-wise loops below: their float64 temporaries are 8 MB, not
#: the size of the tensor (a 10M-parameter layer's would be 80 MB, several at once)
CHUNK = 1 << 20


def _slices(size: int) -> range:
    return range(0, size, CHUNK)


def add_scaled(total: np.ndarray, weight: float, delta: np.ndarray) -> None:
    """``total += weight * float64(delta)`` in place, slice by slice.

    Element-wise only: each element sees the same two roundings (one product, one sum) as the
    whole-array expression, so the bits are the same; the temporaries are one slice, not two
    float64 copies of the tensor. `total` is a contiguous float64 array of delta's shape."""
    if total.size <= CHUNK:  # one slice: the whole-array expression, without the loop's overhead
        total += weight * np.asarray(delta, dtype=np.float64)
        return
    flat, src = total.reshape(-1), np.ascontiguousarray(delta).reshape(-1)
    for i in _slices(flat.size):
        part = np.multiply(src[i:i + CHUNK], weight, dtype=np.float64)
        flat[i:i + CHUNK] += part


def _plain_step(w: Any, lr: float, g: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``(float64(w) + lr * g).astype(dtype)`` slice by slice (the same roundings per element)."""
    if g.size <= CHUNK:  # one slice: the expression itself, one copy fewer
        return (np.asarray(w, dtype=np.float64) + lr * g).astype(dtype)
    base = np.ascontiguousarray(w).reshape(-1)
    step = np.ascontiguousarray(g).reshape(-1)
    out = np.empty(base.size, dtype=dtype)
    for i in _slices(base.size):
        part = base[i:i + CHUNK].astype(np.float64)
        part += lr * step[i:i + CHUNK]
        out[i:i + CHUNK] = part.astype(dtype)
    return out.reshape(np.shape(w))


def last_step(weights: Weights, parent: Weights, cfg: StrategyConfig) -> dict[str, np.ndarray]:
    """(weights - parent) / lr in float64: the mean delta a version applied, as published (after
    the cast to the model's dtype and any central noise), so every reader derives the same bits."""
    lr = learning_rate(cfg)
    return {k: (np.asarray(w, np.float64) - np.asarray(parent[k], np.float64)) / lr
            for k, w in weights.items() if k in parent}


def centred_clip(delta: Weights, center: Mapping[str, np.ndarray] | None,
                 bound: float | None) -> tuple[dict[str, np.ndarray], float]:
    """(center + clip(delta - center, bound), |delta - center|); a missing centre is zero and
    bound None clips nothing (the median history is still short)."""
    center = center or {}
    base = {k: np.asarray(center[k], np.float64) if k in center else np.zeros(np.shape(v), np.float64)
            for k, v in delta.items()}
    deviation = {k: np.asarray(v, np.float64) - base[k] for k, v in delta.items()}
    size = l2_norm(deviation)
    if bound is not None and bound <= 0 < size:
        deviation = {k: np.zeros_like(v) for k, v in deviation.items()}
    elif bound is not None:
        deviation = clip(deviation, bound, size)
    return {k: base[k] + deviation[k] for k in delta}, size


@dataclass(frozen=True)
class BufferedUpdate:
    """One update as a user strategy sees it: the delta in float64 after clip_norm / median
    clipping, its staleness factor s(tau) and weight m (num_samples or 1), and its metadata."""

    delta: Mapping[str, np.ndarray]
    staleness: float
    weight: float
    contribution: Contribution


class Strategy(Protocol):
    """A user strategy, named in the job config as ``strategy.name = "package.module:callable"``.

    Called once per version with the parent's weights, the job's StrategyConfig, the buffered
    updates in arrival order (``cfg.buffer_size`` of them, fewer on a flush timeout) and the
    parent's ``server_state`` (None for v0's children); returns the new weights (the model's
    dtypes) and the state the next call receives (None for none). It must be a pure function of
    its arguments (no randomness, clock, files or globals: anything it keeps goes in the returned
    state, which is published with the version), so `fedmq replay` recomputes it bit for bit.
    """

    def __call__(self, current: Weights, cfg: StrategyConfig, updates: Sequence[BufferedUpdate],
                 state: Weights | None) -> tuple[Weights, Weights | None]: ...


def load_strategy(cfg: StrategyConfig) -> Strategy | None:
    """The user strategy `cfg.name` names (ConfigError when it can't be imported); None for a built-in."""
    if not cfg.name.is_user:
        return None
    return import_callable(cfg.name.value, "strategy.name")  # type: ignore[return-value]


def strategy_source_sha256(cfg: StrategyConfig) -> str | None:
    """sha256 of the source file defining the user strategy (recorded in v0's meta so replay
    can warn when the code changed); None for built-ins or code without a source file."""
    import hashlib
    import inspect

    fn = load_strategy(cfg)
    if fn is None:
        return None
    try:
        path = inspect.getsourcefile(fn)  # type: ignore[arg-type]
    except TypeError:
        return None
    if not path:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mean_strategy(current: Weights, cfg: StrategyConfig, updates: Sequence[BufferedUpdate],
                  state: Weights | None) -> tuple[Weights, Weights | None]:
    """FedBuff / FedAsync / FedAvg (robust = none) through the `Strategy` interface: the same
    float64 sums in the same order as `Accumulator`, so the same bits (tests/test_user_strategy.py).
    The Accumulator keeps its running sum (memory O(model)) instead of buffering."""
    total: dict[str, np.ndarray] = {}
    denominator = 0.0
    for u in updates:
        w = u.staleness * u.weight
        for k, v in u.delta.items():
            if k not in total:
                total[k] = np.zeros(np.shape(v), dtype=np.float64)
            total[k] += w * np.asarray(v, dtype=np.float64)
        denominator += u.weight
    if denominator <= 0:
        mean = {k: np.zeros_like(v) for k, v in total.items()}
    else:
        mean = {k: v / denominator for k, v in total.items()}
    return server_step(cfg, current, mean, state)


class Accumulator:
    """Folds deltas into a float64 running sum: memory O(model) for mean-type strategies; a user
    strategy (`Strategy`) keeps the buffer and is called with it at `step`."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self._user = load_strategy(cfg)
        self._updates: list[BufferedUpdate] = []  # user strategies only
        self._sum: dict[str, np.ndarray] | None = None
        self._denominator = 0.0
        self._buffer: list[Weights] = []  # robust strategies only
        #: centred folds before any deviation was recorded: (delta, centre, deviation, s, m)
        self._pending: list[tuple[Weights, Mapping[str, np.ndarray] | None, float, float, float]] = []
        self.contributions: list[Contribution] = []

    def __len__(self) -> int:
        return len(self.contributions)

    def ready(self) -> bool:
        return len(self) >= self.cfg.effective_buffer

    def fold(self, *, update_id: str, site: str, delta: Weights, tau: int, num_samples: int,
             base_version: int, median_bound: float | None = None,
             center: Mapping[str, np.ndarray] | None = None, outlier_limit: float | None = None) -> Contribution:
        """Fold one delta. `median_bound` is the running-median clip bound of the version being
        built (`NormWindow.bound`; None = none yet, or clipping against the median is off);
        `center` the centred clip's centre (`NormWindow.step`), used when clip_center is last_step;
        `outlier_limit` (`NormWindow.limit`): raises OutlierError, before touching any state, for a
        delta whose norm (deviation, when centred) exceeds it."""
        cfg = self.cfg
        s = staleness_factor(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        m = float(num_samples) if cfg.sample_weighted else 1.0
        norm = l2_norm(delta)
        if cfg.clip_center is not ClipCenter.LAST_STEP:
            _refuse_outlier(update_id, "L2 norm", norm, outlier_limit, cfg)
            clipped = self._length_clip(delta, norm, median_bound)
            c = Contribution(update_id, site, base_version, tau, s * m, num_samples, norm)
            if self._user is not None:
                self._updates.append(BufferedUpdate(
                    {k: np.array(v, dtype=np.float64) for k, v in clipped.items()}, s, m, c))
            else:
                self._add(clipped, s, m)
            self.contributions.append(c)
            return c
        delta = clip(delta, cfg.clip_norm, norm)
        if median_bound is None:
            # cold start (no recorded deviations yet): held until flush, then clipped against the
            # median of this version's own deviations, so the very first version is bounded too
            deviation = centred_clip(delta, center, None)[1]
            _refuse_outlier(update_id, "deviation from the last step", deviation, outlier_limit, cfg)
            self._pending.append((delta, center, deviation, s, m))
        else:
            clipped, deviation = centred_clip(delta, center, median_bound)
            _refuse_outlier(update_id, "deviation from the last step", deviation, outlier_limit, cfg)
            self._add(clipped, s, m)
        c = Contribution(update_id, site, base_version, tau, s * m, num_samples, norm, deviation)
        self.contributions.append(c)
        return c

    def _add(self, delta: Weights, s: float, m: float) -> None:
        if self.cfg.robust is Robust.NONE:
            if self._sum is None:
                self._sum = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in delta.items()}
            w = s * m
            for k, v in delta.items():
                add_scaled(self._sum[k], w, np.asarray(v))
            self._denominator += m
        else:
            self._buffer.append({k: s * np.asarray(v, dtype=np.float64) for k, v in delta.items()})

    def _resolve_pending(self) -> None:
        """Clip the cold-start folds against factor x the median of their own deviations."""
        if not self._pending:
            return
        bound = self.cfg.clip_median_factor * float(np.median(np.asarray([p[2] for p in self._pending], np.float64)))
        for delta, center, _deviation, s, m in self._pending:
            self._add(centred_clip(delta, center, bound)[0], s, m)
        self._pending = []

    def _length_clip(self, delta: Weights, norm: float, median_bound: float | None) -> Weights:
        """Scale to the tighter of clip_norm and the running-median bound."""
        bound = self.cfg.clip_norm
        if median_bound is not None and (bound <= 0 or median_bound < bound):
            bound = median_bound
        if median_bound is not None and median_bound <= 0 < norm:
            # the recent updates were all zero: a bound of 0 admits no movement (clip's 0 means "off")
            return {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in delta.items()}
        return clip(delta, bound, norm)

    def mean_delta(self, *, consume: bool = False) -> dict[str, np.ndarray]:
        """The (robust) mean of the folded deltas. `consume` (used by `step`, which empties the
        accumulator anyway) divides the running sum in place instead of into a copy: the same
        division, one float64 copy of the model less at the flush."""
        self._resolve_pending()
        cfg = self.cfg
        if cfg.robust is Robust.NONE:
            if self._sum is None or self._denominator <= 0:
                # every update had 0 samples: nothing to move the model by
                return {k: np.zeros_like(v) for k, v in (self._sum or {}).items()}
            if consume:
                total, self._sum = self._sum, None
                for v in total.values():
                    np.divide(v, self._denominator, out=v)
                return total
            return {k: v / self._denominator for k, v in self._sum.items()}
        out = {}
        for k in self._buffer[0]:
            stack = np.stack([d[k] for d in self._buffer])
            if cfg.robust is Robust.MEDIAN:
                out[k] = np.median(stack, axis=0)
            else:
                cut = int(np.floor(cfg.trim_fraction * len(stack)))
                srt = np.sort(stack, axis=0)
                out[k] = srt[cut:len(stack) - cut].mean(axis=0)
        return out

    def flush(self, current: Weights) -> tuple[Weights, list[Contribution]]:
        """New weights from `current` and the folded updates; empties the accumulator. Without a
        server optimizer only: one needs the parent's state (`step`)."""
        if self.cfg.server_optimizer is not ServerOptimizer.NONE or self._user is not None:
            raise ValueError("a server optimizer (or user strategy) continues from the parent's state: call step()")
        new, contributions, _ = self.step(current, None)
        return new, contributions

    def step(self, current: Weights, state: Weights | None
             ) -> tuple[Weights, list[Contribution], Weights | None]:
        """New weights and server-optimizer state from the parent's (`current`, `state`) and the
        folded updates; empties the accumulator."""
        if not self.contributions:
            raise ValueError("flush of an empty accumulator")
        if self._user is not None:
            new, new_state = self._user(current, self.cfg, tuple(self._updates), state)
        else:
            new, new_state = server_step(self.cfg, current, self.mean_delta(consume=True), state)
        contributions = self.contributions
        self._sum, self._denominator, self._buffer, self.contributions = None, 0.0, [], []
        self._updates = []
        self._pending = []
        return new, contributions, new_state


def _moments(state: Weights | None, name: str, shape: tuple[int, ...], tau: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """The parent's (m, v) of one parameter in float64; v0's (no state): m = 0, v = tau^2."""
    if not state:
        return np.zeros(shape, np.float64), np.full(shape, tau * tau, np.float64)
    m, v = state.get(f"m:{name}"), state.get(f"v:{name}")
    if m is None or v is None or np.shape(m) != shape or np.shape(v) != shape:
        raise ServerStateError(f"the parent's server-optimizer state has no {shape} moments for {name!r}; "
                               "the version was not written by this job's aggregator")
    return np.asarray(m, np.float64), np.asarray(v, np.float64)


def server_step(cfg: StrategyConfig, current: Weights, mean: Mapping[str, np.ndarray],
                state: Weights | None) -> tuple[Weights, Weights | None]:
    """The server's step on the mean delta; returns the weights and the optimizer's state, both
    cast to the model's dtypes (what is published is what the next step starts from).

    Without an optimizer: ``w + lr * mean``. With one (Reddi et al., ICLR 2021, Algorithm 2; the
    mean delta is the negative pseudo-gradient g): ``m = b1 m + (1 - b1) g``; v = ``v + g^2``
    (adagrad), ``b2 v + (1 - b2) g^2`` (adam) or ``v - (1 - b2) g^2 sign(v - g^2)`` (yogi);
    ``w + lr * m / (sqrt(v) + tau)``. Only +, -, *, /, sqrt and sign: bit for bit on any machine.
    Integer buffers (e.g. BatchNorm's counter) take the plain step and keep no state."""
    lr, opt = learning_rate(cfg), cfg.server_optimizer
    new: Weights = {}
    out: Weights = {}
    for k, w in current.items():
        dtype = np.asarray(w).dtype
        g = mean.get(k)
        if (opt is ServerOptimizer.NONE and np.issubdtype(dtype, np.floating) and isinstance(g, np.ndarray)
                and g.dtype == np.float64 and g.shape == np.shape(w)):
            new[k] = _plain_step(w, lr, g, dtype)  # the line below, without tensor-sized temporaries
            continue
        base = np.asarray(w, dtype=np.float64)
        if opt is ServerOptimizer.NONE or not np.issubdtype(dtype, np.floating):
            new[k] = (base + lr * g if g is not None else base).astype(dtype)
            continue
        g = np.zeros(base.shape, np.float64) if g is None else np.asarray(g, np.float64)
        m0, v0 = _moments(state, k, base.shape, cfg.server_tau)
        m = cfg.server_beta1 * m0 + (1.0 - cfg.server_beta1) * g
        g2 = g * g
        if opt is ServerOptimizer.ADAGRAD:
            v = v0 + g2
        elif opt is ServerOptimizer.ADAM:
            v = cfg.server_beta2 * v0 + (1.0 - cfg.server_beta2) * g2
        else:
            v = v0 - (1.0 - cfg.server_beta2) * g2 * np.sign(v0 - g2)
        new[k] = (base + lr * m / (np.sqrt(v) + cfg.server_tau)).astype(dtype)
        out[f"m:{k}"], out[f"v:{k}"] = m.astype(dtype), v.astype(dtype)
    return new, (out if opt is not ServerOptimizer.NONE else None)


def aggregate(current: Weights, cfg: StrategyConfig, updates: list[tuple[str, str, Weights, int, int, int]]) -> Weights:
    """One version from (update_id, site, delta, tau, num_samples, base_version) tuples, in order."""
    acc = Accumulator(cfg)
    for update_id, site, delta, tau, n, base in updates:
        acc.fold(update_id=update_id, site=site, delta=delta, tau=tau, num_samples=n, base_version=base)
    return acc.flush(current)[0]
