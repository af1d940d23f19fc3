"""Job configuration: a TOML file, overridden by ``FEDMQ_<SECTION>_<KEY>`` env, overridden by flags.

Every section is a frozen dataclass validated in ``__post_init__``; an unknown key, a wrong type or
an out-of-range value raises `ConfigError` naming the key (``strategy.buffer_size``), which the CLI
prints as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ConfigError

C = TypeVar("C")


class StrategyName(StrEnum):
    FEDBUFF = "fedbuff"
    FEDASYNC = "fedasync"
    FEDAVG = "fedavg"


class StalenessFn(StrEnum):
    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    HINGE = "hinge"


class ExportPolicy(StrEnum):
    """Which version a finished job hands over (exports and reports as final)."""

    TARGET = "target"  # the first version that reached target_accuracy; the newest when none did
    LAST = "last"      # always the newest version, whatever its accuracy


class Robust(StrEnum):
    NONE = "none"
    TRIMMED_MEAN = "trimmed_mean"
    MEDIAN = "median"


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class StrategyConfig:
    """How the aggregator merges updates. Travels inside every ModelVersion as `params`."""

    name: StrategyName = StrategyName.FEDBUFF
    buffer_size: int = 4           # K: updates per version (FedAsync forces 1)
    server_lr: float = 1.0         # FedBuff's global step on the buffered mean delta
    alpha: float = 0.6             # FedAsync mixing weight
    staleness: StalenessFn = StalenessFn.POLYNOMIAL
    staleness_a: float = 0.5       # polynomial/hinge exponent; 0.5 = FedBuff's 1/sqrt(1+tau)
    staleness_b: int = 4           # hinge: no discount up to b versions
    max_staleness: int = 50        # older updates are dead-lettered with reason "stale"
    sample_weighted: bool = True   # weight by num_samples (FedAvg's n_k/n)
    flush_timeout: float = 10.0    # publish a partial buffer after this many idle seconds
    robust: Robust = Robust.NONE   # trimmed_mean / median keep the buffer in memory
    trim_fraction: float = 0.1
    clip_norm: float = 0.0         # > 0: scale each delta to at most this L2 norm before folding
    max_update_norm: float = 0.0   # > 0: dead-letter deltas with a larger L2 norm ("norm_bound")

    def __post_init__(self) -> None:
        _require(self.buffer_size >= 1, "strategy.buffer_size", f"must be >= 1, got {self.buffer_size}")
        _require(self.server_lr > 0, "strategy.server_lr", f"must be > 0, got {self.server_lr}")
        _require(0 < self.alpha <= 1, "strategy.alpha", f"must be in (0, 1], got {self.alpha}")
        _require(self.staleness_a >= 0, "strategy.staleness_a", f"must be >= 0, got {self.staleness_a}")
        _require(self.staleness_b >= 0, "strategy.staleness_b", f"must be >= 0, got {self.staleness_b}")
        _require(self.max_staleness >= 0, "strategy.max_staleness", f"must be >= 0, got {self.max_staleness}")
        _require(self.flush_timeout > 0, "strategy.flush_timeout", f"must be > 0, got {self.flush_timeout}")
        _require(0 <= self.trim_fraction < 0.5, "strategy.trim_fraction",
                 f"must be in [0, 0.5), got {self.trim_fraction}")
        _require(self.clip_norm >= 0, "strategy.clip_norm", f"must be >= 0, got {self.clip_norm}")
        _require(self.max_update_norm >= 0, "strategy.max_update_norm",
                 f"must be >= 0, got {self.max_update_norm}")
        if self.name is StrategyName.FEDAVG:
            _require(self.max_staleness == 0, "strategy.max_staleness",
                     "synchronous fedavg needs max_staleness = 0 (every update from the current version)")

    @property
    def effective_buffer(self) -> int:
        return 1 if self.name is StrategyName.FEDASYNC else self.buffer_size

    def to_params(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> StrategyConfig:
        return build(cls, params, "strategy")


@dataclass(frozen=True)
class TrainingConfig:
    """Local hyper-parameters sent in every task."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    mu: float = 0.0  # FedProx proximal term; 0 = plain local SGD

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "training.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, "training.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, "training.lr", f"must be > 0, got {self.lr}")
        _require(self.mu >= 0, "training.mu", f"must be >= 0, got {self.mu}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # logreg | mlp | cnn | package.module:callable
    args: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args)}


@dataclass(frozen=True)
class DataConfig:
    test: str = ""  # NPZ/CSV file of held-out test data the coordinator evaluates on


@dataclass(frozen=True)
class CoordinatorConfig:
    concurrency: int = 8             # tasks kept outstanding (fedavg: the cohort size)
    target_accuracy: float = 0.0     # stop when a version reaches it; 0 = no target
    max_versions: int = 200
    max_seconds: float = 600.0
    task_deadline: float = 300.0     # a task unfinished after this is reissued
    out: str = "fedmq-out"           # where the final model is exported
    #: "target": export the version that met the target (versions folded from updates still in
    #: flight at the stop are kept in the stream, but can be worse); "last": the newest version
    export: ExportPolicy = ExportPolicy.TARGET

    def __post_init__(self) -> None:
        _require(self.concurrency >= 1, "coordinator.concurrency", f"must be >= 1, got {self.concurrency}")
        _require(0 <= self.target_accuracy <= 1, "coordinator.target_accuracy",
                 f"must be in [0, 1], got {self.target_accuracy}")
        _require(self.max_versions >= 1, "coordinator.max_versions", f"must be >= 1, got {self.max_versions}")
        _require(self.max_seconds > 0, "coordinator.max_seconds", f"must be > 0, got {self.max_seconds}")
        _require(self.task_deadline > 0, "coordinator.task_deadline", f"must be > 0, got {self.task_deadline}")


@dataclass(frozen=True)
class RetentionConfig:
    max_age: str = ""    # e.g. "30D"; empty = keep forever (full audit trail)
    max_bytes: int = 0   # 0 = unbounded


class PrivacyMechanism(StrEnum):
    NONE = "none"
    DP_SGD = "dp_sgd"        # record-level: Opacus DP-SGD at every site
    DP_FEDAVG = "dp_fedavg"  # update-level: clip each update, add Gaussian noise


class NoisePlacement(StrEnum):
    SITE = "site"              # every update is noised before it leaves the site
    AGGREGATOR = "aggregator"  # the aggregator noises each version's sum (trusted aggregator)


class AccountantName(StrEnum):
    RDP = "rdp"
    PRV = "prv"


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of the job; sites receive it in Task.options["privacy"].

    With noise_multiplier = 0, sigma is calibrated so that `planned_tasks` tasks of one site spend
    exactly `epsilon` (DP-SGD: at that site's sample rate; DP-FedAvg: `planned_tasks` releases).
    `epsilon` is also each site's budget: a site refuses the task that would take it past it.
    """

    mechanism: PrivacyMechanism = PrivacyMechanism.NONE
    epsilon: float = 0.0          # per-site budget; 0 = no budget (needs noise_multiplier > 0)
    delta: float = 1e-5
    noise_multiplier: float = 0.0  # sigma; 0 = calibrated from epsilon and planned_tasks
    planned_tasks: int = 20        # tasks (DP-FedAvg: updates) one site's budget should pay for
    max_grad_norm: float = 1.0     # dp_sgd: per-sample gradient clip C
    accountant: AccountantName = AccountantName.RDP  # dp_sgd: the site ledger's Opacus accountant
    clip_norm: float = 1.0         # dp_fedavg: update L2 clip C
    noise_at: NoisePlacement = NoisePlacement.SITE  # dp_fedavg: local or central noise
    stop_when_spent: float = 1.0   # end the job once this fraction of the sites that trained is spent

    def __post_init__(self) -> None:
        _require(self.epsilon >= 0, "privacy.epsilon", f"must be >= 0, got {self.epsilon}")
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        _require(self.noise_multiplier >= 0, "privacy.noise_multiplier",
                 f"must be >= 0, got {self.noise_multiplier}")
        _require(self.planned_tasks >= 1, "privacy.planned_tasks", f"must be >= 1, got {self.planned_tasks}")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(self.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(0 < self.stop_when_spent <= 1, "privacy.stop_when_spent",
                 f"must be in (0, 1], got {self.stop_when_spent}")
        if self.mechanism is not PrivacyMechanism.NONE:
            _require(self.epsilon > 0 or self.noise_multiplier > 0, "privacy.epsilon",
                     "set privacy.epsilon (a budget) or privacy.noise_multiplier (a fixed sigma)")

    @property
    def central(self) -> bool:
        return self.mechanism is PrivacyMechanism.DP_FEDAVG and self.noise_at is NoisePlacement.AGGREGATOR

    def to_options(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PrivacyConfig:
        return build(cls, options, "privacy")


class EncryptionScheme(StrEnum):
    NONE = "none"
    CKKS = "ckks"  # homomorphic: sites encrypt, the aggregator sums ciphertexts, a key holder decrypts


@dataclass(frozen=True)
class EncryptionConfig:
    """Homomorphic aggregation (docs/privacy.md). The coordinator publishes the public context in v0;
    only the key holder (`fedmq keyholder`, or the coordinator when secret_context is set) decrypts."""

    scheme: EncryptionScheme = EncryptionScheme.NONE
    public_context: str = ""   # <job>.public.ctx written by `fedmq keys --job ID --out DIR`
    secret_context: str = ""   # set only when the coordinator itself is the key holder

    def __post_init__(self) -> None:
        if self.scheme is EncryptionScheme.CKKS:
            _require(bool(self.public_context), "encryption.public_context",
                     "scheme ckks needs the public context file (fedmq keys --job ID --out DIR)")
        else:
            _require(not self.secret_context, "encryption.secret_context",
                     "only meaningful with scheme = \"ckks\"")

    @property
    def enabled(self) -> bool:
        return self.scheme is not EncryptionScheme.NONE


@dataclass(frozen=True)
class SigningConfig:
    """Ed25519 update signatures: with a registry, the aggregator dead-letters any update that is
    unsigned or does not verify ("bad_signature"); without one, signatures are not required."""

    registry: str = ""  # registry.json (site -> public key hex) from `fedmq keys --site NAME`


@dataclass(frozen=True)
class JobConfig:
    job: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)


# resolved hints, not Field.type: with postponed annotations that is only the string "StrategyConfig"
SECTIONS: dict[str, type] = {name: typ for name, typ in typing.get_type_hints(JobConfig).items()
                             if name not in ("job", "seed")}


def _resolve_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a TOML or env value into `typ`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        return build(typ, value, key)  # type: ignore[arg-type]
    if isinstance(typ, type) and issubclass(typ, Enum):
        try:
            return typ(value)
        except ValueError:
            choices = ", ".join(m.value for m in typ)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: {value!r} is not a boolean")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    if origin is dict or typ is dict:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not a table / JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        return dict(value)
    return value


def build(cls: type[C], values: dict[str, Any], prefix: str) -> C:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys by their full name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in values:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, _resolve_type(cls, k), f"{prefix}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``FEDMQ_STRATEGY_BUFFER_SIZE=8`` -> ``{"strategy": {"buffer_size": "8"}}``."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("FEDMQ_"):
            continue
        rest = name[len("FEDMQ_"):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
    return out


def env_names() -> list[str]:
    """Every FEDMQ_* variable the job config understands (docs, --help, compose checks)."""
    names = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            names.append(f"FEDMQ_{section.upper()}_{f.name.upper()}")
    return names


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_job_config(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
                    environ: dict[str, str] | None = None) -> JobConfig:
    """TOML file (optional) < FEDMQ_* env < `overrides` (flags)."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    raw = merge(raw, env_overrides(environ))
    raw = merge(raw, overrides or {})
    return build(JobConfig, raw, "config")
