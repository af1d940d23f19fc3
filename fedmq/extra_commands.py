"""Subcommands beyond the roles (history, replay, monitor, report, ...).

Each lives in its own module exposing ``register(sub, add_common)``; list it here so `fedmq.cli`
stays a thin parser and no two features edit the same function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

COMMAND_MODULES: list[str] = [
    "fedmq.monitor",
    "fedmq.report",
    "fedmq.init_cmd",
    "fedmq.history",
    "fedmq.replay",
    "fedmq.export",
    "fedmq.keys",
    "fedmq.keyholder",
    "fedmq.permissions",
    "fedmq.simulate",
    "fedmq.jobs",
    "fedmq.fleet",
]

#: commands whose parser `fedmq.cli.main` builds alone (command -> its module): importing every
#: module above costs ~0.3 s CPU, a third of what `monitor --once --json` may take in all
OPERATOR_COMMANDS: dict[str, str] = {
    "monitor": "fedmq.monitor",
    "history": "fedmq.history",
    "replay": "fedmq.replay",
    "report": "fedmq.report",
}


def register(sub: Any, add_common: Callable[..., None], modules: Sequence[str] | None = None) -> None:
    """Add the operator subcommands (of `modules`, default all) to the `fedmq` parser."""
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(sub, add_common)
