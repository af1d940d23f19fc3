"""A fleet of simulated sites: `fedmq fleet` with 1,000 sites against a real job on this machine.

One coordinator and one aggregator (real `python -m fedmq` processes) run a FedBuff job on the
bundled synthetic dataset split over N sites; one `fedmq fleet` process runs all N sites through
the broker. Measured: updates per second, the job's ledger (every update id in exactly one version
or dead letter: 0 lost, 0 double), the fleet's and the aggregator's RSS and CPU (read from
/proc/<pid> while they run), and the fleet's RSS per site beyond its data: its peak RSS less its
own RSS once torch and the data are loaded and before any site starts (the baseline, same run).

`python -m bench.fleet [--sites 1000 --updates 10000]` prints the section; `make bench` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, Machine, fmt_seconds, table
from fedmq.demo import write_job_toml
from fedmq.shared.broker import DEFAULT_URL, Connection, JobNames, read_stream
from fedmq.shared.datasets import save_site, split_dataset
from fedmq.shared.ledger import LedgerReport, logged_update_id, read_ledger
from fedmq.shared.signing import REGISTRY_FILE, generate_site_key

TITLE = "Fleet"
BUFFER = 10  # updates per version (FedBuff K): versions = updates / BUFFER
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcSample:
    """The peak RSS and the last CPU seconds seen of one process (from /proc/<pid>)."""

    pid: int
    rss_peak: int = 0
    cpu_seconds: float = 0.0
    sockets_peak: int = 0  # open sockets (broker connections, a few others)

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return  # exited
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.rss_peak = max(self.rss_peak, int(line.split()[1]) * 1024)
        fields = stat.rpartition(")")[2].split()
        self.cpu_seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        sockets = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with suppress(OSError):
                    sockets += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:")
        except OSError:
            return
        self.sockets_peak = max(self.sockets_peak, sockets)


@dataclass
class FleetRun:
    job: str
    sites: int
    fleet: dict[str, Any]
    ledger: LedgerReport
    seconds: float
    aggregator: ProcSample
    fleet_proc: ProcSample
    sites_in_versions: int
    updates_per_site: Counter[str] = field(default_factory=Counter)
    work: Path = Path()
    #: updates in the updates log whose signature verified under their own site's registry key
    signatures_verified: int = 0


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedmq", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_job(url: str, work: Path, *, sites: int, updates: int, lanes: int = 4, concurrency: int = 200,
            sign: bool = False, timeout: float = 1200.0, log_level: str = "warning",
            separate: bool = False) -> FleetRun:
    """A whole job with its sites in one fleet process; returns what was measured. Raises
    RuntimeError when a role fails or the job does not end within `timeout` seconds.

    `separate`: the baseline instead of the fleet, the same sites as plain `fedmq.site` workers on
    threads of one process (each its own connections, models feed and training thread)."""
    job = f"fleet-{uuid.uuid4().hex[:8]}"
    ds, parts, test_mask = split_dataset("synthetic", sites, seed=0)
    save_site(work / "test.npz", ds.x[test_mask], ds.y[test_mask])
    sections: dict[str, dict[str, Any]] = {
        "model": {"name": "logreg"},
        "data": {"test": str(work / "test.npz")},
        "strategy": {"name": "fedbuff", "buffer_size": BUFFER, "server_lr": 1.0, "staleness": "polynomial",
                     "staleness_a": 0.5, "max_staleness": 100_000, "flush_timeout": 5.0},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "coordinator": {"concurrency": concurrency, "target_accuracy": 0.0, "max_versions": -(-updates // BUFFER),
                        "max_seconds": timeout, "out": str(work / "model")},
    }
    keys = work / "keys"
    if sign:
        for i in range(sites):
            generate_site_key(keys, f"site_{i}", force=True)
        sections["signing"] = {"registry": str(keys / REGISTRY_FILE)}
    write_job_toml(work / "job.toml", sections)
    common = ["--broker", url, "--job", job, "--log-level", log_level]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coord = _start(["coordinator", *common, "--config", str(work / "job.toml"), "--replicas", "1"],
                       work / "coordinator.log")
        procs.append(coord)
        agg = _start(["aggregator", *common, "--name", "agg-fleet"], work / "aggregator.log")
        procs.append(agg)
        fleet_args = ["fleet", *common, "--dataset", "synthetic", "--sites", str(sites), "--lanes", str(lanes),
                      "--ledger-dir", str(work / "ledgers"), "--json"]
        if sign:
            fleet_args += ["--keys", str(keys)]
        t0 = time.monotonic()
        fleet_out = (work / "fleet.out").open("wb")
        cmd = [sys.executable, "-m", "fedmq", *fleet_args]
        if separate:
            cmd = [sys.executable, "-m", "bench.fleet", "--workers-process", "--broker", url, "--job", job,
                   "--sites", str(sites), "--ledger-dir", str(work / "ledgers")]
        fleet = subprocess.Popen(cmd, stdout=fleet_out, stderr=(work / "fleet.log").open("wb"),
                                 start_new_session=True, cwd=ROOT,
                                 env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
        procs.append(fleet)
        agg_s, fleet_s = ProcSample(agg.pid), ProcSample(fleet.pid)
        deadline = time.monotonic() + timeout + 120
        while fleet.poll() is None or coord.poll() is None:
            agg_s.sample()
            fleet_s.sample()
            for name, p in (("coordinator", coord), ("aggregator", agg), ("fleet", fleet)):
                if p.poll() not in (None, 0):
                    raise RuntimeError(f"{name} exited {p.returncode}: {_tail(work / f'{name}.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} did not end within {timeout:.0f} s")
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        agg_s.sample()
        fleet_out.close()
        result = json.loads((work / "fleet.out").read_text().strip().splitlines()[-1])
        _stop(agg)
        report = read_ledger(url, JobNames(job)).check()
        site_of = {uid: d.routing_key for d in read_stream(url, JobNames(job).updates_log, "first")
                   if (uid := logged_update_id(d)) is not None}
        included = [uid for v in _versions(url, job) for uid in v]
        per_site = Counter(site_of.get(uid, "?") for uid in included)
        verified = _verify_signatures(url, job, keys / REGISTRY_FILE) if sign else 0
        return FleetRun(job, sites, result, report, seconds, agg_s, fleet_s, len(per_site), per_site, work,
                        verified)
    finally:
        for p in procs:
            _stop(p)
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def _verify_signatures(url: str, job: str, registry_file: Path) -> int:
    """Every logged update is signed by the site it was routed as (SignatureError otherwise)."""
    from fedmq.shared.messages import Update
    from fedmq.shared.signing import load_registry, verify_update

    registry = load_registry(registry_file)
    n = 0
    for d in read_stream(url, JobNames(job).updates_log, "first"):
        update = Update.decode(d.body)
        if update.site != d.routing_key:
            raise RuntimeError(f"update {update.update_id} says site {update.site}, routed as {d.routing_key}")
        verify_update(update, registry)
        n += 1
    return n


def _versions(url: str, job: str) -> list[tuple[str, ...]]:
    from fedmq.shared.messages import ModelVersion

    return [tuple(ModelVersion.decode(d.body).included) for d in read_stream(url, JobNames(job).models, "first")]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _check(r: FleetRun) -> None:
    rep = r.ledger
    if not rep.ok:
        raise RuntimeError(f"job {r.job}: ledger check failed: lost={rep.lost[:5]} double={rep.double_counted[:5]} "
                           f"errors={rep.version_errors[:3]}")


def _column(r: FleetRun) -> list[str]:
    rep, f = r.ledger, r.fleet
    return [
        f"{r.sites:,}",
        f"{rep.included:,} in {rep.versions - 1:,}",
        f"{len(rep.lost)} / {len(rep.double_counted)}",
        f"{rep.dead_lettered}",
        f"{r.sites_in_versions:,}",
        f"{min(r.updates_per_site.values())} / {max(r.updates_per_site.values())}",
        fmt_seconds(f["seconds"]),
        f"{rep.included / f['seconds']:.1f}",
        _mib(f["rss_baseline_bytes"]),
        _mib(f["rss_peak_bytes"]),
        f"{f['rss_per_site_bytes'] / 1024:,.0f} KiB",
        _mib(f["data_bytes"]),
        f"{f['cpu_seconds']:.1f} s ({f['cpu_seconds'] / f['seconds']:.2f} cores)",
        f"{r.fleet_proc.sockets_peak:,}",
        _mib(r.aggregator.rss_peak),
        f"{r.aggregator.cpu_seconds:.1f} s ({r.aggregator.cpu_seconds / f['seconds']:.2f} cores)",
        f"{f['reconnects']} / {len(f['errors'])}",
    ]


ROWS = ["sites in the process", "updates included / versions", "updates lost / double counted", "dead letters",
        "distinct sites in versions", "updates per site (min / max)", "sites' time (first site start to job end)",
        "updates / s", "process RSS: baseline (torch + data, 0 sites)", "process RSS: peak",
        "RSS per site beyond data", "data (all shards)", "process CPU (user + system)",
        "open sockets (peak)", "aggregator RSS peak", "aggregator CPU (user + system)",
        "reconnects / sites that left early"]


def run(url: str = DEFAULT_URL, quick: bool = False, sites: int | None = None, updates: int | None = None) -> str:
    """The fleet at full size, then the fleet and the baseline (separate workers on threads of one
    process) at a size the baseline can run, in the same run."""
    n = sites or (50 if quick else 1000)
    u = updates or (300 if quick else 10_000)
    small, small_u = (30, 200) if quick else (100, 1000)
    machine = Machine()
    runs: list[tuple[str, FleetRun]] = []
    for label, size, count, separate in ((f"fleet, {n:,} sites", n, u, False),
                                         (f"fleet, {small} sites", small, small_u, False),
                                         (f"separate workers, {small} sites", small, small_u, True)):
        with tempfile.TemporaryDirectory(prefix="fedmq-bench-fleet-") as tmp:
            r = run_job(url, Path(tmp), sites=size, updates=count, separate=separate)
        _check(r)
        runs.append((label, r))
    cols = [_column(r) for _, r in runs]
    body = [[name, *(c[k] for c in cols)] for k, name in enumerate(ROWS)]
    fleet_small, sep_small = runs[1][1].fleet, runs[2][1].fleet
    ratio = sep_small["rss_per_site_bytes"] / max(fleet_small["rss_per_site_bytes"], 1.0)
    return (f"{machine.note().markdown()}\n\n"
            f"One `fedmq fleet` process runs {n:,} sites (4 lanes: 4 AMQP connections with one channel per site, "
            "one shared models feed, one training pool of one thread per core) against a FedBuff job "
            f"(K={BUFFER}, logistic regression, bundled synthetic data, one shard per site, 200 tasks outstanding) "
            "with its coordinator and one aggregator as separate processes on the same broker. Baseline in the "
            f"same run: {small} sites as separate `fedmq.site` workers on threads of one process (each its own "
            "two connections, models feed and training thread), against the fleet with the same sites. Lost / "
            "double: the job's ledger (`shared.ledger`) read back from its streams. RSS, CPU and sockets: "
            "/proc of each process; per site = (peak RSS - the same process's RSS with torch and the data "
            "loaded, before any site starts) / sites.\n\n"
            + table(["what", *(label for label, _ in runs)], body)
            + f"\n\nRSS per site beyond data, separate workers / fleet at {small} sites: {ratio:.1f}x.\n")


def workers_process(url: str, job: str, n: int, ledger_dir: str) -> None:
    """The baseline process: the fleet's sites as separate `fedmq.site` workers on threads (what
    running many sites in one process costs without sharing), reporting what `fedmq fleet --json`
    reports."""
    import torch

    from fedmq.fleet import _cpu_seconds, _status_kb, load_sites, rss_bytes
    from fedmq.site import start_site

    torch.set_num_threads(1)
    sites = load_sites(dataset="synthetic", num_sites=n)
    baseline, cpu0, t0 = rss_bytes(), _cpu_seconds(), time.monotonic()
    handles = [start_site(url, job, s.name, (s.x, s.y), device="cpu", heartbeat=60,
                          ledger=str(Path(ledger_dir) / f"{s.name}.dp-ledger.json")) for s in sites]
    errors = {}
    for h in handles:
        try:
            h.join()
        except Exception as exc:  # reported, as the fleet reports a site that left
            errors[h.worker.site] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({
        "sites": n, "tasks": sum(h.stats.tasks for h in handles), "seconds": time.monotonic() - t0,
        "finished": all(h.worker.finished for h in handles), "errors": errors,
        "reconnects": sum(h.stats.reconnects for h in handles), "data_bytes": sum(s.nbytes for s in sites),
        "rss_baseline_bytes": baseline, "rss_peak_bytes": _status_kb("VmHWM") * 1024,
        "cpu_seconds": _cpu_seconds() - cpu0,
        "rss_per_site_bytes": max(_status_kb("VmHWM") * 1024 - baseline, 0) / n}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", default=DEFAULT_URL)
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--workers-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--ledger-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers_process:
        workers_process(args.broker, args.job, args.sites, args.ledger_dir)
        return 0
    print(run(args.broker, sites=args.sites, updates=args.updates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
