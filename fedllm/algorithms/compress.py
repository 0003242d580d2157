"""Update compression: codecs that turn a client's delta into the bytes that would be uploaded.

Every codec's :class:`Encoded` holds one safetensors blob: the packed tensors (codes, scales,
indices) plus a JSON header naming each original key, shape and dtype. ``nbytes`` is the length
of that blob, header included, so the communication we report is what would really be sent.

- ``Identity`` ("none"): the delta as is; ``nbytes == serialized_bytes(delta)``.
- ``Float16`` ("fp16"): half precision.
- ``StochasticQuantizer`` ("q8", "q4", "q2"): QSGD-style unbiased stochastic rounding (Alistarh et
  al., 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization"), here on the uniform
  grid between each tensor's min a and max b with s = 2^bits − 1 steps of h = (b − a)/s:
  u = (x − a)/h, q = ⌊u⌋ + Bernoulli(u − ⌊u⌋), x̂ = a + q·h, so E[x̂] = x and |x̂ − x| < h.
  Codes are bit-packed (two 4-bit or four 2-bit codes a byte).
- ``SignSGD`` ("sign"): x̂ = mean(|x|)·sign(x), one bit a weight (Bernstein et al., 2018,
  "signSGD"; the ℓ1 scale as in Karimireddy et al., 2019, "Error Feedback Fixes SignSGD").
- ``TopK`` ("topk"): keep the ⌈f·n⌉ largest |x| of each tensor as int32 indices + fp32 values
  (Stich et al., 2018, "Sparsified SGD with Memory").

:class:`ErrorFeedback` (Seide et al., 2014; Karimireddy et al., 2019) keeps each client's
compression error: p = Δ + e; send C(p); e ← p − D(C(p)). Biased codecs (sign, top-k) need it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedllm.types import ClientStates, StateDict, add, clone_state, subtract


@dataclass(frozen=True)
class Encoded:
    """A compressed delta: ``payload`` is exactly the bytes that would be sent."""

    codec: str
    payload: bytes
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class Codec(Protocol):
    """Maps a delta to an :class:`Encoded` payload and back (lossy for all but ``Identity``)."""

    name: str

    def encode(self, delta: StateDict) -> Encoded: ...

    def decode(self, enc: Encoded) -> StateDict: ...


# ---------------------------------------------------------------------------- shared plumbing


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _layout(delta: Mapping[str, torch.Tensor]) -> list[list[Any]]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in delta.items()]


def _check_input(codec: str, delta: Mapping[str, torch.Tensor]) -> None:
    for k, v in delta.items():
        if not v.is_floating_point():
            raise ValueError(f"{codec}: delta[{k!r}] has dtype {v.dtype}; expected a floating tensor")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{codec}: delta[{k!r}] has NaN/Inf entries; expected finite values")


def _pack(codec: str, parts: dict[str, torch.Tensor], layout: list[list[Any]], **extra: Any) -> Encoded:
    # One metadata entry: safetensors may write several in any order, and payloads should be
    # byte-for-byte reproducible.
    meta = {"fedllm": json.dumps({"layout": layout, **extra}, separators=(",", ":"))}
    payload = st_save({k: v.detach().contiguous().cpu() for k, v in parts.items()}, metadata=meta)
    return Encoded(codec, payload, {k: tuple(s) for k, s, _ in layout}, {k: d for k, _, d in layout})


def _metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]).get("__metadata__") or {}


def _unpack(codec: str, enc: Encoded) -> tuple[dict[str, torch.Tensor], list[list[Any]], dict[str, Any]]:
    if enc.codec != codec:
        raise ValueError(f"payload was encoded by {enc.codec!r}; this codec is {codec!r}")
    meta = json.loads(_metadata(enc.payload).get("fedllm", "{}"))
    return st_load(enc.payload), meta.get("layout", []), meta


def _split(flat: torch.Tensor, layout: list[list[Any]]) -> StateDict:
    sizes = [math.prod(s) for _, s, _ in layout]
    return {k: part.reshape(s).to(_dtype(d))
            for (k, s, d), part in zip(layout, torch.split(flat, sizes))}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit unsigned codes (uint8 < 2^bits) into bytes, low bits first."""
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[:codes.size] = codes
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for ``n`` codes."""
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:n]


def _flat(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not delta:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([v.detach().cpu().flatten().to(torch.float64) for v in delta.values()])


# ---------------------------------------------------------------------------- codecs


class Identity:
    """No compression: the safetensors serialization of the delta itself."""

    name = "none"

    def encode(self, delta: StateDict) -> Encoded:
        layout = _layout(delta)
        payload = st_save({k: v.detach().contiguous().cpu() for k, v in delta.items()})
        return Encoded(self.name, payload, {k: tuple(s) for k, s, _ in layout}, {k: d for k, _, d in layout})

    def decode(self, enc: Encoded) -> StateDict:
        parts = _unpack(self.name, enc)[0]
        return {k: parts[k] for k in enc.shapes} if parts.keys() == enc.shapes.keys() else parts


class Float16:
    """Half-precision values; decoded back to each tensor's original dtype."""

    name = "fp16"

    def encode(self, delta: StateDict) -> Encoded:
        _check_input(self.name, delta)
        half = {k: v.to(torch.float16) for k, v in delta.items()}
        for k, v in half.items():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"fp16: delta[{k!r}] overflows float16 (|x| > 65504)")
        return _pack(self.name, half, _layout(delta))

    def decode(self, enc: Encoded) -> StateDict:
        parts, layout, _ = _unpack(self.name, enc)
        return {k: parts[k].to(_dtype(d)) for k, _, d in layout}


class StochasticQuantizer:
    """Unbiased stochastic uniform quantization to ``bits`` ∈ {8, 4, 2} between per-tensor min/max.

    Randomness comes from a private generator seeded with ``seed``; its state is checkpointable.
    """

    def __init__(self, bits: int = 8, seed: int = 0) -> None:
        if bits not in (8, 4, 2):
            raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
        self.bits = bits
        self.name = f"q{bits}"
        self.levels = (1 << bits) - 1
        self._gen = torch.Generator().manual_seed(seed)

    def encode(self, delta: StateDict) -> Encoded:
        _check_input(self.name, delta)
        ranges = torch.tensor([[float(v.min()), float(v.max())] if v.numel() else [0.0, 0.0]
                               for v in delta.values()], dtype=torch.float32).reshape(-1, 2)
        codes = []
        for (lo, hi), v in zip(ranges.to(torch.float64), delta.values()):
            step = (hi - lo) / self.levels
            x = v.detach().cpu().flatten().to(torch.float64)
            if step <= 0:
                codes.append(torch.zeros(x.numel(), dtype=torch.uint8))
                continue
            u = ((x - lo) / step).clamp(0, self.levels)
            q = u.floor() + (torch.rand(u.shape, generator=self._gen, dtype=torch.float64) < u - u.floor())
            codes.append(q.clamp(0, self.levels).to(torch.uint8))
        flat = torch.cat(codes).numpy() if codes else np.zeros(0, dtype=np.uint8)
        packed = torch.from_numpy(pack_codes(flat, self.bits))
        return _pack(self.name, {"codes": packed, "range": ranges}, _layout(delta))

    def decode(self, enc: Encoded) -> StateDict:
        parts, layout, _ = _unpack(self.name, enc)
        sizes = [math.prod(s) for _, s, _ in layout]
        codes = torch.from_numpy(unpack_codes(parts["codes"].numpy(), self.bits, sum(sizes)).copy())
        ranges = parts["range"].to(torch.float64)
        lo = torch.repeat_interleave(ranges[:, 0], torch.tensor(sizes, dtype=torch.long))
        hi = torch.repeat_interleave(ranges[:, 1], torch.tensor(sizes, dtype=torch.long))
        return _split(lo + codes.to(torch.float64) * (hi - lo) / self.levels, layout)

    def reseed(self, seed: int) -> None:
        """Draw the next encodings from ``seed`` (the uplink keys it by round and client)."""
        self._gen.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])


class SignSGD:
    """One bit a weight (x ≥ 0 → +1) times the per-tensor scale mean(|x|)."""

    name = "sign"

    def encode(self, delta: StateDict) -> Encoded:
        _check_input(self.name, delta)
        scale = torch.tensor([float(v.abs().mean()) if v.numel() else 0.0 for v in delta.values()],
                             dtype=torch.float32)
        bits = torch.from_numpy(np.packbits((_flat(delta) >= 0).numpy()))
        return _pack(self.name, {"signs": bits, "scale": scale}, _layout(delta))

    def decode(self, enc: Encoded) -> StateDict:
        parts, layout, _ = _unpack(self.name, enc)
        sizes = [math.prod(s) for _, s, _ in layout]
        signs = np.unpackbits(parts["signs"].numpy(), count=sum(sizes)).astype(np.float64) * 2 - 1
        scale = torch.repeat_interleave(parts["scale"].to(torch.float64),
                                        torch.tensor(sizes, dtype=torch.long))
        return _split(torch.from_numpy(signs) * scale, layout)


class TopK:
    """The ⌈fraction · n⌉ largest-magnitude entries of each tensor (int32 index, fp32 value)."""

    name = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def encode(self, delta: StateDict) -> Encoded:
        _check_input(self.name, delta)
        idx, val, counts = [], [], []
        for v in delta.values():
            x = v.detach().cpu().flatten()
            k = min(x.numel(), math.ceil(self.fraction * x.numel()))
            top = torch.topk(x.abs(), k, sorted=False).indices.sort().values
            idx.append(top.to(torch.int32))
            val.append(x[top].to(torch.float32))
            counts.append(k)
        parts = {"index": torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32),
                 "value": torch.cat(val) if val else torch.zeros(0)}
        return _pack(self.name, parts, _layout(delta), counts=counts)

    def decode(self, enc: Encoded) -> StateDict:
        parts, layout, meta = _unpack(self.name, enc)
        counts = meta["counts"]
        out: StateDict = {}
        for (k, shape, dtype), index, value in zip(layout, torch.split(parts["index"], counts),
                                                   torch.split(parts["value"], counts)):
            full = torch.zeros(math.prod(shape), dtype=torch.float32)
            full[index.long()] = value
            out[k] = full.reshape(shape).to(_dtype(dtype))
        return out


class ErrorFeedback:
    """Per-client residual memory e_i: p = Δ + e_i; send C(p); e_i ← p − D(C(p)).

    Whatever a lossy codec drops is carried into the client's next upload, so over T rounds
    Σ D(C(pₜ)) + e_T = Σ Δₜ exactly (up to float rounding).
    """

    def __init__(self, residuals: ClientStates | None = None) -> None:
        self.residuals = ClientStates() if residuals is None else residuals  # or a store on disk

    def compress(self, client_id: int, delta: StateDict, codec: Codec) -> Encoded:
        residual = self.residuals.get(client_id)
        target = clone_state(delta) if residual is None else add(delta, residual)
        enc = codec.encode(target)
        self.residuals[client_id] = subtract(target, codec.decode(enc))
        return enc

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self.residuals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals.load_state_dict(state["residuals"])


CODECS: dict[str, Any] = {
    "none": Identity,
    "fp16": Float16,
    "q8": lambda **kw: StochasticQuantizer(8, **kw),
    "q4": lambda **kw: StochasticQuantizer(4, **kw),
    "q2": lambda **kw: StochasticQuantizer(2, **kw),
    "sign": SignSGD,
    "topk": TopK,
}


def build_codec(name: str, **kw: Any) -> Codec:
    """A codec by name: none, fp16, q8/q4/q2 (``seed=``), sign, topk (``fraction=``)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}")
    try:
        return CODECS[name](**kw)
    except TypeError as err:
        raise ValueError(f"codec {name!r} does not accept options {sorted(kw)}: {err}") from None
