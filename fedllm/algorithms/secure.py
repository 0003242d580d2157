"""Secure aggregation by pairwise masks (Bonawitz et al., 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), simulated in one process with real cryptography.

Fixed point. A delta x is encoded as q = round(x·2^s) mod 2^b (two's complement, s = scale_bits,
b = modulus_bits). Rounding moves each value by at most 2^−(s+1), so the decoded sum of K inputs
is within K·2^−(s+1) of the true sum per coordinate (:func:`fixed_point_error_bound`), provided
no wrap-around: :func:`encode_fixed` rejects |q| > (2^(b−1) − 1)/K.

Masking (double masking, the paper's §4). Per round, client u makes two X25519 key pairs: c_u for
encrypting the Shamir shares it sends through the server (AES-GCM, key HKDF-SHA256 of the X25519
agreement) and s_u for masks; the pairwise seed s_uv = HKDF-SHA256(X25519(s_u, s_v)) is the same
for u and v. With PRG(seed) the ChaCha20 keystream under that 32-byte key (nonce 0) read as
little-endian uint64 mod 2^b, and b_u a private 32-byte self-mask seed, client u sends

    y_u = q_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)   (mod 2^b)

so the pairwise masks cancel in Σ y_u. Before masking, u splits s_u's private key and b_u into
t-of-n Shamir shares over the prime 2^521 − 1 and sends one to each participant.

Unmasking. U3 = clients whose masked input arrived. The server asks the survivors for the shares
of b_u for u ∈ U3 and of s_u's key for u ∉ U3 (dropped before sending); an honest client never
reveals both for the same u. The server rebuilds the dropped clients' pairwise masks and every
PRG(b_u), and outputs Σ_{u∈U3} x_u: a client whose masked input arrived and who then dropped is
included (its b_u comes from the others' shares). A client that was declared dropped and whose
input then arrives late stays masked by PRG(b_u), which nobody will reveal. Fewer than t
responding survivors is an error. Honest-but-curious model: the paper's consistency-check round
(signatures against an active server) and dropouts during the key phases are not simulated.

One module (~440 lines) on purpose: fixed-point coding, key agreement, Shamir sharing, masking and
recovery are one protocol whose correctness is read top to bottom against the paper.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedllm.types import StateDict, serialized_bytes

PRIME = 2**521 - 1  # Mersenne prime: Shamir's field; larger than any 32-byte secret
_INT_BYTES = 66  # ⌈521/8⌉: one field element on the wire
_ID = struct.Struct(">Q")


# ------------------------------------------------------------------------- Shamir over GF(p)


def shamir_split(secret: int, xs: Iterable[int], threshold: int,
                 rand: Callable[[int], bytes]) -> dict[int, int]:
    """Shares f(x) for each x in ``xs`` of a random degree-(t−1) polynomial with f(0) = secret."""
    xs = list(xs)
    if not 0 <= secret < PRIME:
        raise ValueError("Shamir secret must be in [0, 2^521 − 1)")
    if not 1 <= threshold <= len(xs) or any(not 0 < x < PRIME for x in xs) or len(set(xs)) < len(xs):
        raise ValueError(f"need 1 <= threshold <= {len(xs)} distinct nonzero points, got t={threshold}")
    coeffs = [secret] + [int.from_bytes(rand(_INT_BYTES + 2), "big") % PRIME for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def shamir_reconstruct(shares: Mapping[int, int]) -> int:
    """f(0) by Lagrange interpolation: Σ_j y_j Π_{m≠j} x_m / (x_m − x_j) mod p."""
    if not shares:
        raise ValueError("cannot reconstruct from zero shares")
    secret = 0
    for xj, yj in shares.items():
        num, den = 1, 1
        for xm in shares:
            if xm != xj:
                num, den = num * xm % PRIME, den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


# ------------------------------------------------------------------------- fixed-point encoding


def _check_bits(scale_bits: int, modulus_bits: int) -> None:
    if not 2 <= modulus_bits <= 62:
        raise ValueError(f"modulus_bits must be in [2, 62] (int64 sums), got {modulus_bits}")
    if not 0 <= scale_bits <= modulus_bits - 2:
        raise ValueError(f"scale_bits must be in [0, modulus_bits − 2 = {modulus_bits - 2}], "
                         f"got {scale_bits}")


def fixed_point_error_bound(count: int, scale_bits: int) -> float:
    """Per-coordinate bound on |decoded sum − true sum| for ``count`` summands: count / 2^(s+1)."""
    return count / 2.0 ** (scale_bits + 1)


def encode_fixed(delta: Mapping[str, torch.Tensor], scale_bits: int, modulus_bits: int,
                 num_summands: int = 1) -> dict[str, torch.Tensor]:
    """round(x·2^s) mod 2^b as int64; refuses values whose sum over ``num_summands`` could wrap."""
    _check_bits(scale_bits, modulus_bits)
    limit = (2 ** (modulus_bits - 1) - 1) // max(num_summands, 1)
    out = {}
    for k, v in delta.items():
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ValueError(f"delta[{k!r}] must be a finite floating tensor (got dtype {v.dtype})")
        q = torch.round(v.detach().cpu().double() * 2.0**scale_bits)
        if q.numel() and float(q.abs().max()) > limit:
            raise ValueError(f"delta[{k!r}] reaches |x| = {float(v.abs().max()):.4g}; with scale_bits="
                             f"{scale_bits}, modulus_bits={modulus_bits} and {num_summands} summands "
                             f"the largest encodable is {limit / 2.0**scale_bits:.4g}")
        out[k] = q.to(torch.int64) & (2**modulus_bits - 1)
    return out


def decode_fixed(sum_encoded: Mapping[str, torch.Tensor], scale_bits: int, modulus_bits: int,
                 dtype: torch.dtype = torch.float32) -> StateDict:
    """Map a sum mod 2^b back to reals: values ≥ 2^(b−1) are negative; divide by 2^s."""
    _check_bits(scale_bits, modulus_bits)
    out = {}
    for k, v in sum_encoded.items():
        v = v & (2**modulus_bits - 1)
        v = torch.where(v >= 2 ** (modulus_bits - 1), v - 2**modulus_bits, v)
        out[k] = (v.double() / 2.0**scale_bits).to(dtype)
    return out


# ------------------------------------------------------------------------- PRG and key derivation


def prg_mask(seed: bytes, layout: Mapping[str, torch.Size], modulus_bits: int) -> dict[str, torch.Tensor]:
    """ChaCha20 keystream under the 32-byte ``seed``, as uint64 mod 2^b, over sorted keys."""
    keys = sorted(layout)
    total = sum(int(np.prod(layout[k], dtype=np.int64)) for k in keys)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * total))
    flat = (np.frombuffer(stream, dtype="<u8") & np.uint64(2**modulus_bits - 1)).astype(np.int64)
    out, start = {}, 0
    for k in keys:
        n = int(np.prod(layout[k], dtype=np.int64))
        out[k] = torch.from_numpy(flat[start:start + n].copy()).reshape(layout[k])
        start += n
    return out


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(secret)


def pairwise_seed(own: X25519PrivateKey, other: bytes) -> bytes:
    """s_uv = HKDF-SHA256(X25519(own, other)): the same 32 bytes on both ends of the pair."""
    return _kdf(own.exchange(X25519PublicKey.from_public_bytes(other)), b"fedllm secagg pairwise mask")


def _randomness(seed: int | None, client_id: int) -> Callable[[int], bytes]:
    """The OS CSPRNG, or (simulation only, for reproducible tests) a ChaCha20 stream from ``seed``."""
    if seed is None:
        return os.urandom
    key = _kdf(str(seed).encode(), b"fedllm secagg simulation client %d" % client_id)
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda n: enc.update(bytes(n))


def _modular(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], sign: int,
             modulus_bits: int) -> dict[str, torch.Tensor]:
    """a ± b mod 2^b (entries < 2^62, so int64 never overflows)."""
    return {k: (a[k] + sign * b[k]) & (2**modulus_bits - 1) for k in a}


class MaskedSum:
    """Σ y_u mod 2^b of the masked inputs received so far, and whose they are.

    The masks cancel only in the sum, so a server can fold each masked input as it arrives and
    drop it: the modular sum is exact and independent of the order (integers, not floats).
    """

    def __init__(self, modulus_bits: int) -> None:
        self.modulus_bits = modulus_bits
        self.ids: list[int] = []
        self.layout: dict[str, torch.Size] = {}
        self.total: dict[str, torch.Tensor] = {}

    def add(self, client_id: int, masked: Mapping[str, torch.Tensor]) -> None:
        layout = {k: t.shape for k, t in masked.items()}
        if not self.ids:
            self.layout, self.total = layout, {k: torch.zeros(s, dtype=torch.int64) for k, s in layout.items()}
        elif layout != self.layout:
            raise ValueError(f"masked input of client {client_id} has different keys/shapes than the others")
        if client_id in self.ids:
            raise ValueError(f"a second masked input from client {client_id}")
        self.total = _modular(self.total, masked, +1, self.modulus_bits)
        self.ids.append(client_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)


# ------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class KeyAdvert:
    """Phase 0: a client's two public keys (c for share encryption, s for masks)."""

    client_id: int
    c_public: bytes
    s_public: bytes

    @property
    def nbytes(self) -> int:
        return _ID.size + len(self.c_public) + len(self.s_public)


@dataclass(frozen=True)
class RevealedShares:
    """Phase 3: a survivor's shares of dropped clients' s keys and of arrived clients' b seeds."""

    client_id: int
    s_key: dict[int, int]
    b_seed: dict[int, int]

    @property
    def nbytes(self) -> int:
        return _ID.size + (len(self.s_key) + len(self.b_seed)) * (_ID.size + _INT_BYTES)


@dataclass
class SecAggBytes:
    """What one client uploads in one round, in serialized bytes."""

    keys: int = 0  # its KeyAdvert
    shares: int = 0  # AES-GCM ciphertexts of its Shamir shares (plus receiver ids)
    masked: int = 0  # the masked input (safetensors of int64 tensors)
    unmask: int = 0  # shares revealed for unmasking

    @property
    def overhead(self) -> int:
        return self.keys + self.shares + self.unmask


# ------------------------------------------------------------------------- the two parties


class SecAggClient:
    """One client. Its private keys and b_u leave this object only as encrypted Shamir shares."""

    def __init__(self, client_id: int, threshold: int, rand: Callable[[int], bytes]) -> None:
        self.client_id, self.threshold, self._rand = client_id, threshold, rand
        self._c_key = X25519PrivateKey.from_private_bytes(rand(32))
        self._s_key = X25519PrivateKey.from_private_bytes(rand(32))
        self._b_seed = rand(32)
        self._adverts: dict[int, KeyAdvert] = {}
        self._held: dict[int, tuple[int, int]] = {}  # owner → (share of s key, share of b seed)
        self._revealed_s: set[int] = set()
        self._revealed_b: set[int] = set()
        self._masked = False

    def advertise(self) -> KeyAdvert:
        return KeyAdvert(self.client_id, self._c_key.public_key().public_bytes_raw(),
                         self._s_key.public_key().public_bytes_raw())

    def _aead(self, other: int) -> AESGCM:
        shared = self._c_key.exchange(X25519PublicKey.from_public_bytes(self._adverts[other].c_public))
        return AESGCM(_kdf(shared, b"fedllm secagg share encryption"))

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Split s key and b_u into t-of-n shares; one AES-GCM ciphertext per other participant."""
        if self.client_id not in adverts or len(adverts) < self.threshold:
            raise ValueError(f"client {self.client_id}: need its own and >= {self.threshold} adverts")
        self._adverts = dict(adverts)
        xs = [u + 1 for u in adverts]
        s_secret = int.from_bytes(self._s_key.private_bytes_raw(), "big")
        s_sh = shamir_split(s_secret, xs, self.threshold, self._rand)
        b_sh = shamir_split(int.from_bytes(self._b_seed, "big"), xs, self.threshold, self._rand)
        self._held[self.client_id] = (s_sh[self.client_id + 1], b_sh[self.client_id + 1])
        out = {}
        for v in adverts:
            if v != self.client_id:
                plain = (_ID.pack(self.client_id) + _ID.pack(v) + s_sh[v + 1].to_bytes(_INT_BYTES, "big")
                         + b_sh[v + 1].to_bytes(_INT_BYTES, "big"))
                out[v] = self._aead(v).encrypt(_nonce(self.client_id, v), plain, None)
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        for u, ct in ciphertexts.items():
            plain = self._aead(u).decrypt(_nonce(u, self.client_id), ct, None)
            if _ID.unpack(plain[:8])[0] != u or _ID.unpack(plain[8:16])[0] != self.client_id:
                raise ValueError(f"client {self.client_id}: share from {u} is addressed to someone else")
            s_share, b_share = plain[16:16 + _INT_BYTES], plain[16 + _INT_BYTES:]
            self._held[u] = (int.from_bytes(s_share, "big"), int.from_bytes(b_share, "big"))

    def masked_input(self, delta: Mapping[str, torch.Tensor], scale_bits: int,
                     modulus_bits: int) -> dict[str, torch.Tensor]:
        """y_u = q_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) mod 2^b."""
        if not self._adverts:
            raise ValueError(f"client {self.client_id}: call share_keys() before masked_input()")
        if self._masked:
            raise ValueError(f"client {self.client_id} already sent its masked input this round")
        self._masked = True
        y = encode_fixed(delta, scale_bits, modulus_bits, num_summands=len(self._adverts))
        layout = {k: t.shape for k, t in y.items()}
        y = _modular(y, prg_mask(self._b_seed, layout, modulus_bits), +1, modulus_bits)
        for v, advert in self._adverts.items():
            if v != self.client_id:
                mask = prg_mask(pairwise_seed(self._s_key, advert.s_public), layout, modulus_bits)
                y = _modular(y, mask, +1 if v > self.client_id else -1, modulus_bits)
        return y

    def reveal(self, dropped: set[int], arrived: set[int]) -> RevealedShares:
        """Shares of s keys for ``dropped`` and of b seeds for ``arrived``; never both for one client."""
        if dropped & arrived or dropped & self._revealed_b or arrived & self._revealed_s:
            raise ValueError(f"client {self.client_id} refuses: revealing both the s-key and the b-seed "
                             f"shares of one client would unmask its individual input")
        self._revealed_s |= dropped
        self._revealed_b |= arrived
        return RevealedShares(self.client_id, {u: self._held[u][0] for u in dropped},
                              {u: self._held[u][1] for u in arrived})


def _nonce(sender: int, receiver: int) -> bytes:
    return sender.to_bytes(6, "big") + receiver.to_bytes(6, "big")


class SecAggServer:
    """The server: it only ever receives public keys, ciphertexts, masked inputs and shares."""

    def __init__(self, threshold: int, scale_bits: int, modulus_bits: int) -> None:
        self.threshold, self.scale_bits, self.modulus_bits = threshold, scale_bits, modulus_bits
        self.adverts: dict[int, KeyAdvert] = {}
        self.recovered_keys: dict[int, X25519PrivateKey] = {}

    def collect_adverts(self, adverts: Iterable[KeyAdvert]) -> dict[int, KeyAdvert]:
        self.adverts = {a.client_id: a for a in adverts}
        keys = [a.s_public for a in self.adverts.values()] + [a.c_public for a in self.adverts.values()]
        if len(set(keys)) != len(keys):
            raise ValueError("two advertised public keys are equal; abort the round")
        return dict(self.adverts)

    @staticmethod
    def route(outgoing: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Forward each ciphertext to its receiver (the server cannot decrypt them)."""
        inbox: dict[int, dict[int, bytes]] = {}
        for u, cts in outgoing.items():
            for v, ct in cts.items():
                inbox.setdefault(v, {})[u] = ct
        return inbox

    def unmask(self, masked: Mapping[int, Mapping[str, torch.Tensor]] | MaskedSum,
               reveals: Iterable[RevealedShares], dtype: torch.dtype = torch.float32) -> StateDict:
        """Σ_{u∈U3} x_u from the masked inputs (or their :class:`MaskedSum`) and ≥ t survivors' shares."""
        reveals = list(reveals)
        if not isinstance(masked, MaskedSum):
            summed = MaskedSum(self.modulus_bits)
            for u, y in masked.items():
                summed.add(u, y)
            masked = summed
        if min(len(masked), len(reveals)) < self.threshold:
            raise ValueError(f"secure aggregation needs >= threshold={self.threshold} masked inputs and "
                             f"responders; got {len(masked)} and {len(reveals)}")
        layout, total = masked.layout, masked.total
        for u in masked:
            b_seed = self._reconstruct(u, reveals, "b").to_bytes(32, "big")
            total = _modular(total, prg_mask(b_seed, layout, self.modulus_bits), -1, self.modulus_bits)
        for d in set(self.adverts) - set(masked):
            key = X25519PrivateKey.from_private_bytes(self._reconstruct(d, reveals, "s").to_bytes(32, "big"))
            self.recovered_keys[d] = key
            for u in masked:  # u added +PRG(s_ud) when d > u: take it back out
                mask = prg_mask(pairwise_seed(key, self.adverts[u].s_public), layout, self.modulus_bits)
                total = _modular(total, mask, -1 if d > u else +1, self.modulus_bits)
        return decode_fixed(total, self.scale_bits, self.modulus_bits, dtype)

    def _reconstruct(self, owner: int, reveals: list[RevealedShares], which: str) -> int:
        points = {}
        for r in reveals:
            shares = r.s_key if which == "s" else r.b_seed
            if owner in shares and len(points) < self.threshold:
                points[r.client_id + 1] = shares[owner]
        if len(points) < self.threshold:
            raise ValueError(f"only {len(points)} shares for client {owner}; threshold is {self.threshold}")
        return shamir_reconstruct(points)


# ------------------------------------------------------------------------- one simulated round


class SecAggRound:
    """One round of the protocol: the clients and the server, phase by phase.

    Call ``advertise_keys()``, ``share_keys()``, then ``masked_input(u, delta)`` for each client
    that sends, then ``unmask(received, dropped_after_masking)``. ``seed=None`` draws every key
    from the OS CSPRNG; an int makes the keys reproducible (simulation and tests only). Inputs
    stay hidden from the server colluding with up to t − 1 clients; the paper takes t > n/2.
    """

    def __init__(self, client_ids: Iterable[int], threshold: int, modulus_bits: int,
                 scale_bits: int, seed: int | None = None) -> None:
        ids = list(client_ids)
        if len(ids) < 2 or len(set(ids)) != len(ids) or any(not 0 <= u < 2**48 for u in ids):
            raise ValueError(f"need >= 2 distinct client ids in [0, 2^48), got {ids}")
        if not 2 <= threshold <= len(ids):
            raise ValueError(f"threshold must be in [2, {len(ids)}] for {len(ids)} clients, got {threshold}")
        _check_bits(scale_bits, modulus_bits)
        self.client_ids, self.threshold = ids, threshold
        self.scale_bits, self.modulus_bits = scale_bits, modulus_bits
        self._clients = {u: SecAggClient(u, threshold, _randomness(seed, u)) for u in ids}
        self.server = SecAggServer(threshold, scale_bits, modulus_bits)
        self.bytes_up = {u: SecAggBytes() for u in ids}
        self._adverts: dict[int, KeyAdvert] = {}

    def advertise_keys(self) -> dict[int, KeyAdvert]:
        """Phase 0: each client uploads its two public keys; the server broadcasts them."""
        adverts = [c.advertise() for c in self._clients.values()]
        for a in adverts:
            self.bytes_up[a.client_id].keys = a.nbytes
        self._adverts = self.server.collect_adverts(adverts)
        return self._adverts

    def share_keys(self) -> dict[int, dict[int, bytes]]:
        """Phase 1: encrypted Shamir shares travel client → server → client; returns the inboxes."""
        if not self._adverts:
            raise ValueError("call advertise_keys() before share_keys()")
        outgoing = {u: c.share_keys(self._adverts) for u, c in self._clients.items()}
        for u, cts in outgoing.items():
            self.bytes_up[u].shares = sum(_ID.size + len(ct) for ct in cts.values())
        inbox = self.server.route(outgoing)
        for v, cts in inbox.items():
            self._clients[v].receive_shares(cts)
        return inbox

    def masked_input(self, client_id: int, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Phase 2: client ``client_id``'s masked, fixed-point delta (what it would upload)."""
        if client_id not in self._clients:
            raise ValueError(f"client {client_id} is not in this round ({self.client_ids})")
        y = self._clients[client_id].masked_input(delta, self.scale_bits, self.modulus_bits)
        self.bytes_up[client_id].masked = serialized_bytes(y)
        return y

    def unmask(self, received: Mapping[int, Mapping[str, torch.Tensor]] | MaskedSum,
               dropped_after_masking: Iterable[int] = (), dtype: torch.dtype = torch.float32) -> StateDict:
        """Phase 3: Σ x_u over the clients in ``received`` (Bonawitz's U3), as floats.

        ``dropped_after_masking`` are clients whose masked input is in ``received`` but who do
        not answer the unmasking request; their inputs are still in the sum. A client that
        dropped before sending is simply absent from ``received``.
        """
        arrived, late_drop = set(received), set(dropped_after_masking)
        if unknown := arrived - set(self._clients):
            raise ValueError(f"masked inputs from clients not in this round: {sorted(unknown)}")
        if missing := late_drop - arrived:
            raise ValueError(f"clients {sorted(missing)} are listed as dropped after masking but their "
                             "masked input is not in `received`; leave them out of both instead")
        survivors = sorted(arrived - late_drop)
        if len(survivors) < self.threshold:
            raise ValueError(f"secure aggregation needs >= threshold={self.threshold} surviving clients "
                             f"to unmask; only {len(survivors)} survive ({survivors})")
        dropped = set(self._clients) - arrived
        reveals = [self._clients[u].reveal(dropped, arrived) for u in survivors]
        for r in reveals:
            self.bytes_up[r.client_id].unmask += r.nbytes
        return self.server.unmask(received, reveals, dtype)
