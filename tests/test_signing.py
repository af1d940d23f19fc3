"""Ed25519 update signatures: a signed update verifies, anything altered or unsigned does not, and
a job with a site registry dead-letters such updates with reason "bad_signature"."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator.validate import validate_update
from fedmq.shared.broker import Connection, JobNames, TopologyConfig
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import ConfigError, SignatureError
from fedmq.shared.messages import Update, make_version
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
