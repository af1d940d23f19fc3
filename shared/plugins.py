"""Importing a callable named as ``package.module:attribute`` (custom models, replay steps)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedmq.shared.errors import ConfigError


def import_callable(target: str, what: str) -> Callable[..., Any]:
    """The callable `target` names; ConfigError (saying which `what` it was for) when it can't be had.

    Only code installed on this machine can be named, so a broker message never makes a process
    run code its operator did not install.
    """
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{what} {target!r} must look like package.module:callable")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} {target!r} cannot be imported on this machine: {exc}") from exc
    except Exception as exc:  # the module itself fails on import (SyntaxError, its own errors)
        raise ConfigError(f"{what} {target!r}: importing {mod_name} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not callable(fn):
        raise ConfigError(f"{what} {target!r} is not callable")
    return fn  # type: ignore[no-any-return]
