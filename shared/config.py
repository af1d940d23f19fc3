"""Job configuration: a TOML file, overridden by ``FEDMQ_<SECTION>_<KEY>`` env, overridden by flags.

Every section is a frozen dataclass validated in ``__post_init__``; an unknown key, a wrong type or
an out-of-range value raises `ConfigError` naming the key (``strategy.buffer_size``), which the CLI
prints as one line and exits 2.

Every numeric key declares its range on its annotation (``Annotated[int, In("[1, 10_000]")]``) and
`Section.__post_init__` checks them all, whoever built the object (TOML, env, flags, a ModelVersion's
params). So NaN and infinities never pass (they lie in no interval), a bool is not an integer, a
float is not accepted where an integer is required, and no value is unbounded: a 20-digit
buffer size or a ten-year-plus timeout is refused rather than overflowing or never firing. The
bounds are sanity limits, documented in docs/deploy.md, not tuning advice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from fedmq.shared.errors import ConfigError
from fedmq.shared.evaluation import EvalSource, TaskKind, parse_metrics

C = TypeVar("C")


class StrategyName(StrEnum):
    """A built-in strategy, or a user strategy named ``package.module:callable`` (a pseudo-member
    whose value is that text; `is_user` tells them apart; fedmq.aggregator.strategy loads it)."""

    FEDBUFF = "fedbuff"
    FEDASYNC = "fedasync"
    FEDAVG = "fedavg"

    @classmethod
    def _missing_(cls, value: object) -> StrategyName | None:
        if not isinstance(value, str) or value.count(":") != 1 or not all(value.partition(":")[::2]):
            return None
        member = str.__new__(cls, value)
        member._name_, member._value_ = "USER", value
        return cls._value2member_map_.setdefault(value, member)  # type: ignore[return-value]

    @property
    def is_user(self) -> bool:
        return ":" in self.value


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


class ClipCenter(StrEnum):
    """What the running-median clip measures each delta against."""

    ZERO = "zero"            # the delta itself: bounds its length, not its direction
    LAST_STEP = "last_step"  # its deviation from the previous version's step (centred clipping)


class ServerOptimizer(StrEnum):
    """The server's step on the buffered mean delta (Reddi et al., "Adaptive Federated Optimization")."""

    NONE = "none"        # w + server_lr * mean delta (FedBuff / FedAvg as published)
    ADAM = "adam"        # FedAdam
    YOGI = "yogi"        # FedYogi
    ADAGRAD = "adagrad"  # FedAdagrad


class Compression(StrEnum):
    """How a site's delta travels (shared/compression.py); the aggregator decompresses it."""

    NONE = "none"          # float32 as trained
    FLOAT16 = "float16"    # half the bytes, IEEE half precision (range +-65504)
    BFLOAT16 = "bfloat16"  # half the bytes, float32's range with 8 bits of mantissa
    TOPK = "topk"          # the largest topk_fraction of each tensor, with error feedback at the site


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


_INTERVAL_RE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")
_INT_RE = re.compile(r"^[+-]?[0-9]+$")


@dataclass(frozen=True)
class In:
    """A numeric interval written as in maths, "(0, 1]" or "[1, 10_000]": the range of one key.

    Written as one string so the bound reads like the docs and the field stays on one line (the
    starter config takes each field's comment from its source line).
    """

    text: str
    lo: float = field(init=False)
    hi: float = field(init=False)
    lo_open: bool = field(init=False)
    hi_open: bool = field(init=False)

    def __post_init__(self) -> None:
        m = _INTERVAL_RE.match(self.text)
        if not m:
            raise ValueError(f"interval {self.text!r} must look like [0, 1] or (0, 1]")
        object.__setattr__(self, "lo", float(m.group(2)))
        object.__setattr__(self, "hi", float(m.group(3)))
        object.__setattr__(self, "lo_open", m.group(1) == "(")
        object.__setattr__(self, "hi_open", m.group(4) == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below  # NaN compares false both ways: never inside

    def __str__(self) -> str:
        return "{}{}, {}{}".format("(" if self.lo_open else "[", _plain_number(self.lo),
                                   _plain_number(self.hi), ")" if self.hi_open else "]")

    def violation(self, value: float) -> str | None:
        """None when `value` is inside, else the one-line reason ("must be in (0, 1], got 1.5")."""
        return None if value in self else f"must be in {self}, got {value!r}"


def _plain_number(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)


def parse_number(value: Any, kind: type, key: str) -> int | float:
    """`value` (TOML value, env or flag string) as `kind` (int or float), or ConfigError naming `key`.

    Strict on purpose: a bool is not a number, 2.0 is not an integer (write 2), "1e3" is not an
    integer, and a float must be finite (NaN and infinities are refused here already).
    """
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not {noun}")
    if isinstance(value, str):
        text = value.strip()
        if kind is int and not _INT_RE.match(text):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:  # also a string of more digits than Python converts
            raise ConfigError(f"{key}: {value!r} is not {noun}") from None
    if kind is int:
        if not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if not isinstance(value, int | float):
        raise ConfigError(f"{key}: {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"{key}: {value!r} is too large") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return value


#: at most ten years: a longer timeout or deadline is a typo, and would never fire anyway
TEN_YEARS = 315_360_000
Seconds = Annotated[float, In("(0, 315_360_000]")]
Norm = Annotated[float, In("[0, 1e9]")]          # an L2 norm bound; 0 = off
Rate = Annotated[float, In("(0, 1000]")]         # a learning rate
Fraction = Annotated[float, In("(0, 1]")]
Seed = Annotated[int, In("[0, 4_294_967_295]")]  # what numpy and torch both take


@cache
def _field_ranges(cls: type) -> dict[str, tuple[type, In]]:
    """Field name -> (int or float, its declared interval), read from the Annotated hints once per class."""
    out: dict[str, tuple[type, In]] = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if typing.get_origin(hint) is Annotated:
            base, *extras = typing.get_args(hint)
            out.update((name, (base, e)) for e in extras if isinstance(e, In))
    return out


def range_of(cls: type, name: str) -> tuple[type, In]:
    """(int or float, interval) of numeric field `name` of section `cls` (flags reuse it)."""
    return _field_ranges(cls)[name]


class Section:
    """Base of every config table: checks each numeric field's type and declared range.

    Subclasses set `KEY` (the TOML table name, used in messages) and put cross-field rules in
    `check`, which runs after the per-field checks.
    """

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, (kind, interval) in _field_ranges(type(self)).items():  # type: ignore[arg-type]  # classes hash
            key = f"{self.KEY}.{name}"
            value = parse_number(getattr(self, name), kind, key)
            problem = interval.violation(value)
            if problem:
                raise ConfigError(f"{key}: {problem}")
        self.check()

    def check(self) -> None:
        """Rules that involve more than one key (none by default)."""


@dataclass(frozen=True)
class StrategyConfig(Section):
    """How the aggregator merges updates. Travels inside every ModelVersion as `params`."""

    KEY: ClassVar[str] = "strategy"

    name: StrategyName = StrategyName.FEDBUFF
    buffer_size: Annotated[int, In("[1, 10_000]")] = 4  # K: updates per version (FedAsync forces 1)
    server_lr: Rate = 1.0          # FedBuff's global step on the buffered mean delta
    alpha: Fraction = 0.6          # FedAsync mixing weight
    staleness: StalenessFn = StalenessFn.POLYNOMIAL
    staleness_a: Annotated[float, In("[0, 100]")] = 0.5  # polynomial/hinge exponent; 0.5 = FedBuff's 1/sqrt(1+tau)
    staleness_b: Annotated[int, In("[0, 1_000_000]")] = 4  # hinge: no discount up to b versions
    max_staleness: Annotated[int, In("[0, 1_000_000]")] = 50  # older updates are dead-lettered ("stale")
    sample_weighted: bool = True   # weight by num_samples (FedAvg's n_k/n)
    flush_timeout: Seconds = 10.0  # publish a partial buffer after this many idle seconds
    robust: Robust = Robust.NONE   # trimmed_mean / median keep the buffer in memory
    trim_fraction: Annotated[float, In("[0, 0.5)")] = 0.1
    clip_norm: Norm = 0.0          # > 0: scale each delta to at most this L2 norm before folding
    max_update_norm: Norm = 0.0    # > 0: dead-letter deltas with a larger L2 norm ("norm_bound")
    clip_median_factor: Annotated[float, In("[0, 1000]")] = 0.0  # >= 1: clip to factor x running median norm; 0 = off
    clip_window: Annotated[int, In("[1, 1000]")] = 10  # versions whose recorded norms form that median
    clip_center: ClipCenter = ClipCenter.ZERO  # last_step: clip each delta's deviation from the last step
    outlier_factor: Annotated[float, In("[0, 1000]")] = 0.0  # > 0: dead-letter beyond factor x that median ("outlier")
    server_optimizer: ServerOptimizer = ServerOptimizer.NONE  # adam / yogi / adagrad: server_lr is its step size
    server_beta1: Annotated[float, In("[0, 1)")] = 0.9   # momentum of the pseudo-gradient
    server_beta2: Annotated[float, In("[0, 1)")] = 0.99  # second-moment decay (adam, yogi)
    server_tau: Annotated[float, In("(0, 1]")] = 1e-3    # adaptivity: sqrt(v) + tau in the denominator
    compression: Compression = Compression.NONE  # how sites send deltas: none, float16, bfloat16 or topk
    topk_fraction: Annotated[float, In("(0, 1]")] = 0.01  # topk: share of each tensor's entries a site sends

    def check(self) -> None:
        if self.name is StrategyName.FEDAVG:
            _require(self.max_staleness == 0, "strategy.max_staleness",
                     "synchronous fedavg needs max_staleness = 0 (every update from the current version)")
        _require(self.clip_median_factor == 0 or self.clip_median_factor >= 1, "strategy.clip_median_factor",
                 f"must be 0 (off) or >= 1 (below 1 it shrinks the typical honest update), "
                 f"got {self.clip_median_factor!r}")
        _require(self.clip_center is ClipCenter.ZERO or self.clip_median_factor > 0, "strategy.clip_center",
                 "last_step clips against the running median of deviations: set clip_median_factor >= 1 too")
        _require(self.outlier_factor == 0 or (self.clip_median_factor > 0
                                              and self.outlier_factor >= self.clip_median_factor),
                 "strategy.outlier_factor", f"must be 0 (off) or >= clip_median_factor (> 0), which it refines, "
                 f"got {self.outlier_factor!r} with clip_median_factor {self.clip_median_factor!r}")

        if self.name.is_user:
            _require(self.robust is Robust.NONE and self.server_optimizer is ServerOptimizer.NONE
                     and self.clip_center is ClipCenter.ZERO, "strategy.name",
                     f"a user strategy ({self.name.value}) does its own folding: set robust = none, "
                     "server_optimizer = none and clip_center = zero (clip_norm and the median clip still apply)")
        _require(self.compression is not Compression.TOPK or self.robust is Robust.NONE, "strategy.compression",
                 f"topk deltas are zero outside each site's own largest entries, so robust = {self.robust.value} "
                 "would take the median or trimmed mean of mostly zeros: use robust = none with topk "
                 "(clip_median_factor and outlier_factor still apply), or float16 / bfloat16")
        if self.server_optimizer is not ServerOptimizer.NONE:
            _require(self.name is not StrategyName.FEDASYNC, "strategy.server_optimizer",
                     "fedasync mixes each update in with alpha; a server optimizer needs a buffered mean "
                     "(use fedbuff or fedavg)")
            _require(self.clip_center is ClipCenter.ZERO, "strategy.server_optimizer",
                     "clip_center = last_step reads the previous step as a mean delta, which an adaptive "
                     "step is not: use clip_center = zero with a server optimizer")

    @property
    def effective_buffer(self) -> int:
        return 1 if self.name is StrategyName.FEDASYNC else self.buffer_size

    #: keys left out of `to_params` at their defaults: the versions of a job that does not use them
    #: read as before in a release that predates them (`from_params` restores the defaults)
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("compression", "topk_fraction")

    def to_params(self) -> dict[str, Any]:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()
                if not (k in self.OMIT_AT_DEFAULT and v == defaults[k])}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> StrategyConfig:
        return build(cls, params, "strategy")


@dataclass(frozen=True)
class TrainingConfig(Section):
    """Local hyper-parameters sent in every task."""

    KEY: ClassVar[str] = "training"

    epochs: Annotated[int, In("[1, 10_000]")] = 1
    batch_size: Annotated[int, In("[1, 1_000_000]")] = 32
    lr: Rate = 0.05
    mu: Annotated[float, In("[0, 1e6]")] = 0.0  # FedProx proximal term; 0 = plain local SGD


#: spec arguments the coordinator derives from the test data; model.args may not set them
DERIVED_MODEL_ARGS = ("input_dim", "input_shape", "num_classes")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class ModelConfig(Section):
    KEY: ClassVar[str] = "model"

    name: str = "mlp"  # logreg | mlp | cnn | package.module:callable
    args: dict[str, Any] = field(default_factory=dict)
    task: TaskKind = TaskKind.CLASSIFICATION  # regression: one output, squared-error loss, float targets
    #: the model's input shape and class count when the coordinator has no data.test to derive
    #: them from (federated evaluation only), e.g. input_shape = "30"; "" = from data.test
    input_shape: str = ""
    num_classes: Annotated[int, In("[0, 1_000_000]")] = 0  # 0 = from data.test (regression: 1 output)

    def check(self) -> None:
        _require(bool(_MODEL_NAME_RE.match(self.name)), "model.name",
                 f"{self.name!r} must be logreg, mlp, cnn or package.module:callable")
        derived = sorted(set(self.args) & set(DERIVED_MODEL_ARGS))
        _require(not derived, f"model.args.{derived[0] if derived else ''}",
                 "is derived from the data (data.test, or model.input_shape / model.num_classes); "
                 "remove it from model.args")
        self.shape()
        _require(self.task is TaskKind.CLASSIFICATION or self.num_classes in (0, 1), "model.num_classes",
                 f"a regression model has one output, got {self.num_classes}")

    def shape(self) -> tuple[int, ...] | None:
        """`input_shape` as a tuple ("8,8" -> (8, 8)), None when unset; ConfigError when malformed."""
        if not self.input_shape.strip():
            return None
        try:
            dims = tuple(int(d) for d in self.input_shape.replace("x", ",").split(","))
        except ValueError:
            dims = ()
        _require(bool(dims) and len(dims) <= 8 and all(0 < d <= 1_000_000 for d in dims), "model.input_shape",
                 f"{self.input_shape!r} must be positive integers separated by commas, e.g. 30 or 1,28,28")
        return dims

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args)}


@dataclass(frozen=True)
class DataConfig(Section):
    KEY: ClassVar[str] = "data"

    test: str = ""  # NPZ/CSV file of held-out test data the coordinator evaluates on ("" = federated only)


@dataclass(frozen=True)
class EvaluationConfig(Section):
    """What versions are judged by: at the coordinator on data.test (central) and/or at the sites
    on their own held-out rows (federated), reported per site and folded per version."""

    KEY: ClassVar[str] = "evaluation"

    metrics: str = ""  # comma-separated: accuracy, loss, auc, f1 (classification); mse, mae, r2, loss (regression)
    federated: bool = False  # sites evaluate each task's version on held-out rows before training it
    site_fraction: Annotated[float, In("[0, 0.9]")] = 0.2  # rows a site holds out when it has no --eval-data
    min_sites: Annotated[int, In("[1, 10_000]")] = 2  # site reports a version needs before its federated figure

    def names(self, task: TaskKind) -> tuple[str, ...]:
        return parse_metrics(self.metrics, task)

    def site_options(self, task: TaskKind) -> dict[str, Any]:
        """What every task tells the sites (Task.options["evaluation"]); empty when not federated."""
        if not self.federated:
            return {}
        return {"metrics": list(self.names(task)), "site_fraction": self.site_fraction}


@dataclass(frozen=True)
class CoordinatorConfig(Section):
    KEY: ClassVar[str] = "coordinator"

    concurrency: Annotated[int, In("[1, 10_000]")] = 8  # tasks kept outstanding (fedavg: the cohort size)
    target_accuracy: Annotated[float, In("[0, 1]")] = 0.0  # stop when a version reaches it; 0 = no target
    #: stop on any evaluated metric instead: target_metric = "auc", target_value = 0.85 (errors such
    #: as mse stop at or below the value), measured where target_source says
    target_metric: str = ""
    target_value: Annotated[float, In("[-1e12, 1e12]")] = 0.0  # the value target_metric must reach
    target_source: EvalSource = EvalSource.CENTRAL  # central (data.test) or federated (the sites' reports)
    max_versions: Annotated[int, In("[1, 10_000_000]")] = 200
    max_seconds: Seconds = 600.0
    task_deadline: Seconds = 300.0   # a task unfinished after this is reissued
    out: str = "fedmq-out"           # where the final model is exported
    #: the coordinator's Ed25519 task-signing key (PEM, 0600); "" = <out>/<job>.task.key. Created
    #: with the job, needed on every restart: updates must carry a task's signature to count
    task_key: str = ""
    #: "target": export the version that met the target (versions folded from updates still in
    #: flight at the stop are kept in the stream, but can be worse); "last": the newest version
    export: ExportPolicy = ExportPolicy.TARGET
    #: updates one site of the registry may have waiting in its own queue; past it the broker
    #: refuses that site's publishes (its worker waits), so a flooding site fills only its own share
    site_queue_limit: Annotated[int, In("[1, 1_000_000]")] = 64


_MAX_AGE_RE = re.compile(r"^[0-9]+[YMDhms]$")  # RabbitMQ's x-max-age syntax


@dataclass(frozen=True)
class RetentionConfig(Section):
    KEY: ClassVar[str] = "retention"

    max_age: str = ""    # e.g. "30D"; empty = keep forever (full audit trail)
    max_bytes: Annotated[int, In("[0, 1e15]")] = 0  # 0 = unbounded

    def check(self) -> None:
        _require(not self.max_age or bool(_MAX_AGE_RE.match(self.max_age)), "retention.max_age",
                 f"{self.max_age!r} must be a number and one of Y M D h m s, like 30D or 12h")


@dataclass(frozen=True)
class ClusterConfig(Section):
    """How the job's queues and streams are replicated over a RabbitMQ cluster (docs/deploy.md)."""

    KEY: ClassVar[str] = "cluster"

    replicas: Annotated[int, In("[0, 99]")] = 3  # copies of each queue and stream (capped at the node count); 0 = all


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
class PrivacyConfig(Section):
    """Differential privacy of the job; sites receive it in Task.options["privacy"].

    With noise_multiplier = 0, sigma is calibrated so that `planned_tasks` tasks of one site spend
    exactly `epsilon` (DP-SGD: at that site's sample rate; DP-FedAvg: `planned_tasks` releases).
    `epsilon` is also each site's budget: a site refuses the task that would take it past it.
    """

    KEY: ClassVar[str] = "privacy"

    mechanism: PrivacyMechanism = PrivacyMechanism.NONE
    epsilon: Annotated[float, In("[0, 1000]")] = 0.0  # per-site budget; 0 = no budget (needs noise_multiplier > 0)
    delta: Annotated[float, In("(0, 1)")] = 1e-5
    noise_multiplier: Annotated[float, In("[0, 1000]")] = 0.0  # sigma; 0 = calibrated from epsilon and planned_tasks
    planned_tasks: Annotated[int, In("[1, 1_000_000]")] = 20  # tasks (DP-FedAvg: updates) one budget pays for
    max_grad_norm: Annotated[float, In("(0, 1e9]")] = 1.0  # dp_sgd: per-sample gradient clip C
    accountant: AccountantName = AccountantName.RDP  # dp_sgd: the site ledger's Opacus accountant
    clip_norm: Annotated[float, In("(0, 1e9]")] = 1.0  # dp_fedavg: update L2 clip C
    noise_at: NoisePlacement = NoisePlacement.SITE  # dp_fedavg: local or central noise
    stop_when_spent: Fraction = 1.0  # end the job once this fraction of the sites that trained is spent

    def check(self) -> None:
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
class EncryptionConfig(Section):
    """Homomorphic aggregation (docs/privacy.md). The coordinator publishes the public context in v0;
    only the key holder (`fedmq keyholder`, or the coordinator when secret_context is set) decrypts."""

    KEY: ClassVar[str] = "encryption"

    scheme: EncryptionScheme = EncryptionScheme.NONE
    public_context: str = ""   # <job>.public.ctx written by `fedmq keys --job ID --out DIR`
    secret_context: str = ""   # set only when the coordinator itself is the key holder

    def check(self) -> None:
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
class SigningConfig(Section):
    """Ed25519 update signatures: with a registry, the aggregator dead-letters any update that is
    unsigned or does not verify ("bad_signature"); without one, signatures are not required."""

    KEY: ClassVar[str] = "signing"

    registry: str = ""  # registry.json (site -> public key hex) from `fedmq keys --site NAME`


@dataclass(frozen=True)
class JobConfig(Section):
    KEY: ClassVar[str] = "config"

    job: str = ""
    seed: Seed = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        c, names = self.coordinator, self.evaluation.names(self.model.task)
        target = self.target()
        if target is not None:
            _require(target[0] in names, "coordinator.target_metric",
                     f"{target[0]} is not evaluated; add it to evaluation.metrics ({', '.join(names)})")
            _require(target[2] is EvalSource.CENTRAL or self.evaluation.federated, "coordinator.target_source",
                     "federated needs evaluation.federated = true")
        _require(not (c.target_metric and c.target_accuracy), "coordinator.target_accuracy",
                 "set either target_accuracy or target_metric/target_value, not both")

    def check_evaluation(self) -> None:
        """What only the coordinator (and `init --check`) need: something evaluates the job, and
        without test data the model's shape is given."""
        ev, task = self.evaluation, self.model.task
        _require(bool(self.data.test) or ev.federated, "data.test",
                 "nothing would evaluate the job: give the coordinator test data (data.test) or let the "
                 "sites evaluate (evaluation.federated = true)")
        _require(bool(self.data.test) or self.model.shape() is not None, "model.input_shape",
                 "without data.test the coordinator cannot derive the model's input shape: set it")
        _require(bool(self.data.test) or task is TaskKind.REGRESSION or self.model.num_classes > 0,
                 "model.num_classes", "without data.test the coordinator cannot derive the class count: set it")
        target = self.target()
        _require(target is None or target[2] is EvalSource.FEDERATED or bool(self.data.test),
                 "coordinator.target_source", 'central needs data.test (or target_source = "federated")')

    def target(self) -> tuple[str, float, EvalSource] | None:
        """(metric, value, source) the job stops at; target_accuracy is central accuracy's shorthand."""
        c = self.coordinator
        if c.target_metric:
            return c.target_metric, c.target_value, c.target_source
        if c.target_accuracy:
            return "accuracy", c.target_accuracy, EvalSource.CENTRAL
        return None


# resolved hints, not Field.type: with postponed annotations that is only the string "StrategyConfig"
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)
                             if f.name not in ("job", "seed")}


@cache
def _hints(cls: type) -> dict[str, Any]:
    """A section's resolved hints, once per class: `get_type_hints` evaluates every annotation
    string again on each call (measured: 1 ms per StrategyConfig built, which replay builds for
    every version it checks: 27 s of a 30 s replay of 300 versions)."""
    return typing.get_type_hints(cls)


def _resolve_type(cls: type, name: str) -> Any:
    return _hints(cls)[name]


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
        return build(typ, value, getattr(typ, "KEY", "") or key)  # type: ignore[arg-type]
    if isinstance(typ, type) and issubclass(typ, Enum):
        try:
            return typ(value)
        except ValueError:
            choices = ", ".join(m.value for m in typ) + (" or package.module:callable" if typ is StrategyName else "")
            raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: {value!r} is not a boolean")
    if typ is int or typ is float:
        number = parse_number(value, typ, key)
        return float(number) if typ is float else number
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    if origin is dict or typ is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not a table / JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        _check_plain(value, key)
        return dict(value)
    return value


def _check_plain(value: Any, key: str) -> None:
    """A free-form table (model.args) may hold only what JSON and msgpack carry, all finite.

    It travels in every ModelVersion, so a TOML date or a NaN would otherwise fail (or poison
    the model) only once the job is running.
    """
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]")
    elif isinstance(value, float):
        parse_number(value, float, key)
    elif not (value is None or isinstance(value, str | int)):  # bool is an int
        raise ConfigError(f"{key}: {type(value).__name__} values are not allowed here "
                          "(strings, numbers, booleans, arrays and tables only)")


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


def read_toml(path: Path) -> dict[str, Any]:
    """The table a TOML file holds; ConfigError (one line, the file named) for a missing,
    unreadable, non-UTF-8 or malformed file."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}); save it as UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_job_config(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
                    environ: dict[str, str] | None = None) -> JobConfig:
    """TOML file (optional) < FEDMQ_* env < `overrides` (flags)."""
    raw: dict[str, Any] = {}
    if path:
        raw = read_toml(Path(path))
    raw = merge(raw, env_overrides(environ))
    raw = merge(raw, overrides or {})
    return build(JobConfig, raw, "config")
