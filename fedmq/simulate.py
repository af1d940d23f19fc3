"""`fedmq simulate`: a job in simulated time, without a broker — the zero-overhead bound.

Every site trains for real (`worker.train.train_local`, the same code and hyper-parameters a task
carries) and every version is folded by the aggregator's own `Accumulator`, but messaging costs
nothing: a task starts the instant a site is free, an update is folded the instant its training
ends, and a version exists the instant its buffer is full. Only the sites' task durations take
time, on a simulated clock: `slowdown x max(measured compute, min_task_seconds)` (the worker's
own padding rule), or a fixed `task_seconds` per site. What fedmq measures on the real broker,
divided by what this reports for the same job, is its messaging overhead; and for a user it
answers "how long will my sites take to reach the target?" before any site is connected.

Scheduling follows the coordinator: `concurrency` tasks outstanding, each carrying the version
current when it was issued, taken by the site that has been free longest (ties: the order the
sites were given); FedAvg issues a whole cohort from one version and the next only after the
cohort is merged. Staleness, `max_staleness`, the flush timeout, running-median and centred
clipping and outlier rejection are applied as the aggregator does, and so is `strategy.compression`
(each site compresses with its own error feedback, the fold decompresses: shared/compression.py).
Not simulated: central DP noise, CKKS, signatures (they change the cost, not the math of the bound).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator.strategy import Accumulator, NormWindow
from fedmq.shared.codec import Weights
from fedmq.shared.compression import CompressionSpec, ErrorFeedback, decompress
from fedmq.shared.config import EncryptionScheme, JobConfig, PrivacyMechanism, StrategyName
from fedmq.shared.datasets import fit_to_model, load_site
from fedmq.shared.errors import ConfigError, OutlierError


@dataclass(frozen=True)
class SimSite:
    """One site of the simulation: its data and how long its tasks take."""

    name: str
    data: Path
    slowdown: float = 1.0
    min_task_seconds: float = 0.0
    #: a fixed duration per task (seconds), e.g. measured at the site; overrides the two above
    task_seconds: float | None = None


@dataclass
class SimResult:
    strategy: str
    seconds_to_target: float | None      # simulated seconds from v0 to the first version >= target
    updates_to_target: int | None
    versions: int
    updates: int                         # folded into versions
    stale: int                           # dropped past max_staleness
    outliers: int                        # refused by outlier_factor
    sim_seconds: float                   # simulated time at the stop
    wall_seconds: float                  # what the simulation itself took
    stop_reason: str
    final_accuracy: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (version, sim t, accuracy)
    task_seconds: dict[str, float] = field(default_factory=dict)          # mean simulated duration per site

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class _Task:
    seq: int
    version: int


@dataclass(order=True)
class _Event:
    t: float
    seq: int
    kind: str = field(compare=False)            # "done" | "flush"
    site: int = field(compare=False, default=-1)
    base: int = field(compare=False, default=0)
    delta: Weights | None = field(compare=False, default=None)
    num_samples: int = field(compare=False, default=0)
    generation: int = field(compare=False, default=0)


def check_simulable(cfg: JobConfig) -> None:
    if cfg.privacy.mechanism is not PrivacyMechanism.NONE:
        raise ConfigError("privacy.mechanism: simulate models no differential privacy (set it to \"none\")")
    if cfg.encryption.scheme is not EncryptionScheme.NONE:
        raise ConfigError("encryption.scheme: simulate folds plaintext deltas only (set it to \"none\")")
    if not cfg.data.test:
        raise ConfigError("data.test: simulate evaluates every version on held-out test data")


class Simulation:
    """The event loop: sites, outstanding tasks, the aggregator's buffer, the simulated clock."""

    def __init__(self, cfg: JobConfig, sites: Sequence[SimSite], *, device: Any = None) -> None:
        from fedmq.shared.models import build_model, get_weights, model_spec  # torch: only when simulating

        check_simulable(cfg)
        if not sites:
            raise ConfigError("simulate needs at least one site")
        self.cfg, self.sites, self.device = cfg, list(sites), device
        x_test, self.y_test = load_site(cfg.data.test)
        num_classes = int(self.y_test.max()) + 1
        self.spec = model_spec(cfg.model.name, tuple(x_test.shape[1:]), num_classes, **cfg.model.args)
        self.x_test = fit_to_model(x_test, self.y_test, self.spec, source=f"data.test {cfg.data.test}")
        self.model = build_model(self.spec, seed=cfg.seed)
        self.data = []
        for s in self.sites:
            x, y = load_site(s.data)
            self.data.append((fit_to_model(x, y, self.spec, source=f"site {s.name} data {s.data}"), y))
        self.weights: Weights = get_weights(self.model)
        self.server_state: Weights | None = None
        self.version = 0
        self.strategy = cfg.strategy
        self.acc = Accumulator(self.strategy)
        self.compression = CompressionSpec.of(self.strategy)
        self.feedback = [ErrorFeedback() for _ in self.sites]  # each site's top-k residual
        self.norms = NormWindow(self.strategy.clip_window, step={})
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.free: deque[int] = deque(range(len(self.sites)))
        self.pending: deque[_Task] = deque()
        self.outstanding = 0
        self.round_version = -1
        self.generation = 0  # bumped at each flush: a flush timer of an older buffer is void
        #: older versions that waiting tasks were issued on (a task is trained when a site takes it)
        self.kept: dict[int, Weights] = {}
        self.now = 0.0
        self.updates = self.stale = self.outliers = 0
        self.durations: dict[int, list[float]] = {i: [] for i in range(len(self.sites))}
        self.curve: list[tuple[int, float, float]] = [(0, 0.0, self._accuracy())]

    # ---------------------------------------------------------------- the loop

    def run(self, max_seconds: float | None = None) -> SimResult:
        started = time.perf_counter()
        c = self.cfg.coordinator
        limit = c.max_seconds if max_seconds is None else max_seconds
        target = c.target_accuracy
        reached: tuple[float, int] | None = None
        reason = "no_events"
        self._issue()
        while self.events:
            ev = heapq.heappop(self.events)
            if ev.t > limit:
                self.now, reason = limit, "max_seconds"
                break
            self.now = ev.t
            published = self._on_done(ev) if ev.kind == "done" else self._on_flush_timer(ev)
            if published:
                acc = self.curve[-1][2]
                if target > 0 and acc >= target and reached is None:
                    reached = (self.now, self.updates)
                    reason = "target_accuracy"
                    break
                if self.version >= c.max_versions:
                    reason = "max_versions"
                    break
            self._issue()
        return SimResult(
            strategy=self.strategy.name.value, seconds_to_target=reached[0] if reached else None,
            updates_to_target=reached[1] if reached else None, versions=self.version, updates=self.updates,
            stale=self.stale, outliers=self.outliers, sim_seconds=self.now,
            wall_seconds=time.perf_counter() - started, stop_reason=reason, final_accuracy=self.curve[-1][2],
            curve=self.curve, task_seconds={self.sites[i].name: float(np.mean(d)) for i, d in self.durations.items()
                                            if d})

    def _issue(self) -> None:
        """Top up to `concurrency` outstanding tasks (FedAvg: a cohort per version), then hand the
        waiting tasks to free sites."""
        c = self.cfg.coordinator
        if self.strategy.name is StrategyName.FEDAVG:
            want = c.concurrency if not self.outstanding and self.version != self.round_version else 0
            if want:
                self.round_version = self.version
        else:
            want = c.concurrency - self.outstanding
        for _ in range(max(want, 0)):
            self.pending.append(_Task(next(self.seq), self.version))
            self.outstanding += 1
        while self.pending and self.free:
            self._start(self.free.popleft(), self.pending.popleft())

    def _start(self, i: int, task: _Task) -> None:
        """Train now (on the task's version), finish after the site's simulated duration."""
        from fedmq.worker.train import task_seed, train_local

        site, (x, y) = self.sites[i], self.data[i]
        base = self.weights if task.version == self.version else self.kept[task.version]
        t = self.cfg.training
        t0 = time.perf_counter()
        result = train_local(self.spec, base, x, y, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, mu=t.mu,
                             seed=task_seed(f"sim-{task.seq}"), device=self.device)
        compute = time.perf_counter() - t0
        seconds = site.task_seconds if site.task_seconds is not None else \
            site.slowdown * max(compute, site.min_task_seconds)
        self.durations[i].append(seconds)
        # what the aggregator folds: the site's wire form, decompressed (the delta itself without compression)
        delta = decompress(self.feedback[i].compress(result.delta, self.compression), self.compression, base)
        heapq.heappush(self.events, _Event(self.now + seconds, next(self.seq), "done", i, task.version,
                                           delta, result.num_samples))

    def _on_done(self, ev: _Event) -> bool:
        """An update arrives: fold (or drop as stale / outlier); True when a version was published."""
        self.outstanding -= 1
        self.free.append(ev.site)
        tau = self.version - ev.base
        if tau > self.strategy.max_staleness:
            self.stale += 1
            return False
        assert ev.delta is not None
        try:
            self.acc.fold(update_id=f"sim-{ev.seq}", site=self.sites[ev.site].name, delta=ev.delta, tau=tau,
                          num_samples=ev.num_samples, base_version=ev.base,
                          median_bound=self.norms.bound(self.strategy), center=self.norms.step,
                          outlier_limit=self.norms.limit(self.strategy))
        except OutlierError:
            self.outliers += 1
            return False
        if len(self.acc) == 1 and self.strategy.effective_buffer > 1:
            heapq.heappush(self.events, _Event(self.now + self.strategy.flush_timeout, next(self.seq), "flush",
                                               generation=self.generation))
        if self.acc.ready():
            self._flush()
            return True
        return False

    def _on_flush_timer(self, ev: _Event) -> bool:
        if ev.generation != self.generation or not len(self.acc):
            return False
        self._flush()
        return True

    def _flush(self) -> None:
        before = self.weights
        self.weights, contributions, self.server_state = self.acc.step(self.weights, self.server_state)
        self.updates += len(contributions)
        self.norms = self.norms.folded(contributions, self.weights, before, self.strategy)
        self.kept[self.version] = before
        self.version += 1
        self.generation += 1
        needed = {t.version for t in self.pending}
        self.kept = {v: w for v, w in self.kept.items() if v in needed}
        self.curve.append((self.version, self.now, self._accuracy()))

    def _accuracy(self) -> float:
        from fedmq.shared.models import evaluate, set_weights

        set_weights(self.model, self.weights)
        return evaluate(self.model, self.x_test, self.y_test)[0]


def simulate(cfg: JobConfig, sites: Sequence[SimSite], *, max_seconds: float | None = None,
             device: Any = None) -> SimResult:
    """The zero-overhead run of `cfg` over `sites` (see the module docstring)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one worker process: a fair measure of each site's compute
    try:
        return Simulation(cfg, sites, device=device).run(max_seconds)
    finally:
        torch.set_num_threads(threads)


def simulate_demo(argv: Sequence[str], work: Path) -> SimResult:
    """The zero-overhead run of `fedmq demo <argv>`: the same partition (written under `work`),
    job sections and per-site slowdowns as the demo would start processes with."""
    from fedmq.demo import add_demo_arguments, demo_sections, site_slowdown
    from fedmq.shared.config import load_job_config
    from fedmq.shared.datasets import write_partition

    parser = argparse.ArgumentParser(prog="fedmq demo")
    add_demo_arguments(parser)
    args = parser.parse_args(list(argv))
    part = write_partition(work / "data", args.dataset, args.sites, scheme=args.partition, alpha=args.alpha,
                           seed=args.seed)
    cfg = load_job_config(overrides={"job": "simulated", "seed": args.seed, **demo_sections(args, part, work)},
                          environ={})
    sites = [SimSite(f"site-{i}", Path(f), site_slowdown(args, i), args.min_task_seconds)
             for i, f in enumerate(part.site_files)]
    return simulate(cfg, sites)


# ----------------------------------------------------------------------------- CLI


def _per_site(values: list[float] | None, n: int, flag: str, default: float) -> list[float]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{flag}: give one value or one per site ({n}), got {len(values)}")
    return values


def sites_from_args(args: argparse.Namespace) -> list[SimSite]:
    n = len(args.data)
    slow = _per_site(args.slowdown, n, "--slowdown", 1.0)
    pad = _per_site(args.min_task_seconds, n, "--min-task-seconds", 0.0)
    fixed = _per_site(args.task_seconds, n, "--task-seconds", -1.0)
    return [SimSite(f"site-{i}", Path(p), slow[i], pad[i], fixed[i] if fixed[i] >= 0 else None)
            for i, p in enumerate(args.data)]


def run(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json
    from fedmq.shared.config import load_job_config

    overrides: dict[str, Any] = {}
    if args.target is not None:
        overrides["coordinator"] = {"target_accuracy": args.target}
    cfg = load_job_config(args.config, overrides=overrides)
    for p in args.data:
        if not Path(p).is_file():
            raise ConfigError(f"--data: {p} is not a file")
    result = simulate(cfg, sites_from_args(args), max_seconds=args.max_seconds)
    if args.json:
        print_json(result.to_dict())
        return 0
    to = "not reached" if result.seconds_to_target is None else \
        f"{result.seconds_to_target:.1f} s ({result.updates_to_target} updates)"
    print(f"{result.strategy}: to {cfg.coordinator.target_accuracy:g} in {to}; {result.versions} versions, "
          f"{result.updates} updates, final accuracy {result.final_accuracy:.3f} at {result.sim_seconds:.1f} s "
          f"simulated ({result.stop_reason}; simulated in {result.wall_seconds:.1f} s)")
    for name, s in result.task_seconds.items():
        print(f"  {name}: {s:.2f} s per task")
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    from fedmq.args import number

    p = sub.add_parser("simulate", help="a job in simulated time without a broker: the zero-overhead time to "
                                        "target, from the sites' task durations")
    p.add_argument("--config", required=True, help="the job's TOML (model, data.test, strategy, training, "
                   "coordinator.concurrency / target_accuracy / max_versions)")
    p.add_argument("--data", nargs="+", required=True, help="one data file per site (.npz or .csv)")
    p.add_argument("--slowdown", nargs="+", type=number(float, "[1, 1e6]"),
                   help="per-site slowdown factor (one value for all, or one per site)")
    p.add_argument("--min-task-seconds", nargs="+", type=number(float, "[0, 1e6]"),
                   help="per-site padding of each task, as fedmq worker --min-task-seconds")
    p.add_argument("--task-seconds", nargs="+", type=number(float, "[0, 1e6]"),
                   help="per-site fixed seconds per task (measured at the site); overrides the two above")
    p.add_argument("--target", type=number(float, "[0, 1]"), help="stop at this test accuracy (default: the config's)")
    p.add_argument("--max-seconds", type=number(float, "(0, 1e9]"),
                   help="simulated seconds to stop after (default: coordinator.max_seconds)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level; logs go to stderr")
    p.set_defaults(run=run)
