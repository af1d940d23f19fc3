"""Differential-privacy primitives that more than one role needs: accountants, the site's budget
ledger, the Gaussian noise of DP-FedAvg and the sealing of central noise seeds.

Two mechanisms (``[privacy] mechanism``):

* ``dp_sgd`` -- record-level DP at the site (Abadi et al., 2016): Opacus clips every per-sample
  gradient to ``max_grad_norm`` and adds N(0, sigma^2 C^2) to each Poisson-sampled batch sum. A step
  is a sampled Gaussian mechanism with rate q = 1 / ceil(n / batch_size); the site composes all of
  its steps, over all jobs on the same data, with Opacus' RDP or PRV accountant.
* ``dp_fedavg`` -- update-level DP (McMahan et al., 2018): each update is clipped to ``clip_norm``
  and N(0, sigma^2 C^2) noise is added, either at the site to every update (``noise_at = site``)
  or once per version by the aggregator to the sum of the clipped updates (``noise_at =
  aggregator``). The unit of privacy is one update; the job's epsilon is composed with Google's
  dp-accounting (RDP), per site, and the job reports the worst site.

No sampling amplification is claimed for DP-FedAvg: in an asynchronous job a site's participation
is decided by its speed, not by a random draw, so each participation is a plain Gaussian mechanism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.codec import Weights
from fedmq.shared.config import AccountantName, JobConfig, PrivacyConfig, PrivacyMechanism, Robust, ServerOptimizer
from fedmq.shared.errors import ConfigError, PrivacyBudgetError, SealedSeedError

log = logging.getLogger(__name__)

LEDGER_SCHEMA = 1
#: environment variable naming the file with the key that seals central noise seeds.
NOISE_KEY_ENV = "FEDMQ_DP_NOISE_KEY_FILE"

#: (noise multiplier sigma, sample rate q, steps): one homogeneous run of a sampled Gaussian mechanism,
#: the unit Opacus' accountants compose.
HistoryEntry = tuple[float, float, int]
#: Opacus' RDPAccountant.DEFAULT_ALPHAS
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


# ---------------------------------------------------------------------------- clipping
# DP-FedAvg's at the site, and the aggregator's robust clipping


def l2_norm(delta: Weights) -> float:
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values())))


def clip(delta: Weights, max_norm: float, norm: float | None = None) -> Weights:
    """Scale `delta` to L2 norm <= max_norm (no-op when max_norm <= 0 or already inside).

    `norm` is `l2_norm(delta)` when the caller has it already (the same float, computed once)."""
    if max_norm <= 0:
        return delta
    norm = l2_norm(delta) if norm is None else norm
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}


# ---------------------------------------------------------------------------- accountants


def dp_sgd_epsilon(history: Iterable[HistoryEntry], delta: float,
                   accountant: AccountantName = AccountantName.RDP) -> float:
    """epsilon at `delta` of composing every entry, with Opacus' RDP or PRV accountant.

    RDP is an upper bound; PRV is tighter (about 10 % lower at epsilon ~ 5) but costs 0.1-0.3 s a
    call. The RDP path is Opacus' `RDPAccountant.get_privacy_spent` with its per-step RDP curve
    cached per (sigma, q): RDP composes linearly in steps, so a ledger of hundreds of spends costs
    one vector sum instead of 0.05-0.2 s per entry.
    """
    entries = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf  # a step without noise has no finite epsilon
    if accountant is AccountantName.PRV:
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = entries
        return float(acc.get_epsilon(delta=delta))
    from opacus.accountants.analysis import rdp as opacus_rdp

    curve = sum((k * _rdp_per_step(s, q) for s, q, k in entries), np.zeros(len(RDP_ORDERS)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": still a bound
        eps, _ = opacus_rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as opacus_rdp

    return np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS),
                      dtype=np.float64)


def dp_sgd_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest sigma whose `steps` sampled steps stay within `epsilon` by Opacus' RDP account.

    The search runs on dp-accounting's RDP (0.2 ms a try, against Opacus' 0.05-0.2 s); the two
    agree within 0.5 % and the result is then checked with Opacus' own account and raised 0.5 % at
    a time until it fits. With the PRV accountant the site then affords a few more tasks.
    """
    from dp_accounting import calibrate_dp_mechanism, dp_event
    from dp_accounting.mechanism_calibration import LowerEndpointAndGuess
    from dp_accounting.rdp import RdpAccountant

    def event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(sigma)), steps)

    try:
        sigma = float(calibrate_dp_mechanism(RdpAccountant, event, epsilon, delta,
                                             LowerEndpointAndGuess(0.05, 1.0), tol=1e-4))
    except Exception as exc:  # dp-accounting raises its own bracket/search errors
        raise ConfigError(f"privacy.epsilon: {epsilon} is out of reach for {steps} steps at "
                          f"q={sample_rate:.4g}: {exc}") from exc
    while dp_sgd_epsilon([(sigma, sample_rate, steps)], delta) > epsilon:
        sigma *= 1.005
    return sigma


def gaussian_epsilon(noise_multiplier: float, releases: Mapping[int, int], delta: float) -> float:
    """epsilon at `delta` of one participant's Gaussian releases, with dp-accounting's RDP.

    `releases` maps multiplicity m -> how many times the participant entered a release m times at
    once: its sensitivity there is m C, so that release is a Gaussian of multiplier sigma / m.
    """
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    for m, count in releases.items():
        if count > 0 and m > 0:
            acc.compose(dp_event.GaussianDpEvent(noise_multiplier / m), int(count))
    return float(acc.get_epsilon(delta)) if acc.ledger != dp_event.NoOpDpEvent() else 0.0


def gaussian_noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """sigma such that `releases` Gaussian releases of sensitivity C cost `epsilon` at `delta`."""
    from dp_accounting import calibrate_dp_mechanism, dp_event
    from dp_accounting.rdp import RdpAccountant

    if releases < 1:
        raise ConfigError(f"privacy.planned_tasks must be >= 1, got {releases}")

    def event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), releases)

    return float(calibrate_dp_mechanism(RdpAccountant, event, epsilon, delta, tol=1e-4))


# ---------------------------------------------------------------------------- job settings


def check_privacy(cfg: JobConfig) -> None:
    """Combinations of [privacy] with other sections that would void the guarantee."""
    p = cfg.privacy
    if p.mechanism is PrivacyMechanism.DP_SGD and cfg.training.mu > 0:
        raise ConfigError("training.mu: FedProx's proximal term has no per-sample gradient, so DP-SGD "
                          "cannot clip it; set training.mu = 0 with privacy.mechanism = dp_sgd")
    if p.central:
        if cfg.strategy.name.is_user:
            raise ConfigError(f"strategy.name = {cfg.strategy.name.value}: central DP-FedAvg's noise is calibrated "
                              "to a weighted mean of clipped updates; use a built-in strategy")
        if cfg.strategy.sample_weighted:
            raise ConfigError("strategy.sample_weighted: central DP-FedAvg bounds each update's weight "
                              "by 1; set strategy.sample_weighted = false")
        if cfg.strategy.robust is not Robust.NONE:
            raise ConfigError("strategy.robust: central DP-FedAvg noises a weighted sum; "
                              "set strategy.robust = none")
        if cfg.strategy.server_optimizer is not ServerOptimizer.NONE:
            raise ConfigError("strategy.server_optimizer: central DP-FedAvg noises the version it publishes, "
                              "after the server step; set strategy.server_optimizer = none")


def privacy_strategy(cfg: JobConfig) -> JobConfig:
    """`cfg` with the strategy's clip at the DP clip when the aggregator adds the noise.

    Central DP-FedAvg's sensitivity is the clip C: the Accumulator clips every delta before it
    folds it (strategy.clip_norm travels in v0's params, so replay clips identically). A tighter
    strategy clip is kept; none, or a looser one, becomes C.
    """
    p, s = cfg.privacy, cfg.strategy
    if not p.central or 0 < s.clip_norm <= p.clip_norm:
        return cfg
    return dataclasses.replace(cfg, strategy=dataclasses.replace(s, clip_norm=p.clip_norm))


def resolve_options(p: PrivacyConfig) -> dict[str, Any]:
    """What the coordinator sends in Task.options["privacy"] and records in v0's meta.

    DP-FedAvg's sigma does not depend on the site, so it is calibrated here once; DP-SGD's depends
    on the site's sample rate, so each site calibrates its own.
    """
    opts = p.to_options()
    if p.mechanism is PrivacyMechanism.DP_FEDAVG and p.noise_multiplier == 0:
        opts["noise_multiplier"] = gaussian_noise_multiplier(p.epsilon, p.delta, p.planned_tasks)
    return opts


# ---------------------------------------------------------------------------- site ledger


@dataclass(frozen=True)
class Spend:
    """One charged training run: `steps` sampled Gaussian steps of multiplier sigma at rate q."""

    job: str
    task_id: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    ts: float

    @property
    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """A site's spends, in a JSON file that outlives the worker process.

    The ledger is per data set, not per job: every job trained on the same records composes.
    Writes take an exclusive lock, go to a temporary file and `os.replace` it (atomic on POSIX),
    then fsync the directory, so a crash leaves the old or the new ledger, never a torn one.
    A spend is charged *before* the training it pays for (write-ahead): a crash in between
    over-counts, which is safe; a redelivered task is charged again for the same reason.
    """

    def __init__(self, path: str | Path, site: str) -> None:
        self.path = Path(path)
        self.site = site

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[Spend]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("schema") != LEDGER_SCHEMA:
                raise ValueError(f"schema {raw.get('schema')!r}, expected {LEDGER_SCHEMA}")
            return [Spend(**s) for s in raw["spends"]]
        except (ValueError, KeyError, TypeError) as exc:
            # never silently restart from zero: that would re-grant a spent budget
            raise ConfigError(f"privacy ledger {self.path} is unreadable ({exc}); "
                              "restore it from backup, the site's spend cannot be recomputed") from exc

    def _write(self, spends: list[Spend]) -> None:
        body = {"schema": LEDGER_SCHEMA, "site": self.site, "spends": [asdict(s) for s in spends]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def spends(self) -> list[Spend]:
        with self._locked():
            return self._read()

    def epsilon(self, delta: float, accountant: AccountantName = AccountantName.RDP,
                extra: Iterable[HistoryEntry] = ()) -> float:
        """epsilon spent so far (plus `extra`, to ask what a planned run would bring it to)."""
        return dp_sgd_epsilon([*(s.entry for s in self.spends()), *extra], delta, accountant)

    def charge(self, spend: Spend) -> None:
        with self._locked():
            spends = self._read()
            spends.append(spend)
            self._write(spends)
        log.info("privacy spend charged", extra={"site": self.site, "job": spend.job, "task": spend.task_id,
                                                  "sigma": spend.noise_multiplier, "q": spend.sample_rate,
                                                  "steps": spend.steps})


def new_spend(job: str, task_id: str, mechanism: PrivacyMechanism, entry: HistoryEntry) -> Spend:
    sigma, q, steps = entry
    return Spend(job=job, task_id=task_id, mechanism=mechanism.value, noise_multiplier=sigma,
                 sample_rate=q, steps=steps, ts=time.time())


def check_budget(site: str, epsilon_now: float, epsilon_next: float, budget: float) -> None:
    """Raise PrivacyBudgetError when the next run would take the site past `budget` (0 = none)."""
    if budget > 0 and epsilon_next > budget:
        raise PrivacyBudgetError(site, epsilon_now, epsilon_next, budget)


# ---------------------------------------------------------------------------- Gaussian noise


def gaussian_noise(template: Mapping[str, np.ndarray], rng: np.random.Generator, std: float) -> Weights:
    """N(0, std^2) per float coordinate, float64, tensor by tensor in `template`'s order.

    Integer tensors (counters) get zeros: they are not trained and carry no gradient.
    """
    out: Weights = {}
    for name, ref in template.items():
        arr = np.asarray(ref)
        if arr.dtype.kind == "f":
            out[name] = rng.standard_normal(arr.shape, dtype=np.float64) * std
        else:
            out[name] = np.zeros(arr.shape, dtype=np.float64)
    return out


def fresh_rng() -> np.random.Generator:
    """A generator nobody can predict: DP noise whose seed is guessable can be subtracted."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


# ---------------------------------------------------------------------------- sealed seeds


def load_noise_key(path: str | Path | None = None) -> bytes:
    """The 32-byte AES key (64 hex characters in a file) that seals central noise seeds."""
    path = path or os.environ.get(NOISE_KEY_ENV)
    if not path:
        raise ConfigError(f"central DP-FedAvg needs a noise key: set {NOISE_KEY_ENV} to a file holding "
                          "64 hex characters (openssl rand -hex 32 > dp-noise.key) on every aggregator")
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{NOISE_KEY_ENV}: cannot read a hex key from {path}: {exc}") from exc
    if len(key) != 32:
        raise ConfigError(f"{NOISE_KEY_ENV}: {path} holds {len(key)} bytes, expected 32 (64 hex characters)")
    return key


def _aad(job: str, version: int) -> bytes:
    return f"fedmq-dp-noise/{job}/v{version}".encode()


def seal_seed(key: bytes, job: str, version: int, seed: int) -> str:
    """AES-GCM(seed) bound to (job, version), hex. The seed is in the version, yet only key holders
    can regenerate (and so subtract) the noise."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return (nonce + AESGCM(key).encrypt(nonce, seed.to_bytes(16, "little"), _aad(job, version))).hex()


def open_seed(key: bytes, job: str, version: int, sealed: str) -> int:
    """Inverse of `seal_seed`; a wrong key or a seed moved to another version raises."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = bytes.fromhex(sealed)
    try:
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], _aad(job, version))
    except InvalidTag as exc:
        raise SealedSeedError(f"noise seed of {job} v{version} does not open with this key") from exc
    return int.from_bytes(plain, "little")
