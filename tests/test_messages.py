"""Messages: every type round-trips, and strict decoding names the defect of a bad body, so the
aggregator's dead letters say precisely what was wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.shared.codec import FRAME_MAGIC, encode_tensors, pack, unpack_any
from fedmq.shared.errors import CodecError, MalformedMessageError
from fedmq.shared.messages import (
    BASE_SCHEMA,
    FRAMED_SCHEMA,
    SCHEMA,
    EncryptedAggregate,
    Event,
    ModelVersion,
    Task,
    Update,
    make_version,
)

#: bodies the previous release wrote (map form), made with its code at e83631b
PREVIOUS = json.loads((Path(__file__).parent / "data" / "previous_release_bodies.json").read_text())


def _update(**over: Any) -> Update:
    fields: dict[str, Any] = dict(job="j1", update_id="u-t1", task_id="t1", site="site-0", base_version=3,
                                  num_samples=40, delta={"w": np.ones((2, 3), np.float32)},
                                  metrics={"loss": 0.5}, signature=b"sig", created_at=1.0)
    fields.update(over)
    return Update(**fields)


def _task() -> Task:
    return Task(job="j1", task_id="t1", version=2, epochs=1, batch_size=16, lr=0.1, issued_at=1.0,
                deadline=301.0, model_offset=7, options={"dp": False})


def _version() -> ModelVersion:
    return make_version(job="j1", version=1, parent=0, weights={"w": np.arange(6, dtype=np.float32)},
                        included=["u-a", "u-b"], strategy="fedbuff", params={"buffer_size": 2},
                        model={"name": "mlp", "args": {}}, contributions=[{"update_id": "u-a"}])


def _body(msg: Any, **changes: Any) -> bytes:
    """A map-form body (schema 1 unless `changes` say otherwise) with `changes` applied."""
    d = {**msg.to_dict(), "schema": BASE_SCHEMA}
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return pack(d)


_DROP = object()


def test_update_round_trips_with_its_delta() -> None:
    u = _update()
    got = Update.decode(u.encode())
    assert got.update_id == u.update_id and got.base_version == 3 and got.signature == b"sig"
    assert got.delta is not None
    np.testing.assert_array_equal(got.delta["w"], np.ones((2, 3), np.float32))
    assert got.metrics == {"loss": 0.5}


def test_task_round_trips_and_its_update_id_is_stable_across_redelivery() -> None:
    t = _task()
    again = Task.decode(t.encode())
    assert again == t
    assert again.update_id == Task.decode(t.encode()).update_id == "u-t1"


def test_model_version_round_trips_and_its_hash_verifies() -> None:
    mv = _version()
    got = ModelVersion.decode(mv.encode())
    assert got.included == ("u-a", "u-b")
    assert got.sha256 == mv.sha256
    assert got.verify_hash()


def test_a_tampered_model_version_fails_hash_verification() -> None:
    d = {**_version().to_dict(), "schema": BASE_SCHEMA}
    d["weights"] = encode_tensors({"w": np.arange(6, dtype=np.float32) + 1})
    assert not ModelVersion.decode(pack(d)).verify_hash()


def test_event_round_trips() -> None:
    ev = Event(job="j1", event="version_published", source="aggregator", data={"version": 3})
    assert Event.decode(ev.encode()) == ev


@pytest.mark.parametrize("changes, match", [
    ({"update_id": _DROP}, "field 'update_id' is missing"),
    ({"schema": _DROP}, "field 'schema' missing"),
    ({"schema": "1"}, "field 'schema' missing or not an int"),
    ({"schema": SCHEMA + 1}, "newer than this fedmq understands"),
    ({"surprise": 1}, r"unknown field\(s\) \['surprise'\]"),
    ({"base_version": "3"}, "field 'base_version' is str, expected int"),
    ({"base_version": 3.0}, "field 'base_version' is float, expected int"),
    ({"num_samples": True}, "field 'num_samples' is a bool"),
    ({"site": None}, "field 'site' is NoneType, expected str"),
    ({"signature": "text"}, "field 'signature' is str, expected bytes"),
    ({"metrics": [1]}, "field 'metrics' is list, expected dict"),
    ({"num_samples": -1}, "field .num_samples. is -1, outside"),
    ({"delta": None}, "exactly one of delta and ciphertext"),
    ({"ciphertext": {"scheme": "ckks"}}, "exactly one of delta and ciphertext"),
])
def test_update_decoding_names_each_defect(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        Update.decode(_body(_update(), **changes))


def test_a_delta_whose_bytes_do_not_fit_its_shape_is_a_codec_error() -> None:
    bad = encode_tensors({"w": np.ones((2, 3), np.float32)})
    bad["w"]["shape"] = [3, 3]
    with pytest.raises(CodecError, match="tensor 'w'"):
        Update.decode(_body(_update(), delta=bad))


@pytest.mark.parametrize("body, match", [
    (b"\x93\x01", "not msgpack"),
    (b"not msgpack at all \xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "not a map"),
])
def test_a_body_that_is_not_a_message_is_malformed(body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        Update.decode(body)


def test_a_task_is_not_an_update() -> None:
    with pytest.raises(MalformedMessageError, match="unknown field"):
        Update.decode(_task().encode())


def test_a_model_version_must_step_forward_from_its_parent() -> None:
    with pytest.raises(MalformedMessageError, match="not a forward step"):
        ModelVersion.decode(_body(_version(), parent=1))


def test_task_model_offset_may_be_null() -> None:
    d = _task().to_dict()
    d["model_offset"] = None
    assert Task.from_dict(d).model_offset is None


def test_older_schema_without_defaulted_fields_still_decodes() -> None:
    d = {**_update().to_dict(), "schema": BASE_SCHEMA}
    for optional in ("metrics", "privacy", "ciphertext", "created_at", "signature"):
        d.pop(optional)
    got = Update.from_dict(d)
    assert got.metrics == {} and got.signature == b""


def test_signing_bytes_cover_everything_but_the_signature() -> None:
    a, b = _update(signature=b"one"), _update(signature=b"two")
    assert a.signing_bytes() == b.signing_bytes()
    assert _update(num_samples=41).signing_bytes() != a.signing_bytes()


def test_updates_and_versions_travel_framed_and_the_other_kinds_as_maps() -> None:
    assert _update().encode().startswith(FRAME_MAGIC) and _version().encode().startswith(FRAME_MAGIC)
    assert _update().schema == _version().schema == FRAMED_SCHEMA
    agg = EncryptedAggregate(job="j1", aggregate_id="a", version=2, parent=1, included=("u-a",),
                             contributions=({"update_id": "u-a"},), strategy="fedbuff", params={},
                             denominator=1.0, sample_ref=1.0, context_sha256="ab" * 32, size=1,
                             chunks=(b"c",), ciphertext_sha256="ab" * 32)
    for msg in (_task(), Event(job="j1", event="e", source="s"), agg):
        body = msg.encode()
        assert isinstance(msgpack.unpackb(body), dict) and msg.schema == BASE_SCHEMA  # the previous release reads it
        assert type(msg).decode(body) == msg


def test_a_framed_version_round_trips_with_its_server_state() -> None:
    state = {"m:w": np.zeros(6, np.float32), "v:w": np.full(6, 1e-6, np.float32)}
    mv = dataclasses.replace(_version(), server_state=state)
    got = ModelVersion.decode(mv.encode())
    assert got.verify_hash() and got.server_state is not None and list(got.server_state) == ["m:w", "v:w"]
    np.testing.assert_array_equal(got.server_state["v:w"], state["v:w"])
    assert ModelVersion.decode(_version().encode()).server_state is None


def test_framed_decoding_is_zero_copy_and_read_only() -> None:
    body = _update(delta={"w": np.arange(100_000, dtype=np.float32)}).encode()
    w = Update.decode(body).delta["w"]  # type: ignore[index]
    start = np.frombuffer(body, np.uint8).__array_interface__["data"][0]
    assert start <= w.__array_interface__["data"][0] < start + len(body)  # a view into the body
    assert w.__array_interface__["data"][0] % 8 == 0 or start % 8 != 0  # aligned where the body is
    assert not w.flags.writeable
    mutable = bytearray(body)
    w2 = Update.decode(mutable).delta["w"]  # type: ignore[index]
    assert not w2.flags.writeable  # not even a bytearray body can be written through the view
    np.testing.assert_array_equal(w2, np.arange(100_000, dtype=np.float32))


def test_the_form_is_bound_to_the_schema() -> None:
    """A map body saying schema 4 and a framed body saying schema 1 are both refused: a decoded
    message's schema then says how it travelled (which bytes its signature covers)."""
    with pytest.raises(MalformedMessageError, match="map body says schema 4"):
        Update.decode(pack(_update().to_dict()))
    with pytest.raises(MalformedMessageError, match="map body says schema 4"):
        ModelVersion.decode(pack(_version().to_dict()))
    with pytest.raises(MalformedMessageError, match="framed body says schema 1"):
        Update.decode(_update().encode().replace(b"\xa6schema\x04", b"\xa6schema\x01"))
    with pytest.raises(MalformedMessageError, match="not msgpack"):
        Task.decode(_update().encode())  # only the kinds with tensors may be framed


def test_map_form_messages_still_round_trip_as_maps() -> None:
    """Schema 1 and 2 messages (the previous release's) keep their form when encoded again."""
    old = dataclasses.replace(_update(), schema=BASE_SCHEMA)
    body = old.encode()
    assert body == pack(old.to_dict()) and not body.startswith(FRAME_MAGIC)
    assert Update.decode(body).schema == BASE_SCHEMA and Update.decode(body).encode() == body


def test_bodies_the_previous_release_wrote_still_decode() -> None:
    u = Update.decode(bytes.fromhex(PREVIOUS["update"]))
    assert u.schema == BASE_SCHEMA and u.delta is not None and list(u.delta) == ["w", "b"]
    np.testing.assert_array_equal(u.delta["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert u.delta["b"].dtype == np.float64 and u.encode() == bytes.fromhex(PREVIOUS["update"])
    mv = ModelVersion.decode(bytes.fromhex(PREVIOUS["version"]))
    assert mv.schema == BASE_SCHEMA and mv.sha256 == PREVIOUS["version_sha256"] and mv.verify_hash()
    assert mv.encode() == bytes.fromhex(PREVIOUS["version"])


def test_unpack_any_reads_the_fields_of_either_form() -> None:
    for mv in (_version(), dataclasses.replace(_version(), schema=BASE_SCHEMA)):
        head = unpack_any(mv.encode())
        assert head["version"] == 1 and head["included"] == ["u-a", "u-b"] and "server_state" not in head


def test_signing_bytes_of_a_framed_update_do_not_hold_its_tensor_bytes() -> None:
    big = _update(delta={"w": np.arange(250_000, dtype=np.float32)})
    assert len(big.signing_bytes()) < 1000 < len(dataclasses.replace(big, schema=BASE_SCHEMA).signing_bytes())
