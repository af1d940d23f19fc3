"""argparse types for numeric flags: every number a flag takes has a range, checked at parse time.

A value out of range is an argparse error, so it ends as one line on stderr and exit 2 before any
role starts (``fedmq aggregator --heartbeat -1`` once reached pika and printed a traceback).
Flags that set a config key take that key's range from the schema (`config_number`), so the flag
and ``[section] key`` can never disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fedmq.shared.config import In, parse_number, range_of
from fedmq.shared.errors import ConfigError

Number = int | float

#: AMQP heartbeat seconds: 0 would switch heartbeats off, so a hung peer would never be noticed
HEARTBEAT = "[1, 3600]"
PORT = "[0, 65535]"
#: a wait or padding in seconds: at most ten years, as every duration in the config
SECONDS = "[0, 315_360_000]"
#: how many times slower a simulated site is
SLOWDOWN = "[1, 1000]"


def number(kind: type[int] | type[float], interval: str) -> Callable[[str], Number]:
    """An argparse `type=` that parses `kind` strictly and requires it to lie in `interval`."""
    bounds = In(interval)

    def parse(text: str) -> Number:
        try:
            value = parse_number(text, kind, "")
        except ConfigError:
            raise ValueError(text) from None  # argparse: "invalid int value: 'often'"
        problem = bounds.violation(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def config_number(section: type, key: str) -> Callable[[str], Number]:
    """The argparse type of a flag that sets config key `section.key`: same kind, same range."""
    kind, interval = range_of(section, key)
    return number(kind, interval.text)
