"""Ed25519 update signatures: a signed update verifies, anything altered or unsigned does not, and
a job with a site registry dead-letters such updates with reason "bad_signature"."""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator.validate import validate_update
from fedmq.shared.broker import Connection, JobNames, TopologyConfig
from fedmq.shared.codec import _PREFIX, FRAME_MAGIC, FRAME_VERSION, pack
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import ConfigError, MalformedMessageError, SignatureError
from fedmq.shared.messages import BASE_SCHEMA, FRAMED_SCHEMA, Update, make_version
from fedmq.shared.models import build_model, get_weights, model_spec
from fedmq.shared.signing import (
    META_REGISTRY,
    JobTrust,
    generate_site_key,
    load_private_key,
    load_registry,
    public_hex,
    sign_update,
    verify_update,
)
from tests.jobkit import dead_letters, make_update, publish_updates, running_aggregator, wait_for_version

TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _update(**kw: object) -> Update:
    base = make_update("j", "u-1", TEMPLATE, site="site-a")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_a_signed_update_verifies_against_the_registry() -> None:
    key = Ed25519PrivateKey.generate()
    verify_update(sign_update(_update(), key), {"site-a": public_hex(key)})


@pytest.mark.parametrize("tamper", [
    {"num_samples": 1000},
    {"base_version": 3},
    {"site": "site-b"},
    {"delta": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}},
    {"metrics": {"loss": 0.0}},
])
def test_any_change_after_signing_breaks_the_signature(tamper: dict[str, object]) -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = sign_update(_update(), key)
    registry = {"site-a": public_hex(key), "site-b": public_hex(other)}
    with pytest.raises(SignatureError) as info:
        verify_update(dataclasses.replace(signed, **tamper), registry)  # type: ignore[arg-type]
    assert info.value.reason == "bad_signature"


def test_signature_survives_the_wire() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_update(_update(), key)
    verify_update(Update.decode(signed.encode()), {"site-a": public_hex(key)})


# --------------------------------------------------------------------------- both wire forms
#
# A framed update (schema 4) is signed over its fields and per tensor [name, dtype, shape,
# SHA-256]; a map-form update (schema <= 3, the previous release's) over the whole map. Every
# attack below edits a signed body the way an attacker on the wire would and must end in a
# refusal: a MalformedMessageError at decode or a SignatureError at verification.

PREVIOUS = json.loads((Path(__file__).parent / "data" / "previous_release_bodies.json").read_text())


def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A framed body's header and payload (the bytes after the header's padding)."""
    _, _, head_len = _PREFIX.unpack_from(body)
    start = -(-(_PREFIX.size + head_len) // 8) * 8
    return msgpack.unpackb(body[_PREFIX.size:_PREFIX.size + head_len]), body[start:]


def _frame(header: dict[str, Any], payload: bytes) -> bytes:
    head = pack(header)
    used = _PREFIX.size + len(head)
    return _PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, len(head)) + head + bytes(-used % 8) + payload


def _signed_framed() -> tuple[Update, dict[str, str]]:
    key = Ed25519PrivateKey.generate()
    signed = sign_update(_update(), key)
    assert signed.schema == FRAMED_SCHEMA and signed.encode().startswith(FRAME_MAGIC)
    return signed, {"site-a": public_hex(key)}


def _refused(body: bytes, registry: dict[str, str]) -> str:
    try:
        update = Update.decode(body)
    except MalformedMessageError:
        return "malformed"
    with pytest.raises(SignatureError):
        verify_update(update, registry)
    return "bad_signature"


def _swap_order(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    w, b = h["delta"]  # w: float32 [2, 3] at 0 (24 bytes), b: float32 [3] at 24 (12 bytes)
    h["delta"] = [[b[0], b[1], b[2], 0, 12], [w[0], w[1], w[2], 16, 24]]
    return h, p[24:36] + bytes(4) + p[:24]


def _move_bytes(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][0][2:] = [[4], 0, 16]  # 2 floats of w become b's: same payload, other split
    h["delta"][1][2:] = [[5], 16, 20]
    return h, p


def _relabel(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][0][1] = "int32"  # the same bytes read as another dtype
    return h, p


def _reshape(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][0][2] = [3, 2]
    return h, p


def _rename(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][0][0] = "v"
    return h, p


def _flip_payload(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    return h, p[:5] + bytes([p[5] ^ 1]) + p[6:]


def _shift_offset(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][1][3] = 28  # b read 4 bytes later (with 4 more bytes at the end)
    return h, p + bytes(4)


def _overlap(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"][1][3] = 16  # b overlapping w's last 8 bytes
    return h, p[:28]


def _header_field(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["num_samples"] = 10_000
    return h, p


def _drop_tensor(h: dict[str, Any], p: bytes) -> tuple[dict[str, Any], bytes]:
    h["delta"] = h["delta"][:1]
    return h, p[:24]


@pytest.mark.parametrize("attack, outcome", [
    (_swap_order, "bad_signature"), (_move_bytes, "bad_signature"), (_relabel, "bad_signature"),
    (_reshape, "bad_signature"), (_rename, "bad_signature"), (_flip_payload, "bad_signature"),
    (_header_field, "bad_signature"), (_drop_tensor, "bad_signature"),
    (_shift_offset, "malformed"), (_overlap, "malformed"),
])
def test_a_framed_body_altered_anywhere_is_refused(
        attack: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]], outcome: str) -> None:
    signed, registry = _signed_framed()
    header, payload = _split(signed.encode())
    assert _frame(header, payload) == signed.encode()  # the helpers rebuild the body exactly
    verify_update(Update.decode(_frame(header, payload)), registry)
    assert _refused(_frame(*attack(header, payload)), registry) == outcome


def test_a_signed_update_cannot_change_form() -> None:
    """Downgrade and upgrade: the same fields and signature re-sent in the other form do not verify
    (the form is bound to the schema and each form has its own signing bytes)."""
    signed, registry = _signed_framed()
    as_map = {**signed.to_dict(), "schema": BASE_SCHEMA}
    assert _refused(pack(as_map), registry) == "bad_signature"
    assert _refused(pack(signed.to_dict()), registry) == "malformed"  # schema 4 in a map
    old = Update.decode(bytes.fromhex(PREVIOUS["update"]))
    old_registry = {old.site: PREVIOUS["site_key"]}
    verify_update(old, old_registry)
    assert _refused(dataclasses.replace(old, schema=FRAMED_SCHEMA).encode(), old_registry) == "bad_signature"


def test_an_update_signed_by_the_previous_release_verifies_and_its_tampering_does_not() -> None:
    body = bytes.fromhex(PREVIOUS["update"])
    registry = {"site-0": PREVIOUS["site_key"]}
    verify_update(Update.decode(body), registry)
    for field, value in (("num_samples", 41), ("metrics", {"loss": 0.0})):
        assert _refused(pack({**msgpack.unpackb(body), field: value}), registry) == "bad_signature"
    wire = msgpack.unpackb(body)
    wire["delta"]["w"]["data"] = bytes(24)
    assert _refused(pack(wire), registry) == "bad_signature"


def test_a_map_form_update_signed_today_is_verified_over_all_its_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    registry = {"site-a": public_hex(key)}
    signed = sign_update(dataclasses.replace(_update(), schema=BASE_SCHEMA), key)
    verify_update(Update.decode(signed.encode()), registry)
    wire = msgpack.unpackb(signed.encode())
    wire["delta"]["b"]["data"] = b"\1" + wire["delta"]["b"]["data"][1:]
    assert _refused(pack(wire), registry) == "bad_signature"


def test_unsigned_update_unknown_site_and_foreign_key_are_refused() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="unsigned"):
        verify_update(_update(), {"site-a": public_hex(key)})
    with pytest.raises(SignatureError, match="not in the job's site registry"):
        verify_update(sign_update(_update(), key), {"site-b": public_hex(key)})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_update(sign_update(_update(), other), {"site-a": public_hex(key)})


def test_validation_checks_signatures_only_when_the_job_has_a_registry() -> None:
    cfg = StrategyConfig()
    unsigned = _update()
    assert validate_update(unsigned, job="j", current_version=0, template=TEMPLATE, cfg=cfg) == 0
    with pytest.raises(SignatureError):
        validate_update(unsigned, job="j", current_version=0, template=TEMPLATE, cfg=cfg,
                        trust=JobTrust(registry={"site-a": public_hex(Ed25519PrivateKey.generate())}))


def test_site_keys_are_private_files_and_the_registry_collects_them(tmp_path: Path) -> None:
    key_a, hex_a = generate_site_key(tmp_path, "site-a")
    _, hex_b = generate_site_key(tmp_path, "site-b")
    assert stat.S_IMODE(key_a.stat().st_mode) == 0o600
    assert load_registry(tmp_path / "registry.json") == {"site-a": hex_a, "site-b": hex_b}
    assert public_hex(load_private_key(key_a)) == hex_a
    with pytest.raises(ConfigError, match="exists already"):
        generate_site_key(tmp_path, "site-a")


@pytest.mark.parametrize("content, message", [
    ({"site-a": "00ff"}, "32-byte Ed25519"),
    ({"bad site!": "00" * 32}, "site name"),
    (["site-a"], "JSON object"),
])
def test_a_broken_registry_is_a_config_error(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_aggregator_dead_letters_tampered_and_unsigned_updates(broker_url: str, job: str) -> None:
    key = Ed25519PrivateKey.generate()
    strategy = StrategyConfig(buffer_size=1, flush_timeout=1.0)
    spec = model_spec("logreg", (64,), 10)
    v0 = make_version(job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                      included=[], strategy=strategy.name.value, params=strategy.to_params(), model=spec,
                      meta={META_REGISTRY: {"site-0": public_hex(key)}})
    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-setup").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode(), message_id="v0")
    template = {k: np.asarray(v) for k, v in v0.weights.items()}
    good = sign_update(make_update(job, "u-good", template, seed=1), key)
    signed = sign_update(make_update(job, "u-tampered", template, seed=2), key)
    tampered = dataclasses.replace(signed, delta={k: v * 10 for k, v in signed.delta.items()}  # type: ignore[union-attr]
                                   )
    unsigned = make_update(job, "u-unsigned", template, seed=3)
    with running_aggregator(broker_url, job) as agg:
        publish_updates(broker_url, job, [tampered, unsigned, good])
        got = wait_for_version(broker_url, job, 1)
        assert got[-1].included == ("u-good",)
        assert got[-1].meta[META_REGISTRY] == {"site-0": public_hex(key)}  # copied forward
    dead = {d.update_id: d.reason for d in dead_letters(broker_url, job)}
    assert dead == {"u-tampered": "bad_signature", "u-unsigned": "bad_signature"}
    assert agg.stats.dead_lettered == {"bad_signature": 2}


def test_a_compressed_update_in_the_map_form_of_schema_3_still_verifies_and_is_covered() -> None:
    """Schema 3 (the map form with `compression`) is read and verified over its old signing bytes;
    the framed form (this release's) covers `compression` as well."""
    key = Ed25519PrivateKey.generate()
    registry = {"site-a": public_hex(key)}
    for schema in (3, FRAMED_SCHEMA):
        signed = sign_update(dataclasses.replace(_update(), compression="float16", schema=schema), key)
        got = Update.decode(signed.encode())
        assert got.schema == schema and got.compression == "float16"
        verify_update(got, registry)
        with pytest.raises(SignatureError):
            verify_update(dataclasses.replace(got, compression="topk"), registry)
