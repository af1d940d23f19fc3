"""What the coordinator publishes about a job's keys, and the key holder it may host.

v0's meta is the job's genesis record, read by every role (no role keeps job state in process memory):

* ``site_keys`` — the site registry {site: Ed25519 public key hex} from ``[signing] registry``;
  the aggregator then refuses unsigned or badly signed updates ("bad_signature");
* ``encryption`` — {scheme, context_sha256, slots, poly_modulus_degree, scale_bits,
  modulus_bits}, copied into every later version so each role can check the key it holds;
* ``he_public_context`` — the public CKKS context itself (0.36 MB), in v0 only: workers encrypt
  with it, aggregators add with it; it has no secret key.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fedmq.shared import he
from fedmq.shared.config import JobConfig
from fedmq.shared.errors import ConfigError, FedmqError
from fedmq.shared.signing import META_REGISTRY, load_registry

log = logging.getLogger(__name__)


def genesis_meta(cfg: JobConfig) -> dict[str, Any]:
    """The key material v0 carries; raises ConfigError for anything inconsistent, before start."""
    meta: dict[str, Any] = {}
    if cfg.signing.registry:
        registry = load_registry(cfg.signing.registry)
        if not registry:
            raise ConfigError(f"signing.registry {cfg.signing.registry} lists no site")
        meta[META_REGISTRY] = registry
    if cfg.encryption.enabled:
        if cfg.privacy.central:
            raise ConfigError("privacy.noise_at = \"aggregator\" needs the plaintext sum; with encryption "
                              "noise at the site (noise_at = \"site\") or use DP-SGD")
        he.check_strategy(cfg.strategy)
        public = he.read_file(cfg.encryption.public_context, "encryption.public_context")
        meta[he.META_ENCRYPTION] = he.encryption_meta(public)
        meta[he.META_PUBLIC_CONTEXT] = public
        if cfg.encryption.secret_context:
            secret = he.read_file(cfg.encryption.secret_context, "encryption.secret_context")
            _, sha = he.load_secret(secret)
            if sha != meta[he.META_ENCRYPTION]["context_sha256"]:
                raise ConfigError("encryption.secret_context and encryption.public_context are not one key pair")
    return meta


class HostedKeyHolder:
    """The key holder on a thread of the coordinator (``[encryption] secret_context`` set): one
    process fewer, at the price of the coordinator also being able to decrypt sums."""

    def __init__(self, url: str, job: str, secret_path: str) -> None:
        from fedmq.aggregator.keyholder import KeyHolder

        self.stop_event = threading.Event()
        self.holder = KeyHolder(url, job, he.read_file(secret_path, "encryption.secret_context"),
                                stop=self.stop_event, name="keyholder-coordinator")
        self.thread = threading.Thread(target=self._run, name=f"keyholder-{job}", daemon=True)
        self.error: FedmqError | None = None

    def _run(self) -> None:
        try:
            self.holder.run()
        except FedmqError as exc:
            self.error = exc
            log.error("hosted key holder stopped job=%s error=%s", self.holder.names.job, exc)

    def start(self) -> HostedKeyHolder:
        self.thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
