"""Secure aggregation by homomorphic encryption: CKKS (Cheon, Kim, Kim & Song, 2017, "Homomorphic
Encryption for Arithmetic of Approximate Numbers") through TenSEAL (Benaissa et al., 2021).

Three parties, simulated in one process with real cryptography:

- the **key holder** (:class:`KeyHolder`) makes a fresh CKKS key pair every round and publishes
  only the public context (public key, no secret, relinearization or Galois keys: additions need
  none). It decrypts one thing: the sum the server hands it.
- each **client** flattens its (clipped) delta in sorted-key order, cuts it into chunks of N/2
  slots (N = poly_modulus_degree) and sends one CKKS ciphertext per chunk (:func:`encrypt_delta`).
- the **server** holds the public context only; it adds the ciphertexts as they arrive
  (:class:`EncryptedSum`, ciphertext + ciphertext: no key needed) and sends the summed ciphertexts
  to the key holder, who returns Σᵢ Δᵢ.

Who sees what: a client sees the public context; the server sees ciphertexts and the decrypted
sum; the key holder sees the summed ciphertexts and the decrypted sum, never an individual
ciphertext. A server colluding with the key holder sees every update: that is the trust
assumption (honest-but-curious, non-colluding), as masks assume fewer than t colluding clients.

Precision. CKKS is approximate: each slot carries x·2^s plus encryption noise, so the decrypted sum
differs from the float64 sum by the noise over 2^s (s = ``scale_bits``). The key holder then rounds the
sum to a grid of 2^−``release_bits`` (2^−24) before releasing it: CKKS decryptions handed to an
adversary who holds the ciphertext leak the secret key (Li & Micciancio, 2021, "On the Security of
Homomorphic Encryption on Approximate Numbers"); cutting the bits that carry the noise is the
usual mitigation (a heuristic, not a proof), and fresh keys each round limit any key to one sum.
So per coordinate |decrypted − true| ≤ CKKS noise + 2^−(release_bits+1): measured at most 5.8e−8
on the sum of 5 SmolLM2 adapter updates at N = 8192, s = 40 (benchmarks/bench_he.py,
docs/benchmarks.md), of which 3.0e−8 is the rounding. No wrap-around: a client
refuses values with |x| > 2^(q_bits − 1 − s)/K, which could push the sum out of the modulus q.

Cost: a ciphertext chunk is 2·N·(number of data primes)·8 bytes, ~32 bytes per value with one
60-bit data prime, against 4 for float32 and 8 for the masks' int64 (benchmarks/bench_he.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.algorithms.secure import SecAggBytes
from fedllm.types import StateDict

_ID = struct.Struct(">Q")


def _tenseal():
    try:
        import tenseal  # noqa: PLC0415  (optional: the `he` extra)
    except ImportError:
        raise ImportError("privacy.secagg_scheme: he needs TenSEAL; install it with "
                          "pip install 'fedllm[he]' (tenseal==0.3.16)") from None
    return tenseal


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters: ring degree N, coefficient-modulus primes (last: the special prime), scale 2^s.

    Defaults: N = 8192 with one 60-bit data prime and a 60-bit special prime (120 bits, under the
    218 that the HE security standard allows N = 8192 at 128-bit security) and s = 40; no
    multiplication is ever done, so one data prime (no rescaling level) suffices.
    """

    poly_degree: int = 8192
    coeff_bits: tuple[int, ...] = (60, 60)
    scale_bits: int = 40
    release_bits: int = 24

    def __post_init__(self) -> None:
        if self.poly_degree not in (4096, 8192, 16384, 32768):
            raise ValueError(f"poly_degree must be 4096, 8192, 16384 or 32768, got {self.poly_degree}")
        if len(self.coeff_bits) < 2 or not 0 < self.scale_bits < self.coeff_bits[0] - 1:
            raise ValueError(f"need >= 2 coefficient primes and 0 < scale_bits < first prime - 1, "
                             f"got {self.coeff_bits}, {self.scale_bits}")

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    def max_abs(self, num_summands: int) -> float:
        """Largest |x| a client may encrypt so that a sum of ``num_summands`` stays inside the modulus."""
        data_bits = sum(self.coeff_bits[:-1])
        return 2.0 ** (data_bits - 1 - self.scale_bits - 1) / max(num_summands, 1)


def _context(params: CKKSParams):
    ts = _tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_degree,
                     coeff_mod_bit_sizes=list(params.coeff_bits))
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


class KeyHolder:
    """Makes the round's key pair; publishes the public context; decrypts only a summed ciphertext."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self._secret = _context(params)
        public = self._secret.copy()
        public.make_context_public()
        self.public: bytes = public.serialize(save_public_key=True, save_secret_key=False,
                                              save_galois_keys=False, save_relin_keys=False)

    def decrypt_sum(self, chunks: Iterable[bytes], size: int) -> np.ndarray:
        """The summed ciphertexts (serialized) as ``size`` float64 values, rounded to 2^−release_bits."""
        ts = _tenseal()
        values = np.concatenate([np.asarray(ts.ckks_vector_from(self._secret, c).decrypt(), dtype=np.float64)
                                 for c in chunks])[:size]
        grid = 2.0**self.params.release_bits
        return np.round(values * grid) / grid


@dataclass(frozen=True)
class Ciphertexts:
    """One client's encrypted delta: a CKKS ciphertext per chunk of N/2 values, and the layout."""

    client_id: int
    chunks: tuple[bytes, ...]
    layout: tuple[tuple[str, tuple[int, ...]], ...]  # (key, shape) in the flattening order

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the id, and per chunk its length prefix and ciphertext."""
        return _ID.size + sum(_ID.size + len(c) for c in self.chunks)


def _layout(delta: Mapping[str, torch.Tensor]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, tuple(delta[k].shape)) for k in sorted(delta))


def encrypt_delta(public: bytes, client_id: int, delta: Mapping[str, torch.Tensor], params: CKKSParams,
                  num_summands: int) -> Ciphertexts:
    """``delta`` flattened (sorted keys, float64), chunked into N/2 slots, each chunk encrypted."""
    ts = _tenseal()
    ctx = ts.context_from(public)
    limit = params.max_abs(num_summands)
    parts = []
    for k, _ in _layout(delta):
        v = delta[k]
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ValueError(f"delta[{k!r}] must be a finite floating tensor (got dtype {v.dtype})")
        flat = v.detach().cpu().double().reshape(-1).numpy()
        if flat.size and float(np.abs(flat).max()) > limit:
            raise ValueError(f"delta[{k!r}] reaches |x| = {float(np.abs(flat).max()):.4g}; with CKKS scale 2^"
                             f"{params.scale_bits} and {num_summands} summands the largest encodable is {limit:.4g}")
        parts.append(flat)
    flat = np.concatenate(parts) if parts else np.zeros(0)
    n = params.slots
    chunks = tuple(ts.ckks_vector(ctx, flat[i:i + n].tolist()).serialize() for i in range(0, len(flat), n))
    return Ciphertexts(client_id, chunks, _layout(delta))


class EncryptedSum:
    """Σ of the clients' ciphertexts, folded as they arrive, under the public context only."""

    def __init__(self, public: bytes) -> None:
        self._ctx = _tenseal().context_from(public)
        self.ids: list[int] = []
        self.layout: tuple[tuple[str, tuple[int, ...]], ...] = ()
        self._total: list = []

    def add(self, client_id: int, ct: Ciphertexts) -> None:
        ts = _tenseal()
        if client_id in self.ids:
            raise ValueError(f"a second encrypted input from client {client_id}")
        if self.ids and (ct.layout != self.layout or len(ct.chunks) != len(self._total)):
            raise ValueError(f"encrypted input of client {client_id} has different keys/shapes than the others")
        vectors = [ts.ckks_vector_from(self._ctx, c) for c in ct.chunks]
        if not self.ids:
            self.layout, self._total = ct.layout, vectors
        else:
            for acc, v in zip(self._total, vectors):
                acc += v
        self.ids.append(client_id)

    def serialized(self) -> list[bytes]:
        """The summed ciphertexts as sent to the key holder."""
        return [v.serialize() for v in self._total]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)


def unflatten(values: np.ndarray, layout, dtype: torch.dtype) -> StateDict:
    out, start = {}, 0
    for k, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[k] = torch.from_numpy(values[start:start + n].copy()).reshape(shape).to(dtype)
        start += n
    return out


class HERound:
    """One round of HE secure aggregation: the key holder, the clients' encryption, the decryption.

    Has the methods the server calls on :class:`~fedllm.algorithms.secure.SecAggRound` so the two
    schemes are interchangeable there; ``bytes_up[k].keys`` counts the public context client k
    downloads, ``.masked`` its ciphertexts; ``sum_bytes`` the summed ciphertexts sent for decryption.
    A client that drops after uploading is in the sum (no unmasking phase): ``threshold`` is 0.
    """

    threshold = 0

    def __init__(self, client_ids: Iterable[int], params: CKKSParams | None = None) -> None:
        self.client_ids = list(client_ids)
        if len(self.client_ids) < 2 or len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError(f"need >= 2 distinct client ids, got {self.client_ids}")
        self.params = params or CKKSParams()
        self.key_holder = KeyHolder(self.params)  # fresh keys every round
        self.bytes_up = {u: SecAggBytes() for u in self.client_ids}
        self.sum_bytes = 0

    def advertise_keys(self) -> bytes:
        """Every client of the round downloads the public context."""
        for u in self.client_ids:
            self.bytes_up[u].keys = len(self.key_holder.public)
        return self.key_holder.public

    def share_keys(self) -> None:
        """Nothing to share: one key pair, held by the key holder."""

    def new_sum(self) -> EncryptedSum:
        return EncryptedSum(self.key_holder.public)

    def masked_input(self, client_id: int, delta: Mapping[str, torch.Tensor]) -> Ciphertexts:
        if client_id not in self.bytes_up:
            raise ValueError(f"client {client_id} is not in this round ({self.client_ids})")
        ct = encrypt_delta(self.key_holder.public, client_id, delta, self.params, len(self.client_ids))
        self.bytes_up[client_id].masked = ct.nbytes
        return ct

    def unmask(self, received: EncryptedSum, dropped_after_masking: Iterable[int] = (),
               dtype: torch.dtype = torch.float32) -> StateDict:
        """Σ Δᵢ over the clients in ``received``: the server sends the summed ciphertexts, the key holder decrypts."""
        if unknown := set(received) - set(self.client_ids):
            raise ValueError(f"encrypted inputs from clients not in this round: {sorted(unknown)}")
        if not len(received):
            raise ValueError("no encrypted input to decrypt")
        chunks = received.serialized()
        self.sum_bytes = sum(len(c) for c in chunks)
        size = sum(int(np.prod(s, dtype=np.int64)) for _, s in received.layout)
        return unflatten(self.key_holder.decrypt_sum(chunks, size), received.layout, dtype)
