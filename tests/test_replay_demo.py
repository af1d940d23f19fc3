"""The issue's acceptance run: a whole demo job (real processes), then `fedmq replay` on it
reports 0 mismatches for every version, and a what-if under another strategy prints both curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_fedmq

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(420)]


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("part_bytes", ["", "4096"], ids=["whole", "in-parts"])
def test_a_finished_demo_job_replays_bit_for_bit_and_under_another_strategy(
        broker_url: str, job: str, tmp_path: Path, part_bytes: str) -> None:
    """In parts: every model, update and event over 4 KiB crosses the broker as parts."""
    env = {"FEDMQ_PART_BYTES": part_bytes}
    demo = run_fedmq("demo", "--broker", broker_url, "--job", job, "--sites", "4", "--slow", "1",
                     "--target", "0.8", "--max-seconds", "90", "--workdir", str(tmp_path), "--json",
                     timeout=300, **env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    result = _last_json(demo.stdout)
    assert result["versions"] >= 1

    res = run_fedmq("replay", "--broker", broker_url, "--job", job, "--json", timeout=120, **env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = _last_json(res.stdout)
    assert out["mismatches"] == 0 and out["first_mismatch"] is None
    assert out["versions_recomputed"] == out["versions_read"] - 1 >= result["versions"]  # all but v0
    assert {v["status"] for v in out["versions"]} == {"root", "ok"}
    assert out["updates_replayed"] == result["updates_applied"]

    test = tmp_path / "data" / "test.npz"
    wi = run_fedmq("replay", "--broker", broker_url, "--job", job, "--strategy", "fedasync",
                   "--param", "alpha=0.6", "--test", str(test), "--json", timeout=180, **env)
    assert wi.returncode == 0, wi.stderr[-2000:]
    out = _last_json(wi.stdout)
    assert len(out["original"]["curve"]) == out["versions_read"]
    assert out["what_if"]["versions"] == out["what_if"]["updates_folded"] >= 1  # FedAsync: one per update
    recorded = {p["version"]: p["accuracy"] for p in out["original"]["curve"]}
    assert abs(recorded[result["final_version"]] - result["final_accuracy"]) < 1e-9  # same model and test data
