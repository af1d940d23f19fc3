"""Federated evaluation: what it costs in time to target, side by side with central evaluation.

Three settings of the default demo job (digits, 8 sites Dirichlet 0.5, 2 of them 5x slower,
FedBuff K=3, target 0.90), each `fedmq demo --json --example DIR` as real processes, DIR written
here as a user's own example would be:

* central only: the coordinator evaluates every version on its test data; sites train on all rows;
* central target, sites evaluate too: each site holds out 20 % of its rows and evaluates the version
  each task brings before training it (accuracy and loss), the coordinator folds the reports;
  the stop is still central test accuracy, so the difference is the sites' evaluation and their
  smaller training sets;
* federated only: no test data at the coordinator, the stop is the sites' sample-weighted
  accuracy on their held-out rows.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import Machine, table
from bench.time_to_accuracy import TARGET, Run, demo

EVALUATION = """
[evaluation]
federated = true
metrics = "accuracy,loss"
site_fraction = 0.2
min_sites = 2
"""

SETTINGS: list[tuple[str, str]] = [
    ("central only", ""),
    ("central target, sites evaluate too", EVALUATION),
    ("federated only (no test data)", "[demo]\ncentral_test = false\n" + EVALUATION + f"""
[model]
name = "mlp"
input_shape = "64"
num_classes = 10

[coordinator]
target_metric = "accuracy"
target_value = {TARGET}
target_source = "federated"
"""),
]


def _median(xs: list[float | None]) -> float | None:
    return None if not xs or any(x is None for x in xs) else statistics.median([x for x in xs if x is not None])


def run(url: str, quick: bool = False, repeats: int = 2) -> str:
    machine = Machine()
    repeats = 1 if quick else repeats
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-fedeval-") as tmp:
        for i in range(repeats):
            for k, (label, toml) in enumerate(SETTINGS):
                example = Path(tmp) / f"setting{k}"
                example.mkdir(exist_ok=True)
                (example / "example.toml").write_text(toml)
                print(f"bench: federated evaluation, {label}, run {i + 1}/{repeats}", file=sys.stderr, flush=True)
                runs.append(demo(url, label, "fedbuff", ["--example", str(example)], max_seconds=180.0))
    rows = [[r.label, "not reached" if r.seconds_to_target is None else f"{r.seconds_to_target:.1f} s",
             str(r.versions), str(r.updates_applied), r.metrics_source,
             " ".join(f"{k} {v:.3f}" for k, v in sorted(r.metrics.items()))] for r in runs]
    med = {label: _median([r.seconds_to_target for r in runs if r.label == label]) for label, _ in SETTINGS}
    base = med[SETTINGS[0][0]]
    ratios = [f"{label}: {'—' if m is None or not base else f'{m / base:.2f}x'}" for label, m in med.items()]
    return "\n\n".join([
        machine.note().markdown(),
        "The default demo job (digits, 8 sites Dirichlet 0.5, 2 of them 5x slower, FedBuff K=3, target "
        f"{TARGET:.2f}) in three settings, each run by `fedmq demo --json --example DIR` as real processes. "
        "\"sites evaluate too\" = `[evaluation] federated = true`, accuracy and loss on 20 % of each site's "
        "rows held out (the sites train on the other 80 %), evaluated on the version each task brings "
        "before training it; the stop stays central test accuracy. \"federated only\" has no test data at "
        "the coordinator and stops at the sites' sample-weighted held-out accuracy. Time to target from v0 "
        "(the coordinator's clock); metrics are those of the version handed over, from `metrics_source`.",
        table(["setting", f"to {TARGET:.2f}", "versions", "updates", "metrics from", "metrics"], rows),
        f"Median time to target against central only (same run, {repeats} run(s) each): " + "; ".join(ratios) + ".",
    ])
