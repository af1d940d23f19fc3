"""Fuzzing every decoder: for any bytes, `X.decode` gives a valid X or MalformedMessageError.

Structure-aware first: a valid message of each type with one field (or one tensor spec entry)
replaced by a hostile value, dropped, or joined by an unknown key; then byte-level mutations of
valid bodies (flips, truncation, insertion) and random bytes. Both wire forms: the map form (the
previous release's, schema 1, which `fedmq replay` still reads) and the framed form (schema 4,
updates and versions), whose header fields, tensor descriptors (name, dtype, shape, offset,
nbytes), prefix (magic, frame version, header length), padding and payload are broken one at a
time. About 25,000 examples per run in all (the `max_examples` below), a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.shared.codec import _PREFIX, ALIGN, FRAME_MAGIC, FRAME_VERSION, pack
from fedmq.shared.errors import MalformedMessageError
from fedmq.shared.messages import (
    BASE_SCHEMA,
    FRAMED_SCHEMA,
    EncryptedAggregate,
    Event,
    ModelVersion,
    Task,
    Update,
    make_version,
)

SHA = "ab" * 32


def _update(schema: int = BASE_SCHEMA) -> Update:
    return Update(job="j1", update_id="u-t1", task_id="t1", site="site-0", base_version=3, num_samples=40,
                  delta={"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)},
                  metrics={"loss": 0.5}, privacy={"epsilon": 1.0}, signature=b"s" * 64, task_proof=b"p" * 64,
                  schema=schema)


def _version() -> ModelVersion:
    """Framed (what make_version writes), with a server state: two tensor fields in one frame."""
    return dataclasses.replace(
        make_version(job="j1", version=1, parent=0, weights={"w": np.arange(6, dtype=np.float32),
                                                             "n": np.arange(3, dtype=np.int64)},
                     included=["u-a", "u-b"], strategy="fedbuff", params={"buffer_size": 2},
                     model={"name": "mlp", "args": {}},
                     contributions=[{"update_id": "u-a", "weight": 1.0}, {"update_id": "u-b"}],
                     meta={"seed": 0, "site_keys": {"site-0": "00" * 32}}),
        server_state={"m:w": np.zeros(6, np.float32), "v:w": np.ones(6, np.float32)})


def _encrypted_update(schema: int = BASE_SCHEMA) -> Update:
    return Update(job="j1", update_id="u-t2", task_id="t2", site="site-1", base_version=1, num_samples=4,
                  delta=None, ciphertext={"scheme": "ckks", "chunks": [b"c" * 32], "slots": 4096, "size": 9},
                  schema=schema)


#: map-form seeds (the previous release's form) and framed seeds
MESSAGES: dict[str, Any] = {
    "update": _update(),
    "update_framed": _update(schema=FRAMED_SCHEMA),
    "version_framed": _version(),
    "encrypted_update": _encrypted_update(),
    "encrypted_update_framed": _encrypted_update(schema=FRAMED_SCHEMA),  # what a worker writes: no tensor, a frame
    "task": Task(job="j1", task_id="t1", version=2, epochs=1, batch_size=16, lr=0.1, issued_at=1.0,
                 deadline=301.0, model_offset=7, options={"privacy": {"epsilon": 4.0}}, signature=b"x" * 64),
    "version": dataclasses.replace(_version(), server_state=None, schema=BASE_SCHEMA),
    "aggregate": EncryptedAggregate(job="j1", aggregate_id="agg-v2", version=2, parent=1, included=("u-a",),
                                    contributions=({"update_id": "u-a"},), strategy="fedbuff",
                                    params={"buffer_size": 1}, denominator=1.0, sample_ref=1.0,
                                    context_sha256=SHA, size=9, chunks=(b"c" * 16,), ciphertext_sha256=SHA),
    "event": Event(job="j1", event="update_published", source="site-0",
                   data={"task_id": "t1", "site": "site-0", "loss": 0.3, "included": ["u-a"]}),
}
TYPES = {"update": Update, "encrypted_update": Update, "task": Task, "version": ModelVersion,
         "aggregate": EncryptedAggregate, "event": Event, "update_framed": Update, "version_framed": ModelVersion,
         "encrypted_update_framed": Update}
KINDS = sorted(MESSAGES)
MAP_KINDS = [k for k in KINDS if not k.endswith("_framed")]
FRAMED_KINDS = [k for k in KINDS if k.endswith("_framed")]


def _wire(msg: Any) -> dict[str, Any]:
    """The message as msgpack would hand it to the decoder (bytes, not memoryviews)."""
    out = msgpack.unpackb(msg.encode(), raw=False)
    assert isinstance(out, dict)
    return out


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


#: what an attacker puts in a field: wrong types, edge numbers, sizes, nesting, other messages' shapes
HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**62, 2**63, 2**64 - 1, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 64.5, -0.0, 1e308]),
    st.text(max_size=40), st.sampled_from(["", "x" * 300, "u-" + "a" * 200, "../../etc", "\x00", "é"]),
    st.binary(max_size=80),
    st.lists(st.integers(min_value=-5, max_value=2**62), max_size=70),
    st.lists(st.sampled_from([64.5, True, "6", None, 2**62, -1]), max_size=5),
    st.dictionaries(st.text(max_size=8), st.integers(min_value=-2**63, max_value=2**64 - 1) | st.text(max_size=8),
                    max_size=5),
    st.builds(_nested, st.integers(min_value=5, max_value=60)),
    st.sampled_from([{"dtype": "float32", "shape": [2, 3], "data": b"\0" * 24},
                     {"w": {"dtype": "float32", "shape": [0, 2**62, 2**62], "data": b""}},
                     {"w": {"dtype": "float64", "shape": [1] * 65, "data": b"\0" * 8}},
                     {"w": {"dtype": "uint8", "shape": [1], "data": b"\0"}},
                     {b"w": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}]),
)


def _check(kind: str, body: bytes) -> None:
    """The property: a typed message of the right class (that round-trips), or the typed error."""
    cls = TYPES[kind]
    try:
        msg = cls.decode(body)
    except MalformedMessageError:
        return
    assert isinstance(msg, cls)
    again = cls.decode(msg.encode())
    assert again.encode() == msg.encode()


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=False)


@pytest.mark.parametrize("kind", MAP_KINDS)
@FUZZ
@given(data=st.data())
def test_one_field_broken(kind: str, data: st.DataObject) -> None:
    wire = _wire(MESSAGES[kind])
    _break_one_field(wire, data)
    _check(kind, pack(wire))


def _break_one_field(fields: dict[Any, Any], data: st.DataObject) -> None:
    """Replace, drop or add one field, or give one key as bytes beside the str keys."""
    action = data.draw(st.sampled_from(["replace", "drop", "add", "replace_key_type"]))
    name = data.draw(st.sampled_from(sorted(fields)))
    if action == "replace":
        fields[name] = data.draw(HOSTILE)
    elif action == "drop":
        del fields[name]
    elif action == "add":
        fields[data.draw(st.text(min_size=1, max_size=10))] = data.draw(HOSTILE)
    else:
        fields[name.encode()] = fields.pop(name)


TENSOR_KINDS = ["update", "version"]


@pytest.mark.parametrize("kind", TENSOR_KINDS)
@FUZZ
@given(data=st.data())
def test_one_tensor_spec_entry_broken(kind: str, data: st.DataObject) -> None:
    wire = _wire(MESSAGES[kind])
    field = "delta" if kind == "update" else "weights"
    tensors = wire[field]
    tname = data.draw(st.sampled_from(sorted(tensors)))
    entry = data.draw(st.sampled_from(["dtype", "shape", "data", "extra"]))
    spec = dict(tensors[tname])
    if entry == "extra":
        spec["extra"] = data.draw(HOSTILE)
    elif data.draw(st.booleans()):
        spec[entry] = data.draw(HOSTILE)
    else:
        del spec[entry]
    tensors[tname] = spec
    _check(kind, pack(wire))


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_valid_bodies_mutated_byte_by_byte(kind: str, data: st.DataObject) -> None:
    body = bytearray(MESSAGES[kind].encode())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not body:
            break
        i = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        if op == "flip":
            body[i] = data.draw(st.integers(min_value=0, max_value=255))
        elif op == "truncate":
            del body[i:]
        elif op == "insert":
            body[i:i] = data.draw(st.binary(min_size=1, max_size=9))
        else:
            del body[i:i + data.draw(st.integers(min_value=1, max_value=9))]
    _check(kind, bytes(body))


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=512), kind=st.sampled_from(KINDS))
def test_random_bytes(body: bytes, kind: str) -> None:
    _check(kind, body)


def test_the_valid_seeds_decode() -> None:
    """The fuzzers start from messages that are valid, so a mutation breaks exactly one thing."""
    for kind, msg in MESSAGES.items():
        assert TYPES[kind].decode(msg.encode()).encode() == msg.encode()
        assert msg.encode().startswith(FRAME_MAGIC) == (kind in FRAMED_KINDS)
    for kind in FRAMED_KINDS:
        header, payload = _split(MESSAGES[kind].encode())
        assert _frame(header, payload) == MESSAGES[kind].encode()


# --------------------------------------------------------------------------- framed form

def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, head_len = _PREFIX.unpack_from(body)
    start = -(-(_PREFIX.size + head_len) // ALIGN) * ALIGN
    header = msgpack.unpackb(body[_PREFIX.size:_PREFIX.size + head_len], raw=False)
    assert isinstance(header, dict)
    return header, body[start:]


def _frame(header: Any, payload: bytes, *, magic: bytes = FRAME_MAGIC, version: int = FRAME_VERSION,
           head_len_delta: int = 0, padding: bytes | None = None) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    used = _PREFIX.size + len(head)
    pad = bytes(-used % ALIGN) if padding is None else padding
    return _PREFIX.pack(magic, version, max(0, len(head) + head_len_delta)) + head + pad + payload


def _tensor_fields(kind: str) -> list[str]:
    return ["delta"] if kind == "update_framed" else ["weights", "server_state"]


#: what an attacker puts in a descriptor entry: HOSTILE plus near misses of the right values
NEAR = st.one_of(HOSTILE, st.integers(min_value=-9, max_value=80),
                 st.sampled_from(["float32", "float64", "int32", "int64", "float16", "w", "b", "m:w"]),
                 st.lists(st.integers(min_value=0, max_value=7), max_size=3))


@pytest.mark.parametrize("kind", FRAMED_KINDS)
@FUZZ
@given(data=st.data())
def test_one_frame_header_field_broken(kind: str, data: st.DataObject) -> None:
    header, payload = _split(MESSAGES[kind].encode())
    _break_one_field(header, data)
    _check(kind, _frame(header, payload))


@pytest.mark.parametrize("kind", ["update_framed", "version_framed"])
@FUZZ
@given(data=st.data())
def test_one_tensor_descriptor_broken(kind: str, data: st.DataObject) -> None:
    """Name, dtype, shape, offset or nbytes of one tensor replaced, or the descriptor cut or grown,
    or two descriptors swapped / duplicated: offsets then overlap, leave gaps or leave the body."""
    header, payload = _split(MESSAGES[kind].encode())
    fields = [f for f in _tensor_fields(kind) if header.get(f)]
    descs = header[data.draw(st.sampled_from(fields))]
    i = data.draw(st.integers(min_value=0, max_value=len(descs) - 1))
    action = data.draw(st.sampled_from(["entry", "cut", "grow", "swap", "duplicate", "drop"]))
    if action == "entry":
        descs[i][data.draw(st.integers(min_value=0, max_value=4))] = data.draw(NEAR)
    elif action == "cut":
        descs[i] = descs[i][:data.draw(st.integers(min_value=0, max_value=4))]
    elif action == "grow":
        descs[i] = [*descs[i], data.draw(HOSTILE)]
    elif action == "swap":
        j = data.draw(st.integers(min_value=0, max_value=len(descs) - 1))
        descs[i], descs[j] = descs[j], descs[i]
    elif action == "duplicate":
        descs.append(list(descs[i]))
    else:
        del descs[i]
    _check(kind, _frame(header, payload))


@pytest.mark.parametrize("kind", FRAMED_KINDS)
@FUZZ
@given(data=st.data())
def test_frame_envelope_broken(kind: str, data: st.DataObject) -> None:
    """Magic, frame version, header length, padding, truncation and trailing bytes."""
    header, payload = _split(MESSAGES[kind].encode())
    action = data.draw(st.sampled_from(["magic", "version", "head_len", "padding", "truncate", "trail"]))
    if action == "magic":
        body = _frame(header, payload, magic=data.draw(st.binary(min_size=4, max_size=4)))
    elif action == "version":
        body = _frame(header, payload, version=data.draw(st.integers(min_value=0, max_value=255)))
    elif action == "head_len":
        body = _frame(header, payload, head_len_delta=data.draw(st.integers(min_value=-40, max_value=2**20)))
    elif action == "padding":
        body = _frame(header, payload, padding=data.draw(st.binary(max_size=ALIGN + 2)))
    elif action == "truncate":
        body = MESSAGES[kind].encode()
        body = body[:data.draw(st.integers(min_value=0, max_value=len(body) - 1))]
    else:
        body = MESSAGES[kind].encode() + data.draw(st.binary(min_size=1, max_size=16))
    _check(kind, body)


@pytest.mark.parametrize("kind, body, match", [
    ("update_framed", FRAME_MAGIC, "shorter than its 9-byte prefix"),
    ("update_framed", _PREFIX.pack(FRAME_MAGIC, 2, 0), "frame version 2"),
    ("update_framed", _PREFIX.pack(FRAME_MAGIC, 1, 2**32 - 1), "runs past the body"),
    ("update_framed", MESSAGES["update_framed"].encode() + b"\0", "trailing garbage"),
    ("update_framed", MESSAGES["update_framed"].encode()[:-1], "run past the body's end"),
    ("version_framed", MESSAGES["version_framed"].encode()[:-4], "run past the body's end"),
])
def test_broken_frames_are_typed_errors_naming_the_defect(kind: str, body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        TYPES[kind].decode(body)


def _descs(**change: Any) -> bytes:
    header, payload = _split(MESSAGES["update_framed"].encode())
    for k, v in change.items():
        name, pos = k.rsplit("_", 1)
        header["delta"][0 if name == "w" else 1][int(pos)] = v
    return _frame(header, payload)


@pytest.mark.parametrize("body, match", [
    (_descs(b_3=16), "overlaps the tensor before it"),
    (_descs(b_3=32), "is not where the tensor before it ends"),
    (_descs(w_4=20), "nbytes 20 but float32"),
    (_descs(w_2=[2, 3.0]), "not an int"),
    (_descs(w_2=[2**40, 2**40]), "more than"),
    (_descs(w_1="uint8"), "bad or missing dtype"),
    (_descs(b_0="w"), "appears twice"),
    (_descs(w_0=""), "not a string of 1-256"),
    (_descs(w_3=-8), "overlaps"),
    (_descs(w_3=True), "must be ints"),
])
def test_broken_descriptors_are_typed_errors_naming_the_defect(body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        Update.decode(body)


@pytest.mark.parametrize("body, match", [
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": [float("inf")], "data": b""}}}),
     "dimension inf is not an int"),
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": [1] * 65, "data": b"\0" * 4}}}),
     "65 dimensions"),
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": [0, 2**62, 2**62], "data": b""}}}),
     "more than"),
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": [64.5, 64.5], "data": b""}}}),
     "64.5 is not an int"),
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": [True], "data": b""}}}),
     "True is not an int"),
    (pack({**_wire(_update()), "delta": {"w": {"dtype": "float32", "shape": "64", "data": b""}}}),
     "not a list"),
    (msgpack.packb({**_wire(_update()), b"evil": 1, "evil": 2}), "not a string"),
    (pack({**_wire(_update()), "update_id": "u-" + "x" * 200_000}), "characters, at most"),
    (pack({**_wire(_update()), "base_version": 10**9 * 10**9}), "outside"),
    (pack({**_wire(_update()), "created_at": float("nan")}), "not a finite number"),
])
def test_the_reported_crashes_are_typed_errors_naming_the_defect(body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        Update.decode(body)
