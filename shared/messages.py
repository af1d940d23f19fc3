"""The messages that cross the broker: ModelVersion, Task, Update, Event.

Each is a frozen dataclass with a ``schema`` number and strict ``decode``: a missing field, an
unknown field, a wrong type or a newer schema raises `MalformedMessageError` naming the field, so
the aggregator can dead-letter it with a precise reason. Every message carries what a replay needs
(no process memory): a version names its parent, its strategy and the ordered update ids folded in.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import numpy as np

from shared.codec import Weights, decode_tensors, encode_tensors, pack, unpack, weights_sha256
from shared.errors import MalformedMessageError

SCHEMA = 1

_NUM = (int, float)
T = TypeVar("T", bound="_Message")


class _Message:
    """Shared strict encode/decode; subclasses list their field types in `_types`."""

    _types: ClassVar[dict[str, tuple[type, ...]]]
    _tensor_fields: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._tensor_fields and value is not None:
                value = encode_tensors(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def encode(self) -> bytes:
        return pack(self.to_dict())

    @classmethod
    def from_dict(cls: type[T], obj: dict[str, Any]) -> T:
        name = cls.__name__
        schema = obj.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise MalformedMessageError(f"{name}: field 'schema' missing or not an int")
        if schema > SCHEMA:
            raise MalformedMessageError(
                f"{name}: schema {schema} is newer than this fedmq understands ({SCHEMA}); upgrade fedmq"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(obj) - set(known)
        if unknown:
            raise MalformedMessageError(f"{name}: unknown field(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for fname, f in known.items():
            if fname not in obj:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MalformedMessageError(f"{name}: field {fname!r} is missing")
                continue
            value = obj[fname]
            types = cls._types[fname]
            if value is None and type(None) in types:
                kwargs[fname] = None
                continue
            if fname in cls._tensor_fields:
                kwargs[fname] = decode_tensors(value)
                continue
            if isinstance(value, bool) and bool not in types:
                raise MalformedMessageError(f"{name}: field {fname!r} is a bool")
            if not isinstance(value, types):
                raise MalformedMessageError(
                    f"{name}: field {fname!r} is {type(value).__name__}, expected "
                    + "/".join(t.__name__ for t in types)
                )
            kwargs[fname] = tuple(value) if isinstance(value, list) and tuple in types else value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise MalformedMessageError(f"{name}: {exc}") from exc

    @classmethod
    def decode(cls: type[T], body: bytes) -> T:
        return cls.from_dict(unpack(body))


@dataclass(frozen=True, slots=True)
class ModelVersion(_Message):
    """One entry of the models stream. v0 has parent -1 and no included updates."""

    job: str
    version: int
    parent: int
    weights: Weights
    included: tuple[str, ...]
    strategy: str
    params: dict[str, Any]
    model: dict[str, Any]
    sha256: str
    #: per included update, in the same order: site, base_version, staleness, weight, samples.
    contributions: tuple[dict[str, Any], ...] = ()
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    kind: ClassVar[str] = "model_version"
    _tensor_fields: ClassVar[tuple[str, ...]] = ("weights",)
    _types: ClassVar[dict[str, tuple[type, ...]]] = {
        "job": (str,), "version": (int,), "parent": (int,), "weights": (dict,),
        "included": (list, tuple), "strategy": (str,), "params": (dict,), "model": (dict,),
        "sha256": (str,), "contributions": (list, tuple), "created_at": _NUM, "meta": (dict,),
        "schema": (int,),
    }

    def __post_init__(self) -> None:
        if self.version < 0 or self.parent >= self.version:
            raise ValueError(f"version {self.version} with parent {self.parent} is not a forward step")

    def verify_hash(self) -> bool:
        return weights_sha256(self.weights) == self.sha256


@dataclass(frozen=True, slots=True)
class Task(_Message):
    """A unit of local training. `model_offset` lets a worker seek straight to the version."""

    job: str
    task_id: str
    version: int
    epochs: int
    batch_size: int
    lr: float
    issued_at: float
    deadline: float
    model_offset: int | None = None
    mu: float = 0.0
    #: site-side options the coordinator sets for the whole job (e.g. DP parameters).
    options: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    kind: ClassVar[str] = "task"
    _types: ClassVar[dict[str, tuple[type, ...]]] = {
        "job": (str,), "task_id": (str,), "version": (int,), "epochs": (int,), "batch_size": (int,),
        "lr": _NUM, "issued_at": _NUM, "deadline": _NUM, "model_offset": (int, type(None)),
        "mu": _NUM, "options": (dict,), "schema": (int,),
    }

    @property
    def update_id(self) -> str:
        """Derived from the task alone, so a redelivered task yields the same update id."""
        return f"u-{self.task_id}"


@dataclass(frozen=True, slots=True)
class Update(_Message):
    """A site's contribution: delta = local weights - base weights (or its ciphertext)."""

    job: str
    update_id: str
    task_id: str
    site: str
    base_version: int
    num_samples: int
    delta: Weights | None
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    #: homomorphic payload: {"scheme": "ckks", "chunks": [bytes], ...}; delta is None then.
    ciphertext: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    signature: bytes = b""
    schema: int = SCHEMA

    kind: ClassVar[str] = "update"
    _tensor_fields: ClassVar[tuple[str, ...]] = ("delta",)
    _types: ClassVar[dict[str, tuple[type, ...]]] = {
        "job": (str,), "update_id": (str,), "task_id": (str,), "site": (str,),
        "base_version": (int,), "num_samples": (int,), "delta": (dict, type(None)),
        "metrics": (dict,), "privacy": (dict,), "ciphertext": (dict, type(None)),
        "created_at": _NUM, "signature": (bytes,), "schema": (int,),
    }

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if (self.delta is None) == (self.ciphertext is None):
            raise ValueError("exactly one of delta and ciphertext must be set")

    def signing_bytes(self) -> bytes:
        """What the site signs: the whole message except the signature itself."""
        d = self.to_dict()
        d.pop("signature")
        return pack(d)


@dataclass(frozen=True, slots=True)
class EncryptedAggregate(_Message):
    """A homomorphic job's next version, still encrypted: the aggregator's output, the key holder's input.

    `chunks` = sum_k multiplier_k * ciphertext_k (CKKS, in `included` order); the key holder turns
    it into ModelVersion `version` = parent + lr * decrypt(chunks) / denominator. Multipliers are
    s(tau_k) * m_k / sample_ref (sample_ref = the first update's sample count keeps the weighted sum
    inside CKKS's headroom); each contribution records its multiplier so replay can recompute the
    sum bit-for-bit with the public context alone (`ciphertext_sha256`).
    """

    job: str
    aggregate_id: str
    version: int
    parent: int
    included: tuple[str, ...]
    contributions: tuple[dict[str, Any], ...]
    strategy: str
    params: dict[str, Any]
    denominator: float
    sample_ref: float
    context_sha256: str
    size: int
    chunks: tuple[bytes, ...]
    ciphertext_sha256: str
    created_at: float = field(default_factory=time.time)
    schema: int = SCHEMA

    kind: ClassVar[str] = "encrypted_aggregate"
    _types: ClassVar[dict[str, tuple[type, ...]]] = {
        "job": (str,), "aggregate_id": (str,), "version": (int,), "parent": (int,),
        "included": (list, tuple), "contributions": (list, tuple), "strategy": (str,), "params": (dict,),
        "denominator": _NUM, "sample_ref": _NUM, "context_sha256": (str,), "size": (int,),
        "chunks": (list, tuple), "ciphertext_sha256": (str,), "created_at": _NUM, "schema": (int,),
    }

    def __post_init__(self) -> None:
        if self.version != self.parent + 1:
            raise ValueError(f"aggregate for version {self.version} must have parent {self.version - 1}")
        if not all(isinstance(c, bytes) for c in self.chunks):
            raise ValueError("chunks must be bytes")


class EventKind(StrEnum):
    JOB_STARTED = "job_started"
    TASK_ISSUED = "task_issued"
    TASK_REFUSED = "task_refused"
    UPDATE_PUBLISHED = "update_published"
    VERSION_PUBLISHED = "version_published"
    VERSION_EVALUATED = "version_evaluated"
    DEAD_LETTERED = "dead_lettered"
    #: a replica started receiving updates (single-active-consumer chose it); data: replica, takeover
    AGGREGATOR_ACTIVE = "aggregator_active"
    #: homomorphic jobs: the aggregator handed an encrypted sum to the key holder
    AGGREGATE_PUBLISHED = "aggregate_published"
    JOB_FINISHING = "job_finishing"
    JOB_FINISHED = "job_finished"


@dataclass(frozen=True, slots=True)
class Event(_Message):
    """Progress record on the events stream; the coordinator's journal and the monitor's feed."""

    job: str
    event: str
    source: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    schema: int = SCHEMA

    kind: ClassVar[str] = "event"
    _types: ClassVar[dict[str, tuple[type, ...]]] = {
        "job": (str,), "event": (str,), "source": (str,), "data": (dict,), "ts": _NUM,
        "schema": (int,),
    }


def make_version(
    *,
    job: str,
    version: int,
    parent: int,
    weights: Weights,
    included: list[str] | tuple[str, ...],
    strategy: str,
    params: dict[str, Any],
    model: dict[str, Any],
    contributions: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
    meta: dict[str, Any] | None = None,
) -> ModelVersion:
    """Build a ModelVersion with its sha256 computed from the weights."""
    weights = {k: np.asarray(v) for k, v in weights.items()}
    return ModelVersion(
        job=job, version=version, parent=parent, weights=weights, included=tuple(included),
        strategy=strategy, params=dict(params), model=dict(model), sha256=weights_sha256(weights),
        contributions=tuple(contributions), meta=dict(meta or {}),
    )
