"""Bundled datasets, the partitioners, and the per-site files a worker loads with --data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.shared.datasets import load_dataset, load_site, partition, save_site, synthetic, write_partition
from fedmq.shared.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def _label_entropy(y: np.ndarray, idx: np.ndarray) -> float:
    p = np.bincount(y[idx], minlength=10) / len(idx)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_every_sample_goes_to_exactly_one_site(scheme: str) -> None:
    parts = partition(LABELS, 8, scheme, alpha=0.5, seed=1)
    assert len(parts) == 8
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert set(joined.tolist()) == set(range(len(LABELS)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_iid_sites_have_equal_sizes() -> None:
    sizes = [len(p) for p in partition(LABELS, 8, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_a_small_dirichlet_alpha_skews_labels_more_than_iid_or_a_large_alpha() -> None:
    def mean_entropy(scheme: str, alpha: float) -> float:
        parts = partition(LABELS, 8, scheme, alpha=alpha, seed=3)
        return float(np.mean([_label_entropy(LABELS, p) for p in parts]))

    iid, wide, skewed = mean_entropy("iid", 1.0), mean_entropy("dirichlet", 100.0), mean_entropy("dirichlet", 0.1)
    assert skewed < wide - 0.5
    assert abs(wide - iid) < 0.1
    assert iid > np.log(10) - 0.1


def test_shards_give_each_site_few_labels() -> None:
    parts = partition(LABELS, 10, "shards", shards_per_site=2, seed=0)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_quantity_skew_varies_sizes_not_labels() -> None:
    parts = partition(LABELS, 5, "quantity", alpha=0.3, seed=4, min_size=10)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]


@pytest.mark.parametrize("scheme, alpha", [("dirichlet", 0.1), ("quantity", 1.0)])
def test_every_site_gets_at_least_min_size(scheme: str, alpha: float) -> None:
    for seed in range(5):
        parts = partition(LABELS, 10, scheme, alpha=alpha, seed=seed, min_size=20)
        assert min(len(p) for p in parts) >= 20


def test_partitions_are_reproducible_from_the_seed() -> None:
    a = partition(LABELS, 6, "dirichlet", seed=9)
    b = partition(LABELS, 6, "dirichlet", seed=9)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_sites": 0}, "num_sites must be >= 1"),
    ({"num_sites": 600}, "cannot give 600 sites"),
    ({"num_sites": 4, "scheme": "zipf"}, "partition scheme 'zipf'"),
    ({"num_sites": 4, "alpha": 0.0}, "alpha must be > 0"),
    ({"num_sites": 50, "scheme": "dirichlet", "alpha": 0.001, "min_size": 19}, "could not give every site"),
])
def test_impossible_partitions_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition(LABELS, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_site_files_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 1, 3, 4)).astype(np.float32)
    y = rng.integers(0, 10, 25).astype(np.int64)
    path = tmp_path / f"site{suffix}"
    save_site(path, x, y)
    gx, gy = load_site(path, input_shape=(1, 3, 4))
    assert gx.dtype == np.float32 and gy.dtype == np.int64
    np.testing.assert_array_equal(gy, y)
    np.testing.assert_array_equal(gx, x)


def test_a_csv_without_input_shape_loads_flat(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    save_site(path, np.ones((3, 2, 2), np.float32), np.array([0, 1, 2]))
    x, y = load_site(path)
    assert x.shape == (3, 4) and y.tolist() == [0, 1, 2]


def test_bad_site_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_site(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a fedmq NPZ"):
        load_site(junk)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros(3))
    with pytest.raises(ConfigError, match="is not a fedmq NPZ"):
        load_site(wrong)
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(ConfigError, match="3 inputs but 2 labels"):
        load_site(uneven)


@pytest.mark.parametrize("name, n, shape, classes", [
    ("digits", 1797, (64,), 10),
    ("breast_cancer", 569, (30,), 2),
    ("mnist", 5000, (1, 28, 28), 10),
    ("synthetic", 2000, (60,), 10),
])
def test_bundled_datasets_load_offline(name: str, n: int, shape: tuple[int, ...], classes: int) -> None:
    ds = load_dataset(name)
    assert len(ds.x) == len(ds.y) == n
    assert ds.input_shape == shape and ds.num_classes == classes
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert int(ds.y.max()) < classes and np.isfinite(ds.x).all()


def test_an_unknown_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dataset 'cifar' is not one of"):
        load_dataset("cifar")


def test_synthetic_sites_have_different_label_distributions() -> None:
    ds, parts = synthetic(1.0, 1.0, num_sites=5, seed=2)
    dists = [np.bincount(ds.y[p], minlength=10) / len(p) for p in parts]
    assert max(float(np.abs(a - b).sum()) for a in dists for b in dists) > 0.5


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_write_partition_holds_out_a_stratified_test_split(tmp_path: Path, fmt: str) -> None:
    res = write_partition(tmp_path, "digits", 4, alpha=0.5, test_fraction=0.2, seed=0, fmt=fmt)
    assert [f.name for f in res.site_files] == [f"site_{i}.{fmt}" for i in range(4)]
    meta = json.loads((tmp_path / "partition.json").read_text())
    xt, yt = load_site(res.test_file)
    assert meta["test_size"] == len(yt) and sum(meta["sizes"]) + len(yt) == 1797
    assert set(np.unique(yt).tolist()) == set(range(10))
    assert abs(len(yt) / 1797 - 0.2) < 0.01
    train = [load_site(f) for f in res.site_files]
    assert [len(y) for _, y in train] == meta["sizes"]
    # no test sample leaks into a site: compare rows as bytes
    test_rows = {r.tobytes() + bytes([int(c)]) for r, c in zip(xt, yt, strict=True)}
    leaked = sum(r.tobytes() + bytes([int(c)]) in test_rows for x, y in train for r, c in zip(x, y, strict=True))
    dup_in_digits = 1  # digits has a few identical images; tolerate one collision
    assert leaked <= dup_in_digits
    assert res.num_classes == 10 and res.input_shape == (64,)


def test_write_partition_of_synthetic_keeps_the_natural_sites(tmp_path: Path) -> None:
    res = write_partition(tmp_path, "synthetic", 5, seed=1)
    sizes = [len(load_site(f)[1]) for f in res.site_files]
    assert sizes == [160] * 5
    assert len(load_site(res.test_file)[1]) == 200


def test_a_bundled_dataset_without_its_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as in the site image
    with pytest.raises(ConfigError, match="leaves out"):
        load_dataset("digits")
