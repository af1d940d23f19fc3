"""Whole jobs on the real broker, every role a real OS process (`fedmq demo` starts them)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.shared.broker import Connection, JobNames, read_last, read_stream
from fedmq.shared.codec import pack
from fedmq.shared.messages import Event, EventKind, ModelVersion, Update
from fedmq.shared.signing import load_private_key, sign_update
from tests.conftest import ROOT, child_env, fedmq_cmd, run_fedmq
from tests.jobkit import dead_letters, make_update, publish_raw, publish_updates, versions, with_task_proof

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(420)]

DEMO_FIELDS = {"job", "strategy", "final_accuracy", "versions", "updates_applied", "updates_dead_lettered",
               "wall_seconds", "seconds_to_target"}


def _result(stdout: str) -> dict[str, Any]:
    """The --json contract: the last stdout line is one JSON object."""
    last = stdout.strip().splitlines()[-1]
    obj = json.loads(last)
    assert isinstance(obj, dict)
    assert DEMO_FIELDS <= set(obj)  # the README's demo fields; features may add their own
    return obj


def _evaluated(url: str, job: str) -> dict[int, float]:
    """version -> test accuracy, as the coordinator journaled it on the events stream."""
    out = {}
    for d in read_stream(url, JobNames(job).events, "first"):
        ev = Event.decode(d.body)
        if ev.event == EventKind.VERSION_EVALUATED:
            out[int(ev.data["version"])] = float(ev.data["accuracy"])
    return out


def _demo_args(broker_url: str, job: str, workdir: Path, *extra: str) -> list[str]:
    return ["demo", "--json", "--broker", broker_url, "--job", job, "--workdir", str(workdir),
            "--max-seconds", "240", *extra]


def test_a_small_job_converges_and_exports_the_final_model(broker_url: str, job: str, tmp_path: Path) -> None:
    proc = run_fedmq(*_demo_args(broker_url, job, tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _result(proc.stdout)
    assert res["job"] == job and res["strategy"] == "fedbuff"
    accuracy = _evaluated(broker_url, job)
    # the job stopped because a version reached the target and hands that version over; updates
    # still in flight are folded afterwards into newer versions, which stay in the stream
    assert res["seconds_to_target"] is not None and res["seconds_to_target"] <= res["wall_seconds"]
    assert res["final_accuracy"] == accuracy[res["final_version"]] >= 0.9
    assert min(v for v, a in accuracy.items() if a >= 0.9) == res["final_version"] <= res["versions"]
    assert res["last_accuracy"] == accuracy[res["versions"]]
    assert res["updates_dead_lettered"] == 0
    history = versions(broker_url, job)
    assert history[-1].version == res["versions"] >= 1
    assert [mv.parent for mv in history] == list(range(-1, len(history) - 1))
    included = [uid for mv in history for uid in mv.included]
    assert len(included) == len(set(included)) == res["updates_applied"]
    assert all(mv.verify_hash() for mv in history)
    meta = json.loads((tmp_path / "model" / f"{job}-v{res['final_version']}.json").read_text())
    assert meta["sha256"] == history[res["final_version"]].sha256 and meta["accuracy"] == res["final_accuracy"]
    assert (tmp_path / "model" / f"{job}-v{res['final_version']}.pt").stat().st_size > 0


def test_synchronous_fedavg_demo_ends_with_the_json_object(broker_url: str, job: str, tmp_path: Path) -> None:
    proc = run_fedmq(*_demo_args(broker_url, job, tmp_path, "--strategy", "fedavg", "--sites", "4",
                                 "--slow", "1", "--target", "0.85"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _result(proc.stdout)
    assert res["strategy"] == "fedavg" and res["final_accuracy"] >= 0.85
    for mv in versions(broker_url, job)[1:]:
        assert len(mv.included) == 4  # a whole cohort per version
        assert all(c["staleness"] == 0 for c in mv.contributions)


def _wait_for_v0(url: str, job: str, proc: subprocess.Popen[str], timeout: float = 120) -> ModelVersion:
    deadline = time.monotonic() + timeout
    names = JobNames(job)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited early: {proc.communicate()[1][-3000:]}")
        with Connection(url, name="fedmq-test-probe").open() as conn:
            exists = conn.job_exists(names)
        last = read_last(url, names.models) if exists else None
        if last is not None:
            return ModelVersion.decode(last.body)
        time.sleep(0.3)
    raise AssertionError(f"job {job} published no v0 within {timeout}s")


def test_malformed_updates_are_dead_lettered_and_the_job_still_finishes(
        broker_url: str, job: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(fedmq_cmd(*_demo_args(broker_url, job, tmp_path, "--target", "0.85")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT)
    try:
        v0 = _wait_for_v0(broker_url, job, proc)
        template = {k: np.asarray(v) for k, v in v0.weights.items()}
        # answers to "issued" tasks (signed with the coordinator's own task key), signed like site-0
        # (the demo gives every site a key and the job a registry): these fail on their content
        task_key = load_private_key(tmp_path / "model" / f"{job}.task.key")
        wrong_shape = make_update(job, "evil-shape", {k: np.zeros(3, v.dtype) for k, v in template.items()})
        nan = Update(job=job, update_id="evil-nan", task_id="evil-nan", site="site-0", base_version=0,
                     num_samples=10, delta={k: np.full(v.shape, np.nan, v.dtype) for k, v in template.items()})
        wrong_job = make_update("not-this-job", "evil-job", template)
        unsigned = with_task_proof(make_update(job, "evil-unsigned", template), task_key)
        forged = make_update(job, "evil-forged", template)  # signed by the site, but no task was issued
        key = load_private_key(tmp_path / "keys" / "site-0.key")
        signed = [sign_update(u, key) for u in (with_task_proof(wrong_shape, task_key),
                                                with_task_proof(nan, task_key), wrong_job, forged)]
        publish_updates(broker_url, job, [*signed, unsigned])
        publish_raw(broker_url, job, b"\x92\xc1 not msgpack", update_id="evil-msgpack")
        publish_raw(broker_url, job, pack({"schema": 1, "job": job, "update_id": "evil-fields"}),
                    update_id="evil-fields")
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, stderr[-3000:]
    res = _result(stdout)
    assert res["seconds_to_target"] is not None and max(_evaluated(broker_url, job).values()) >= 0.85
    assert res["updates_dead_lettered"] == 7
    reasons = {d.update_id: d.reason for d in dead_letters(broker_url, job)}
    assert reasons == {"u-evil-shape": "shape_mismatch", "u-evil-nan": "non_finite", "evil-job": "wrong_job",
                       "u-evil-unsigned": "bad_signature", "evil-forged": "unknown_task",
                       "evil-msgpack": "malformed", "evil-fields": "malformed"}
    included = {uid for mv in versions(broker_url, job) for uid in mv.included}
    assert not any("evil-" in uid for uid in included)
