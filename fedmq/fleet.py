"""`fedmq fleet`: many simulated sites in one process, through the same broker path as production.

Each site is a real `worker.service.Worker`: its own site id (the routing key of its updates,
which the aggregator checks), its own data shard, its own signing key and DP ledger file when
given, and its own task consumer on the job's tasks queue (prefetch 1, acked only after its
update was confirmed, unconfirmed updates republished after a reconnect). What the sites share is
what costs memory when copied (measured for bench/fleet.py, BENCHMARKS.md "Fleet"):

* connections: a *lane* is one AMQP connection carrying the task consumers of many sites, one
  channel each (per-channel QoS keeps each site's prefetch and acks its own), and one publish
  channel; a single worker opens two connections (tasks + models feed) and a thread pool;
* the models feed: one reader of the models stream decodes each version once for every site
  (`SharedFeed`), instead of one reader per site reading every version again;
* training: one thread pool (one torch runtime, one thread per core by default) trains for all.

A lane serves its sites one task at a time (while a task trains, its connection keeps being
serviced, as a single worker's does), so `lanes` bounds how many tasks train at once. Because the
fleet consumes, publishes and acks through the broker exactly as separate workers would, a fleet
run is also a load test of the broker, the aggregator and the coordinator.

Python API: `run_fleet(broker, job, load_sites(...), FleetOptions(...))` -> `FleetResult`.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.shared.broker import (
    ChannelConsumer,
    Connection,
    Delivery,
    JobNames,
    run_forever,
    validate_job_id,
    validate_site,
)
from fedmq.shared.datasets import DatasetName, check_site_data, load_site, split_dataset
from fedmq.shared.errors import BrokerUnavailableError, ConfigError, FedmqError
from fedmq.shared.jobstate import ModelFeed
from fedmq.shared.messages import ModelVersion

if TYPE_CHECKING:  # imported where used: it imports torch, and every fedmq command imports this module
    from fedmq.worker.service import Worker, WorkerOptions, WorkerStats

log = logging.getLogger(__name__)

#: channels per connection RabbitMQ allows by default (channel_max 2047), less the publish and
#: scratch channels a lane also opens
MAX_SITES_PER_LANE = 2000


@dataclass(frozen=True)
class FleetSite:
    """One simulated site: its name and its data (arrays, or the file they were read from)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    source: Path | None = None  # the site file (its DP ledger defaults to beside it)

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)


@dataclass(frozen=True)
class FleetOptions:
    lanes: int = 4                 # AMQP connections the sites are spread over (tasks trained at once)
    threads: int = 0               # training threads shared by all sites (0 = one per core)
    keys: str = ""                 # directory of <site>.key files (fedmq keys); "" = unsigned updates
    ledger_dir: str = ""           # DP ledgers as <dir>/<site>.dp-ledger.json ("" = beside the data file, else cwd)
    max_tasks: int = 0             # per site (0 = until the job ends)
    max_failures: int = 3          # per site, as fedmq worker --max-failures
    epsilon_budget: float = 0.0    # every site's own epsilon cap (0 = the job's only)
    device: str = "cpu"
    heartbeat: int = 60
    wait_for_job: float = 60.0
    model_cache: int = 16          # versions the shared feed keeps decoded


@dataclass
class FleetResult:
    sites: int
    tasks: int                     # updates published and confirmed, all sites
    failures: int
    reconnects: int
    seconds: float
    finished: bool                 # the job ended (rather than a stop or max_tasks)
    tasks_per_site: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # site -> what stopped it early
    data_bytes: int = 0
    rss_baseline_bytes: int = 0    # this process with torch loaded and the data read, before any site
    rss_peak_bytes: int = 0        # VmHWM at the end
    cpu_seconds: float = 0.0       # user + system of this process over the run

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rss_per_site_bytes"] = self.rss_per_site_bytes
        return d

    @property
    def rss_per_site_bytes(self) -> float:
        return max(self.rss_peak_bytes - self.rss_baseline_bytes, 0) / max(self.sites, 1)


class SharedFeed(ModelFeed):
    """One models-stream reader for every site of the fleet; lanes call it from their threads."""

    def __init__(self, url: str, names: JobNames, *, cache: int) -> None:
        super().__init__(url, names, cache=cache)
        self._lock = threading.Lock()

    def get(self, version: int, offset: int | None = None, timeout: float = 30.0) -> ModelVersion:
        with self._lock:
            return super().get(version, offset, timeout)

    def close(self) -> None:
        with self._lock:
            super().close()


# ----------------------------------------------------------------------------- data


def load_sites(*, dataset: str = "", num_sites: int = 0, data_glob: str = "", scheme: str = "iid",
               alpha: float = 0.5, seed: int = 0) -> list[FleetSite]:
    """The fleet's sites: `num_sites` shards of a bundled dataset (the split `fedmq partition` writes
    with the same arguments, sites named site_<i> like its files) or one site per file matching
    `data_glob` (the file stem is the site name; `num_sites` > 0 takes the first ones)."""
    if bool(dataset) == bool(data_glob):
        raise ConfigError("give the sites' data as a bundled --dataset or as --data files, not both or neither")
    if dataset:
        if num_sites < 1:
            raise ConfigError("--sites must be at least 1 with --dataset")
        if dataset not in {d.value for d in DatasetName}:
            raise ConfigError(f"--dataset {dataset!r} is not one of {', '.join(d.value for d in DatasetName)}")
        ds, parts, _test = split_dataset(dataset, num_sites, scheme=scheme, alpha=alpha, seed=seed)
        return [FleetSite(f"site_{i}", *check_site_data(ds.x[p], ds.y[p], source=f"site_{i}", task=None))
                for i, p in enumerate(parts)]
    files = sorted(Path(f) for f in glob.glob(data_glob) if Path(f).is_file())
    if not files:
        raise ConfigError(f"--data {data_glob!r} matches no file")
    if num_sites:
        if num_sites > len(files):
            raise ConfigError(f"--sites {num_sites}: --data {data_glob!r} matches only {len(files)} files")
        files = files[:num_sites]
    sites = [FleetSite(validate_site(f.stem), *load_site(f, task=None), source=f) for f in files]
    if len({s.name for s in sites}) != len(sites):
        raise ConfigError(f"--data {data_glob!r}: two files have the same stem (the site name)")
    return sites


def _check_options(opts: FleetOptions, n: int) -> None:
    if n < 1:
        raise ConfigError("a fleet needs at least one site")
    if opts.lanes < 1:
        raise ConfigError(f"--lanes must be at least 1, got {opts.lanes}")
    if -(-n // opts.lanes) > MAX_SITES_PER_LANE:
        raise ConfigError(f"{n} sites over {opts.lanes} lanes is more than {MAX_SITES_PER_LANE} channels on one "
                          "connection: raise --lanes")
    if opts.keys and not Path(opts.keys).is_dir():
        raise ConfigError(f"--keys {opts.keys} is not a directory (fedmq keys --site NAME --out DIR writes one)")


def _worker_options(opts: FleetOptions, site: FleetSite) -> WorkerOptions:
    if opts.ledger_dir:
        ledger = str(Path(opts.ledger_dir) / f"{site.name}.dp-ledger.json")
    elif site.source is not None:
        ledger = str(site.source.with_name(f"{site.source.stem}.{site.name}.dp-ledger.json"))
    else:
        ledger = f"{site.name}.dp-ledger.json"
    key = ""
    if opts.keys:
        path = Path(opts.keys) / f"{site.name}.key"
        if not path.is_file():
            raise ConfigError(f"--keys {opts.keys} has no {path.name} for site {site.name} "
                              f"(fedmq keys --site {site.name} --out {opts.keys})")
        key = str(path)
    from fedmq.worker.service import WorkerOptions

    return WorkerOptions(device=opts.device, heartbeat=opts.heartbeat, max_tasks=opts.max_tasks,
                         wait_for_job=opts.wait_for_job, ledger=ledger, epsilon_budget=opts.epsilon_budget,
                         key=key, max_failures=opts.max_failures)


# ----------------------------------------------------------------------------- lanes


class _Lane:
    """One connection, many sites: each its own consumer channel (prefetch 1); tasks handled in
    arrival order on this thread, training on the shared pool."""

    def __init__(self, index: int, url: str, names: JobNames, workers: list[Worker], *, heartbeat: int,
                 stop: threading.Event, on_site_error: Callable[[str, BaseException], None]) -> None:
        self.index, self.url, self.names, self.workers = index, url, names, workers
        self.heartbeat, self.stop, self.on_site_error = heartbeat, stop, on_site_error
        self.reconnects = 0
        self.job_ended = False

    def run(self) -> None:
        run_forever(self._serve, stop=self.stop, what=f"fleet lane={self.index} job={self.names.job}",
                    on_reconnect=self._count)

    def _count(self, _attempt: int) -> None:
        self.reconnects += 1

    def _end_of_job(self) -> None:
        """The tasks queue is gone: the coordinator closed the job; every site of the fleet leaves."""
        self.job_ended = True
        for w in self.workers:
            w.finished = True
            w.stop.set()
        self.stop.set()

    def _serve(self) -> None:
        conn = Connection(self.url, name=f"fedmq-fleet-{self.names.job}-{self.index}", heartbeat=self.heartbeat)
        conn.open(retries=3)
        consumers: dict[str, ChannelConsumer] = {}
        pending: list[tuple[Worker, Delivery]] = []
        try:
            for w in self.workers:
                if w.stop.is_set():
                    continue

                def consume(w: Worker = w) -> None:
                    # one watch per lane: the broker cancels every consumer of a deleted queue alike
                    consumers[w.site] = conn.open_consumer(
                        self.names.tasks, lambda d: pending.append((w, d)), prefetch=1,
                        on_cancel=None if consumers else self._end_of_job)

                if not w.attach(conn, consume):
                    if not w.finished:
                        continue  # this site was told to stop while it waited for the job
                    self._end_of_job()
                    return
            log.info("fleet lane ready job=%s lane=%d sites=%d", self.names.job, self.index, len(consumers))
            while not self.stop.is_set():
                conn.process(0.2)
                while pending and not self.stop.is_set():
                    w, d = pending.pop(0)
                    self._one(conn, w, d, consumers)
                if not consumers:
                    return  # every site of this lane left (max_tasks, budget, failures)
        finally:
            conn.close()

    def _one(self, conn: Connection, w: Worker, d: Delivery, consumers: dict[str, ChannelConsumer]) -> None:
        if w.stop.is_set():
            return  # the site left; closing its channel gave the task back
        try:
            w.handle(conn, d)
        except BrokerUnavailableError:
            raise  # the connection: reconnect the lane, its tasks are redelivered, outboxes republished
        except FedmqError as exc:  # this site's data, key, options or trainer: it leaves, the others go on
            self._leave(w, exc, consumers)
            return
        if w.finished:
            self._end_of_job()
        elif w.options.max_tasks and w.stats.tasks >= w.options.max_tasks:
            w.stop.set()
        if w.stop.is_set() and w.site in consumers:
            consumers.pop(w.site).close()

    def _leave(self, w: Worker, exc: BaseException, consumers: dict[str, ChannelConsumer]) -> None:
        w.stop.set()
        self.on_site_error(w.site, exc)
        if w.site in consumers:
            consumers.pop(w.site).close()  # its unacked task goes back to the queue


# ----------------------------------------------------------------------------- the fleet


def rss_bytes() -> int:
    """This process's resident set now (VmRSS), from /proc."""
    return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_fleet(broker: str, job: str, sites: list[FleetSite], options: FleetOptions | None = None, *,
              stop: threading.Event | None = None,
              on_ready: Callable[[int], None] | None = None) -> FleetResult:
    """Run every site until the job ends (or `stop` is set, or each site did `max_tasks`).

    `on_ready(rss_baseline_bytes)` is called once the data is loaded and before any site starts.
    Raises ConfigError for bad options, keys or site names before anything connects."""
    import torch

    from fedmq.worker.service import Worker

    opts = options or FleetOptions()
    validate_job_id(job)
    _check_options(opts, len(sites))
    if len({s.name for s in sites}) != len(sites):
        raise ConfigError("two sites of the fleet have the same name")
    worker_opts = [_worker_options(opts, s) for s in sites]
    threads = opts.threads or os.cpu_count() or 1
    torch.set_num_threads(1)  # parallelism comes from the pool: one torch thread per training thread
    stop = stop or threading.Event()
    names = JobNames(job)
    baseline = rss_bytes()
    if on_ready is not None:
        on_ready(baseline)
    cpu0, t0 = _cpu_seconds(), time.monotonic()
    feed = SharedFeed(broker, names, cache=opts.model_cache)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fleet-train")
    errors: dict[str, str] = {}
    lock = threading.Lock()

    def site_error(site: str, exc: BaseException) -> None:
        log.warning("site left the fleet job=%s site=%s error=%s", job, site, exc)
        with lock:
            errors[site] = f"{type(exc).__name__}: {exc}"[:300]

    try:
        workers = [Worker(broker, job, s.name, (s.x, s.y), options=o, feed=feed, pool=pool)
                   for s, o in zip(sites, worker_opts, strict=True)]
        lanes = [_Lane(i, broker, names, workers[i::opts.lanes], heartbeat=opts.heartbeat, stop=stop,
                       on_site_error=site_error) for i in range(min(opts.lanes, len(workers)))]
        failures: list[BaseException] = []

        def run_lane(lane: _Lane) -> None:
            try:
                lane.run()
            except BaseException as exc:  # raised below, after the other lanes stop
                failures.append(exc)
                stop.set()

        threads_ = [threading.Thread(target=run_lane, args=(lane,), name=f"fleet-lane-{lane.index}", daemon=True)
                    for lane in lanes]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        if failures:
            raise failures[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        feed.close()
    stats: list[WorkerStats] = [w.stats for w in workers]
    return FleetResult(
        sites=len(sites), tasks=sum(s.tasks for s in stats), failures=sum(s.failures for s in stats),
        reconnects=sum(lane.reconnects for lane in lanes), seconds=time.monotonic() - t0,
        finished=any(lane.job_ended for lane in lanes),
        tasks_per_site={w.site: w.stats.tasks for w in workers}, errors=errors,
        data_bytes=sum(s.nbytes for s in sites), rss_baseline_bytes=baseline,
        rss_peak_bytes=_status_kb("VmHWM") * 1024, cpu_seconds=_cpu_seconds() - cpu0)


# ----------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    from fedmq.cli import await_broker, print_json, stop_on_signals

    sites = load_sites(dataset=args.dataset or "", num_sites=args.sites, data_glob=args.data or "",
                       scheme=args.partition, alpha=args.alpha, seed=args.seed)
    opts = FleetOptions(lanes=args.lanes, threads=args.threads, keys=args.keys, ledger_dir=args.ledger_dir,
                        max_tasks=args.max_tasks, max_failures=args.max_failures,
                        epsilon_budget=args.epsilon_budget, device=args.device, heartbeat=args.heartbeat,
                        wait_for_job=args.wait)
    _check_options(opts, len(sites))
    for site in sites:
        _worker_options(opts, site)  # a missing key file: exit 2 before waiting for the broker
    stop = stop_on_signals()
    if not await_broker(args, stop):
        return 0

    def ready(rss: int) -> None:
        log.info("fleet data loaded job=%s sites=%d rss_baseline_bytes=%d", args.job, len(sites), rss)

    result = run_fleet(args.broker, args.job, sites, opts, stop=stop, on_ready=ready)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"fleet {args.job}: {result.sites} sites, {result.tasks} updates in {result.seconds:.1f} s, "
              f"{len(result.errors)} sites left early; RSS {result.rss_peak_bytes / 2**20:.0f} MiB peak, "
              f"{result.rss_per_site_bytes / 1024:.0f} KiB per site beyond the data; CPU {result.cpu_seconds:.1f} s")
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    from fedmq.args import HEARTBEAT, SECONDS, config_number, number
    from fedmq.cli import add_broker_wait
    from fedmq.shared.config import PrivacyConfig

    p = sub.add_parser("fleet", help="many simulated sites in one process against a running job, through the "
                                     "broker like separate workers (a simulation and a load test)")
    add_common(p)
    # every site logs each task at info: with hundreds of sites, warnings only unless asked for
    p.set_defaults(log_level=os.environ.get("FEDMQ_LOG_LEVEL", "warning"))
    p.add_argument("--sites", type=number(int, "[0, 100_000]"), default=0,
                   help="number of sites: shards of --dataset (required with it), or the first N files of --data "
                        "(0 = every file)")
    p.add_argument("--dataset", choices=[d.value for d in DatasetName],
                   help="partition this bundled dataset in memory: the sites are the site_<i> files "
                        "`fedmq partition` writes with the same --sites, --scheme (here --partition), --alpha "
                        "and --seed")
    p.add_argument("--data", help="instead of --dataset: a glob of site files (.npz/.csv); each file's stem "
                                  "is its site name")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards", "quantity"],
                   help="how --dataset is split over the sites")
    p.add_argument("--alpha", type=number(float, "(0, 1e6]"), default=0.5, help="Dirichlet concentration")
    p.add_argument("--seed", type=number(int, "[0, 4_294_967_295]"), default=0, help="seed of the partition")
    p.add_argument("--lanes", type=number(int, "[1, 1000]"), default=4,
                   help="AMQP connections the sites share (one channel per site); also how many tasks train at once")
    p.add_argument("--threads", type=number(int, "[0, 1024]"), default=0,
                   help="training threads shared by all sites (0 = one per core)")
    p.add_argument("--keys", default="", help="directory holding <site>.key for every site (fedmq keys --site "
                                              "NAME --out DIR); signs each site's updates with its own key")
    p.add_argument("--ledger-dir", default="", help="keep each site's DP budget ledger as DIR/<site>.dp-ledger.json "
                   "(default: beside its --data file; with --dataset, the current directory)")
    p.add_argument("--max-tasks", type=number(int, "[0, 1_000_000_000]"), default=0,
                   help="each site leaves after N tasks (0 = until the job ends)")
    p.add_argument("--max-failures", type=number(int, "[0, 1_000_000]"), default=3,
                   help="a site leaves after training fails on N tasks in a row (0 = never)")
    p.add_argument("--epsilon-budget", type=config_number(PrivacyConfig, "epsilon"), default="0",
                   help="every site's own epsilon cap (0 = the job's budget only)")
    p.add_argument("--device", default="cpu", help="torch device the shared training pool uses")
    p.add_argument("--heartbeat", type=number(int, HEARTBEAT), default=60, help="AMQP heartbeat seconds")
    p.add_argument("--wait", type=number(float, SECONDS), default=60.0, help="seconds to wait for the job to exist")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_broker_wait(p)
    p.set_defaults(run=run)
