"""Secure aggregation of one round, CKKS homomorphic encryption vs pairwise masks: bytes on the wire,
seconds, and the error of the decrypted / unmasked sum against the float64 sum.

The update is the SmolLM2-135M adapter's shape (LoRA r 16 on all 7 linear projections of its 30
decoder layers: 4.88 M values; built from the published config, no model loaded) filled with random
deltas N(0, 1e-3²); K = 5 clients. Everything runs in this one process, one party after another,
so "client s" is one client's own work (encrypting / masking: clients work in parallel in a real
round) and "round s" is the whole round done sequentially. Schemes run in the order masks, HE, HE,
masks (``--repeats 2``); each figure is the mean over repeats.

    flock /tmp/fedllm-bench.lock python benchmarks/bench_he.py [--clients 5] [--layers 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from fedllm.algorithms.he import HERound
from fedllm.algorithms.secure import MaskedSum, SecAggRound
from fedllm.federation.server import SECAGG_MODULUS_BITS, SECAGG_SCALE_BITS
from fedllm.types import serialized_bytes

# SmolLM2-135M (hidden 576, MLP 1536, 9 heads of 64, 3 KV heads): (in, out) of each projection
HIDDEN, MLP, KV = 576, 1536, 3 * 64
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP),
        "mlp.down_proj": (MLP, HIDDEN)}


def adapter_shapes(layers: int, r: int = 16) -> dict[str, tuple[int, int]]:
    """peft's LoRA keys and shapes (A: r x in, B: out x r) for every projection of every layer."""
    out = {}
    for i in range(layers):
        for name, (fan_in, fan_out) in PROJ.items():
            base = f"base_model.model.model.layers.{i}.{name}"
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = (r, fan_in), (fan_out, r)
    return out


def deltas(shapes, k: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()} for _ in range(k)]


def masks_round(ds) -> dict[str, float]:
    ids = list(range(len(ds)))
    t0 = time.perf_counter()
    rnd = SecAggRound(ids, math.ceil(0.6 * len(ids)), SECAGG_MODULUS_BITS, SECAGG_SCALE_BITS)  # OS randomness
    rnd.advertise_keys()
    rnd.share_keys()
    keys_s = time.perf_counter() - t0
    total, client_s = MaskedSum(SECAGG_MODULUS_BITS), []
    for k, d in enumerate(ds):
        c0 = time.perf_counter()
        y = rnd.masked_input(k, d)
        client_s.append(time.perf_counter() - c0)
        total.add(k, y)
    out = rnd.unmask(total, dtype=torch.float64)
    wall = time.perf_counter() - t0
    b = rnd.bytes_up.values()
    return {"round_s": wall, "client_s": statistics.fmean(client_s), "keys_s": keys_s,
            "upload_MB": sum(x.masked for x in b) / len(ds) / 1e6,
            "overhead_MB": sum(x.overhead for x in b) / len(ds) / 1e6, "error": _error(out, ds)}


def he_round(ds) -> dict[str, float]:
    t0 = time.perf_counter()
    rnd = HERound(range(len(ds)))
    rnd.advertise_keys()
    keys_s = time.perf_counter() - t0
    total, client_s = rnd.new_sum(), []
    for k, d in enumerate(ds):
        c0 = time.perf_counter()
        ct = rnd.masked_input(k, d)
        client_s.append(time.perf_counter() - c0)
        total.add(k, ct)
        del ct
    out = rnd.unmask(total, dtype=torch.float64)
    wall = time.perf_counter() - t0
    b = rnd.bytes_up.values()
    return {"round_s": wall, "client_s": statistics.fmean(client_s), "keys_s": keys_s,
            "upload_MB": sum(x.masked for x in b) / len(ds) / 1e6,
            "overhead_MB": (sum(x.keys for x in b) / len(ds)) / 1e6, "sum_MB": rnd.sum_bytes / 1e6,
            "error": _error(out, ds)}


def _error(out, ds) -> float:
    return max(float((out[n] - sum(d[n].double() for d in ds)).abs().max()) for n in ds[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    shapes = adapter_shapes(args.layers)
    ds = deltas(shapes, args.clients)
    n = sum(math.prod(s) for s in shapes.values())
    plain_mb = serialized_bytes(ds[0]) / 1e6
    t0 = time.perf_counter()
    _ = {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}
    plain_s = time.perf_counter() - t0
    print(f"adapter: {n:,} values ({len(shapes)} tensors), K = {args.clients}; plain float32 upload "
          f"{plain_mb:.2f} MB/client, plain mean {plain_s:.3f} s; load average {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[dict[str, float]]] = {"masks": [], "he": []}
    order = [("masks", masks_round), ("he", he_round)]
    for rep in range(args.repeats):
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(fn(ds))
            print(f"  {name:5s} rep {rep}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()), flush=True)
    print("| scheme | upload per client (MB) | x plain | key material per client (MB) | client s (encrypt/mask) "
          "| round s (sequential) | max abs error of the sum |")
    for name, rs in runs.items():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in rs[0]}
        worst = max(r["error"] for r in rs)
        print(f"| {name} | {mean['upload_MB']:.1f} | {mean['upload_MB'] / plain_mb:.1f} | {mean['overhead_MB']:.3f} | "
              f"{mean['client_s']:.2f} | {mean['round_s']:.1f} | {worst:.3g} |"
              + (f"  (summed ciphertexts to the key holder: {mean['sum_MB']:.1f} MB)" if "sum_MB" in mean else ""))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
