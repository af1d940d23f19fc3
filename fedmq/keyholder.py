"""`fedmq keyholder --job J --secret J.secret.ctx`: decrypts encrypted sums into model versions.

The only process that holds the job's secret key. Start it beside the aggregator(s); it leaves
when the coordinator finishes the job (the aggregates queue is deleted).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from fedmq.args import HEARTBEAT, number

log = logging.getLogger(__name__)


def cmd_keyholder(args: argparse.Namespace) -> int:
    from fedmq.aggregator.keyholder import KeyHolder
    from fedmq.cli import await_broker, stop_on_signals
    from fedmq.shared import he

    stop = stop_on_signals()
    holder = KeyHolder(args.broker, args.job, he.read_file(args.secret, "--secret"), stop=stop,
                       heartbeat=args.heartbeat, name=args.name)
    if not await_broker(args, stop):
        return 0
    stats = holder.run()
    log.info("keyholder stopped", extra={"job": args.job, "versions": stats.versions,
                                          "duplicates": stats.duplicates})
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("keyholder", help="decrypt a homomorphic job's encrypted sums into versions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p)
    p.add_argument("--secret", required="FEDMQ_KEYHOLDER_SECRET" not in os.environ,
                   default=os.environ.get("FEDMQ_KEYHOLDER_SECRET"),
                   help="the job's <job>.secret.ctx from fedmq keys (env FEDMQ_KEYHOLDER_SECRET)")
    p.add_argument("--name", default=f"keyholder-{os.getpid()}", help="replica name in logs")
    p.add_argument("--heartbeat", type=number(int, HEARTBEAT), default=10, help="AMQP heartbeat seconds")
    from fedmq.cli import add_broker_wait

    add_broker_wait(p)
    p.set_defaults(run=cmd_keyholder)
