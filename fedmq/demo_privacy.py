"""`fedmq demo --privacy {none,dp,he}`: the demo's privacy arguments, job settings and summary.

Kept out of `fedmq.demo` so the differential-privacy and homomorphic halves each edit their own
branch. With ``--privacy dp`` every site trains under ``--dp`` (default: record-level DP-SGD) with
``--epsilon`` as its budget, calibrated to last ``--planned-tasks`` tasks; the result adds the
job's epsilon as spent (the worst site's, from the sites' own ledgers) and the refusals.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from fedmq.args import config_number
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import PrivacyConfig
from fedmq.shared.errors import ConfigError, MalformedMessageError
from fedmq.shared.messages import Event, EventKind
from fedmq.shared.privacy import NOISE_KEY_ENV

#: --dp choice -> [privacy] keys
DP_MECHANISMS: dict[str, dict[str, Any]] = {
    "sgd": {"mechanism": "dp_sgd"},
    "fedavg-local": {"mechanism": "dp_fedavg", "noise_at": "site"},
    "fedavg-central": {"mechanism": "dp_fedavg", "noise_at": "aggregator"},
}


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--privacy", default="none", choices=["none", "dp", "he"],
                   help="none; dp = differential privacy (see --dp, --epsilon); he = homomorphic aggregation")
    p.add_argument("--dp", default="sgd", choices=sorted(DP_MECHANISMS),
                   help="with --privacy dp: record-level DP-SGD at each site, or DP-FedAvg update noise "
                        "added at the site (local) or by the aggregator (central)")
    p.add_argument("--epsilon", type=config_number(PrivacyConfig, "epsilon"),
                   default=4.0, help="with --privacy dp: each site's epsilon budget")
    p.add_argument("--delta", type=config_number(PrivacyConfig, "delta"),
                   default=1e-5, help="with --privacy dp: delta of the budget")
    p.add_argument("--planned-tasks", type=config_number(PrivacyConfig, "planned_tasks"), default=20,
                   help="with --privacy dp: tasks per site the budget is calibrated to pay for")
    p.add_argument("--stop-when-spent", type=config_number(PrivacyConfig, "stop_when_spent"), default=0.5,
                   help="with --privacy dp: end the job once this fraction of the training sites has "
                        "spent its budget (the fast ones spend first; 1 = wait for the slowest)")


def apply_privacy(args: argparse.Namespace, work: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Add [privacy] (and what it requires of [strategy]) to the demo job's sections."""
    if args.privacy == "none":
        return
    if args.privacy == "he":
        return  # [encryption], the key pair and the key holder: fedmq/demo_keys.py
    if args.epsilon <= 0:
        raise ConfigError(f"--epsilon must be > 0, got {args.epsilon}")
    dp = dict(DP_MECHANISMS[args.dp])
    sections["privacy"] = {**dp, "epsilon": args.epsilon, "delta": args.delta,
                           "planned_tasks": args.planned_tasks, "stop_when_spent": args.stop_when_spent}
    if dp.get("noise_at") == "aggregator":
        # central noise bounds every update's weight by 1 and seals its seeds with a key of the job's
        sections["strategy"]["sample_weighted"] = False
        key = work / "dp-noise.key"
        if not key.exists():
            key.write_text(secrets.token_hex(32))
            key.chmod(0o600)
        os.environ.setdefault(NOISE_KEY_ENV, str(key))  # the aggregator children inherit it


def privacy_summary(url: str, job: str, args: argparse.Namespace) -> dict[str, Any]:
    """Extra fields of the demo result: the job's epsilon as spent and who refused tasks."""
    if args.privacy != "dp":
        return {"privacy": args.privacy} if args.privacy != "none" else {}
    site_eps: dict[str, float] = {}
    version_eps: float | None = None
    refused: set[str] = set()
    for d in read_stream(url, JobNames(job).events, "first", idle=0.3):
        try:
            ev = Event.decode(d.body)
        except MalformedMessageError:
            continue
        eps = ev.data.get("epsilon")
        if ev.event == EventKind.UPDATE_PUBLISHED and isinstance(eps, int | float):
            site_eps[ev.data["site"]] = max(float(eps), site_eps.get(ev.data["site"], 0.0))
        elif ev.event == EventKind.VERSION_PUBLISHED and isinstance(eps, int | float):
            version_eps = float(eps)
        elif ev.event == EventKind.TASK_REFUSED:
            refused.add(str(ev.data.get("site")))
    # sites' own ledgers when they noise (they count every release); the versions' account otherwise
    epsilon = max(site_eps.values()) if site_eps else version_eps
    return {"privacy": "dp", "dp_mechanism": DP_MECHANISMS[args.dp]["mechanism"],
            "noise_at": DP_MECHANISMS[args.dp].get("noise_at", "site"),
            "epsilon": None if epsilon is None else round(epsilon, 4), "epsilon_budget": args.epsilon,
            "delta": args.delta, "sites_refused": sorted(refused)}
