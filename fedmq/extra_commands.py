"""Subcommands beyond the roles (history, replay, monitor, report, ...).

Each lives in its own module exposing ``register(sub, add_common)``; list it here so `fedmq.cli`
stays a thin parser and no two features edit the same function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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


def register(sub: Any, add_common: Callable[..., None]) -> None:
    """Add the operator subcommands to the `fedmq` parser."""
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, add_common)
