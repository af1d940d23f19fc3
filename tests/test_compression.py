"""Wire compression of updates (strategy.compression): float16, bfloat16, top-k with error feedback.

Pure tests of shared/compression.py first (round-trip bounds, round-to-nearest-even against torch's
own bfloat16, top-k's choice, error feedback), then on the real broker: hostile wire forms are
dead-lettered with a reason, whole jobs reach their version count with each compression, and
replay recomputes their versions bit for bit."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmq.aggregator.service import Aggregator
from fedmq.aggregator.validate import validated_delta
from fedmq.coordinator.service import Coordinator
from fedmq.replay import Status, replay
from fedmq.shared import he
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.compression import (
    CompressionSpec,
    ErrorFeedback,
    compress,
    decompress,
    from_bfloat16_bits,
    to_bfloat16_bits,
    topk_count,
)
from fedmq.shared.config import Compression, Robust, StrategyConfig, load_job_config
from fedmq.shared.datasets import write_partition
from fedmq.shared.errors import CompressionError, CompressionMismatchError, ConfigError, NonFiniteError
from fedmq.shared.messages import COMPRESSED_UPDATE_SCHEMA, Update
from fedmq.shared.signing import generate_site_key
from fedmq.worker.service import Worker, WorkerOptions
from tests import user_trainer
from tests.conftest import run_fedmq
from tests.jobkit import (
    dead_letters,
    declare_job_with_v0,
    publish_updates,
    run_threaded_job,
    running_aggregator,
    wait_for_version,
)

TOPK = CompressionSpec(Compression.TOPK, 0.1)
F16 = CompressionSpec(Compression.FLOAT16)
BF16 = CompressionSpec(Compression.BFLOAT16)


def _delta(seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (scale * rng.normal(size=(10, 64))).astype(np.float32),
            "b": (scale * rng.normal(size=10)).astype(np.float32),
            "steps": np.array(7, dtype=np.int64)}  # not float32: travels as is


# ---------------------------------------------------------------------------- float16 / bfloat16


def test_float16_round_trip_is_within_half_an_ulp_and_dense() -> None:
    d = _delta(scale=3.0)
    wire = compress(d, F16)
    assert wire["w"].dtype == np.float16 and wire["steps"].dtype == np.int64
    back = decompress(wire, F16, d)
    assert list(back) == list(d) and back["w"].dtype == np.float32 and back["steps"] == 7
    err = np.abs(back["w"].astype(np.float64) - d["w"])
    assert np.all(err <= np.maximum(np.abs(d["w"]) * 2.0**-11, 2.0**-25))
    assert np.array_equal(back["w"], d["w"].astype(np.float16).astype(np.float32))


def test_float16_refuses_values_beyond_its_range_instead_of_sending_infinity() -> None:
    with pytest.raises(NonFiniteError, match="bfloat16"):
        compress({"w": np.array([1.0, 7e4], np.float32)}, F16)


def test_bfloat16_rounds_to_nearest_even_bit_for_bit_like_torch() -> None:
    rng = np.random.default_rng(3)
    one = np.float32(1.0)
    ulp = 2.0**-7
    edge = np.array([one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0**-20, -(one + ulp / 2), 0.0, -0.0,
                     np.finfo(np.float32).tiny, 1e-40, 3.3e38, np.inf, -np.inf], np.float32)
    x = np.concatenate([edge, rng.normal(size=20_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20_000)])
    x = x.astype(np.float32)
    ours = from_bfloat16_bits(to_bfloat16_bits(x))
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # ties to even, not truncation: 1 + ulp/2 -> 1, 1 + 3 ulp/2 -> 1 + 2 ulp, just above half -> up
    assert list(ours[:3]) == [1.0, 1 + 2 * ulp, 1 + ulp]
    nans = np.array([0x7FC00000, 0x7F800001, 0xFF80FFFF], np.uint32).view(np.float32)  # the last two round "up"
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(nans))).all()  # into an infinity, without the guard


def test_bfloat16_round_trip_is_within_half_a_bfloat16_ulp() -> None:
    d = _delta(scale=5.0)
    wire = compress(d, BF16)
    assert wire["w"].dtype == np.uint16 and wire["w"].nbytes * 2 == d["w"].nbytes
    back = decompress(wire, BF16, d)
    assert np.all(np.abs(back["w"].astype(np.float64) - d["w"]) <= np.abs(d["w"]) * 2.0**-8)


# ---------------------------------------------------------------------------- top-k


def test_topk_sends_exactly_the_k_largest_magnitudes_of_each_tensor() -> None:
    d = _delta(seed=1)
    wire = compress(d, TOPK)
    assert list(wire) == ["w.topk_indices", "w.topk_values", "b.topk_indices", "b.topk_values", "steps"]
    for name in ("w", "b"):
        flat = d[name].reshape(-1)
        k = topk_count(flat.size, 0.1)
        assert k == math.ceil(0.1 * flat.size)
        idx, values = wire[f"{name}.topk_indices"], wire[f"{name}.topk_values"]
        assert idx.dtype == np.int32 and values.dtype == np.float32 and len(idx) == k
        assert set(idx.tolist()) == set(np.argsort(-np.abs(flat))[:k].tolist())
        assert np.all(np.diff(idx) > 0) and np.array_equal(values, flat[idx])
    back = decompress(wire, TOPK, d)
    assert np.count_nonzero(back["w"]) == 64 and back["steps"] == 7
    kept = back["w"] != 0
    assert np.array_equal(back["w"][kept], d["w"][kept])
    assert np.abs(d["w"][~kept]).max() <= np.abs(d["w"][kept]).min()


def test_topk_count_is_at_least_one_and_at_most_all() -> None:
    assert [topk_count(n, 0.01) for n in (0, 1, 99, 100, 101)] == [0, 1, 1, 1, 2]
    assert topk_count(10, 1.0) == 10


def test_error_feedback_sends_everything_eventually() -> None:
    """The residual is exactly what was not sent: sum(sent) + residual == sum(true deltas), so the
    sum of what a site sent converges to the sum of its true deltas (the gap is the residual, bounded)."""
    ef = ErrorFeedback()
    rng = np.random.default_rng(0)
    true_sum = np.zeros((10, 64))
    sent_sum = np.zeros((10, 64))
    gaps = []
    for _ in range(60):
        d = {"w": (0.01 * rng.normal(size=(10, 64)) + 0.002).astype(np.float32)}  # a drift every round shares
        sent = decompress(ef.compress(d, TOPK), TOPK, d)
        true_sum += d["w"]
        sent_sum += sent["w"]
        assert np.count_nonzero(sent["w"]) <= 64
        assert np.allclose(sent_sum + ef.residual["w"], true_sum, atol=1e-5)
        gaps.append(np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum))
    assert gaps[-1] < 0.35 * gaps[0] and gaps[-1] < 0.2
    # without feedback, the same selection loses the unsent part for good
    plain_sum = np.zeros((10, 64))
    rng = np.random.default_rng(0)
    for _ in range(60):
        d = {"w": (0.01 * rng.normal(size=(10, 64)) + 0.002).astype(np.float32)}
        plain_sum += decompress(compress(d, TOPK), TOPK, d)["w"]
    assert np.linalg.norm(plain_sum - true_sum) > 2 * np.linalg.norm(sent_sum - true_sum)


def test_error_feedback_drops_a_diverged_residual() -> None:
    ef = ErrorFeedback()
    ef.compress({"w": np.array([np.nan, 1.0, 2.0, 3.0], np.float32)}, CompressionSpec(Compression.TOPK, 0.25))
    assert ef.residual == {}


# ---------------------------------------------------------------------------- hostile wire forms


def _topk_wire() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    d = _delta(seed=2)
    return d, compress(d, TOPK)


def _replace(wire: dict[str, np.ndarray], name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {k: (value if k == name else v) for k, v in wire.items()}


HOSTILE: dict[str, Any] = {
    "duplicate index": lambda w: _replace(w, "w.topk_indices", np.concatenate(
        [w["w.topk_indices"][:1], w["w.topk_indices"][:-1]])),
    "unsorted indices": lambda w: _replace(w, "w.topk_indices", w["w.topk_indices"][::-1].copy()),
    "index past the end": lambda w: _replace(w, "w.topk_indices", np.append(w["w.topk_indices"][:-1],
                                                                            np.int32(640))),
    "negative index": lambda w: _replace(w, "w.topk_indices", np.insert(w["w.topk_indices"][1:], 0, np.int32(-1))),
    "too many entries": lambda w: _replace(w, "w.topk_values", np.append(w["w.topk_values"], np.float32(1))),
    "too few indices": lambda w: _replace(w, "w.topk_indices", w["w.topk_indices"][:-1]),
    "int64 indices": lambda w: _replace(w, "w.topk_indices", w["w.topk_indices"].astype(np.int64)),
    "float64 values": lambda w: _replace(w, "w.topk_values", w["w.topk_values"].astype(np.float64)),
    "2-d values": lambda w: _replace(w, "w.topk_values", w["w.topk_values"].reshape(8, 8)),
    "a tensor missing": lambda w: {k: v for k, v in w.items() if k != "b.topk_values"},
    "an extra tensor": lambda w: {**w, "x": np.zeros(3, np.float32)},
    "dense instead": lambda w: _delta(seed=2),
    "non-float tensor recast": lambda w: _replace(w, "steps", np.array(7, np.int32)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_decompress_refuses_every_wire_form_compress_does_not_write(case: str) -> None:
    d, wire = _topk_wire()
    with pytest.raises(CompressionError):
        decompress(HOSTILE[case](wire), TOPK, d, "u-x")


@pytest.mark.parametrize("spec,wrong", [(F16, np.float32), (F16, np.uint16), (BF16, np.float16), (BF16, np.float32)])
def test_half_precision_wire_of_the_wrong_dtype_is_refused(spec: CompressionSpec, wrong: type) -> None:
    d = _delta()
    wire = compress(d, spec)
    with pytest.raises(CompressionError, match="wire tensor w"):
        decompress(_replace(wire, "w", d["w"].astype(wrong)), spec, d)
    with pytest.raises(CompressionError):
        decompress(_replace(wire, "w", wire["w"].reshape(64, 10)), spec, d)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("strategy,words", [
    ({"compression": "zip"}, "strategy.compression: 'zip' is not one of none, float16, bfloat16, topk"),
    ({"compression": "topk", "topk_fraction": 0}, "strategy.topk_fraction: must be in (0, 1]"),
    ({"compression": "topk", "topk_fraction": 1.5}, "strategy.topk_fraction: must be in (0, 1]"),
    ({"compression": "topk", "robust": "median"}, "strategy.compression: topk deltas are zero"),
])
def test_bad_compression_settings_are_config_errors(strategy: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_job_config(overrides={"strategy": strategy}, environ={})
    assert str(err.value).startswith(words), err.value


def test_params_of_a_job_without_compression_are_what_they_were_before_it() -> None:
    """Versions carry the strategy's params: without compression they hold no new key, so a release
    that predates compression still reads them; with it, both keys travel and read back."""
    assert not {"compression", "topk_fraction"} & set(StrategyConfig().to_params())
    cfg = StrategyConfig(compression=Compression.TOPK, topk_fraction=0.05)
    assert cfg.to_params()["compression"] == "topk" and StrategyConfig.from_params(cfg.to_params()) == cfg
    half = StrategyConfig(compression=Compression.BFLOAT16)
    assert "topk_fraction" not in half.to_params() and StrategyConfig.from_params(half.to_params()) == half


def test_an_encrypted_job_refuses_compression() -> None:
    with pytest.raises(ConfigError, match="strategy.compression = bfloat16: an encrypted job"):
        he.check_strategy(StrategyConfig(compression=Compression.BFLOAT16))
    he.check_strategy(StrategyConfig(robust=Robust.NONE))  # none is fine


def test_init_check_exits_2_with_one_line_for_a_bad_compression(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[strategy]\ncompression = "topk"\ntopk_fraction = 2.0\n')
    res = run_fedmq("init", "--check", str(path), timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "strategy.topk_fraction" in res.stderr


def test_demo_refuses_compression_with_homomorphic_aggregation_before_starting_anything() -> None:
    res = run_fedmq("demo", "--privacy", "he", "--compression", "topk", "--broker",
                    "amqp://guest:guest@127.0.0.1:1/%2F", timeout=60)  # nothing listens: refused before connecting
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--compression topk: --privacy he" in res.stderr


# ---------------------------------------------------------------------------- the aggregator's check


def _update(job: str, uid: str, wire: dict[str, np.ndarray], tag: str | None, site: str = "site-0") -> Update:
    return Update(job=job, update_id=uid, task_id=uid, site=site, base_version=0, num_samples=10, delta=wire,
                  compression=tag, schema=COMPRESSED_UPDATE_SCHEMA if tag else 1)


def test_validated_delta_is_the_dense_delta_and_the_tag_must_be_the_jobs() -> None:
    d = _delta(seed=4)
    cfg = StrategyConfig(compression=Compression.TOPK, topk_fraction=0.1)
    tau, dense = validated_delta(_update("j", "u1", compress(d, TOPK), "topk"), job="j", current_version=0,
                                 template=d, cfg=cfg)
    assert tau == 0 and np.count_nonzero(dense["w"]) == 64
    for tag, wire in (("float16", compress(d, F16)), (None, d)):
        with pytest.raises(CompressionMismatchError, match="strategy.compression is topk"):
            validated_delta(_update("j", "u2", wire, tag), job="j", current_version=0, template=d, cfg=cfg)
    with pytest.raises(CompressionMismatchError):  # an uncompressed job refuses a compressed update too
        validated_delta(_update("j", "u3", compress(d, F16), "float16"), job="j", current_version=0, template=d,
                        cfg=StrategyConfig())


def test_a_compressed_update_survives_the_wire_with_its_tag() -> None:
    d, wire = _topk_wire()
    u = Update.decode(_update("j", "u1", wire, "topk").encode())
    assert u.compression == "topk" and u.schema == COMPRESSED_UPDATE_SCHEMA and list(u.delta or {}) == list(wire)
    plain = _update("j", "u2", d, None)
    assert b"compression" not in plain.encode()  # absent when unset: a schema-1 reader reads it


# ---------------------------------------------------------------------------- the real broker


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_hostile_compressed_updates_are_dead_lettered_with_a_reason(broker_url: str, job: str) -> None:
    cfg = StrategyConfig(buffer_size=2, flush_timeout=120.0, compression=Compression.TOPK, topk_fraction=0.1)
    v0 = declare_job_with_v0(broker_url, job, cfg)  # logreg 64 -> 10: weight [10, 64], bias [10]
    t = v0.weights
    rng = np.random.default_rng(5)
    dense = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in t.items()}
    good = compress(dense, TOPK)
    w = next(iter(t))  # the weight tensor's name
    idx, values = f"{w}.topk_indices", f"{w}.topk_values"
    bad: dict[str, tuple[dict[str, np.ndarray], str | None, str]] = {
        "dup": (_replace(good, idx, np.concatenate([good[idx][:1], good[idx][:-1]])), "topk", "bad_compression"),
        "range": (_replace(good, idx, np.append(good[idx][:-1], np.int32(10_000))), "topk", "bad_compression"),
        "unsorted": (_replace(good, idx, good[idx][::-1].copy()), "topk", "bad_compression"),
        "length": (_replace(good, values, good[values][:-1]), "topk", "bad_compression"),
        "dtype": (_replace(good, values, good[values].astype(np.float16)), "topk", "bad_compression"),
        "untagged": (dense, None, "compression_mismatch"),
        "othertag": (compress(dense, F16), "float16", "compression_mismatch"),
    }
    with running_aggregator(broker_url, job):
        publish_updates(broker_url, job, [_update(job, f"u-{name}", wire, tag) for name, (wire, tag, _) in bad.items()])
        publish_updates(broker_url, job, [_update(job, "u-good1", good, "topk"),
                                          _update(job, "u-good2", compress(dense, TOPK), "topk", site="site-1")])
        got = wait_for_version(broker_url, job, 1)
    assert sorted(got[1].included) == ["u-good1", "u-good2"]  # round-robin by site: either order
    expected = 2 * decompress(good, TOPK, t)[w]  # both good updates, equal weights: the mean is one of them
    assert np.allclose(got[1].weights[w] - t[w], expected / 2, atol=1e-7)
    reasons = {dl.update_id: (dl.reason, dl.detail) for dl in dead_letters(broker_url, job)}
    assert {uid: r for uid, (r, _) in reasons.items()} == {f"u-{n}": reason for n, (_, _, reason) in bad.items()}
    assert "strictly increasing" in reasons["u-dup"][1] and "outside" in reasons["u-range"][1]
    assert "strategy.compression is topk" in reasons["u-untagged"][1]


def _job_config(job: str, tmp_path: Path, test_file: Path, compression: str, **sections: Any) -> Any:
    return load_job_config(overrides={
        "job": job, "data": {"test": str(test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0, "compression": compression,
                     "topk_fraction": 0.1},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "coordinator": {"concurrency": 3, "target_accuracy": 0.0, "max_versions": 10, "max_seconds": 90,
                        "out": str(tmp_path / "out")},
        **sections,
    }, environ={})


@pytest.mark.broker
@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression", ["float16", "bfloat16", "topk"])
def test_a_compressed_job_reaches_its_versions_and_replays_bit_for_bit(
        broker_url: str, job: str, tmp_path: Path, compression: str) -> None:
    """Three real workers (signed: the signature covers the compressed form), a coordinator and an
    aggregator on threads; every update on the log is compressed as the job says; replay finds 0 mismatches."""
    part = write_partition(tmp_path / "data", "digits", 3, scheme="dirichlet", alpha=1.0, seed=0)
    sites = [f"site-{i}" for i in range(3)]
    keys = {s: generate_site_key(tmp_path / "keys", s)[0] for s in sites}
    cfg = _job_config(job, tmp_path, part.test_file, compression,
                      signing={"registry": str(tmp_path / "keys" / "registry.json")})
    # site-0 trains with a loop of its own (fedmq.site): compression applies to whatever it returns
    workers = [Worker(broker_url, job, s, part.site_files[i], options=WorkerOptions(
                          device="cpu", key=str(keys[s]), min_task_seconds=0.3),  # every site gets tasks
                      trainer=user_trainer.adam_trainer if i == 0 else None)
               for i, s in enumerate(sites)]
    result = run_threaded_job(Coordinator(broker_url, cfg, stop=threading.Event()),
                              Aggregator(broker_url, job, stop=threading.Event(), name="agg-compress"), workers)
    assert result.stop_reason == "max_versions" and result.versions >= 10, result
    assert not dead_letters(broker_url, job)
    updates = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
    assert updates and all(u.compression == compression and len(u.signature) == 64 for u in updates)
    assert {u.site for u in updates} == set(sites)
    assert all(u.metrics.get("trainer") == "adam" for u in updates if u.site == "site-0")
    if compression == "topk":  # 10 % of logreg's 640 weights and 10 biases
        assert all(list(u.delta or {}) == ["1.weight.topk_indices", "1.weight.topk_values", "1.bias.topk_indices",
                                           "1.bias.topk_values"] and len(u.delta["1.weight.topk_values"]) == 64
                   for u in updates if u.delta is not None)
    else:
        assert all(u.delta is not None and u.delta["1.weight"].dtype == (np.float16 if compression == "float16"
                                                                         else np.uint16) for u in updates)
    report = replay(broker_url, job)
    d = report.to_dict()
    assert d["mismatches"] == 0 and d["first_mismatch"] is None, d
    assert report.count(Status.OK) == result.versions


def test_decompress_is_total_on_random_wire_forms() -> None:
    """Whatever tensors a site sends (random names, dtypes, shapes, indices), decompress returns the
    model's dense shapes or raises CompressionError: never another exception, never a wrong shape."""
    from fedmq.shared.codec import DTYPES

    rng = np.random.default_rng(11)
    template = {"w": np.zeros((6, 5), np.float32), "s": np.zeros((), np.float32), "e": np.zeros(0, np.float32),
                "n": np.zeros(3, np.int64)}
    dtypes = list(DTYPES.values())
    for spec in (TOPK, F16, BF16):
        good = compress({k: rng.normal(size=v.shape).astype(v.dtype) for k, v in template.items()}, spec)
        for _ in range(400):
            wire = dict(good)
            name = list(wire)[rng.integers(len(wire))]
            size = int(rng.integers(0, 40))
            kind = rng.integers(4)
            if kind == 0:
                wire[name] = rng.integers(-50, 50, size).astype(dtypes[rng.integers(len(dtypes))])
            elif kind == 1:
                wire[name] = np.sort(rng.integers(-2, 35, size)).astype(wire[name].dtype)
            elif kind == 2:
                wire.pop(name)
            else:
                wire[name] = wire[name].reshape(-1)[: max(0, wire[name].size - 1)]
            try:
                out = decompress(wire, spec, template, "u-fuzz")
            except CompressionError:
                continue
            assert {k: (v.shape, v.dtype) for k, v in out.items()} == \
                {k: (v.shape, v.dtype) for k, v in template.items()}


def test_what_if_replay_decompresses_with_the_jobs_recorded_compression() -> None:
    """What-if feeds the logged (compressed) updates to another strategy: they are decompressed as the
    job sent them, whatever the what-if's own params say; a tampered one is skipped and counted."""
    from fedmq.replay import WhatIf
    from fedmq.shared.config import StrategyName
    from fedmq.shared.messages import make_version

    job_cfg = StrategyConfig(buffer_size=2, compression=Compression.TOPK, topk_fraction=0.1)
    d0 = _delta(seed=8)
    v0 = make_version(job="j", version=0, parent=-1, weights={k: np.zeros_like(v) for k, v in d0.items()},
                      included=[], strategy="fedbuff", params=job_cfg.to_params(), model={})
    wi = WhatIf(StrategyConfig(name=StrategyName.FEDASYNC), v0, lambda w: 0.0)  # what-if: no compression set
    ef = ErrorFeedback()
    for i in range(3):
        wi.feed(_update("j", f"u{i}", ef.compress(_delta(seed=20 + i), TOPK), "topk"))
    d, wire = _topk_wire()
    wi.feed(_update("j", "u-bad", HOSTILE["duplicate index"](wire), "topk"))
    wi.feed(_update("j", "u-dense", d, None))
    assert wi.skipped["bad_compression"] == 2 and len(wi.contributions) == 3
    assert np.count_nonzero(wi.weights["w"]) <= 3 * 64 and np.count_nonzero(wi.weights["w"]) > 64


def test_simulate_compresses_each_sites_updates_as_the_aggregator_would_read_them(tmp_path: Path) -> None:
    """`fedmq simulate` shares the math: each simulated site compresses (own residual), the fold
    decompresses; top-k at 1 % moves only ~1 % of each tensor per update, so the runs differ."""
    from fedmq.simulate import SimSite, Simulation

    part = write_partition(tmp_path / "d", "digits", 3, scheme="iid", seed=0)
    weights = {}
    for c in ("none", "bfloat16", "topk"):
        cfg = load_job_config(overrides={"job": "s", "data": {"test": str(part.test_file)}, "model": {"name": "logreg"},
                                         "strategy": {"compression": c, "topk_fraction": 0.01, "buffer_size": 1},
                                         "coordinator": {"max_versions": 1}}, environ={})
        sim = Simulation(cfg, [SimSite(f"s{i}", Path(f), task_seconds=1.0) for i, f in enumerate(part.site_files)])
        v0 = {k: v.copy() for k, v in sim.weights.items()}
        assert sim.run().versions == 1
        weights[c] = {k: sim.weights[k] - v0[k] for k in v0}
    moved = {c: int(np.count_nonzero(w["1.weight"])) for c, w in weights.items()}
    assert moved["topk"] == math.ceil(0.01 * 640) and moved["none"] > 500, moved  # digits: some pixels are always 0
    assert not np.array_equal(weights["bfloat16"]["1.weight"], weights["none"]["1.weight"])
    assert np.allclose(weights["bfloat16"]["1.weight"], weights["none"]["1.weight"], rtol=2**-7, atol=1e-7)
