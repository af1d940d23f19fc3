"""Ed25519 signatures on updates and the job's site registry (site -> public key).

Why sign when the broker already authenticates users: the broker's `user_id` check proves who
*published*, not who *computed*; a signature travels with the update into the updates log, so an
auditor (or `fedmq replay`) can check every folded update long after the connection is gone, and
an update altered anywhere between the site and the aggregator fails verification.

The site signs `Update.signing_bytes()` (the whole message except the signature). Keys are files:
`<site>.key` (PKCS#8 PEM, mode 0600) stays at the site; `<site>.pub` (hex) and `registry.json`
(``{site: hex}``) go to the job's owner, who publishes the registry in v0's meta under
`META_REGISTRY`; the aggregator verifies against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.shared.broker import validate_site
from fedmq.shared.errors import ConfigError, SignatureError, SiteMismatchError, UnknownTaskError
from fedmq.shared.messages import META_REGISTRY, Task, Update, task_proof_bytes, update_id_for

#: v0's meta: the coordinator's task-signing public key (hex); every update must carry a proof
META_TASK_KEY = "task_key"
REGISTRY_FILE = "registry.json"


def public_hex(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def sign_update(update: Update, key: Ed25519PrivateKey) -> Update:
    """The same update with its signature set (covers delta or ciphertext, metrics, privacy)."""
    return dataclasses.replace(update, signature=key.sign(update.signing_bytes()))


def _public_key(hex_key: str, site: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as exc:
        raise ConfigError(f"registry key of site {site!r} is not a 32-byte Ed25519 key in hex: {exc}") from exc


def verify_update(update: Update, registry: Mapping[str, str]) -> None:
    """Raise `SignatureError` (dead-letter reason "bad_signature") unless the site's key signed it."""
    uid, site = update.update_id, update.site
    hex_key = registry.get(site)
    if hex_key is None:
        raise SignatureError(f"update {uid}: site {site!r} is not in the job's site registry")
    if not update.signature:
        raise SignatureError(f"update {uid} from {site!r} is unsigned; start the worker with --key")
    try:
        _public_key(hex_key, site).verify(update.signature, update.signing_bytes())
    except (InvalidSignature, ConfigError) as exc:
        raise SignatureError(f"update {uid}: signature does not verify against {site!r}'s key "
                             f"(altered in transit, or signed with another key): {exc or 'invalid'}") from exc


# --------------------------------------------------------------------------- task proofs
#
# Why: the aggregator is stateless and cannot ask the coordinator which tasks exist. The
# coordinator signs each task it issues; the update carries that signature back. A site cannot
# invent tasks (it has no key) nor reuse one task's proof under other update ids (the id is
# derived from the task id), so every issued task yields at most one update and nothing else
# counts. Replay checks the same proof from the updates log, years later.


def sign_task(task: Task, key: Ed25519PrivateKey) -> Task:
    return dataclasses.replace(task, signature=key.sign(task.proof_bytes()))


def verify_task_proof(update: Update, task_key_hex: str) -> None:
    """Raise `UnknownTaskError` (dead-letter reason "unknown_task") unless `update` answers a task
    the job's coordinator issued, from the version that task named, under the task's own id."""
    uid = update.update_id
    if uid != update_id_for(update.task_id):
        raise UnknownTaskError(f"update {uid} does not carry the id of its task {update.task_id}")
    if not update.task_proof:
        raise UnknownTaskError(f"update {uid} carries no task proof: it answers no task this job issued")
    try:
        _public_key(task_key_hex, "coordinator").verify(
            update.task_proof, task_proof_bytes(update.job, update.task_id, update.base_version))
    except (InvalidSignature, ConfigError) as exc:
        raise UnknownTaskError(f"update {uid}: task {update.task_id} at version {update.base_version} was "
                               f"never issued by this job's coordinator ({exc or 'proof does not verify'})") from exc


@dataclass(frozen=True)
class JobTrust:
    """What v0 says an update must prove: a site registry (signatures) and a task key (proofs).

    A job without them (built by hand, e.g. in tests) checks neither; `fedmq coordinator` always
    publishes a task key."""

    registry: Mapping[str, str] | None = None
    task_key: str | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> JobTrust:
        registry, task_key = meta.get(META_REGISTRY), meta.get(META_TASK_KEY)
        return cls(registry if isinstance(registry, dict) and registry else None,
                   task_key if isinstance(task_key, str) and task_key else None)

    def verify(self, update: Update, routing_key: str | None) -> None:
        """Sender identity first (cheapest, and what the broker pinned), then task, then signature."""
        if routing_key is not None and routing_key != update.site:
            raise SiteMismatchError(f"update {update.update_id} names site {update.site!r} but was "
                                    f"published by {routing_key[:64]!r}")
        if self.task_key is not None:
            verify_task_proof(update, self.task_key)
        if self.registry is not None:
            verify_update(update, self.registry)


def load_or_create_task_key(path: str | Path, *, create: bool) -> Ed25519PrivateKey:
    """The coordinator's task-signing key: created (0600) for a new job, loaded on every restart."""
    p = Path(path)
    if not p.exists():
        if not create:
            raise ConfigError(f"task key {p} is missing: this job's coordinator created it when the job "
                              "started; restore it (or point [coordinator] task_key at it) to resume")
        p.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        _write_private(p, key)
        return key
    return load_private_key(p)


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


# --------------------------------------------------------------------------- files


def generate_site_key(out_dir: str | Path, site: str, *, force: bool = False) -> tuple[Path, str]:
    """Write <site>.key (0600) and <site>.pub, add the site to registry.json; return (key path, hex)."""
    validate_site(site)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / f"{site}.key"
    if key_path.exists() and not force:
        raise ConfigError(f"{key_path} exists already; pass --force to replace the site's key")
    key = Ed25519PrivateKey.generate()
    _write_private(key_path, key)
    hex_key = public_hex(key)
    (out / f"{site}.pub").write_text(hex_key + "\n")
    reg_path = out / REGISTRY_FILE
    registry = load_registry(reg_path) if reg_path.exists() else {}
    registry[site] = hex_key
    reg_path.write_text(json.dumps(dict(sorted(registry.items())), indent=2) + "\n")
    return key_path, hex_key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"site key {p} does not exist (create it with `fedmq keys --site NAME --out DIR`)")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"site key {p} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"site key {p} is a {type(key).__name__}, not Ed25519")
    return key


def check_registry(registry: Mapping[str, object], source: str) -> dict[str, str]:
    """Site names valid, every key a 32-byte Ed25519 public key in hex."""
    out: dict[str, str] = {}
    for site, hex_key in registry.items():
        try:
            validate_site(site)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        if not isinstance(hex_key, str):
            raise ConfigError(f"{source}: key of site {site!r} must be a hex string")
        _public_key(hex_key, site)
        out[site] = hex_key
    return out


def load_registry(path: str | Path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"site registry {p} does not exist (fedmq keys --site NAME --out DIR writes it)")
    try:
        raw = json.loads(p.read_text())
    except ValueError as exc:
        raise ConfigError(f"site registry {p} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"site registry {p} must be a JSON object site -> public key hex")
    return check_registry(raw, str(p))
