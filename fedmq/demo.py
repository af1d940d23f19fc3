"""`fedmq demo`: a whole federated job on bundled data, every role a real OS process.

It partitions a dataset into per-site files, writes a job TOML, starts the coordinator, the
aggregator replica(s) and one worker per site as `python -m fedmq ...` subprocesses against the
broker, follows the job's events stream with a progress bar, and prints the result.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fedmq.args import SECONDS, SLOWDOWN, config_number, number
from fedmq.demo_keys import add_key_arguments, apply_keys
from fedmq.demo_privacy import add_privacy_arguments, apply_privacy, privacy_summary
from fedmq.shared.broker import Connection, JobNames, StreamReader, mask_url, read_stream
from fedmq.shared.config import (
    Compression,
    CoordinatorConfig,
    JobConfig,
    StrategyConfig,
    TrainingConfig,
    merge,
    read_toml,
)
from fedmq.shared.datasets import PartitionResult, write_partition
from fedmq.shared.errors import ConfigError, FedmqError
from fedmq.shared.evaluation import read_evaluated
from fedmq.shared.messages import Event, EventKind

DEMO_STRATEGIES = {
    # name -> [strategy] and [coordinator] settings tuned for the bundled datasets
    "fedbuff": {"strategy": {"name": "fedbuff", "buffer_size": 3, "server_lr": 1.0,
                             "staleness": "polynomial", "staleness_a": 0.5, "max_staleness": 50,
                             "flush_timeout": 2.0}},
    "fedasync": {"strategy": {"name": "fedasync", "alpha": 0.6, "staleness": "polynomial",
                              "staleness_a": 0.5, "max_staleness": 50, "flush_timeout": 2.0}},
    "fedavg": {"strategy": {"name": "fedavg", "max_staleness": 0,
                            "flush_timeout": 300.0}},
}


def _demo_strategy(value: str) -> str:
    """A preset name, or package.module:callable (a user strategy with fedbuff's preset settings)."""
    if value in DEMO_STRATEGIES or (value.count(":") == 1 and all(value.partition(":")[::2])):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(sorted(DEMO_STRATEGIES))} "
                                     "or package.module:callable")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="fedbuff", type=_demo_strategy,
                   help=f"aggregation strategy, with settings tuned for the bundled data: "
                   f"{', '.join(sorted(DEMO_STRATEGIES))}, or package.module:callable (fedbuff's settings)")
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "breast_cancer", "mnist", "synthetic", "diabetes"],
                   help="bundled dataset (no download)")
    p.add_argument("--example", help="run one of the repository's examples (examples/NAME/example.toml: "
                   "its data, job settings and site code), or a directory of your own laid out the same way "
                   "(a path: its site code imports as DIRNAME.module); the other options only set what it "
                   "leaves open")
    p.add_argument("--model", default="mlp", help="logreg | mlp | cnn | package.module:callable")
    p.add_argument("--sites", type=config_number(CoordinatorConfig, "concurrency"),
                   default=8, help="number of worker processes")
    p.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet", "shards", "quantity"],
                   help="how samples are split over sites")
    p.add_argument("--alpha", type=number(float, "(0, 1e6]"),
                   default=0.5, help="Dirichlet concentration of the partition")
    p.add_argument("--slow", type=number(int, "[0, 10_000]"), default=2, help="how many sites are slow")
    p.add_argument("--slowdown", type=number(float, SLOWDOWN), default=5.0, help="how much slower the slow sites are")
    p.add_argument("--min-task-seconds", type=number(float, SECONDS), default=0.2,
                   help="pad every local task to at least this long (simulated site compute)")
    p.add_argument("--target", type=config_number(CoordinatorConfig, "target_accuracy"),
                   default=0.9, help="stop at this test accuracy (0 = none)")
    p.add_argument("--max-seconds", type=config_number(CoordinatorConfig, "max_seconds"),
                   default=180.0, help="stop after this long")
    p.add_argument("--max-versions", type=config_number(CoordinatorConfig, "max_versions"),
                   default=1000, help="stop after this many versions")
    p.add_argument("--epochs", type=config_number(TrainingConfig, "epochs"), default=1, help="local epochs per task")
    p.add_argument("--lr", type=config_number(TrainingConfig, "lr"), default=0.1, help="local learning rate")
    p.add_argument("--batch-size", type=config_number(TrainingConfig, "batch_size"),
                   default=16, help="local mini-batch size")
    p.add_argument("--compression", default="none", choices=[c.value for c in Compression],
                   help="how sites send their deltas ([strategy] compression): float16 / bfloat16 halve the "
                        "bytes, topk sends the --topk-fraction largest entries of each tensor (error feedback "
                        "at the site)")
    p.add_argument("--topk-fraction", type=config_number(StrategyConfig, "topk_fraction"), default=0.01,
                   help="with --compression topk: share of each tensor's entries a site sends")
    p.add_argument("--aggregators", type=number(int, "[1, 100]"),
                   default=1, help="aggregator replicas (1 active, rest standby)")
    p.add_argument("--seed", type=config_number(JobConfig, "seed"),
                   default=0, help="seed of the partition and the initial model")
    p.add_argument("--workdir", help="where data, config, logs and the model go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    add_privacy_arguments(p)
    add_key_arguments(p)


@dataclass
class Progress_:
    version: int = 0
    accuracy: float = 0.0
    best: float = 0.0
    updates: int = 0
    dead: int = 0
    per_site: Counter[str] = field(default_factory=Counter)
    started: float | None = None
    finished: dict[str, Any] | None = None
    reached_at: float | None = None
    first_version_at: float | None = None  # when v1 was published (event time)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_job_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


#: the repository's examples (`fedmq demo --example NAME`): examples/<name>/example.toml
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: what an example's [demo] table may set: the demo's own options, and the sites' code
EXAMPLE_OPTIONS = {"dataset", "sites", "partition", "alpha", "slow", "slowdown", "min_task_seconds", "strategy",
                   "epochs", "lr", "batch_size", "max_seconds", "max_versions"}
EXAMPLE_SITE_KEYS = {"trainer", "evaluator", "format", "central_test"}


def example_names() -> list[str]:
    return sorted(p.parent.name for p in EXAMPLES.glob("*/example.toml")) if EXAMPLES.is_dir() else []


def example_dir(name: str) -> Path:
    """A bundled example by name, or a directory of one's own by path (anything with a slash)."""
    return Path(name).resolve() if "/" in name or name in (".", "..") else EXAMPLES / name


def load_example(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the example's [demo] table, its job sections); ConfigError for an unknown example or key."""
    path = example_dir(name) / "example.toml"
    if not path.is_file():
        if "/" in name:
            raise ConfigError(f"--example {name!r}: no example.toml in that directory")
        known = ", ".join(example_names()) or "none: the examples ship with the repository, not the wheel"
        raise ConfigError(f"--example {name!r} is not an example (known: {known})")
    raw = read_toml(path)
    demo = raw.pop("demo", {})
    unknown = sorted(set(demo) - EXAMPLE_OPTIONS - EXAMPLE_SITE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: [demo] {unknown[0]} is not a demo option "
                          f"(known: {', '.join(sorted(EXAMPLE_OPTIONS | EXAMPLE_SITE_KEYS))})")
    return demo, raw


def apply_example(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Set the demo's options from the example's [demo] table; its job sections, to merge."""
    demo, sections = load_example(args.example)
    for key in sorted(EXAMPLE_OPTIONS & set(demo)):
        setattr(args, key, demo[key])
    args.trainer, args.evaluator = demo.get("trainer", ""), demo.get("evaluator", "")
    args.format, args.central_test = demo.get("format", "npz"), demo.get("central_test", True)
    return sections


def merge_example(base: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]],
                  args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The demo's sections with the example's over them: the example's own target replaces the
    demo's accuracy target, and without central test data the coordinator gets none."""
    out = merge(base, sections)
    coord = sections.get("coordinator", {})
    if "target_metric" in coord:
        out["coordinator"].pop("target_accuracy", None)
    if not args.central_test:
        out["data"].pop("test", None)
    return out


def _child_env(example: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # an example's site code (tabular_auc.train:train) imports from the directory holding it
    roots = [str(EXAMPLES)] if EXAMPLES.is_dir() else []
    if example and "/" in example:
        roots.insert(0, str(example_dir(example).parent))
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*roots, env.get("PYTHONPATH", "")) if p)
    # many processes on few cores: one thread each, or torch oversubscribes the machine
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


class Processes:
    """The demo's children, with their logs in files; all of them are ended on exit."""

    def __init__(self, logdir: Path, example: str | None = None) -> None:
        self.logdir = logdir
        self.example = example
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = (self.logdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "fedmq", *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=_child_env(self.example))

    def start_sites(self, job: str, sites: list[tuple[str, list[str]]]) -> None:
        """The sites as forks of one process that imported torch once (`fedmq.site_launcher`):
        separate processes, as `fedmq worker` would start them, without 8 imports on 2 cores."""
        spec = self.logdir / "sites.json"
        spec.write_text(json.dumps([{"name": n, "args": a, "log": str(self.logdir / f"{n}.log")} for n, a in sites]))
        log = (self.logdir / "sites.log").open("wb")
        self.procs["sites"] = subprocess.Popen([sys.executable, "-m", "fedmq.site_launcher", "--job", job, str(spec)],
                                               stdout=log, stderr=subprocess.STDOUT, env=_child_env(self.example))

    def failed(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() not in (None, 0)]

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def tail(self, name: str, lines: int = 5) -> str:
        text = (self.logdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def _apply(ev: Event, st: Progress_) -> None:
    d = ev.data
    if ev.event == EventKind.JOB_STARTED:
        st.started = ev.ts
    elif ev.event == EventKind.UPDATE_PUBLISHED:
        st.per_site[d.get("site", "?")] += 1
    elif ev.event == EventKind.VERSION_PUBLISHED:
        st.updates += len(d.get("included", []))
        if st.first_version_at is None:
            st.first_version_at = ev.ts
    elif ev.event == EventKind.VERSION_EVALUATED:
        read = read_evaluated(d)
        if read is not None and read.accuracy is not None:
            st.version, st.accuracy = read.version, read.accuracy
            st.best = max(st.best, st.accuracy)
    elif ev.event == EventKind.DEAD_LETTERED:
        st.dead += 1
    elif ev.event == EventKind.JOB_FINISHED:
        st.finished = d


def _describe(st: Progress_) -> str:
    rate = st.updates / max(time.time() - st.started, 1e-9) if st.started else 0.0
    return f"acc {st.accuracy:.3f} (best {st.best:.3f})  {rate:4.1f} upd/s"


def _sites_line(st: Progress_) -> Text:
    """Updates per site: the slow sites' lower counts are asynchrony at work."""
    counts = "  ".join(f"{s}:{n}" for s, n in sorted(st.per_site.items()))
    return Text(f"updates per site  {counts}", style="dim", overflow="fold")


def demo_sections(args: argparse.Namespace, part: PartitionResult, work: Path) -> dict[str, dict[str, Any]]:
    """The demo job's TOML sections before privacy and keys (also what `bench` simulates)."""
    strategy = dict(DEMO_STRATEGIES.get(args.strategy, DEMO_STRATEGIES["fedbuff"])["strategy"])
    if args.strategy not in DEMO_STRATEGIES:
        strategy["name"] = args.strategy  # a user strategy: imported (and refused if need be) at start
    if args.strategy == "fedavg":
        strategy["buffer_size"] = args.sites
    if getattr(args, "compression", "none") != "none":
        strategy["compression"] = args.compression
        strategy["topk_fraction"] = args.topk_fraction
    return {
        "model": {"name": args.model},
        "data": {"test": str(part.test_file)},
        "strategy": strategy,
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
        "coordinator": {"concurrency": args.sites, "target_accuracy": args.target,
                        "max_versions": args.max_versions, "max_seconds": args.max_seconds,
                        "out": str(work / "model")},
    }


def site_slowdown(args: argparse.Namespace, i: int) -> float:
    """The last `--slow` sites are `--slowdown` times slower."""
    return float(args.slowdown) if i >= args.sites - args.slow else 1.0


def run_demo(args: argparse.Namespace) -> int:
    extra = apply_example(args) if args.example else None  # a bad example exits 2 before the broker is tried
    if not 0 <= args.slow <= args.sites:
        raise ConfigError(f"--slow must be between 0 and --sites ({args.sites}), got {args.slow}")
    if args.privacy == "he" and args.compression != "none":
        raise ConfigError(f"--compression {args.compression}: --privacy he sends CKKS ciphertexts, which "
                          "compression does not shrink; use --compression none")
    console = Console(stderr=True)
    url = args.broker
    Connection(url, name="fedmq-demo-check").open().close()  # exit 3 now, not in a child
    job = args.job or f"demo-{uuid.uuid4().hex[:8]}"
    work = Path(args.workdir or tempfile.mkdtemp(prefix=f"fedmq-{job}-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)

    part = write_partition(work / "data", args.dataset, args.sites, scheme=args.partition,
                           alpha=args.alpha, seed=args.seed, fmt=getattr(args, "format", "npz"))
    sections = demo_sections(args, part, work)
    if extra is not None:
        sections = merge_example(sections, extra, args)
    apply_privacy(args, work, sections)
    keys = apply_keys(args, work, job, [f"site-{i}" for i in range(args.sites)], sections)
    config = work / "job.toml"
    write_job_toml(config, sections)
    console.print(f"[bold]fedmq demo[/] job [cyan]{job}[/] on {mask_url(url)}: {args.dataset}, "
                  f"{args.sites} sites ({args.partition}), {args.slow} of them {args.slowdown:g}x slower, "
                  f"{args.strategy}" + (f", {args.compression} updates" if args.compression != "none" else "")
                  + f"; files in {work}")

    common = ["--broker", url, "--job", job, "--log-level", "info"]
    procs = Processes(work / "logs", args.example)
    t0 = time.time()
    try:
        procs.start("coordinator", ["coordinator", *common, "--config", str(config)])
        for i in range(args.aggregators):
            procs.start(f"aggregator-{i}", ["aggregator", *common, "--name", f"aggregator-{i}"])
        if keys.keyholder_secret is not None:
            procs.start("keyholder", ["keyholder", *common, "--secret", str(keys.keyholder_secret)])
        procs.start_sites(job, [(f"site-{i}", [*common, "--site", f"site-{i}", "--data", str(f),
                                               "--slowdown", str(site_slowdown(args, i)),
                                               "--min-task-seconds", str(args.min_task_seconds),
                                               *keys.worker_args(f"site-{i}"), *_site_code_args(args)])
                                for i, f in enumerate(part.site_files)])
        st = _follow(url, job, procs, console, args)
        procs.wait_all(timeout=30)
    finally:
        procs.wait_all(timeout=0)
    return _report(url, job, st, args, console, time.time() - t0, procs, keys.summary(), launched_at=t0)


def _site_code_args(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "trainer", ""):
        out += ["--trainer", args.trainer]
    if getattr(args, "evaluator", ""):
        out += ["--evaluator", args.evaluator]
    return out


def _follow(url: str, job: str, procs: Processes, console: Console, args: argparse.Namespace) -> Progress_:
    names = JobNames(job)
    st = Progress_()
    conn = Connection(url, name="fedmq-demo").open()
    deadline = time.monotonic() + 120
    while not conn.job_exists(names):
        if "coordinator" in procs.failed() or time.monotonic() > deadline:
            conn.close()
            # one line (the CLI prints the first): the coordinator's own last word says why
            raise FedmqError(f"the coordinator did not create job {job}: {procs.tail('coordinator', 1) or 'no output'} "
                             f"(log: {procs.logdir / 'coordinator.log'})")
        time.sleep(0.2)
    conn.close()
    target = args.target or 1.0
    bar = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(bar_width=24),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
    task = bar.add_task("v0", total=target, info="")
    with StreamReader(url, names.events, name="fedmq-demo-events") as reader, Live(
        Group(bar, _sites_line(st)), console=console, refresh_per_second=4, transient=False,
    ) as live:
        reader.start("first")
        hard_stop = time.monotonic() + args.max_seconds + 120
        while st.finished is None:
            for d in reader.poll(0.2):
                _apply(Event.decode(d.body), st)
            bar.update(task, completed=min(st.accuracy, target), description=f"v{st.version}", info=_describe(st))
            live.update(Group(bar, _sites_line(st)))
            dead = [n for n in procs.failed() if n in ("coordinator", "keyholder") or n.startswith("aggregator")]
            if dead or time.monotonic() > hard_stop:
                why = (f"{dead[0]} exited: {procs.tail(dead[0], 1) or 'no output'} "
                       f"(log: {procs.logdir / (dead[0] + '.log')})") if dead else "the job did not finish in time"
                raise FedmqError(f"demo job {job} failed: {why}")
    return st


#: what each clock in the demo's JSON measures
CLOCKS = {
    "wall_seconds": "coordinator: from v0 published to the job's end",
    "seconds_to_target": "coordinator: from v0 published to the first version evaluated at or above the target "
                         "(includes the workers' start-up)",
    "startup_seconds": "demo: from starting the processes to the first version published (imports, connections, "
                       "the first K tasks)",
    "seconds_to_target_after_first_version": "from the first version published to the target version's evaluation",
    "total_seconds": "demo: the whole command, processes started to processes stopped",
}


def _clocks(st: Progress_, fin: dict[str, Any], launched_at: float | None, total: float) -> dict[str, Any]:
    startup = None if launched_at is None or st.first_version_at is None else st.first_version_at - launched_at
    after = None
    if fin.get("seconds_to_target") is not None and st.started is not None and st.first_version_at is not None:
        after = st.started + fin["seconds_to_target"] - st.first_version_at
    return {"startup_seconds": None if startup is None else round(startup, 3),
            "seconds_to_target_after_first_version": None if after is None else round(after, 3),
            "total_seconds": round(total, 3), "clocks": CLOCKS}


def _report(url: str, job: str, st: Progress_, args: argparse.Namespace, console: Console,
            total_seconds: float, procs: Processes, extra: dict[str, Any] | None = None, *,
            launched_at: float | None = None) -> int:
    assert st.finished is not None
    names = JobNames(job)
    dead_letters = len(read_stream(url, names.dead_log, "first", idle=0.3))
    fin = st.finished
    result = {
        "job": job, "strategy": args.strategy, "final_accuracy": fin["final_accuracy"],
        **({"example": args.example} if getattr(args, "example", None) else {}),
        **({"compression": args.compression} if args.compression != "none" else {}),
        "versions": fin["versions"], "updates_applied": fin["updates_applied"],
        "updates_dead_lettered": dead_letters, "wall_seconds": round(fin["wall_seconds"], 3),
        "seconds_to_target": None if fin["seconds_to_target"] is None else round(fin["seconds_to_target"], 3),
        # beyond the documented fields: which version was handed over, and how the newest one scored
        "final_version": fin["final_version"], "last_accuracy": fin.get("last_accuracy"),
        # the handed-over version's metrics by name (central, else the sites' federated figures)
        "metrics": fin.get("metrics", {}), "metrics_source": fin.get("metrics_source", ""),
        **_clocks(st, fin, launched_at, total_seconds),
        **privacy_summary(url, job, args),
        **(extra or {}),
    }
    table = Table(title=f"fedmq demo {job}", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in result.items():
        if k != "clocks":
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    table.add_row("stop_reason", fin["stop_reason"])
    table.add_row("updates per site", " ".join(f"{s}:{n}" for s, n in sorted(st.per_site.items())))
    table.add_row("model", fin["export_path"])
    console.print()
    if args.json:
        console.print(table)
        from fedmq.cli import print_json

        print_json(result)
    else:
        Console().print(table)
    return 0
