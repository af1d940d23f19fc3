"""Messages: every type round-trips, and strict decoding names the defect of a bad body, so the
aggregator's dead letters say precisely what was wrong."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.shared.codec import encode_tensors, pack
from fedmq.shared.errors import CodecError, MalformedMessageError
from fedmq.shared.messages import SCHEMA, Event, ModelVersion, Task, Update, make_version


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
    d = msg.to_dict()
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
    d = _version().to_dict()
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
    d = _update().to_dict()
    for optional in ("metrics", "privacy", "ciphertext", "created_at", "signature"):
        d.pop(optional)
    got = Update.from_dict(d)
    assert got.metrics == {} and got.signature == b""


def test_signing_bytes_cover_everything_but_the_signature() -> None:
    a, b = _update(signature=b"one"), _update(signature=b"two")
    assert a.signing_bytes() == b.signing_bytes()
    assert _update(num_samples=41).signing_bytes() != a.signing_bytes()
