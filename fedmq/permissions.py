"""`fedmq permissions`: the broker grants a site's user needs for one job, as rabbitmqctl commands.

Printed, not applied: the operator runs them with the broker's admin credentials, which fedmq
never holds. docs/security.md lists every AMQP operation they allow and refuse.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from fedmq.cli import print_json
from fedmq.shared.broker import site_permissions


def cmd_permissions(args: argparse.Namespace) -> int:
    perms = [site_permissions(args.job, site, args.vhost) for site in args.site]
    if args.json:
        print_json({"job": args.job, "vhost": args.vhost,
                    "commands": [["rabbitmqctl", *c] for p in perms for c in p.commands()]})
        return 0
    for p in perms:
        print(f"rabbitmqctl add_user {p.user} 'PASSWORD'  # once per site, if the user does not exist")
        for c in p.commands():
            print(shlex.join(["rabbitmqctl", *c]))
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("permissions", help="print the rabbitmqctl commands that give a site's broker user "
                                           "exactly what it needs for one job")
    add_common(p, job=True)
    p.add_argument("--site", action="append", required=True, help="site name (= its broker user); repeatable")
    p.add_argument("--vhost", default="/", help="the job's virtual host")
    p.add_argument("--json", action="store_true", help="print the commands as one JSON object")
    p.set_defaults(run=cmd_permissions)
