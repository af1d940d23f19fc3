"""Every benchmark `make bench` runs, in its quick mode: a benchmark broken by a change fails CI
instead of the next `make bench`. BENCHMARKS.md is not touched (`run` returns the section).

The demo-based ones start real `fedmq demo` processes and take a minute or more each: `slow`.
The Byzantine benchmark has its own quick test (test_byzantine_bench.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from bench import run_all

#: short name -> (needs a broker, slow, text the section must contain)
EXPECT: dict[str, tuple[bool, bool, list[str]]] = {
    "codec": (False, False, ["best of 3 samples", "| 1,000,000 | Update framed |", "| 1,000,000 | verify: map form |"]),
    "aggregator": (True, False, ["aggregator / consume+ack", "| digits MLP", "| MNIST MLP", "| fedbuff K=10 |",
                                 "| fedasync |", "growth (models)"]),
    "overhead": (True, False, ["| digits MLP", "| MNIST MLP"]),
    "replay": (True, True, ["| demo job (", "| synthetic, 200,000 float32 params"]),
    "ops": (True, False, ["| `fedmq monitor --once --json` (child process", "| live `fedmq monitor` refresh",
                          "| `fedmq replay --json` (every version recomputed", "updates/s"]),
    "he": (False, True, ["decrypt + apply (key holder, per version)", "| 1,000,000 | encrypt (site)"]),
    "he_tta": (True, True, ["| none |", "| he |", "ratio he / none"]),
    "dp": (True, True, ["| no DP |", "| DP-SGD, epsilon 4 |"]),
    "tta": (True, True, ["| FedBuff |", "| FedAvg (synchronous) |", "fedmq / bound"]),
    "fedeval": (True, True, ["| central only |", "| federated only (no test data) |", "against central only"]),
    "flood": (True, True, ["| no flood |", "hostile bodies from site-0 |"]),
    "site_queues": (True, False, ["| none (shared queue only) |", "| 50 |", "aggregator subscribes to all"]),
    "compression": (True, True, ["| none |", "| bfloat16 |", "| topk 10 % |", "bytes / none"]),
    "large_models": (True, True, ["| ~100k (101,260) |", "per message / raw", "0 mismatches"]),
    "fleet": (True, True, ["| updates lost / double counted | 0 / 0 | 0 / 0 | 0 / 0 |",
                           "| RSS per site beyond data |", "separate workers / fleet at 30 sites"]),
}
OWN_TEST = {"byzantine": "tests/test_byzantine_bench.py", "many_jobs": "tests/test_many_jobs.py"}


def _params() -> list[object]:
    out = []
    for name, (broker, slow, _) in EXPECT.items():
        marks = [pytest.mark.timeout(900 if slow else 300)]
        if broker:
            marks.append(pytest.mark.broker)
        if slow:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_every_benchmark_of_make_bench_has_a_quick_run_test() -> None:
    assert set(EXPECT) | set(OWN_TEST) == set(run_all.BENCHMARKS)
    for path in OWN_TEST.values():
        assert (Path(__file__).resolve().parent.parent / path).is_file()


@pytest.mark.parametrize("name", _params())
def test_quick_mode_measures_its_section(name: str, request: pytest.FixtureRequest) -> None:
    broker, _, expected = EXPECT[name]
    url = request.getfixturevalue("broker_url") if broker else ""
    module, _title = run_all.BENCHMARKS[name]
    body: str = importlib.import_module(module).run(url, quick=True)
    assert re.search(r"_Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on \d+ cores .*load average", body), body[:300]
    assert "|---|" in body
    for text in expected:
        assert text in body, f"{text!r} missing from {name}'s section:\n{body}"
    assert "nan" not in body.lower().split("|"), body


def test_a_failing_benchmark_is_recorded_and_leaves_its_section_alone(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# fedmq benchmarks\n\n## Aggregator throughput\n\nold figures\n")
    failed = run_all.measure("aggregator", "amqp://guest:guest@127.0.0.1:1/%2F", True, out)  # nothing listens
    assert failed.status.startswith("failed: ")
    assert "old figures" in out.read_text()
    measured = run_all.measure("codec", "", True, out)
    assert measured.status == "measured" and "## Codec" in out.read_text()
    section = run_all.run_section([failed, measured], quick=True, commit="abc1234", started="2026-01-01 00:00 UTC")
    assert "commit abc1234" in section and "--quick" in section
    assert re.search(r"\| Codec \(`codec`\) \| measured \| \d+ s \| [\d.]+ / [\d.]+ / [\d.]+ \|", section)
    assert "| Aggregator throughput (`aggregator`) | failed: " in section
    assert "`tta`" in section  # not run this time: said so


def test_a_partial_run_keeps_the_rows_of_the_benchmarks_it_did_not_measure() -> None:
    old = "| 2026-01-01 00:00 UTC, commit old1 |"
    tta = "| Time to accuracy (`tta`) | measured | 258 s | 1 / 1 / 1 | 2 / 2 / 2 " + old
    previous = ("| section | status | wall | load before | load after | when |\n|---|---|---|---|---|---|\n"
                f"{tta}\n| Codec (`codec`) | measured | 6 s | 1 / 1 / 1 | 1 / 1 / 1 {old}\n")
    codec = run_all.Outcome("codec", "measured", 9.0, (0.5, 0.5, 0.5), (0.6, 0.6, 0.6))
    section = run_all.run_section([codec], quick=False, commit="new2", started="2026-02-02 00:00 UTC",
                                  previous=previous)
    assert tta in section
    assert ("| Codec (`codec`) | measured | 9 s | 0.50 / 0.50 / 0.50 | 0.60 / 0.60 / 0.60 "
            "| 2026-02-02 00:00 UTC, commit new2 |") in section and f"{old}\n| Codec" not in section
    assert section.index("`codec`") < section.index("`tta`")  # rows in make bench's order
