"""Start several `fedmq worker` processes from one that has already imported torch: fork, no exec.

Why: every worker process imports torch (1.4 s of CPU with torch 2.13), so the demo's 8 sites on 2
cores spent about 6 s importing in parallel with their coordinator, which then took 10 s instead
of 2 s to publish v0. Forked after the import, each site is still its own OS process with its own
pid, connections, signal handlers and log file (kill one and the others go on), but the import
is paid once and its pages are shared copy-on-write.

Fork is safe here because this process starts no threads and runs no torch operation before it
forks (torch's thread pools start on first use); each child then runs the CLI exactly as
`fedmq worker` would.

    python -m fedmq.site_launcher --job JOB SPEC.json

SPEC.json: a list of {"name": ..., "args": [worker arguments...], "log": path}. `--job` only labels
the command line (operators and tests find a job's processes by it). Exits 0 when every site
exited 0, else the first non-zero status; SIGTERM and SIGINT are passed on to every site.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

#: Linux prctl option: the kernel signals the child when its parent dies
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A site whose launcher was SIGKILLed gets SIGTERM instead of running on as an orphan."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the demo's process group still ends them
        pass


def _child(args: list[str], log: str) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from fedmq.cli import main

    try:
        return main(["worker", *args])
    except SystemExit as exc:  # argparse and friends
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a child must never return into the launcher's loop
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _load(path: str) -> list[dict[str, Any]]:
    sites = json.loads(Path(path).read_text())
    if not isinstance(sites, list) or not all(
            isinstance(s, dict) and isinstance(s.get("args"), list) and isinstance(s.get("log"), str) for s in sites):
        raise SystemExit(f"fedmq.site_launcher: {path}: expected a list of {{name, args, log}}")
    return sites


def launch(sites: list[dict[str, Any]]) -> int:
    import fedmq.cli  # noqa: F401  (the CLI's own imports too)
    import fedmq.worker.service  # noqa: F401  (torch, numpy: once, before the forks)

    children: dict[int, str] = {}
    for site in sites:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_child([str(a) for a in site["args"]], site["log"]))
        children[pid] = str(site.get("name", pid))

    def _pass_on(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, _pass_on)
    signal.signal(signal.SIGINT, _pass_on)
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--job":
        print("usage: python -m fedmq.site_launcher --job JOB SPEC.json", file=sys.stderr)
        return 2
    return launch(_load(argv[2]))


if __name__ == "__main__":
    sys.exit(main())
