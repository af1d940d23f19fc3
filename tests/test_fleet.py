"""`fedmq fleet`: many sites in one process, through the real broker.

The slow test runs a whole job (coordinator and aggregator as processes, 120 sites in one fleet
process, each with its own signing key) and checks the job's ledger read back from its streams:
every update id in exactly one version, none lost; the sites seen in versions; every logged
update signed by the key of the site it was routed as. The fast tests are the argument errors,
which exit 2 with one line before anything connects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.fleet import run_job
from fedmq import cli
from fedmq.fleet import FleetOptions, FleetSite, _worker_options, load_sites, run_fleet
from fedmq.shared.datasets import save_site, split_dataset
from fedmq.shared.errors import ConfigError
from fedmq.shared.signing import generate_site_key


def _exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (OneLineParser)
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    return code, err


BAD = {
    "no data": ["--sites", "3"],
    "both data kinds": ["--dataset", "synthetic", "--sites", "3", "--data", "x/*.npz"],
    "dataset without sites": ["--dataset", "synthetic"],
    "no such files": ["--data", "/nonexistent-fleet-dir/*.npz"],
    "zero lanes": ["--dataset", "synthetic", "--sites", "3", "--lanes", "0"],
    "keys dir missing": ["--dataset", "synthetic", "--sites", "3", "--keys", "/nonexistent-fleet-keys"],
    "unknown dataset": ["--dataset", "cifar", "--sites", "3"],
    "too many sites per lane": ["--dataset", "synthetic", "--sites", "2001", "--lanes", "1"],
}


@pytest.mark.parametrize("args", list(BAD.values()), ids=list(BAD))
def test_bad_arguments_exit_2_with_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit(["fleet", "--job", "j1", "--broker", "amqp://guest:guest@127.0.0.1:1/%2F",
                       "--broker-wait", "0", *args], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedmq"), err


def test_a_site_without_its_key_file_exits_2_before_connecting(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    generate_site_key(tmp_path, "site_0")  # site_1 has none
    code, err = _exit(["fleet", "--job", "j1", "--broker", "amqp://guest:guest@127.0.0.1:1/%2F",
                       "--dataset", "synthetic", "--sites", "2", "--keys", str(tmp_path)], capsys)
    assert code == 2 and "site_1.key" in err and len(err.splitlines()) == 1, err


def test_sites_from_files_take_their_names_from_the_stems(tmp_path: Path) -> None:
    ds, parts, _ = split_dataset("digits", 3, scheme="iid")
    for i, p in enumerate(parts):
        save_site(tmp_path / f"clinic-{i}.npz", ds.x[p], ds.y[p])
    sites = load_sites(data_glob=str(tmp_path / "clinic-*.npz"))
    assert [s.name for s in sites] == ["clinic-0", "clinic-1", "clinic-2"]
    assert [len(s.y) for s in sites] == [len(p) for p in parts]
    assert [s.name for s in load_sites(data_glob=str(tmp_path / "*.npz"), num_sites=2)] == ["clinic-0", "clinic-1"]
    with pytest.raises(ConfigError, match="matches only 3"):
        load_sites(data_glob=str(tmp_path / "*.npz"), num_sites=4)


def test_dataset_shards_are_the_partition_command_s_sites() -> None:
    ds, parts, _ = split_dataset("synthetic", 5, scheme="iid", seed=3)
    sites = load_sites(dataset="synthetic", num_sites=5, seed=3)
    assert [s.name for s in sites] == [f"site_{i}" for i in range(5)]
    for s, p in zip(sites, parts, strict=True):
        np.testing.assert_array_equal(s.y, ds.y[p])


def test_each_site_keeps_its_own_key_and_dp_ledger(tmp_path: Path) -> None:
    sites = load_sites(dataset="synthetic", num_sites=3)
    for s in sites:
        generate_site_key(tmp_path / "keys", s.name)
    opts = FleetOptions(keys=str(tmp_path / "keys"), ledger_dir=str(tmp_path / "ledgers"))
    per_site = [_worker_options(opts, s) for s in sites]
    assert [Path(o.key) for o in per_site] == [tmp_path / "keys" / f"site_{i}.key" for i in range(3)]
    assert [Path(o.ledger) for o in per_site] == [tmp_path / "ledgers" / f"site_{i}.dp-ledger.json" for i in range(3)]


def test_two_sites_with_one_name_are_refused() -> None:
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ConfigError, match="same name"):
        run_fleet("amqp://guest:guest@127.0.0.1:1/%2F", "j1", [FleetSite("a", x, y), FleetSite("a", x, y)],
                  FleetOptions())


def test_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["fleet", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--sites", "--dataset", "--data", "--lanes", "--threads", "--keys", "--ledger-dir", "--max-tasks"):
        assert flag in text


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_fleet_of_signed_sites_runs_a_job_with_nothing_lost_or_doubled(broker_url: str, tmp_path: Path) -> None:
    sites, updates = 120, 1000
    r = run_job(broker_url, tmp_path, sites=sites, updates=updates, sign=True, timeout=180)
    rep = r.ledger
    assert rep.ok, rep.to_dict()
    assert rep.lost == [] and rep.double_counted == [] and rep.never_logged == []
    assert rep.included >= updates
    assert rep.dead_lettered == 0  # in particular no bad_signature
    assert r.fleet["finished"] and r.fleet["errors"] == {}
    assert r.fleet["tasks"] >= rep.included
    # the broker spreads the tasks over every site's own consumer
    assert r.sites_in_versions >= int(0.9 * sites), r.updates_per_site
    assert set(r.updates_per_site) <= {f"site_{i}" for i in range(sites)}
    # every logged update carries its own site's signature (verified against the registry)
    assert r.signatures_verified >= rep.logged
    assert r.fleet["rss_peak_bytes"] > r.fleet["rss_baseline_bytes"] > 0
    assert r.aggregator.rss_peak > 0 and r.aggregator.cpu_seconds > 0
