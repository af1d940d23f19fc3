"""CKKS homomorphic encryption of model deltas (TenSEAL): keys, layout, encrypt, decrypt.

Why CKKS: a mean-type strategy only adds deltas and scales them by plaintext weights, and CKKS does
both on encrypted real vectors. One ciphertext holds ``slots = poly_modulus_degree / 2`` values,
so a delta is flattened in the model's tensor order and cut into chunks of ``slots`` values; the
chunks travel together in ``Update.ciphertext``.

Default parameters (poly_modulus_degree 8192, coefficient moduli 60/40/60 bits, scale 2**40):

* 160 bits of modulus, under SEAL's 218-bit bound for 128-bit security at degree 8192;
* exactly one multiplicative level, which is the one plaintext-scalar multiplication the
  aggregator needs (the staleness x sample weight); nothing multiplies two ciphertexts and
  nothing rotates, so the public context carries the public key only (no relinearisation or
  Galois keys: 0.36 MB instead of 35 MB);
* after that multiplication 60 - 40 = 20 bits of headroom: |weighted sum| must stay below 2**19,
  which is why the aggregator normalises sample weights (see aggregator/he.py);
* absolute error ~1e-9 per coordinate, far below any model delta.

Who holds what: `generate` returns the public bytes (workers, aggregators) and the secret bytes
(the key holder only). `load_public` refuses bytes that contain a secret key, so a context given
to an aggregator can never decrypt, even by mistake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from fedmq.shared.codec import Weights
from fedmq.shared.config import Compression, Robust, ServerOptimizer, StrategyConfig
from fedmq.shared.errors import ConfigError, MalformedMessageError, NonFiniteError
from fedmq.shared.messages import Update

SCHEME = "ckks"
#: ModelVersion.meta keys. "encryption" travels in every version; the public context only in v0.
META_ENCRYPTION = "encryption"
META_PUBLIC_CONTEXT = "he_public_context"
META_AGGREGATE = "he"

#: SEAL's largest total coefficient modulus (bits) for 128-bit security, per degree.
_MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        bound = _MAX_MODULUS_BITS.get(self.poly_modulus_degree)
        if bound is None:
            raise ConfigError(f"poly_modulus_degree must be one of {sorted(_MAX_MODULUS_BITS)}, "
                              f"got {self.poly_modulus_degree}")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 3:
            raise ConfigError("coeff_mod_bit_sizes needs >= 3 primes: the aggregator multiplies once")
        if sum(bits) > bound:
            raise ConfigError(f"coeff_mod_bit_sizes total {sum(bits)} bits > {bound}: "
                              f"not 128-bit secure at degree {self.poly_modulus_degree}")
        if not all(b == self.scale_bits for b in bits[1:-1]):
            raise ConfigError(f"inner primes {list(bits[1:-1])} must equal scale_bits {self.scale_bits} "
                              "so a rescale restores the scale")
        if bits[0] <= self.scale_bits:
            raise ConfigError(f"first prime ({bits[0]} bits) must exceed scale_bits ({self.scale_bits}): "
                              "it is the headroom of the decrypted sum")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


@dataclass(frozen=True)
class KeyPair:
    """Serialized contexts; `secret` must stay with the key holder."""

    public: bytes
    secret: bytes
    params: CkksParams

    @property
    def sha256(self) -> str:
        return context_sha256(self.public)


def context_sha256(public: bytes) -> str:
    """Fingerprint of a public context: pinned in v0, checked by every role that loads one."""
    return hashlib.sha256(public).hexdigest()


def _public_bytes(ctx: ts.Context) -> bytes:
    return bytes(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                               save_relin_keys=False))


def generate(params: CkksParams | None = None) -> KeyPair:
    params = params or CkksParams()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), n_threads=1)
    ctx.global_scale = float(2**params.scale_bits)
    secret = bytes(ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                 save_relin_keys=False))
    return KeyPair(public=_public_bytes(ctx), secret=secret, params=params)


def _load(data: bytes, what: str) -> ts.Context:
    try:
        return ts.context_from(bytes(data), n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError from C++
        raise ConfigError(f"{what} is not a TenSEAL context: {exc}") from exc


def load_public(data: bytes) -> ts.Context:
    """A context that can encrypt and add but never decrypt; refuses one holding a secret key."""
    ctx = _load(data, "public context")
    if ctx.has_secret_key():
        raise ConfigError("this context holds a secret key: give workers and aggregators the public "
                          "context (fedmq keys writes <job>.public.ctx)")
    return ctx


def load_secret(data: bytes) -> tuple[ts.Context, str]:
    """The key holder's context and the fingerprint of its public half."""
    ctx = _load(data, "secret context")
    if not ctx.has_secret_key():
        raise ConfigError("this context has no secret key: the key holder needs <job>.secret.ctx")
    return ctx, context_sha256(_public_bytes(ctx))


@dataclass(frozen=True)
class KeyFiles:
    public: Path
    secret: Path
    sha256: str


def write_keys(out_dir: str | Path, job: str, params: CkksParams | None = None, *,
               force: bool = False) -> KeyFiles:
    """<job>.public.ctx (world-readable) and <job>.secret.ctx (mode 0600) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pub, sec = out / f"{job}.public.ctx", out / f"{job}.secret.ctx"
    if not force and (pub.exists() or sec.exists()):
        raise ConfigError(f"{sec} or {pub} exists already; a new key would orphan the job's "
                          "ciphertexts (pass --force to replace)")
    keys = generate(params)
    pub.write_bytes(keys.public)
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keys.secret)
    return KeyFiles(pub, sec, keys.sha256)


def read_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist (create it with `fedmq keys --job ID --out DIR`)")
    return p.read_bytes()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The model's tensors in order: a delta is flattened along it and cut into chunks."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> Layout:
        arrs = {k: np.asarray(v) for k, v in weights.items()}
        return cls(tuple(arrs), tuple(tuple(a.shape) for a in arrs.values()),
                   tuple(a.dtype.str for a in arrs.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def num_chunks(self, slots: int) -> int:
        return max(1, math.ceil(self.size / slots))

    def chunk_sizes(self, slots: int) -> list[int]:
        n = self.num_chunks(slots)
        return [min(slots, self.size - i * slots) for i in range(n)] if self.size else [0]

    def flatten(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        if list(weights) != list(self.names):
            raise ConfigError(f"tensors {list(weights)} do not follow the layout {list(self.names)}")
        parts = [np.asarray(weights[n], dtype=np.float64).reshape(-1) for n in self.names]
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """float64 tensors (the caller casts once, as the plaintext accumulator does)."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has {flat.shape}, layout needs ({self.size},)")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[start:start + n].reshape(shape)
            start += n
        return out


def encrypt(ctx: ts.Context, delta: Weights, layout: Layout, slots: int) -> list[bytes]:
    """The delta's ciphertext chunks, in layout order."""
    flat = layout.flatten(delta)
    return [bytes(ts.ckks_vector(ctx, flat[i:i + slots].tolist()).serialize())
            for i in range(0, max(len(flat), 1), slots)]


def decrypt(ctx: ts.Context, chunks: list[bytes]) -> np.ndarray:
    """Concatenated plaintext of `chunks` (float64); needs the secret context."""
    parts = [np.asarray(ts.ckks_vector_from(ctx, c).decrypt(), dtype=np.float64) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0)


def chunks_sha256(chunks: list[bytes]) -> str:
    """Hash of a ciphertext, chunk by chunk: the aggregate's identity for replay."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()


def payload(chunks: list[bytes], *, context_sha: str, layout: Layout, slots: int) -> dict[str, Any]:
    """The Update.ciphertext map."""
    return {"scheme": SCHEME, "context_sha256": context_sha, "slots": slots, "size": layout.size,
            "chunks": chunks}


# --------------------------------------------------------------------------- job metadata


def encryption_meta(public: bytes) -> dict[str, Any]:
    """What v0 (and, copied forward, every version) says about the job's encryption.

    Read from the context itself, so it cannot disagree with the keys `fedmq keys` wrote.
    """
    ctx = load_public(public)
    parms = ctx.seal_context().data.key_context_data().parms()
    degree = int(parms.poly_modulus_degree())
    return {"scheme": SCHEME, "context_sha256": context_sha256(public), "slots": degree // 2,
            "poly_modulus_degree": degree, "scale_bits": round(math.log2(ctx.global_scale)),
            "modulus_bits": int(ctx.seal_context().data.key_context_data().total_coeff_modulus_bit_count())}


def is_encrypted(meta: Mapping[str, Any]) -> bool:
    enc = meta.get(META_ENCRYPTION)
    return isinstance(enc, Mapping) and enc.get("scheme") == SCHEME


def public_context_from_meta(v0_meta: Mapping[str, Any], expected_sha: str) -> ts.Context:
    """The public context published in v0, checked against the fingerprint every version carries."""
    raw = v0_meta.get(META_PUBLIC_CONTEXT)
    if not isinstance(raw, bytes | bytearray):
        raise MalformedMessageError("v0 of an encrypted job carries no public context")
    if context_sha256(bytes(raw)) != expected_sha:
        raise ConfigError("the public context in v0 does not match the job's context_sha256")
    return load_public(bytes(raw))



#: an update's ciphertext must stay well under RabbitMQ's 128 MiB message limit
MAX_CIPHERTEXT_BYTES = 96 * 2**20


def encrypt_update(update: Update, ctx: ts.Context, context_sha: str, slots: int) -> Update:
    """The same update with its delta replaced by the delta's ciphertext (delta None)."""
    if update.delta is None:
        raise ValueError(f"update {update.update_id} has no plaintext delta to encrypt")
    layout = Layout.of(update.delta)
    if not all(np.isfinite(v).all() for v in update.delta.values() if np.asarray(v).dtype.kind == "f"):
        # CKKS cannot encode NaN/Inf; in plaintext the aggregator would dead-letter it as non_finite
        raise NonFiniteError(f"update {update.update_id} has NaN or Inf values: not encrypted, not sent")
    chunks = encrypt(ctx, update.delta, layout, slots)
    size = sum(len(c) for c in chunks)
    if size > MAX_CIPHERTEXT_BYTES:
        raise ConfigError(f"the encrypted delta is {size / 2**20:.0f} MiB ({layout.size} parameters), over "
                          f"the {MAX_CIPHERTEXT_BYTES // 2**20} MiB an update may carry; CKKS costs ~57 B "
                          "per parameter at degree 8192: use a smaller model or a plaintext job")
    return dataclasses.replace(update, delta=None,
                               ciphertext=payload(chunks, context_sha=context_sha, layout=layout, slots=slots))


def check_strategy(cfg: StrategyConfig) -> None:
    """Raise ConfigError for strategy settings that need plaintext deltas."""
    if cfg.name.is_user:
        raise ConfigError(f"strategy.name = {cfg.name.value}: a user strategy reads plaintext deltas; encrypted "
                          "jobs sum ciphertexts (use fedbuff, fedasync or fedavg)")
    if cfg.robust is not Robust.NONE:
        raise ConfigError(f"strategy.robust = {cfg.robust.value} needs plaintext deltas; encrypted "
                          "jobs support mean-type strategies only (robust = \"none\")")
    if cfg.server_optimizer is not ServerOptimizer.NONE:
        raise ConfigError(f"strategy.server_optimizer = {cfg.server_optimizer.value} is not supported on "
                          "encrypted jobs (the key holder applies the decrypted mean as is); set it to \"none\"")
    if cfg.compression is not Compression.NONE:
        raise ConfigError(f"strategy.compression = {cfg.compression.value}: an encrypted job sends CKKS "
                          "ciphertexts, whose size the plaintext's precision or sparsity does not change; set "
                          "it to \"none\"")
    if cfg.clip_norm > 0:
        raise ConfigError("strategy.clip_norm needs plaintext deltas; with encryption clip at the "
                          "site (privacy.mechanism = \"dp_fedavg\", noise_at = \"site\")")
    if cfg.max_update_norm > 0:
        raise ConfigError("strategy.max_update_norm cannot be checked on ciphertexts; set it to 0 "
                          "for encrypted jobs")
    if cfg.clip_median_factor > 0:
        raise ConfigError("strategy.clip_median_factor needs each update's L2 norm, which a ciphertext "
                          "hides; encrypted jobs cannot clip against the running median (set it to 0, "
                          "and bound updates at the site: privacy.mechanism = \"dp_fedavg\")")
