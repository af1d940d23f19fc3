"""A hostile site floods a running job: every class of crafted update the trust boundary must stop.

`hostile_bodies` builds the attack (structure-aware: each body is a valid update with one thing
broken, plus raw garbage), `flood` publishes it from one site's routing key while `fedmq demo
--json` runs the job as real processes, and `run` (the benchmark) measures what the issue asks:
honest updates dead-lettered ``stale``, the target reached, every hostile body dead-lettered with a
reason, and the aggregator's RSS over the job. tests/test_flood.py runs the same attack, smaller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, Machine, table
from fedmq.shared.broker import (
    UPDATE_ID_HEADER,
    Connection,
    JobNames,
    PublishRefusedError,
    read_last,
    read_stream,
)
from fedmq.shared.codec import pack
from fedmq.shared.ledger import dead_reason
from fedmq.shared.messages import BASE_SCHEMA, ModelVersion, Task, Update

#: the site whose credentials the attacker holds (the demo's first site)
ATTACKER = "site-0"


def _valid(job: str, v0: ModelVersion, uid: str, site: str = ATTACKER) -> dict[str, Any]:
    delta = {k: np.zeros(np.shape(v), np.asarray(v).dtype) for k, v in v0.weights.items()}
    return Update(job=job, update_id=uid, task_id=uid[2:], site=site, base_version=0, num_samples=10,
                  delta=delta, task_proof=os.urandom(64), schema=BASE_SCHEMA).to_dict()  # map form


def _with_tensor(body: dict[str, Any], **spec: Any) -> dict[str, Any]:
    name = next(iter(body["delta"]))
    body["delta"] = {**body["delta"], name: {**body["delta"][name], **spec}}
    return body


def _classes(job: str, v0: ModelVersion) -> list[tuple[str, Any]]:
    """(class, body builder) pairs: each a plausible update with one field turned hostile."""
    def v(uid: str = "") -> dict[str, Any]:
        return _valid(job, v0, uid or f"u-h{uuid.uuid4().hex[:14]}")

    def raw(b: dict[str, Any]) -> bytes:
        return pack(b)

    return [
        ("shape_inf", lambda: raw(_with_tensor(v(), shape=[float("inf")]))),
        ("shape_65_dims", lambda: raw(_with_tensor(v(), shape=[1] * 65, data=b"\0\0\0\0"))),
        ("shape_2_62", lambda: raw(_with_tensor(v(), shape=[0, 2**62, 2**62], data=b""))),
        ("shape_float", lambda: raw(_with_tensor(v(), shape=[64.5, 64.5]))),
        ("shape_bool", lambda: raw(_with_tensor(v(), shape=[True, True]))),
        ("shape_str", lambda: raw(_with_tensor(v(), shape="6410"))),
        ("mixed_key_types", lambda: pack({**v(), b"evil": 1, "evil": 2})),
        ("huge_base_version", lambda: raw({**v(), "base_version": 10**9})),
        ("huge_update_id", lambda: raw({**v(), "update_id": "u-" + "x" * 200_000})),
        ("forged_task_proof", lambda: raw(v())),
        ("reused_task_id", lambda: raw({**v(), "task_id": "never-issued", "update_id": "u-never-issued"})),
        ("other_site_in_body", lambda: raw(_valid(job, v0, f"u-h{uuid.uuid4().hex[:14]}", site="site-1"))),
        ("nan_float_field", lambda: raw({**v(), "created_at": float("nan")})),
        ("deep_nesting", lambda: raw({**v(), "metrics": _nested(200)})),
        ("timestamp_ext", lambda: b"\x81\xa6schema\xd6\xff\x00\x00\x00\x01"),
        ("not_msgpack", lambda: os.urandom(256)),
        ("empty", lambda: b""),
    ]


def _nested(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(depth):
        d = {"a": d}
    return d


def hostile_bodies(job: str, v0: ModelVersion, n: int) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """n (class, body, headers) triples, cycling through every class."""
    classes = _classes(job, v0)
    for i in range(n):
        name, build = classes[i % len(classes)]
        headers: dict[str, Any] = {UPDATE_ID_HEADER: "x" * 100_000} if name == "huge_update_id" else {}
        if name == "mixed_key_types":
            headers = {UPDATE_ID_HEADER: b"\xff\xfe bytes header"}
        yield name, build(), headers


def flood(url: str, job: str, v0: ModelVersion, n: int) -> tuple[Counter[str], Counter[str]]:
    """Publish n hostile bodies as the attacker site would, as fast as confirms come back.

    Returns how many of each class went out, and how many of those the broker refused (the
    attacker's own updates queue at its length limit: its share). A refused body is not retried."""
    names = JobNames(job)
    sent: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    with Connection(url, name=f"fedmq-attacker-{job}").open() as conn:
        for name, body, headers in hostile_bodies(job, v0, n):
            sent[name] += 1
            try:
                conn.publish(names.updates_exchange, ATTACKER, body, headers=headers or None)
            except PublishRefusedError:
                refused[name] += 1
    return sent, refused


def wait_for_v0(url: str, job: str, proc: subprocess.Popen[str], timeout: float = 120.0) -> ModelVersion:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo exited before v0: {proc.communicate()[1][-2000:]}")
        try:
            last = read_last(url, JobNames(job).models)
        except Exception:  # topology not declared yet
            last = None
        if last is not None:
            return ModelVersion.decode(last.body)
        time.sleep(0.2)
    raise RuntimeError(f"job {job} published no v0 within {timeout}s")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _aggregator_pids(job: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"aggregator" in cmd and job.encode() in cmd:
            pids.append(int(p.name))
    return pids


@dataclass
class RssSampler:
    """VmRSS of the job's aggregator process(es), sampled on a thread every `every` seconds."""

    job: str
    every: float = 0.25
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MB summed over replicas)
    _stop: threading.Event = field(default_factory=threading.Event)

    marked_at: float = 0.0

    def mark(self) -> None:
        """From now on: the flood starts (samples before it are the aggregator starting up)."""
        self.marked_at = time.monotonic() - self._t0

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            rss = [r for pid in _aggregator_pids(self.job) if (r := _rss_mb(pid)) is not None]
            if rss:
                self.samples.append((time.monotonic() - self._t0, sum(rss)))


@dataclass
class FloodResult:
    job: str
    demo: dict[str, Any]
    sent: Counter[str]
    #: of those, refused by the broker at publish: the attacker's own updates queue was full
    refused: Counter[str]
    flood_seconds: float
    honest_updates: int
    honest_stale: int
    #: of those, from the site whose credentials flooded: its own updates queue behind its flood
    attacker_site_stale: int
    honest_dead: Counter[str]
    hostile_dead: Counter[str]
    accepted_hostile: int
    rss: list[tuple[float, float]]


def run_flooded_demo(url: str, n: int, demo_args: list[str], workdir: Path | None = None,
                     keep_job: bool = False) -> FloodResult:
    """`fedmq demo --json` with n hostile bodies published as site-0 once v0 is out."""
    job = f"flood-{uuid.uuid4().hex[:8]}"
    work = workdir or Path(tempfile.mkdtemp(prefix=f"fedmq-{job}-"))
    cmd = [sys.executable, "-m", "fedmq", "demo", "--json", "--broker", url, "--job", job, "--workdir",
           str(work), *demo_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        with RssSampler(job) as rss:
            v0 = wait_for_v0(url, job, proc)
            rss.mark()
            t0 = time.perf_counter()
            sent, refused = flood(url, job, v0, n)
            flood_seconds = time.perf_counter() - t0
            stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"demo exited {proc.returncode}: {stderr[-3000:]}")
        demo = json.loads(stdout.strip().splitlines()[-1])
        return _account(url, job, demo, sent, refused, flood_seconds,
                        [s for s in rss.samples if s[0] >= rss.marked_at])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)
        if not keep_job:
            with Connection(url, name="fedmq-bench-cleanup").open() as conn:
                conn.delete_job(JobNames(job))
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _account(url: str, job: str, demo: dict[str, Any], sent: Counter[str], refused: Counter[str],
             flood_seconds: float, rss: list[tuple[float, float]]) -> FloodResult:
    """Honest = the update of a task the coordinator issued (tasks log); everything else is hostile."""
    names = JobNames(job)
    issued = set()
    for d in read_stream(url, names.tasks_log, "first"):
        issued.add(Task.decode(d.body).update_id)
    included = {uid for d in read_stream(url, names.models, "first") for uid in ModelVersion.decode(d.body).included}
    honest_dead: Counter[str] = Counter()
    hostile_dead: Counter[str] = Counter()
    attacker_stale = 0
    for d in read_stream(url, names.dead_log, "first"):
        reason = dead_reason(d.headers)
        try:
            uid: str | None = Update.decode(d.body).update_id
        except Exception:
            uid = None
        if uid is not None and uid in issued:
            honest_dead[reason] += 1
            attacker_stale += reason == "stale" and d.routing_key == ATTACKER
        elif d.routing_key == "task" or _is_task(d.body):
            continue  # a task dead-lettered by a site (rejected): not an update
        else:
            hostile_dead[reason] += 1
    honest = len(included & issued) + sum(honest_dead.values())
    return FloodResult(job, demo, sent, refused, flood_seconds, honest_updates=honest,
                       honest_stale=honest_dead.get("stale", 0), attacker_site_stale=attacker_stale,
                       honest_dead=honest_dead, hostile_dead=hostile_dead,
                       accepted_hostile=len(included - issued), rss=rss)


def _is_task(body: bytes) -> bool:
    try:
        Task.decode(body)
        return True
    except Exception:
        return False


def run(url: str, quick: bool = False) -> str:
    """The benchmark: a 5,000-body flood during the default demo job, against the same job unflooded."""
    machine = Machine()
    n = 500 if quick else 5000
    args = ["--target", "0.9", "--max-seconds", "240"]
    clean = run_flooded_demo(url, 0, args)
    flooded = run_flooded_demo(url, n, args)
    rows = [_row("no flood", clean), _row(f"{n:,} hostile bodies from {ATTACKER}", flooded)]
    note = machine.note().markdown()
    classes = ", ".join(f"{k} {v}" for k, v in sorted(flooded.sent.items()))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(flooded.hostile_dead.items()))
    return f"""{note}

`python -m bench.flood` (in `make bench`): the default demo (`fedmq demo --json --target 0.9`: 8 sites
as real processes, one aggregator, site keys and a registry) once as it is and once while one site's
credentials publish {n:,} hostile update bodies as fast as confirmed publishes go ({flooded.flood_seconds:.1f} s),
starting right after v0. Every body is a plausible update with one field turned hostile, or raw
garbage: {classes}. Honest updates are those answering a task in the tasks log; the issue's target is
≤ 1 % of them dead-lettered `stale`, the target reached, every hostile body dead-lettered with a
reason (or refused at publish) and the aggregator's RSS flat.

{table(["run", "seconds to 0.90", "versions", "honest updates", "honest stale, all",
        f"honest stale, sites other than {ATTACKER}", "hostile dead-lettered", "hostile refused at publish",
        "hostile accepted", "aggregator RSS start / peak / end"], rows)}

Reasons the hostile bodies were dead-lettered with: {reasons}. Refused at publish: bodies the broker
nacked because {ATTACKER}'s own updates queue was at its length limit (`[coordinator]
site_queue_limit`, 64 by default): each site of the registry has its own updates queue, so a flood
fills only the flooder's share and the other sites' queues stay as short as their honest traffic.
Every body, refused or not, is also in the updates log, where replay and the coordinator skip it as
not credible. The attacker holds {ATTACKER}'s credentials, and {ATTACKER} is also one of the demo's
honest sites: its own honest updates wait behind its flood (and its worker waits while the broker
refuses it), so they can go stale; the other sites' updates get their turn in every round of the
aggregator's round-robin over sending sites (`FairQueue`). That split is the fair share the design
promises. `rejected` is the bulk path: past 20 precise dead letters a site gets one a second, the
rest it sends are rejected for the broker to dead-letter itself (x-death reason `rejected`) and
counted by reason in the next precise DEAD_LETTERED event, so a hostile body costs a decode and a
proof check, not two confirmed publishes.
"""


def _row(label: str, r: FloodResult) -> list[str]:
    stt = r.demo.get("seconds_to_target")
    rss = [mb for _, mb in r.rss]
    rss_txt = f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} MB" if rss else "—"
    stale_pct = 100 * r.honest_stale / max(r.honest_updates, 1)
    others = r.honest_stale - r.attacker_site_stale
    others_pct = 100 * others / max(r.honest_updates, 1)
    return [label, f"{stt:.1f} s" if stt is not None else "not reached", str(r.demo["versions"]),
            str(r.honest_updates), f"{r.honest_stale} ({stale_pct:.1f} %)", f"{others} ({others_pct:.1f} %)",
            f"{sum(r.hostile_dead.values()):,} of {sum(r.sent.values()):,}", f"{sum(r.refused.values()):,}",
            str(r.accepted_hostile), rss_txt]


if __name__ == "__main__":
    from bench.common import replace_section
    from fedmq.shared.broker import DEFAULT_URL

    replace_section("Flood from one site", run(os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL), "--quick" in sys.argv))
