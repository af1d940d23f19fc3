"""What every benchmark shares: timing, the machine note, and rewriting one section of BENCHMARKS.md.

BENCHMARKS.md is written by several benchmarks (codec, aggregator, replay, privacy, ...). Each one
owns the ``## <title>`` sections it writes and calls `replace_section`, which rewrites only that
section and keeps every other one byte for byte. Figures are only comparable within one run on one
machine, so every section carries the machine note (cores, load average, commit) of its own run.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"

HEADER = """# fedmq benchmarks

Written by `make bench` (`python -m bench.run_all`); each `## ` section is rewritten by the benchmark
that owns it and says when, on what machine and under what load it was measured. Ratios compare
figures measured in the same run. Nothing here is asserted by a test: speed depends on the machine.
"""


def replace_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Write ``## title`` followed by `body`, replacing that section only (appended when absent).

    A section runs from its heading to the next line starting with ``## `` or the end of the file;
    everything outside it, including sections other benchmarks wrote, is kept unchanged.
    """
    text = path.read_text() if path.exists() else HEADER
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block + "\n", text, count=1)
        text = text.rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def run_group(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(capture_output=True, text=True)` in a process group of its own, and on a
    timeout the whole group is SIGKILLed, not only `cmd`: `fedmq demo` starts a coordinator, an
    aggregator and workers as its children, and killing the parent alone would orphan them (still
    training, still holding the job's queues). Raises `subprocess.TimeoutExpired` like `run`."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    except BaseException:  # KeyboardInterrupt, a test's own timeout: never leave the group running
        _kill_group(proc.pid)
        proc.wait()
        raise
    # the parent is gone; children it failed to reap (it crashed) must not outlive it either
    _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nobody (of ours) left in the group


def _git_commit() -> str:
    """HEAD's short hash, with ``+changes`` when tracked files differ from it: then the figures were
    measured on code that no commit holds."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, timeout=10)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=ROOT, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return f"{commit}+changes" if changed.returncode == 0 and changed.stdout.strip() else commit


def git_commit() -> str:
    return _git_commit()


def broker_rss_mb() -> float | None:
    """VmRSS of the RabbitMQ node (beam.smp) on this machine, or None when not readable."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if b"beam.smp" not in (p / "cmdline").read_bytes():
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass(frozen=True)
class MachineNote:
    """Where and under what load a section was measured; printed under its heading."""

    started: str
    cores: int
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    commit: str
    python: str

    def markdown(self) -> str:
        def fmt(load: tuple[float, float, float]) -> str:
            return " / ".join(f"{x:.2f}" for x in load)

        return (f"_Measured {self.started} on {self.cores} cores (Python {self.python}, commit "
                f"{self.commit}); load average 1/5/15 min {fmt(self.load_start)} at the start, "
                f"{fmt(self.load_end)} at the end._")


class Machine:
    """Records the load at the start of a measurement; `note()` closes it."""

    def __init__(self) -> None:
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.load_start = load_average()

    def note(self) -> MachineNote:
        return MachineNote(self.started, os.cpu_count() or 0, self.load_start, load_average(), _git_commit(),
                           platform.python_version())


def best_and_median(fn: Callable[[], object], *, repeats: int = 7, min_seconds: float = 0.05) -> tuple[float, float]:
    """(best, median) seconds per call of `fn`; each sample loops until it has run `min_seconds`.

    The best is what the code can do; the median says how much the shared machine disturbed it.
    """
    fn()  # warm-up: allocator, caches, lazy imports
    samples = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / n)
    return min(samples), statistics.median(samples)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.1f} s"
