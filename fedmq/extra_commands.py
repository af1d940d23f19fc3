"""Subcommands beyond the roles (history, replay, monitor, report, ...), registered here so each
lives in its own module and `fedmq.cli` stays a thin parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: Any, add_common: Callable[..., None]) -> None:
    """Add the operator subcommands to the `fedmq` parser."""
    _ = (sub, add_common, argparse)
