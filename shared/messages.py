"""The messages that cross the broker: ModelVersion, Task, Update, Event.

Each is a frozen dataclass with a ``schema`` number and strict ``decode``: a missing field, an
unknown field, a wrong type or a newer schema raises `MalformedMessageError` naming the field, so
the aggregator can dead-letter it with a precise reason. Every message carries what a replay needs
(no process memory): a version names its parent, its strategy and the ordered update ids folded in.

Two wire forms (shared.codec): a ModelVersion or Update of schema 4 (`FRAMED_SCHEMA`, what this
release writes) travels framed, a msgpack header then the raw tensor bytes, decoded to zero-copy
views; every other message, and every message the previous release wrote (schema 1-3), is
one msgpack map. `decode` reads both, and the form is bound to the schema (a framed body must
say schema 4, a map body of these two kinds must not), so a decoded message's schema tells how
it travelled and which signing bytes its signature covers (`Update.signing_bytes`). A reader of
the previous release cannot read a framed body (it dead-letters it as "not msgpack"): upgrade
every role of a job together; jobs it wrote replay and resume as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedmq.shared.codec import (
    Weights,
    decode_tensors,
    encode_tensors,
    is_framed,
    pack,
    pack_frame,
    tensor_digests,
    unpack,
    unpack_frame,
    weights_sha256,
)
from fedmq.shared.errors import MalformedMessageError
from fedmq.shared.parts import MAX_MESSAGE_BYTES

#: the newest schema this fedmq reads. A message is written with the oldest schema that holds it,
#: so a reader one release behind still reads every message that uses nothing new: 1 is the base,
#: 2 a ModelVersion with a server optimizer's state (`server_state`, absent from the body otherwise),
#: 3 an Update with a compressed delta (`compression`, absent otherwise) in the map form,
#: 4 (`FRAMED_SCHEMA`) a ModelVersion or Update in the framed form (tensors as raw bytes after a
#: header, shared.codec), which is what this release writes for both, compressed or not: a reader
#: of schema <= 3 cannot read it. Task, Event and EncryptedAggregate stay schema 1 maps.
SCHEMA = 4
BASE_SCHEMA = 1
FRAMED_SCHEMA = 4
#: the schema a compressed update is written with: framed, like every update this release writes
#: (schema 3, the map form with `compression`, is still read)
COMPRESSED_UPDATE_SCHEMA = FRAMED_SCHEMA

T = TypeVar("T", bound="_Message")

#: ids a sender chooses (task, update, aggregate): short, printable, safe in a header or a log line
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # job and site names (shared.broker too)
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_INT = 2**53  # counts and versions; also exact in a float64 (JSON readers, Prometheus)
MAX_LIST = 100_000
MAX_DEPTH = 8
MB = 2**20
#: v0's meta: the site registry {site: Ed25519 public key hex} (shared/signing.py verifies with
#: it; shared/broker.py gives each of its sites an updates queue)
META_REGISTRY = "site_keys"


# --------------------------------------------------------------------------- field checks
#
# Each check takes (message name, field name, value) and returns the value to store or raises
# MalformedMessageError: types are exact (an int is not a bool or a float) and every size is
# bounded, so a decoded message is safe to use without further type checks.

Check = Callable[[str, str, Any], Any]


def _bad(msg: str, name: str, text: str) -> MalformedMessageError:
    return MalformedMessageError(f"{msg}: field {name!r} {text}")


def _type_error(msg: str, name: str, value: Any, expected: str) -> MalformedMessageError:
    if isinstance(value, bool):
        return _bad(msg, name, "is a bool")
    return _bad(msg, name, f"is {type(value).__name__}, expected {expected}")


def integer(lo: int = 0, hi: int = MAX_INT) -> Check:
    def check(msg: str, name: str, value: Any) -> int:
        if type(value) is not int:
            raise _type_error(msg, name, value, "int")
        if not lo <= value <= hi:
            raise _bad(msg, name, f"is {value}, outside [{lo}, {hi}]")
        return value
    return check


def number(lo: float = -math.inf, hi: float = math.inf) -> Check:
    """A finite float (an int is accepted and kept exact; a bool is not)."""
    def check(msg: str, name: str, value: Any) -> float:
        if type(value) not in (int, float):
            raise _type_error(msg, name, value, "int/float")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise _bad(msg, name, f"is {value}, not a finite number in [{lo}, {hi}]")
        return value
    return check


def text(pattern: re.Pattern[str] | None = None, max_len: int = 256) -> Check:
    def check(msg: str, name: str, value: Any) -> str:
        if type(value) is not str:
            raise _type_error(msg, name, value, "str")
        if len(value) > max_len:
            raise _bad(msg, name, f"has {len(value)} characters, at most {max_len}")
        if pattern is not None and not pattern.match(value):
            raise _bad(msg, name, f"{value[:40]!r} does not match {pattern.pattern}")
        return value
    return check


def binary(max_len: int) -> Check:
    def check(msg: str, name: str, value: Any) -> bytes:
        if type(value) is not bytes:
            raise _type_error(msg, name, value, "bytes")
        if len(value) > max_len:
            raise _bad(msg, name, f"has {len(value)} bytes, at most {max_len}")
        return value
    return check


def list_of(item: Check, max_items: int = MAX_LIST) -> Check:
    """A list (stored as a tuple) of at most `max_items`, each passing `item`."""
    def check(msg: str, name: str, value: Any) -> tuple[Any, ...]:
        if type(value) not in (list, tuple):
            raise _type_error(msg, name, value, "list")
        if len(value) > max_items:
            raise _bad(msg, name, f"has {len(value)} items, at most {max_items}")
        return tuple(item(msg, f"{name}[{i}]", v) for i, v in enumerate(value))
    return check


def id_list(max_items: int = MAX_LIST) -> Check:
    return list_of(text(ID_RE, 128), max_items)


def bytes_list(max_items: int = MAX_LIST) -> Check:
    def check(msg: str, name: str, value: Any) -> tuple[bytes, ...]:
        if type(value) not in (list, tuple):
            raise _type_error(msg, name, value, "list")
        if len(value) > max_items or not all(type(v) is bytes for v in value):
            raise _bad(msg, name, f"must be a list of at most {max_items} byte strings")
        return tuple(value)
    return check


def plain(max_items: int = MAX_LIST, *, allow_bytes: bool = True) -> Check:
    """A free-form map (params, meta, metrics, event data): str keys, plain values only.

    Plain means None, bool, int (64-bit), float (not NaN), str, bytes (if allowed), list, map,
    nested at most MAX_DEPTH deep; a reader may then use any value without a type surprise
    beyond these few types."""
    def check(msg: str, name: str, value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _type_error(msg, name, value, "dict")
        count = [0]
        _plain_value(value, msg, name, 0, count, max_items, allow_bytes)
        return value
    return check


def _plain_value(value: Any, msg: str, path: str, depth: int, count: list[int], max_items: int,
                 allow_bytes: bool) -> None:
    count[0] += 1
    if count[0] > max_items:
        raise _bad(msg, path, f"holds more than {max_items} values")
    kind = type(value)
    if value is None or kind in (bool, str):
        return
    if kind is int:
        if not -2**63 <= value < 2**64:
            raise _bad(msg, path, "holds an integer outside 64 bits")
        return
    if kind is float:
        if math.isnan(value):
            raise _bad(msg, path, "holds NaN")
        return
    if kind is bytes and allow_bytes:
        return
    if kind not in (dict, list):
        raise _bad(msg, path, f"holds a {kind.__name__}")
    if depth >= MAX_DEPTH:
        raise _bad(msg, path, f"is nested deeper than {MAX_DEPTH}")
    if kind is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise _bad(msg, path, f"has a {type(k).__name__} key")
            _plain_value(v, msg, f"{path}.{k[:40]}", depth + 1, count, max_items, allow_bytes)
    else:
        for i, v in enumerate(value):
            _plain_value(v, msg, f"{path}[{i}]", depth + 1, count, max_items, allow_bytes)


def plain_list(max_items: int = MAX_LIST) -> Check:
    """A list of free-form maps (a version's contributions)."""
    return list_of(plain(64), max_items)


def tensors(msg: str, name: str, value: Any) -> Weights:
    return decode_tensors(value)


def optional(check: Check) -> Check:
    def opt(msg: str, name: str, value: Any) -> Any:
        return None if value is None else check(msg, name, value)
    return opt


_ANY_TIME = number(0.0, 1e11)  # seconds since the epoch, until the year 5138


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    known: frozenset[str]
    #: fields without a default
    required: frozenset[str]
    #: per field in order: name, its check, a tensor field
    checks: tuple[tuple[str, Check, bool], ...]




_LAYOUTS: dict[type, _Layout] = {}


class _Message:
    """Shared strict encode/decode; subclasses list a check per field in `_fields`.

    `decode` is total: for any byte string it returns a valid message or raises
    `MalformedMessageError` naming the field, never another exception."""

    _fields: ClassVar[dict[str, Check]]
    _tensor_fields: ClassVar[tuple[str, ...]] = ()
    #: fields schema 1 did not have: left out of the body when unset
    _since_schema_2: ClassVar[tuple[str, ...]] = ()
    #: largest body of this kind that is decoded at all
    max_body: ClassVar[int] = MAX_MESSAGE_BYTES  # a message in parts may be this big (shared.parts)
    kind: ClassVar[str]

    @classmethod
    def _layout(cls) -> _Layout:
        """Field names in order and the required ones, computed once per class: `dataclasses.fields`
        took a sixth of a small update's encode + decode."""
        layout = _LAYOUTS.get(cls)
        if layout is None:
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]
            layout = _Layout(
                tuple(f.name for f in fields), frozenset(f.name for f in fields),
                frozenset(f.name for f in fields
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING),
                tuple((f.name, cls._fields[f.name], f.name in cls._tensor_fields) for f in fields))
            _LAYOUTS[cls] = layout
        return layout

    def _fields_in_order(self, *, tensors_as: Callable[[Weights], Any] | None) -> dict[str, Any]:
        """The message's map: tuples as lists, unset newer fields left out, each tensor field's
        value passed through `tensors_as` (None: left as arrays, for `pack_frame`)."""
        out: dict[str, Any] = {}
        for name in self._layout().names:
            value = getattr(self, name)
            if value is None and name in self._since_schema_2:
                continue  # absent, so a schema-1 reader reads the message
            if name in self._tensor_fields and value is not None:
                value = value if tensors_as is None else tensors_as(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """The map form's content (tensors as `{dtype, shape, data}` specs viewing the arrays)."""
        return self._fields_in_order(tensors_as=encode_tensors)

    @property
    def framed(self) -> bool:
        """True if this message travels (or travelled) in the framed form."""
        return bool(self._tensor_fields) and self.schema >= FRAMED_SCHEMA  # type: ignore[attr-defined]

    def encode(self) -> bytes:
        if self.framed:
            return pack_frame(self._fields_in_order(tensors_as=None), self._tensor_fields)
        return pack(self.to_dict())

    @classmethod
    def from_dict(cls: type[T], obj: dict[str, Any]) -> T:
        """A message from the map form's content (tensor fields as specs)."""
        return cls._from_fields(obj, framed=False)

    @classmethod
    def _from_fields(cls: type[T], obj: dict[str, Any], *, framed: bool) -> T:
        """`framed`: `obj` is a frame's header, its tensor fields already decoded and checked."""
        name = cls.__name__
        layout = cls._layout()
        unknown = obj.keys() - layout.known  # a key that is not a str is never known
        if unknown:
            if not all(type(k) is str for k in unknown):
                raise MalformedMessageError(f"{name}: a top-level key is not a string")
            raise MalformedMessageError(f"{name}: unknown field(s) {sorted(k[:40] for k in unknown)[:8]}")
        schema = obj.get("schema")
        if type(schema) is not int:
            raise MalformedMessageError(f"{name}: field 'schema' missing or not an int")
        if schema > SCHEMA:
            raise MalformedMessageError(
                f"{name}: schema {schema} is newer than this fedmq understands ({SCHEMA}); upgrade fedmq"
            )
        # the form is bound to the schema: a decoded message's schema says how it travelled, and so
        # which bytes its signature covers (Update.signing_bytes)
        if framed and schema < FRAMED_SCHEMA:
            raise MalformedMessageError(f"{name}: a framed body says schema {schema}; framed bodies are "
                                        f"schema {FRAMED_SCHEMA} or newer")
        if not framed and cls._tensor_fields and schema >= FRAMED_SCHEMA:
            raise MalformedMessageError(f"{name}: a msgpack map body says schema {schema}; from schema "
                                        f"{FRAMED_SCHEMA} on a {name} travels framed")
        missing = layout.required - obj.keys()
        if missing:
            first = next(f for f in layout.names if f in missing)
            raise MalformedMessageError(f"{name}: field {first!r} is missing")
        # one comprehension, checks in field order (framed: a tensor field's views were checked by
        # unpack_frame, or it is None)
        kwargs = {fname: obj[fname] if framed and is_tensor else check(name, fname, obj[fname])
                  for fname, check, is_tensor in layout.checks if fname in obj}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise MalformedMessageError(f"{name}: {exc}") from exc

    @classmethod
    def decode(cls: type[T], body: bytes) -> T:
        """Either form, by the body's first bytes; the framed form only for kinds with tensors."""
        if cls._tensor_fields and is_framed(body):
            return cls._from_fields(unpack_frame(body, cls._tensor_fields, cls.max_body), framed=True)
        return cls.from_dict(unpack(body, cls.max_body))


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
    #: a server optimizer's moments after this version's step (`m:<param>`, `v:<param>`), so a
    #: replica taking over and replay continue from the published state; None without one
    server_state: Weights | None = None
    schema: int = FRAMED_SCHEMA

    kind: ClassVar[str] = "model_version"
    _tensor_fields: ClassVar[tuple[str, ...]] = ("weights", "server_state")
    _since_schema_2: ClassVar[tuple[str, ...]] = ("server_state",)
    _fields: ClassVar[dict[str, Check]] = {
        "job": text(NAME_RE), "version": integer(0), "parent": integer(-1), "weights": tensors,
        "included": id_list(), "strategy": text(max_len=200), "params": plain(), "model": plain(),
        "sha256": text(SHA_RE), "contributions": plain_list(), "created_at": _ANY_TIME, "meta": plain(),
        "server_state": optional(tensors), "schema": integer(0, SCHEMA),
    }

    def __post_init__(self) -> None:
        if self.version < 0 or self.parent >= self.version:
            raise ValueError(f"version {self.version} with parent {self.parent} is not a forward step")

    def verify_hash(self) -> bool:
        return weights_sha256(self.weights) == self.sha256

    @property
    def listed_sites(self) -> list[str]:
        """The sites of the registry in meta (sorted); what each name is, the caller validates."""
        registry = self.meta.get(META_REGISTRY)
        return sorted(registry) if isinstance(registry, dict) else []


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
    #: the coordinator's Ed25519 signature over `proof_bytes()`; the update carries it back as
    #: `Update.task_proof`, so an aggregator can tell an issued task from an invented one
    signature: bytes = b""
    schema: int = BASE_SCHEMA

    kind: ClassVar[str] = "task"
    max_body: ClassVar[int] = 1 * MB
    _fields: ClassVar[dict[str, Check]] = {
        "job": text(NAME_RE), "task_id": text(ID_RE), "version": integer(0), "epochs": integer(1, 100_000),
        "batch_size": integer(1, 2**24), "lr": number(0, 1e6), "issued_at": _ANY_TIME, "deadline": _ANY_TIME,
        "model_offset": optional(integer(0, 2**63)), "mu": number(0, 1e6), "options": plain(10_000),
        "signature": binary(64), "schema": integer(0, SCHEMA),
    }

    @property
    def update_id(self) -> str:
        """Derived from the task alone, so a redelivered task yields the same update id."""
        return update_id_for(self.task_id)

    def proof_bytes(self) -> bytes:
        return task_proof_bytes(self.job, self.task_id, self.version)


def update_id_for(task_id: str) -> str:
    return f"u-{task_id}"


def task_proof_bytes(job: str, task_id: str, version: int) -> bytes:
    """What the coordinator signs for a task: all an update must agree with to answer it."""
    return pack({"kind": "fedmq-task", "job": job, "task_id": task_id, "version": version})


#: prefix of a framed update's signing bytes (0xc1: never the first byte of a msgpack map)
SIGNING_DOMAIN = b"\xc1fedmq-update-signature-v3\n"


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
    #: the task's signature from the coordinator (Task.signature), proof this answers an issued task
    task_proof: bytes = b""
    #: how `delta` travels (the job's strategy.compression: "float16", "bfloat16", "topk"; None =
    #: dense as trained); the aggregator decompresses it (shared/compression.py)
    compression: str | None = None
    schema: int = FRAMED_SCHEMA

    kind: ClassVar[str] = "update"
    _tensor_fields: ClassVar[tuple[str, ...]] = ("delta",)
    _since_schema_2: ClassVar[tuple[str, ...]] = ("compression",)
    _fields: ClassVar[dict[str, Check]] = {
        "job": text(NAME_RE), "update_id": text(ID_RE), "task_id": text(ID_RE), "site": text(NAME_RE),
        "base_version": integer(0), "num_samples": integer(0, 2**40), "delta": optional(tensors),
        "metrics": plain(256, allow_bytes=False), "privacy": plain(256, allow_bytes=False),
        "ciphertext": optional(plain()), "created_at": _ANY_TIME, "signature": binary(64),
        "task_proof": binary(64), "compression": optional(text(NAME_RE, 32)), "schema": integer(0, SCHEMA),
    }

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if (self.delta is None) == (self.ciphertext is None):
            raise ValueError("exactly one of delta and ciphertext must be set")

    def signing_bytes(self) -> bytes:
        """What the site signs: every field but the signature itself, every tensor byte.

        Map form (schema <= 3, what the previous release wrote and signed): the map without the
        signature, tensor bytes included, exactly as that release computed it, so its jobs' updates
        still verify on replay. Framed form (schema 4): `SIGNING_DOMAIN` + the map without the
        signature, each tensor field as its ordered [name, dtype, shape, SHA-256] list: names,
        order, dtypes, shapes and bytes are all covered, and the payload is hashed in place, not
        packed again. Which of the two applies follows from the schema, which both cover, and
        which `decode` binds to the body's form; the domain prefix is no msgpack map's first
        byte, so no update's bytes of one form equal another's of the other: re-framing a signed
        update (either way) breaks its signature, and a site that writes the map form is verified
        over all of its bytes too."""
        if not self.framed:
            d = self.to_dict()
            d.pop("signature")
            return pack(d)
        d = self._fields_in_order(tensors_as=tensor_digests)
        d.pop("signature")
        return SIGNING_DOMAIN + pack(d)


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
    schema: int = BASE_SCHEMA

    kind: ClassVar[str] = "encrypted_aggregate"
    _fields: ClassVar[dict[str, Check]] = {
        "job": text(NAME_RE), "aggregate_id": text(ID_RE), "version": integer(1), "parent": integer(0),
        "included": id_list(), "contributions": plain_list(), "strategy": text(max_len=200), "params": plain(),
        "denominator": number(), "sample_ref": number(), "context_sha256": text(SHA_RE),
        "size": integer(0, 2**40), "chunks": bytes_list(), "ciphertext_sha256": text(SHA_RE),
        "created_at": _ANY_TIME, "schema": integer(0, SCHEMA),
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
    #: a site's training raised: data task_id, site, reason, error (bounded text); the task is
    #: rejected (the broker dead-letters it) and the coordinator reissues it to the others
    TASK_FAILED = "task_failed"
    UPDATE_PUBLISHED = "update_published"
    VERSION_PUBLISHED = "version_published"
    VERSION_EVALUATED = "version_evaluated"
    DEAD_LETTERED = "dead_lettered"
    #: a replica became the active aggregator (the lock's token reached it); data: replica, takeover
    AGGREGATOR_ACTIVE = "aggregator_active"
    #: homomorphic jobs: the aggregator handed an encrypted sum to the key holder
    AGGREGATE_PUBLISHED = "aggregate_published"
    JOB_FINISHING = "job_finishing"
    JOB_FINISHED = "job_finished"
    #: the coordinator's fold of the events stream so far (fedmq.monitor.JobView.checkpoint), every
    #: few hundred entries: a monitor starts from the newest instead of the stream's first entry
    JOB_SUMMARY = "job_summary"


@dataclass(frozen=True, slots=True)
class Event(_Message):
    """Progress record on the events stream; the coordinator's journal and the monitor's feed."""

    job: str
    event: str
    source: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    schema: int = BASE_SCHEMA

    kind: ClassVar[str] = "event"
    max_body: ClassVar[int] = 8 * MB
    _fields: ClassVar[dict[str, Check]] = {
        "job": text(NAME_RE), "event": text(max_len=64), "source": text(max_len=128), "data": plain(),
        "ts": _ANY_TIME, "schema": integer(0, SCHEMA),
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
    server_state: Weights | None = None,
) -> ModelVersion:
    """Build a ModelVersion with its sha256 computed from the weights."""
    weights = {k: np.asarray(v) for k, v in weights.items()}
    return ModelVersion(
        job=job, version=version, parent=parent, weights=weights, included=tuple(included),
        strategy=strategy, params=dict(params), model=dict(model), sha256=weights_sha256(weights),
        contributions=tuple(contributions), meta=dict(meta or {}), server_state=server_state or None,
        schema=FRAMED_SCHEMA,
    )
