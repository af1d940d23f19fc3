"""Fault-injection points for the chaos tests; inert unless ``FEDMQ_FAULTS`` names them.

A crash "between publishing a version and acking it" lasts microseconds, too short to hit with a
SIGKILL sent at a random moment. A service calls `point` at each such place; a test arms a point
through the environment of the process it starts::

    FEDMQ_FAULTS="aggregator.before_ack=stop:/tmp/t/arm;aggregator.handle=exit:u-poison"

Actions:

* ``stop:PATH`` - when the point is reached and PATH exists, delete PATH (so exactly one process
  claims it) and SIGSTOP ourselves. The test sees the frozen process (state ``T``) and SIGKILLs it:
  a real kill, at an exact point.
* ``exit:KEY`` - ``os._exit(70)`` when the point is reached for KEY (an update id): a consumer
  that crashes on one message, as a native crash in a decoder would.
* ``raise:KEY`` - raise `InjectedFault` for KEY: the same, as a Python exception.

Unset (production), `point` is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from functools import cache

from fedmq.shared.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "FEDMQ_FAULTS"
ACTIONS = ("stop", "exit", "raise")


class InjectedFault(RuntimeError):
    """Raised by a ``raise:`` fault; deliberately not a FedmqError (it stands for a bug)."""


@dataclass(frozen=True)
class Fault:
    action: str
    arg: str


def parse(spec: str) -> dict[str, Fault]:
    """``"a.b=stop:/p;c.d=exit:id"`` -> {point: Fault}; raises ConfigError on a bad entry."""
    faults: dict[str, Fault] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, sep, rest = entry.partition("=")
        action, colon, arg = rest.partition(":")
        if not sep or not colon or action not in ACTIONS or not arg:
            raise ConfigError(f"{ENV}: {entry!r} must look like point=stop:PATH, point=exit:KEY "
                              "or point=raise:KEY")
        faults[name.strip()] = Fault(action, arg)
    return faults


@cache
def _armed() -> dict[str, Fault]:
    return parse(os.environ.get(ENV, ""))


def point(name: str, key: str | None = None) -> None:
    """Trigger the fault armed at `name` (for `key`, when the action names one), if any."""
    fault = _armed().get(name)
    if fault is None:
        return
    if fault.action == "stop":
        try:
            os.unlink(fault.arg)
        except FileNotFoundError:
            return  # not armed right now, or another process claimed it
        log.warning("fault injected: stopping point=%s pid=%d", name, os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if key != fault.arg:
        return
    log.warning("fault injected: %s point=%s key=%s", fault.action, name, key)
    if fault.action == "exit":
        logging.shutdown()
        os._exit(70)
    raise InjectedFault(f"fault injected at {name} for {key}")
