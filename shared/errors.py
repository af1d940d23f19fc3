"""Every error fedmq raises on purpose.

Hierarchy (the CLI maps `exit_code`; the aggregator maps `reason` onto dead letters)::

    FedmqError                      exit 1
    ├── ConfigError                 exit 2  bad flag, TOML key or env value
    ├── BrokerUnavailableError      exit 3  broker cannot be reached (URL printed, password masked)
    ├── BrokerAccessError           exit 3  credentials / permissions refused: never retried
    ├── JobNotFoundError            exit 4  the job's topology or v0 does not exist
    ├── SealedSeedError             exit 2  the DP noise key does not open a version's seed
    ├── TrainingFailedError         exit 1  a site's training raised on N tasks in a row
    ├── MalformedMessageError       reason "malformed"  bytes that are not a valid message
    │   └── CodecError              reason "malformed"  tensor map with bad dtype/shape/size
    └── InvalidUpdateError          reason given per subclass; the update is dead-lettered
        ├── WrongJobError           "wrong_job"
        ├── ShapeMismatchError      "shape_mismatch"
        ├── NonFiniteError          "non_finite"
        ├── NormBoundError          "norm_bound"
        ├── OutlierError            "outlier"
        ├── StaleUpdateError        "stale"
        ├── FutureVersionError      "future_version"
        ├── SignatureError          "bad_signature"
        ├── UnknownTaskError        "unknown_task"  no valid proof that the job issued its task
        ├── SiteMismatchError       "wrong_site"  the update's site is not the broker identity that sent it
        ├── EncryptionMismatchError "encryption_mismatch"  plaintext in a CKKS job or vice versa
        ├── CompressionMismatchError "compression_mismatch"  the update's compression is not the job's
        ├── CompressionError        "bad_compression"  a compressed delta that does not decode to the model
        └── PrivacyBudgetError      "privacy_budget"  also a site's reason to refuse a task
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base of all fedmq errors; `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(FedmqError):
    exit_code = 2


class BrokerUnavailableError(FedmqError):
    exit_code = 3


class BrokerAccessError(FedmqError):
    exit_code = 3


class JobNotFoundError(FedmqError):
    exit_code = 4


class MalformedMessageError(FedmqError):
    reason = "malformed"


class CodecError(MalformedMessageError):
    pass


class ServerStateError(MalformedMessageError):
    """A version's server-optimizer state does not fit its model (a corrupt or foreign version)."""

    reason = "server_state"


class InvalidUpdateError(FedmqError):
    """An update the aggregator refuses; `reason` becomes the dead-letter header."""

    reason = "invalid"


class WrongJobError(InvalidUpdateError):
    reason = "wrong_job"


class ShapeMismatchError(InvalidUpdateError):
    reason = "shape_mismatch"


class NonFiniteError(InvalidUpdateError):
    reason = "non_finite"


class NormBoundError(InvalidUpdateError):
    reason = "norm_bound"


class TrainingFailedError(FedmqError):
    """A site's training raised on several tasks in a row: the worker stops instead of failing
    every task it takes (each failure was reported as a task_failed event)."""


class OutlierError(InvalidUpdateError):
    """Far outside the running median of recent updates (strategy.outlier_factor)."""

    reason = "outlier"


class StaleUpdateError(InvalidUpdateError):
    reason = "stale"

    def __init__(self, update_id: str, tau: int, limit: int) -> None:
        super().__init__(
            f"update {update_id} is {tau} versions behind (limit {limit}); "
            "raise max_staleness or shorten local epochs"
        )
        self.tau = tau


class FutureVersionError(InvalidUpdateError):
    reason = "future_version"


class SignatureError(InvalidUpdateError):
    reason = "bad_signature"


class UnknownTaskError(InvalidUpdateError):
    """The update answers no task the job's coordinator issued (missing or forged task proof, or
    an update id that is not its task's): folding it would let a site multiply its weight."""

    reason = "unknown_task"


class SiteMismatchError(InvalidUpdateError):
    """The update names another site than the routing key it was published with; per-site topic
    permissions pin the routing key to the sender's broker user, so the body is lying."""

    reason = "wrong_site"


class EncryptionMismatchError(InvalidUpdateError):
    """A plaintext delta in a homomorphic job, a ciphertext in a plaintext one, or a ciphertext
    under another job's key: folding it would leak the delta or add garbage to the sum."""

    reason = "encryption_mismatch"


class CompressionMismatchError(InvalidUpdateError):
    """The update says it was compressed otherwise than the job's `strategy.compression` (or not at
    all): the job chooses how deltas travel, never the site."""

    reason = "compression_mismatch"


class CompressionError(InvalidUpdateError):
    """A compressed delta that cannot be the job's model delta: a tensor missing or extra, a wrong
    dtype or shape, or top-k indices that are duplicated, unsorted, out of range or too many."""

    reason = "bad_compression"


class PrivacyBudgetError(InvalidUpdateError):
    """The next release would take a site past its epsilon budget: the site refuses the task
    (TASK_REFUSED event) or, with central noise, the aggregator dead-letters the update."""

    reason = "privacy_budget"

    def __init__(self, site: str, spent: float, would_be: float, budget: float) -> None:
        super().__init__(f"site {site} has spent epsilon {spent:.4g}; the next task would bring it to "
                         f"{would_be:.4g} > budget {budget:.4g}; it takes no more tasks")
        self.site = site
        self.spent = spent
        self.would_be = would_be
        self.budget = budget


class SealedSeedError(FedmqError):
    """The DP noise key does not open a version's sealed seed (wrong key, or seed moved)."""

    exit_code = 2
