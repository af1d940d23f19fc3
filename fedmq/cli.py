"""`fedmq` console script: parse, call the role, print errors as one line with an exit code.

Exit codes: 0 ok, 1 failure (e.g. replay mismatch), 2 bad arguments or config, 3 broker
unreachable or refused, 4 job not found, 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from fedmq.args import HEARTBEAT, PORT, SECONDS, SLOWDOWN, config_number, number
from fedmq.shared.broker import DEFAULT_BROKER_WAIT, DEFAULT_URL, Connection, mask_url, validate_job_id, wait_for_broker
from fedmq.shared.config import ClusterConfig, JobConfig, PrivacyConfig
from fedmq.shared.errors import ConfigError, FedmqError
from fedmq.shared.logs import configure_logging
from fedmq.shared.parts import part_bytes_from_env

log = logging.getLogger("fedmq.cli")

Handler = Callable[[argparse.Namespace], int]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"fedmq{' ' + sub if sub else ''}: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, with a broker URL's password masked (it may come from env)."""

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, str) and "://" in action.default:
            action = copy.copy(action)
            action.default = mask_url(action.default)
        return super()._expand_help(action)


def _job(value: str) -> str:
    try:
        return validate_job_id(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common(p: argparse.ArgumentParser, *, job: bool = True, job_required: bool = True) -> None:
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL),
                   help="AMQP URL, amqps:// for TLS; the nodes of a cluster as a comma-separated list, "
                   "tried in turn on connect and reconnect (env FEDMQ_BROKER_URL)")
    if job:
        env_job = os.environ.get("FEDMQ_JOB") or None  # an exported but empty FEDMQ_JOB is unset
        p.add_argument("--job", type=_job, required=job_required and env_job is None,
                       default=env_job, help="job id (env FEDMQ_JOB)")
    p.add_argument("--log-level", default=os.environ.get("FEDMQ_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"],
                   help="log level; logs go to stderr (env FEDMQ_LOG_LEVEL; default %(default)s)")


def stop_on_signals() -> threading.Event:
    """SIGTERM / SIGINT set the returned event: roles finish the step they are in and leave."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        log.info("signal received, stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def add_metrics_port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=number(int, PORT), default=os.environ.get("FEDMQ_METRICS_PORT", "0"),
                   help="serve Prometheus /metrics on this port, 0 = off (env FEDMQ_METRICS_PORT)")


def start_metrics(args: argparse.Namespace) -> None:
    """Start the /metrics endpoint before the role runs, so a scrape sees it from the start."""
    if args.metrics_port:
        from fedmq.shared.metrics import serve

        serve(args.metrics_port)


def check_broker(url: str) -> None:
    """Fail fast with exit 3 and the masked URL when the broker does not answer (one-shot commands)."""
    Connection(url, name="fedmq-check").open().close()


def add_broker_wait(p: argparse.ArgumentParser) -> None:
    """--broker-wait for the long-running roles (one-shot commands keep failing fast)."""
    p.add_argument("--broker-wait", type=number(float, SECONDS),
                   default=os.environ.get("FEDMQ_BROKER_WAIT") or str(DEFAULT_BROKER_WAIT),
                   help="at start-up, keep retrying a broker that does not answer for this many seconds "
                   "(backoff, one log line per attempt), then exit 3; 0 = fail at once (env FEDMQ_BROKER_WAIT)")


def await_broker(args: argparse.Namespace, stop: threading.Event) -> bool:
    """A long-running role's start-up: wait for the broker (False: a signal came while waiting)."""
    return wait_for_broker(args.broker, wait=args.broker_wait, name=f"fedmq-{args.command}-wait", stop=stop)


def print_json(obj: dict[str, Any]) -> None:
    """The --json contract: exactly one JSON object as the last line of stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- roles


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedmq.aggregator.service import Aggregator

    stop = stop_on_signals()
    if not await_broker(args, stop):
        return 0
    start_metrics(args)
    agg = Aggregator(args.broker, args.job, stop=stop, heartbeat=args.heartbeat,
                     name=args.name)
    stats = agg.run()
    log.info("aggregator stopped job=%s versions=%d applied=%d duplicates=%d", args.job,
             stats.versions, stats.applied, stats.duplicates)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from fedmq.worker.service import Worker, WorkerOptions

    opts = WorkerOptions(slowdown=args.slowdown, min_task_seconds=args.min_task_seconds,
                         device=args.device, heartbeat=args.heartbeat, max_tasks=args.max_tasks,
                         wait_for_job=args.wait, epsilon_budget=args.epsilon_budget,
                         max_failures=args.max_failures, eval_data=args.eval_data or "")
    site, data = args.site, args.data
    if args.site_pool:
        from fedmq.site_pool import claim_site

        claim = claim_site(args.site_pool)  # held (flock) until this process exits
        site, data = claim.site, str(claim.data)
    elif not (site and data):
        raise ConfigError("worker needs --site and --data (env FEDMQ_SITE, FEDMQ_DATA), "
                          "or --site-pool (env FEDMQ_SITE_POOL)")
    if args.key:  # "{site}" in the path picks the claimed site's key under --site-pool
        opts = dataclasses.replace(opts, key=args.key.replace("{site}", site))
    if args.ledger:
        opts = dataclasses.replace(opts, ledger=args.ledger.replace("{site}", site))
    trainer = None
    if args.trainer:
        from fedmq.worker.train import load_trainer

        trainer = load_trainer(args.trainer)  # a missing module or a non-callable: exit 2 before joining
    evaluator = None
    if args.evaluator:
        from fedmq.worker.train import load_evaluator

        evaluator = load_evaluator(args.evaluator)
    stop = stop_on_signals()
    worker = Worker(args.broker, args.job, site, data, options=opts, stop=stop, trainer=trainer,
                    evaluator=evaluator)
    if not await_broker(args, stop):
        return 0
    start_metrics(args)
    stats = worker.run()
    log.info("worker stopped job=%s site=%s tasks=%d", args.job, site, stats.tasks)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedmq.coordinator.service import Coordinator
    from fedmq.shared.config import load_job_config

    overrides: dict[str, Any] = {"job": args.job}
    if args.test:
        overrides["data"] = {"test": args.test}
    if args.out:
        overrides.setdefault("coordinator", {})["out"] = args.out
    if "replicas" in args:  # unset: the config's cluster.replicas (env FEDMQ_CLUSTER_REPLICAS)
        overrides["cluster"] = {"replicas": args.replicas}
    cfg = load_job_config(args.config, overrides=overrides)
    stop = stop_on_signals()
    coord = Coordinator(args.broker, cfg, stop=stop)
    if not await_broker(args, stop):
        return 0
    start_metrics(args)
    result = coord.run()
    if args.json:
        print_json(result.to_dict())
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedmq.shared.datasets import write_partition

    res = write_partition(args.out, args.dataset, args.sites, scheme=args.scheme, alpha=args.alpha,
                          test_fraction=args.test_fraction, seed=args.seed, fmt=args.format)
    for f in res.site_files:
        print(f)
    print(res.test_file)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmq.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------------- parser


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; `only` (a name in `extra_commands.OPERATOR_COMMANDS`) builds just
    that one: an operator command run from a script every second must not import every role."""
    parser = OneLineParser(prog="fedmq", description="Asynchronous federated learning over RabbitMQ.",
                           formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = HelpFormatter
    from fedmq import extra_commands

    if only is not None:
        extra_commands.register(sub, add_common, [extra_commands.OPERATOR_COMMANDS[only]])
        for p in sub.choices.values():
            p.formatter_class = HelpFormatter
        return parser

    p = sub.add_parser("demo", help="a whole federated job on bundled data, as real processes",
                       formatter_class=fmt)
    add_common(p, job=True, job_required=False)
    from fedmq.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("coordinator", help="run one job to its stop criterion and export the model",
                       formatter_class=fmt)
    add_common(p)
    p.add_argument("--config", default=os.environ.get("FEDMQ_CONFIG"),
                   help="job TOML (env FEDMQ_CONFIG); FEDMQ_<SECTION>_<KEY> env overrides it")
    p.add_argument("--test", help="held-out test data (overrides data.test)")
    p.add_argument("--out", help="export directory (overrides coordinator.out)")
    p.add_argument("--replicas", type=config_number(ClusterConfig, "replicas"), default=argparse.SUPPRESS,
                   help="copies of each queue and stream on a RabbitMQ cluster, capped at its node count; "
                   "0 = every node (overrides cluster.replicas, default 3)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_metrics_port(p)
    add_broker_wait(p)
    p.set_defaults(run=cmd_coordinator)

    p = sub.add_parser("aggregator", help="one aggregator replica (start several: one active)",
                       formatter_class=fmt)
    add_common(p)
    p.add_argument("--name", default=os.environ.get("FEDMQ_AGGREGATOR_NAME", f"aggregator-{os.getpid()}"),
                   help="replica name in logs and connection names (env FEDMQ_AGGREGATOR_NAME)")
    p.add_argument("--heartbeat", type=number(int, HEARTBEAT), default=10,
                   help="AMQP heartbeat seconds (standby takeover after a hang takes 2-3x this)")
    add_metrics_port(p)
    add_broker_wait(p)
    p.set_defaults(run=cmd_aggregator)

    p = sub.add_parser("worker", help="one site: train on local data, publish updates",
                       formatter_class=fmt)
    add_common(p)
    p.add_argument("--site", default=os.environ.get("FEDMQ_SITE"),
                   help="site name; also the routing key of its updates (env FEDMQ_SITE)")
    p.add_argument("--data", default=os.environ.get("FEDMQ_DATA"),
                   help="the site's NPZ (x, y) or CSV (label, features...) file (env FEDMQ_DATA)")
    p.add_argument("--site-pool", default=os.environ.get("FEDMQ_SITE_POOL"),
                   help="instead of --site/--data: a glob of data files; this worker claims the first "
                   "one no other worker holds and takes its file stem as site name (env FEDMQ_SITE_POOL)")
    p.add_argument("--trainer", default=os.environ.get("FEDMQ_TRAINER", ""),
                   help="local training of your own, package.module:callable taking a fedmq.site.TrainContext and "
                   "returning a TrainResult (docs/tutorial.md); default the bundled SGD loop (env FEDMQ_TRAINER)")
    p.add_argument("--evaluator", default=os.environ.get("FEDMQ_EVALUATOR", ""),
                   help="federated evaluation of your own, package.module:callable taking a fedmq.site.EvalContext "
                   "and returning {metric: value}; default the job's metrics (env FEDMQ_EVALUATOR)")
    p.add_argument("--eval-data", default=os.environ.get("FEDMQ_EVAL_DATA", ""),
                   help="held-out NPZ/CSV rows for federated evaluation; default: hold out the job's "
                   "evaluation.site_fraction of --data (env FEDMQ_EVAL_DATA)")
    p.add_argument("--slowdown", type=number(float, SLOWDOWN), default=1.0, help="make this site F times slower")
    p.add_argument("--min-task-seconds", type=number(float, SECONDS), default=0.0, help="pad each task to >= S seconds")
    p.add_argument("--device", default=os.environ.get("FEDMQ_DEVICE", "auto"),
                   help="torch device: auto (CUDA if present), cpu, cuda, cuda:N (env FEDMQ_DEVICE)")
    p.add_argument("--heartbeat", type=number(int, HEARTBEAT), default=30, help="AMQP heartbeat seconds")
    p.add_argument("--max-tasks", type=number(int, "[0, 1_000_000_000]"), default=0,
                   help="leave after N tasks (0 = until the job ends)")
    p.add_argument("--wait", type=number(float, SECONDS), default=60.0, help="seconds to wait for the job to exist")
    p.add_argument("--max-failures", type=number(int, "[0, 1_000_000]"), default=3,
                   help="stop (exit 1) after training fails on N tasks in a row; each failure is reported as a "
                   "task_failed event and the task goes back to the others (0 = never stop)")
    p.add_argument("--key", default=os.environ.get("FEDMQ_SITE_KEY", ""),
                   help="the site's Ed25519 key file (fedmq keys --site NAME); signs every update; "
                   "'{site}' is replaced by the site name (env FEDMQ_SITE_KEY)")
    p.add_argument("--ledger", default=os.environ.get("FEDMQ_DP_LEDGER", ""),
                   help="the site's differential-privacy budget ledger (JSON, survives restarts; '{site}' "
                   "is replaced); default <data stem>.<site>.dp-ledger.json beside the data (env FEDMQ_DP_LEDGER)")
    p.add_argument("--epsilon-budget", type=config_number(PrivacyConfig, "epsilon"),
                   default=os.environ.get("FEDMQ_SITE_EPSILON_BUDGET") or "0",
                   help="this site's own epsilon cap over all jobs on its data; the job's budget applies "
                   "too, the tighter wins (0 = the job's only; env FEDMQ_SITE_EPSILON_BUDGET)")
    add_metrics_port(p)
    add_broker_wait(p)
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("partition", help="split a bundled dataset into per-site files",
                       formatter_class=fmt)
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "breast_cancer", "mnist", "synthetic", "diabetes"],
                   help="bundled dataset (no download; diabetes is a regression task: --scheme iid or quantity)")
    p.add_argument("--sites", type=number(int, "[1, 10_000]"), default=8, help="number of site files to write")
    p.add_argument("--scheme", default="dirichlet", choices=["iid", "dirichlet", "shards", "quantity"],
                   help="how samples are split over sites (dirichlet, quantity: skew set by --alpha)")
    p.add_argument("--alpha", type=number(float, "(0, 1e6]"), default=0.5, help="Dirichlet concentration")
    p.add_argument("--test-fraction", type=number(float, "(0, 1)"), default=0.2, help="share held out as test.npz")
    p.add_argument("--seed", type=config_number(JobConfig, "seed"), default=0, help="random seed of the split")
    p.add_argument("--format", default="npz", choices=["npz", "csv"], help="site file format")
    p.add_argument("--out", required=True, help="directory for site_<i>.<format> and test.npz")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level; logs go to stderr")
    p.set_defaults(run=cmd_partition)

    extra_commands.register(sub, add_common)
    for p in sub.choices.values():  # every subcommand's --help shows its defaults
        p.formatter_class = HelpFormatter
    return parser


def _operator_command(argv: list[str]) -> str | None:
    from fedmq.extra_commands import OPERATOR_COMMANDS

    return argv[0] if argv and argv[0] in OPERATOR_COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_operator_command(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        part_bytes_from_env()  # a bad FEDMQ_PART_BYTES is a one-line error before anything runs
        return int(args.run(args))
    except FedmqError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "broker" not in msg and hasattr(args, "broker") and exc.exit_code == 3:
            msg = f"{msg} ({mask_url(args.broker)})"
        print(f"fedmq: {msg}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedmq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
