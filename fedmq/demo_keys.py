"""`fedmq demo` key material: site signing keys (on by default) and, with ``--privacy he``, the
job's CKKS key pair and a key-holder process.

Kept out of `fedmq.demo` like `fedmq.demo_privacy`. Everything is written under the demo's work
directory, in ``keys/``: ``<job>.public.ctx`` goes into the job TOML (the coordinator publishes it
in v0), ``<job>.secret.ctx`` only to the `fedmq keyholder` process, ``site-<i>.key`` to worker i.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.shared import he
from fedmq.shared.signing import REGISTRY_FILE, generate_site_key


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign", action=argparse.BooleanOptionalAction, default=True,
                   help="give every site an Ed25519 key and the job a site registry (the aggregator "
                        "then dead-letters unsigned or altered updates as bad_signature)")


@dataclass
class DemoKeys:
    keyholder_secret: Path | None = None
    context_sha256: str | None = None
    site_keys: dict[str, Path] = field(default_factory=dict)

    def worker_args(self, site: str) -> list[str]:
        key = self.site_keys.get(site)
        return ["--key", str(key)] if key else []

    def summary(self) -> dict[str, Any]:
        """Extra fields of the demo result."""
        out: dict[str, Any] = {"signed": bool(self.site_keys)}
        if self.context_sha256:
            out.update(encryption="ckks", context_sha256=self.context_sha256)
        return out


def apply_keys(args: argparse.Namespace, work: Path, job: str, sites: list[str],
               sections: dict[str, dict[str, Any]]) -> DemoKeys:
    """Create the keys the demo's options ask for and add [encryption] / [signing] to the job."""
    keys = DemoKeys()
    out = work / "keys"
    if args.privacy == "he":
        files = he.write_keys(out, job, force=True)
        sections["encryption"] = {"scheme": "ckks", "public_context": str(files.public)}
        keys.keyholder_secret, keys.context_sha256 = files.secret, files.sha256
    if args.sign:
        for site in sites:
            keys.site_keys[site] = generate_site_key(out, site, force=True)[0]
        sections["signing"] = {"registry": str(out / REGISTRY_FILE)}
    return keys
