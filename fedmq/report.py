"""`fedmq report --job ID --out DIR`: PNG plots and an HTML page, from the job's streams alone.

The events stream gives accuracy per version (the coordinator's evaluations), the staleness and
site of every folded update (``version_published``) and every published update with its task
time (``update_published``); the dead-letter stream gives each parked message's reason, including
the ones the broker parked itself (delivery limit), which no event announces. No process has to be
running: a finished job can be reported months later as long as its streams are retained.

Besides ``index.html`` and the PNGs, ``report.json`` holds every plotted series, so the figures can
be checked or redrawn elsewhere, and its ``points`` per plot are what the page states.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.shared.broker import Delivery, JobNames, read_stream
from fedmq.shared.errors import ConfigError, JobNotFoundError, MalformedMessageError
from fedmq.shared.evaluation import EvalSource, Evaluated, SiteReport, read_evaluated, read_report
from fedmq.shared.jobstate import (
    as_id,
    as_int,
    as_site,
    field_float,
    field_id,
    field_int,
    field_list,
    field_site,
    field_text,
    read_event_delivery,
)
from fedmq.shared.ledger import dead_reason
from fedmq.shared.messages import Event, EventKind

log = logging.getLogger(__name__)

APPLIED_COLOR = "#2e7d32"
PENDING_COLOR = "#9e9e9e"


@dataclass(frozen=True)
class UpdateRecord:
    update_id: str
    site: str
    ts: float            # when the site published it (event time)
    seconds: float       # the task's wall time at the site, so the bar starts at ts - seconds
    base_version: int


@dataclass
class ReportData:
    """Everything the plots need, folded from the streams in order."""

    job: str
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    finished: dict[str, Any] | None = None
    accuracy: list[tuple[int, float, float]] = field(default_factory=list)  # (version, t, accuracy)
    evaluations: list[Evaluated] = field(default_factory=list)  # every VERSION_EVALUATED, central and federated
    site_reports: dict[str, SiteReport] = field(default_factory=dict)  # each site's newest evaluation
    staleness: list[int] = field(default_factory=list)
    versions: int = 0
    updates: dict[str, UpdateRecord] = field(default_factory=dict)          # first publish per id
    applied: set[str] = field(default_factory=set)
    applied_by_site: Counter[str] = field(default_factory=Counter)
    dead_reasons: list[str] = field(default_factory=list)
    #: tasks whose training raised, per reporting site (task_failed events), and the newest error
    failures: Counter[str] = field(default_factory=Counter)
    last_error: dict[str, str] = field(default_factory=dict)
    #: entries skipped per reason: junk, events their routing key does not vouch for, bad fields
    poison: Counter[str] = field(default_factory=Counter)

    def apply(self, ev: Event) -> None:
        """Fold one event; one with a field of the wrong type or out of bounds is skipped whole
        (counted in `poison`), so no value a site chose reaches a plot unchecked."""
        handler = _APPLY.get(ev.event)
        if handler is not None and not handler(self, ev.data, ev.ts):
            self.poison["bad_field"] += 1
            log.warning("event with a bad field skipped job=%s event=%s", self.job, ev.event)

    def _started(self, d: dict[str, Any], ts: float) -> bool:
        params = d.get("params")
        self.started_at, self.strategy = ts, field_text(d, "strategy", 64)
        self.params = dict(params) if isinstance(params, dict) else {}
        return True

    def _update(self, d: dict[str, Any], ts: float) -> bool:
        uid, site = field_id(d, "update_id"), field_site(d)
        seconds = field_float(d, "task_seconds", 0.0, MAX_TASK_SECONDS) if d.get("task_seconds") is not None else 0.0
        base = field_int(d, "base_version") if "base_version" in d else 0
        if uid is None or site is None or seconds is None or base is None:
            return False
        report = read_report(d["eval"]) if "eval" in d else None
        if "eval" in d and report is None:
            return False
        if uid not in self.updates:  # a redelivered task publishes the same id again
            self.updates[uid] = UpdateRecord(uid, site, ts, seconds, base)
        if report is not None:
            self.site_reports[site] = report
        return True

    def _version(self, d: dict[str, Any], ts: float) -> bool:
        version = field_int(d, "version")
        included = field_list(d, "included", as_id)
        staleness = field_list(d, "staleness", lambda t: as_int(t, 0, MAX_STALENESS))
        sites = field_list(d, "sites", as_site)
        if version is None or included is None or staleness is None or sites is None:
            return False
        self.versions = max(self.versions, version)
        self.applied.update(included)
        self.staleness.extend(staleness)
        self.applied_by_site.update(sites)
        return True

    def _failed(self, d: dict[str, Any], ts: float) -> bool:
        site, tid, error = field_site(d), field_id(d, "task_id"), field_text(d, "error", 500)
        if site is None or tid is None or (error is None and "error" in d):
            return False
        self.failures[site] += 1
        self.last_error[site] = error or ""
        return True

    def _evaluated(self, d: dict[str, Any], ts: float) -> bool:
        read = read_evaluated(d)
        if read is None:
            return False
        if read.scope == EvalSource.CENTRAL.value and read.accuracy is not None:
            self.accuracy.append((read.version, read.t, read.accuracy))
        self.evaluations.append(read)
        return True

    def _finished(self, d: dict[str, Any], ts: float) -> bool:
        self.finished = {"stop_reason": field_text(d, "stop_reason", 64),
                         "wall_seconds": field_float(d, "wall_seconds", 0.0, 1e9),
                         "seconds_to_target": field_float(d, "seconds_to_target", 0.0, 1e9)}
        return True

    @property
    def origin(self) -> float:
        """Time zero of the plots: the job's start, else its first event we have."""
        if self.started_at is not None:
            return self.started_at
        return min((u.ts for u in self.updates.values()), default=0.0)

    def sites(self) -> list[str]:
        return sorted({u.site for u in self.updates.values()} | set(self.applied_by_site))

    def summary(self) -> dict[str, Any]:
        fin = self.finished or {}
        accs = [a for _, _, a in self.accuracy]
        return {
            "job": self.job, "strategy": self.strategy,
            "buffer_size": as_int(self.params.get("buffer_size")),
            "versions": self.versions, "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "updates_published": len(self.updates), "updates_applied": len(self.applied),
            "updates_dead_lettered": len(self.dead_reasons), "sites": len(self.sites()),
            "mean_staleness": round(sum(self.staleness) / len(self.staleness), 3) if self.staleness else None,
            "stop_reason": fin.get("stop_reason"), "wall_seconds": fin.get("wall_seconds"),
            "seconds_to_target": fin.get("seconds_to_target"),
            "poison": sum(self.poison.values()),
            "task_failures": sum(self.failures.values()),
            "sites_failing": "; ".join(f"{s}: {n} ({self.last_error.get(s, '')[:80]})"
                                       for s, n in self.failures.most_common(10)) or None,
            **{f"final_{scope}_{k}": v for scope in ("central", "federated")
               for k, v in self.last_metrics(scope).items()},
            "site_evaluations": "; ".join(
                f"{s} v{r.version} " + " ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
                for s, r in sorted(self.site_reports.items())[:MAX_SITES_DRAWN]) or None,
        }

    def last_metrics(self, scope: str) -> dict[str, float]:
        """The newest version's metrics as `scope` (central, federated) evaluated it."""
        evs = [e for e in self.evaluations if e.scope == scope]
        return dict(max(evs, key=lambda e: e.version).metrics) if evs else {}


#: bounds on what a plot shows: a staleness of 10**9 would be a histogram of 10**9 bins
MAX_STALENESS = 10_000
MAX_TASK_SECONDS = 30 * 86400.0

_APPLY: dict[str, Callable[[ReportData, dict[str, Any], float], bool]] = {
    EventKind.JOB_STARTED: ReportData._started,
    EventKind.UPDATE_PUBLISHED: ReportData._update,
    EventKind.VERSION_PUBLISHED: ReportData._version,
    EventKind.VERSION_EVALUATED: ReportData._evaluated,
    EventKind.TASK_FAILED: ReportData._failed,
    EventKind.JOB_FINISHED: ReportData._finished,
}


def fold(job: str, events: Iterable[Event], dead: Iterable[Delivery] = (),
         poison: Counter[str] | None = None) -> ReportData:
    data = ReportData(job)
    data.poison.update(poison or {})
    for ev in events:
        data.apply(ev)
    data.dead_reasons = [dead_reason(d.headers) for d in dead]
    return data


def collect(url: str, job: str) -> ReportData:
    """Read the events and dead-letter streams from their first entry."""
    names = JobNames(job)
    try:
        raw = read_stream(url, names.events, "first")
    except JobNotFoundError:
        raise JobNotFoundError(f"job {job} not found: no events stream {names.events} "
                               "(check --job and --broker)") from None
    events, poison = [], Counter[str]()
    for d in raw:
        try:
            events.append(read_event_delivery(d).event)
        except MalformedMessageError as exc:  # junk, or not vouched for by its routing key
            poison[exc.reason] += 1
            if poison[exc.reason] <= 20:
                log.warning("event skipped job=%s offset=%s reason=%s error=%s", job, d.stream_offset,
                            exc.reason, str(exc)[:200])
    del raw
    try:
        dead = read_stream(url, names.dead_log, "first")
    except JobNotFoundError:
        dead = []
    return fold(job, events, dead, poison)


# ----------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    caption: str
    points: int
    series: dict[str, list[Any]]


def _figure() -> tuple[Any, Any]:
    """A pyplot-free Figure (no global state, no display backend); imported here, not at module
    load, because every `fedmq` invocation imports this module to build its parser."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # the site image leaves the plotting stack out
        raise ConfigError("fedmq report needs matplotlib, which this installation leaves out (the site "
                          "image): run it from the full image, or pip install matplotlib") from exc

    fig = Figure(figsize=(7.5, 4.2), dpi=110, layout="tight")
    return fig, fig.add_subplot()


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this job's streams", ha="center", va="center", transform=ax.transAxes,
            color="#616161")


def plot_accuracy_time(data: ReportData, ax: Any) -> Plot:
    t = [p[1] for p in data.accuracy]
    acc = [p[2] for p in data.accuracy]
    ax.plot(t, acc, marker=".", color="#1565c0")
    ax.set(xlabel="seconds since job start", ylabel="test accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if not acc:
        _empty(ax, "evaluated versions")
    target = data.finished.get("seconds_to_target") if data.finished else None
    if target is not None:
        ax.axvline(target, color="#c62828", linestyle="--", linewidth=1, label=f"target reached at {target:.1f} s")
        ax.legend(loc="lower right")
    return Plot("accuracy_time", "Test accuracy vs wall time",
                "Held-out accuracy of each version as the coordinator evaluated it.", len(acc),
                {"t": t, "accuracy": acc})


def plot_accuracy_version(data: ReportData, ax: Any) -> Plot:
    v = [p[0] for p in data.accuracy]
    acc = [p[2] for p in data.accuracy]
    ax.plot(v, acc, marker=".", color="#6a1b9a")
    ax.set(xlabel="model version", ylabel="test accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if not acc:
        _empty(ax, "evaluated versions")
    return Plot("accuracy_version", "Test accuracy vs version",
                "Accuracy per model version: progress per aggregation step, independent of site speed.",
                len(acc), {"version": v, "accuracy": acc})


def plot_metrics(data: ReportData, ax: Any) -> Plot:
    """Every metric the job evaluates, central (solid) and federated (dashed), against version."""
    series: dict[str, Any] = {}
    for scope, style in (("central", "-"), ("federated", "--")):
        evs = sorted((e for e in data.evaluations if e.scope == scope), key=lambda e: e.version)
        for name in sorted({k for e in evs for k in e.metrics}):
            points = [(e.version, e.metrics[name]) for e in evs if name in e.metrics]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", label=f"{name} ({scope})")
            series[f"{scope}.{name}"] = {"version": [p[0] for p in points], "value": [p[1] for p in points]}
    ax.set(xlabel="model version", ylabel="metric value")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize="small")
    else:
        _empty(ax, "evaluated versions")
    return Plot("metrics", "Every metric vs version",
                "Each metric the job evaluates: central (the coordinator's test data, solid) and federated "
                "(the sites' sample-weighted reports, dashed).", sum(len(v["version"]) for v in series.values()),
                series)


def plot_staleness(data: ReportData, ax: Any) -> Plot:
    values = data.staleness
    if values:
        top = max(values)
        bins: Any = [b - 0.5 for b in range(top + 2)] if top <= 200 else 50  # one bar per tau while readable
        ax.hist(values, bins=bins, color="#ef6c00", edgecolor="white")
        if top <= 200:
            ax.set_xticks(range(0, top + 1, max(1, (top + 1) // 15)))
    else:
        _empty(ax, "folded updates")
    ax.set(xlabel="staleness τ (versions behind when folded)", ylabel="updates")
    ax.grid(alpha=0.3, axis="y")
    return Plot("staleness", "Staleness of folded updates",
                "How many versions old each update's base was when the aggregator folded it.",
                len(values), {"staleness": list(values)})


#: sites a per-site plot draws by name; past this it draws the most and the least active halves
#: (a plot with 1,000 labelled bars or rows is no plot anyone can read); the series keep all sites
MAX_SITES_DRAWN = 40


def drawn_sites(data: ReportData) -> tuple[list[str], str]:
    """The sites a per-site plot draws, and a caption note when some were left out."""
    sites = data.sites()
    if len(sites) <= MAX_SITES_DRAWN:
        return sites, ""
    published = Counter(u.site for u in data.updates.values())
    ranked = sorted(sites, key=lambda s: (-published[s], s))
    half = MAX_SITES_DRAWN // 2
    shown = ranked[:half] + ranked[-half:]
    return shown, (f" Of {len(sites)} sites, the {half} that published most and the {half} that published "
                   f"least are drawn (report.json has them all).")


def plot_sites(data: ReportData, ax: Any) -> Plot:
    everyone = data.sites()
    sites, note = drawn_sites(data)
    published = Counter(u.site for u in data.updates.values())
    xs = range(len(sites))
    ax.bar([x - 0.2 for x in xs], [published[s] for s in sites], width=0.4, label="published", color="#90caf9")
    ax.bar([x + 0.2 for x in xs], [data.applied_by_site[s] for s in sites], width=0.4, label="applied",
           color=APPLIED_COLOR)
    ax.set_xticks(list(xs), sites, rotation=45 if len(sites) > 6 else 0, ha="right" if len(sites) > 6 else "center")
    ax.set(ylabel="updates")
    ax.grid(alpha=0.3, axis="y")
    if sites:
        ax.legend()
    else:
        _empty(ax, "site updates")
    return Plot("sites", "Contribution per site",
                "Updates each site published, and how many of them were folded into a version." + note,
                len(everyone), {"site": everyone, "published": [published[s] for s in everyone],
                                "applied": [data.applied_by_site[s] for s in everyone]})


def plot_timeline(data: ReportData, ax: Any) -> Plot:
    sites, note = drawn_sites(data)
    row = {s: i for i, s in enumerate(sites)}
    ups = sorted(data.updates.values(), key=lambda u: u.ts)
    t0 = data.origin
    for applied, color, label in ((True, APPLIED_COLOR, "applied"), (False, PENDING_COLOR, "not applied")):
        sel = [u for u in ups if (u.update_id in data.applied) is applied and u.site in row]
        if not sel:
            continue
        ends = [u.ts - t0 for u in sel]
        ax.hlines([row[u.site] for u in sel], [e - u.seconds for e, u in zip(ends, sel, strict=True)], ends,
                  color=color, linewidth=4, alpha=0.6)
        ax.scatter(ends, [row[u.site] for u in sel], s=10, color=color, label=label, zorder=3)
    ax.set_yticks(range(len(sites)), sites)
    ax.set(xlabel="seconds since job start (bar = the task at the site, dot = update published)")
    ax.grid(alpha=0.3, axis="x")
    if ups:
        ax.legend(loc="upper left", fontsize="small")
    else:
        _empty(ax, "published updates")
    return Plot("timeline", "Update timeline",
                "Every update by site: when its task ran and when it was published; grey ones were "
                "never folded (dead-lettered or still in flight when the job ended)." + note,
                len(ups), {"site": [u.site for u in ups], "published_t": [u.ts - t0 for u in ups],
                           "task_seconds": [u.seconds for u in ups],
                           "applied": [u.update_id in data.applied for u in ups]})


def plot_dead_letters(data: ReportData, ax: Any) -> Plot:
    counts = Counter(data.dead_reasons)
    reasons = sorted(counts)
    if reasons:
        ax.bar(reasons, [counts[r] for r in reasons], color="#c62828")
    else:
        _empty(ax, "dead letters")
    ax.set(ylabel="messages")
    ax.grid(alpha=0.3, axis="y")
    return Plot("dead_letters", "Dead letters by reason",
                "Messages parked on the dead-letter stream, by the reason in their headers.",
                len(data.dead_reasons), {"reason": reasons, "count": [counts[r] for r in reasons]})


PLOTS: tuple[Callable[[ReportData, Any], Plot], ...] = (
    plot_accuracy_time, plot_accuracy_version, plot_metrics, plot_staleness, plot_sites, plot_timeline,
    plot_dead_letters,
)


# ----------------------------------------------------------------------------- page


@dataclass(frozen=True)
class ReportResult:
    out: Path
    html: Path
    plots: dict[str, Plot]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary, "out": str(self.out), "html": str(self.html),
                "plots": {n: {"file": str(self.out / f"{n}.png"), "points": p.points} for n, p in self.plots.items()}}


def _html(data: ReportData, plots: dict[str, Plot]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_cell(v))}</td></tr>" for k, v in data.summary().items())
    figs = "".join(
        f'<figure><h2>{esc(p.title)}</h2><img src="{esc(n)}.png" alt="{esc(p.title)}">'
        f"<figcaption>{esc(p.caption)} ({p.points} points)</figcaption></figure>"
        for n, p in plots.items()
    )
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedmq report: {esc(data.job)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#212121}}
table{{border-collapse:collapse}}th,td{{padding:.2em .8em;border-bottom:1px solid #e0e0e0;text-align:left}}
img{{max-width:100%}}figure{{margin:2em 0}}figcaption{{color:#616161}}</style></head>
<body><h1>fedmq job {esc(data.job)}</h1>
<p>Built from the job's events and dead-letter streams on {esc(made)}.</p>
<table>{rows}</table>{figs}
<p>Series behind every figure: <a href="report.json">report.json</a>.</p></body></html>
"""


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(data: ReportData, out: Path) -> ReportResult:
    """Draw every plot to `out`/<name>.png, then index.html and report.json beside them."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the directory ({exc.strerror})") from exc
    plots: dict[str, Plot] = {}
    for draw in PLOTS:
        fig, ax = _figure()
        plot = draw(data, ax)
        ax.set_title(plot.title)
        fig.savefig(out / f"{plot.name}.png")
        plots[plot.name] = plot
    page = out / "index.html"
    page.write_text(_html(data, plots))
    summary = data.summary()
    (out / "report.json").write_text(json.dumps(
        {"summary": summary, "plots": {n: {"points": p.points, "series": p.series} for n, p in plots.items()}},
        indent=1, default=str))
    return ReportResult(out, page, plots, summary)


# ----------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json

    result = write_report(collect(args.broker, args.job), Path(args.out))
    log.info("report written", extra={"job": args.job, "html": str(result.html)})
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.html)
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("report", help="plots and an HTML page of a job, from its streams alone")
    add_common(p)
    p.add_argument("--out", default=os.environ.get("FEDMQ_REPORT_OUT", "fedmq-report"),
                   help="directory for index.html, the PNGs and report.json (env FEDMQ_REPORT_OUT)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object (last line)")
    p.set_defaults(run=run)
