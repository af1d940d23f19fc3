"""Homomorphic aggregation math (CKKS): fold ciphertexts, decrypt the sum into weights. No I/O.

The plaintext `Accumulator` (aggregator/strategy.py) computes
``w_next = w + lr * sum_k(s(tau_k) * m_k * delta_k) / sum_k(m_k)``. Here the same sum is taken
over ciphertexts by whoever holds only the public context (the aggregator), and the division,
the learning rate and the addition to ``w`` happen after decryption (the key holder):

* fold: ``S += c_k * enc(delta_k)`` with multiplier ``c_k = s(tau_k) * m_k / sample_ref``;
  ``sample_ref`` is the first folded update's sample count, so multipliers stay near 1 and the
  weighted sum stays inside CKKS's headroom (|sum| < 2**19 at the default parameters) however
  many samples a site has;
* flush: ``denominator = sum_k(m_k) / sample_ref`` travels with ``S`` in an EncryptedAggregate;
* decrypt: ``w_next = w + lr * dec(S) / denominator`` in float64, cast once to the model's dtype.

Exact ciphertext arithmetic: CKKS additions are modular integer sums and the scalar products are
deterministic, so recomputing S from the same ciphertexts and multipliers gives the same bytes in
any fold order (`recompute_sum` is what replay uses). Decryption is approximate (~1e-9 absolute
at scale 2**40), so an HE version differs from the plaintext one in the last bits, not in accuracy.

Only mean-type strategies work on ciphertexts: robust ones (median, trimmed mean), norm clipping
and norm bounds need to see values, so `check_strategy` refuses them for encrypted jobs (clip at
the site instead, e.g. DP-FedAvg with local noise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from fedmq.aggregator.strategy import Contribution, learning_rate, staleness_factor
from fedmq.shared import he
from fedmq.shared.codec import Weights
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import (
    EncryptionMismatchError,
    MalformedMessageError,
    ShapeMismatchError,
)
from fedmq.shared.he import check_strategy
from fedmq.shared.messages import Update


@dataclass(frozen=True)
class JobKeys:
    """What an encrypted job's aggregator knows: the public context and the expected shapes."""

    context: ts.Context
    context_sha256: str
    slots: int
    layout: he.Layout
    scale: float
    level: int  # coefficient moduli of a fresh ciphertext

    @classmethod
    def of(cls, context: ts.Context, context_sha256: str, slots: int, layout: he.Layout) -> JobKeys:
        probe = ts.ckks_vector(context, [0.0]).ciphertext()[0]
        return cls(context, context_sha256, slots, layout, float(probe.scale), int(probe.coeff_modulus_size()))


def check_ciphertext(update: Update, keys: JobKeys) -> list[ts.CKKSVector]:
    """The update's chunks as vectors, or the InvalidUpdateError / MalformedMessageError to
    dead-letter it with: wrong key, wrong size, or bytes that are not a fresh CKKS ciphertext."""
    uid, ct = update.update_id, update.ciphertext
    if ct is None:
        raise EncryptionMismatchError(f"update {uid} carries a plaintext delta but the job is "
                                      "encrypted: the site must encrypt (is it an old fedmq?)")
    if ct.get("scheme") != he.SCHEME:
        raise EncryptionMismatchError(f"update {uid}: scheme {ct.get('scheme')!r}, job uses {he.SCHEME!r}")
    if ct.get("context_sha256") != keys.context_sha256:
        raise EncryptionMismatchError(f"update {uid} is encrypted under another context "
                                      f"({str(ct.get('context_sha256'))[:12]}…), not this job's key")
    if ct.get("slots") != keys.slots or ct.get("size") != keys.layout.size:
        raise ShapeMismatchError(f"update {uid}: {ct.get('size')} values in chunks of {ct.get('slots')}, "
                                 f"model has {keys.layout.size} in chunks of {keys.slots}")
    chunks = ct.get("chunks")
    sizes = keys.layout.chunk_sizes(keys.slots)
    if not isinstance(chunks, list | tuple) or len(chunks) != len(sizes):
        raise ShapeMismatchError(f"update {uid}: expected {len(sizes)} ciphertext chunks")
    out = []
    for i, (raw, n) in enumerate(zip(chunks, sizes, strict=True)):
        if not isinstance(raw, bytes):
            raise MalformedMessageError(f"update {uid}: chunk {i} is not bytes")
        try:
            vec = ts.ckks_vector_from(keys.context, raw)
            parts = vec.ciphertext()
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError from C++
            raise MalformedMessageError(f"update {uid}: chunk {i} is not a CKKS ciphertext: {exc}") from exc
        if len(parts) != 1:  # protobuf parses some garbage into an empty vector
            raise MalformedMessageError(f"update {uid}: chunk {i} holds {len(parts)} ciphertexts, not 1")
        c = parts[0]
        if vec.size() != n or c.size() != 2 or float(c.scale) != keys.scale \
                or int(c.coeff_modulus_size()) != keys.level:
            raise ShapeMismatchError(f"update {uid}: chunk {i} is not a fresh ciphertext of {n} values "
                                     "at the job's scale")
        out.append(vec)
    return out


def multiplier(weight: float, sample_ref: float) -> float:
    return weight / sample_ref


@dataclass(frozen=True)
class EncryptedSum:
    """A flushed CiphertextAccumulator: what becomes an EncryptedAggregate."""

    chunks: list[bytes]
    contributions: list[dict[str, Any]]
    denominator: float
    sample_ref: float

    @property
    def sha256(self) -> str:
        return he.chunks_sha256(self.chunks)


def _weighted(vectors: Sequence[ts.CKKSVector], c: float) -> list[ts.CKKSVector]:
    return [v * c for v in vectors]


class CiphertextAccumulator:
    """Folds encrypted deltas into an encrypted running sum: O(model) memory, no secret key."""

    def __init__(self, cfg: StrategyConfig) -> None:
        check_strategy(cfg)
        self.cfg = cfg
        self._sum: list[ts.CKKSVector] | None = None
        self._samples = 0.0
        self._sample_ref = 0.0
        self.contributions: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.contributions)

    def ready(self) -> bool:
        return len(self) >= self.cfg.effective_buffer

    def fold(self, *, update_id: str, site: str, vectors: list[ts.CKKSVector], tau: int, num_samples: int,
             base_version: int) -> dict[str, Any]:
        """Add c * vectors to the sum; on any TenSEAL error the sum is left as it was."""
        cfg = self.cfg
        s = staleness_factor(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        m = float(num_samples) if cfg.sample_weighted else 1.0
        ref = self._sample_ref or (m if m > 0 else 1.0)
        c = multiplier(s * m, ref)
        try:
            products = _weighted(vectors, c)
            new_sum = products if self._sum is None else [a + p for a, p in zip(self._sum, products, strict=True)]
        except (ValueError, RuntimeError) as exc:
            raise MalformedMessageError(f"update {update_id}: ciphertext does not add to the sum: {exc}") from exc
        self._sum, self._sample_ref = new_sum, ref
        self._samples += m
        contribution = {**Contribution(update_id, site, base_version, tau, s * m, num_samples).to_dict(),
                        "multiplier": c}
        self.contributions.append(contribution)
        return contribution

    def flush(self) -> EncryptedSum:
        if not self.contributions:
            raise ValueError("flush of an empty accumulator")
        assert self._sum is not None  # set by the first fold
        out = EncryptedSum([bytes(v.serialize()) for v in self._sum], self.contributions,
                           self._samples / self._sample_ref, self._sample_ref)
        self._sum, self._samples, self._sample_ref, self.contributions = None, 0.0, 0.0, []
        return out


# --------------------------------------------------------------------------- key holder side


def apply_sum(parent: Mapping[str, np.ndarray], flat_sum: np.ndarray, layout: he.Layout, denominator: float,
              lr: float) -> Weights:
    """w + lr * sum / denominator, in float64, cast once; integer tensors are rounded (CKKS is
    approximate: 0.9999999 must become 1, not 0)."""
    mean = flat_sum / denominator if denominator > 0 else np.zeros_like(flat_sum)
    steps = layout.unflatten(mean)
    new: Weights = {}
    for k, w in parent.items():
        dtype = np.asarray(w).dtype
        value = np.asarray(w, dtype=np.float64) + lr * steps[k]
        new[k] = (np.rint(value) if dtype.kind in "iu" else value).astype(dtype)
    return new


def decrypt_step(secret: ts.Context, parent: Mapping[str, np.ndarray], chunks: Sequence[bytes],
                 denominator: float, cfg: StrategyConfig) -> Weights:
    """The next version's weights from the parent and an encrypted sum (the key holder's job)."""
    layout = he.Layout.of(parent)
    flat = he.decrypt(secret, list(chunks))[:layout.size]
    if flat.shape != (layout.size,):
        raise ShapeMismatchError(f"encrypted sum has {flat.size} values, model has {layout.size}")
    return apply_sum(parent, flat, layout, denominator, learning_rate(cfg))


# --------------------------------------------------------------------------- replay


def recompute_sum(context: ts.Context, ciphertexts: Sequence[Sequence[bytes]],
                  multipliers: Sequence[float]) -> list[bytes]:
    """The encrypted sum of `ciphertexts` (one chunk list per included update) with the recorded
    multipliers: equal bytes <=> the aggregator folded exactly these updates with these weights."""
    total: list[ts.CKKSVector] | None = None
    for chunks, c in zip(ciphertexts, multipliers, strict=True):
        products = _weighted([ts.ckks_vector_from(context, raw) for raw in chunks], c)
        total = products if total is None else [a + p for a, p in zip(total, products, strict=True)]
    return [bytes(v.serialize()) for v in total or []]


def plaintext_equivalent(secret: ts.Context, parent: Mapping[str, np.ndarray],
                         ciphertexts: Sequence[Sequence[bytes]], contributions: Sequence[Mapping[str, Any]],
                         cfg: StrategyConfig) -> Weights:
    """What the plaintext Accumulator would have made of the same updates (each decrypted alone):
    the "same job in plaintext" an HE version is compared with. Needs the secret key."""
    from fedmq.aggregator.strategy import Accumulator

    layout = he.Layout.of(parent)
    acc = Accumulator(cfg)
    for chunks, c in zip(ciphertexts, contributions, strict=True):
        delta = layout.unflatten(he.decrypt(secret, list(chunks))[:layout.size])
        acc.fold(update_id=c["update_id"], site=c["site"], delta=delta, tau=int(c["staleness"]),
                 num_samples=int(c["num_samples"]), base_version=int(c["base_version"]))
    return acc.flush(dict(parent))[0]


def expected_multipliers(cfg: StrategyConfig, taus: Sequence[int], samples: Sequence[int]) -> list[float]:
    """The multipliers `CiphertextAccumulator.fold` uses for these updates, in fold order."""
    out: list[float] = []
    ref = 0.0
    for tau, n in zip(taus, samples, strict=True):
        s = staleness_factor(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        m = float(n) if cfg.sample_weighted else 1.0
        ref = ref or (m if m > 0 else 1.0)
        out.append(multiplier(s * m, ref))
    return out


@dataclass(frozen=True)
class EncryptedReplay:
    """What replay established about one version decrypted by the key holder."""

    sum_matches: bool            # the recomputed encrypted sum hashes to meta["he"]["ciphertext_sha256"]
    weights_match: bool | None   # decrypting it reproduces the version's sha256 (None: no secret key)
    detail: str


def replay_encrypted_version(parent: Mapping[str, np.ndarray], version_sha256: str, meta_he: Mapping[str, Any],
                             params: Mapping[str, Any], updates: Sequence[Update], taus: Sequence[int],
                             public: ts.Context, secret: ts.Context | None = None) -> EncryptedReplay:
    """Recompute an encrypted version from its parent weights and included updates (in order).

    With the public context alone this proves the aggregator folded exactly these ciphertexts with
    the staleness x sample weights the strategy prescribes (the sum is bit-reproducible). With the
    key holder's secret context it also re-decrypts and compares the weights bit for bit.
    """
    from fedmq.shared.codec import weights_sha256

    cfg = StrategyConfig.from_params(dict(params))
    chunks = []
    for u in updates:
        if u.ciphertext is None:
            return EncryptedReplay(False, None, f"{u.update_id} is plaintext in an encrypted version")
        chunks.append(list(u.ciphertext.get("chunks", [])))
    mults = expected_multipliers(cfg, taus, [u.num_samples for u in updates])
    total = recompute_sum(public, chunks, mults)
    if he.chunks_sha256(total) != meta_he.get("ciphertext_sha256"):
        return EncryptedReplay(False, None, "the encrypted sum of the included updates with the "
                               "strategy's weights differs from the one the key holder decrypted")
    if secret is None:
        return EncryptedReplay(True, None, "encrypted sum verified; decryption needs the secret key")
    ms = [float(u.num_samples) if cfg.sample_weighted else 1.0 for u in updates]
    ref = (ms[0] if ms and ms[0] > 0 else 1.0)
    weights = decrypt_step(secret, parent, total, sum(ms) / ref, cfg)
    ok = weights_sha256(weights) == version_sha256
    return EncryptedReplay(True, ok, "encrypted sum and decryption verified bit for bit" if ok
                           else "decrypting the verified sum does not give the published weights")
