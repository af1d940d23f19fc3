"""`fedmq export`: one version of a job's model as a PyTorch state_dict, from the models stream alone.

No process of the job and no model code is needed: a ModelVersion carries its weights in
state_dict order, so the file is ``{name: tensor}`` that ``model.load_state_dict(torch.load(f))``
accepts for the model its spec names. The version's hash is checked before anything is written,
and a JSON file beside the model records where it came from (version, sha256, strategy, updates).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.history import StreamCursor, decode_or_none
from fedmq.shared.broker import JobNames
from fedmq.shared.errors import ConfigError, FedmqError, JobNotFoundError
from fedmq.shared.jobstate import PoisonCounter
from fedmq.shared.messages import ModelVersion


class CorruptVersionError(FedmqError):
    """The stream's weights do not hash to the version's sha256: nothing is exported."""


@dataclass(frozen=True)
class Exported:
    job: str
    version: int
    sha256: str
    path: Path
    meta_path: Path
    #: models-stream entries that are no ModelVersion (skipped while looking for the version)
    unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "version": self.version, "sha256": self.sha256, "out": str(self.path),
                "meta": str(self.meta_path), "unreadable": self.unreadable}


def find_in_stream(url: str, job: str, version: int | None,
                   poison: PoisonCounter | None = None) -> ModelVersion:
    """Version `version` (None: the newest), scanning the models stream once up to its tail;
    entries that are no version are skipped and counted in `poison`."""
    names = JobNames(job)
    found: ModelVersion | None = None
    with StreamCursor(url, names.models, name=f"fedmq-export-{job}", prefetch=4) as cur:
        for d in cur:
            mv = decode_or_none(ModelVersion, d)
            if mv is None:
                if poison is not None:
                    poison.note("model_unreadable", names.models, d.stream_offset)
                continue
            if version is None:
                if found is None or mv.version >= found.version:
                    found = mv
            elif mv.version == version:
                found = mv  # a republished version keeps the latest entry
        first = cur.first_offset
    if found is None:
        if version is None:
            raise JobNotFoundError(f"job {job} has no model version on the broker")
        hint = " (history truncated by retention)" if first else ""
        raise JobNotFoundError(f"job {job}: version {version} is not in the models stream{hint}")
    return found


def export_version(url: str, job: str, version: int | None, out: str | Path) -> Exported:
    import torch

    poison = PoisonCounter("export", job)
    mv = find_in_stream(url, job, version, poison)
    if not mv.verify_hash():
        raise CorruptVersionError(f"job {job} v{mv.version}: the weights do not hash to the recorded "
                                  "sha256; run `fedmq replay` to see where the history breaks")
    path = Path(out)
    if path.is_dir():
        path = path / f"{job}-v{mv.version}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in mv.weights.items())
        torch.save(state, path)
        meta_path = path.with_suffix(".json")
        meta_path.write_text(json.dumps({
            "job": job, "version": mv.version, "parent": mv.parent, "sha256": mv.sha256,
            "model": mv.model, "strategy": mv.strategy, "params": mv.params,
            "included": list(mv.included), "created_at": mv.created_at,
        }, indent=2, default=str))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return Exported(job, mv.version, mv.sha256, path, meta_path, poison.total)


def _version(value: str) -> int | None:
    if value == "latest":
        return None
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"version must be a number or 'latest', got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"version must be >= 0, got {v}")
    return v


def cmd_export(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json

    done = export_version(args.broker, args.job, args.version, args.out)
    if args.json:
        print_json(done.to_dict())
    else:
        print(f"job {done.job} v{done.version} (sha256 {done.sha256[:16]}) -> {done.path}")
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("export", help="one model version as a PyTorch state_dict, from the models stream",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p)
    p.add_argument("--version", type=_version, default=None, help="version number or 'latest' (default)")
    p.add_argument("--out", required=True, help="file (model.pt) or directory for <job>-v<N>.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object (the last stdout line)")
    p.set_defaults(run=cmd_export)
