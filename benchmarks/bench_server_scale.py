"""The server side at scale: peak RSS, round time and checkpoint writes for 2, 100 and 1,000 clients,
and aggregation throughput against Flower's ``aggregate`` (issue 21).

Part 1 — one fresh subprocess per configuration (peak RSS is per process). The server of a
recipe with SCAFFOLD and top-k compression with error feedback (so every client has two
adapter-sized states: its control cᵢ and its residual eᵢ), 10 % of the clients per round,
on a LoRA adapter of ``--layers`` × (q, v) × (A, B) at d = 2048, r = 16 (16 layers: 2.1 M
parameters, 8.4 MB in fp32). Each round the sampled clients upload a synthetic Δᵢ (drawn outside the
timed part) and the server folds, applies and checkpoints it (``torch.save`` of its
``state_dict()``, as the engine's checkpoint does). Reported: peak RSS (and above the process's
RSS before the first round), server seconds per round (upload + finish_round), bytes a round's
checkpoint writes (the checkpoint file plus the per-client files the store wrote that round).

- ``store``: fedllm now: the mean folded as updates arrive, per-client state in the on-disk store;
- ``memory``: what fedllm did before (every update of the round held to the end; controls and
  residuals in dicts; each checkpoint clones every client's state) — the same server with its
  stores in memory and folding off.

Part 2 — in this process: 100 updates of the same adapter with random example counts; the
weighted mean by fedllm (float64 accumulation, the same code the server folds with) against
Flower's ``flwr.server.strategy.aggregate.aggregate`` (numpy) on the same arrays, and a memory
floor: one pass reading every update once (``torch.sum`` of each tensor, on as many threads as
fedllm's fold uses: torch's intra-op count). Best of ``--repeat``.

    python benchmarks/bench_server_scale.py                       # both parts, ~5 min on 2 cores
    python benchmarks/bench_server_scale.py --part aggregate --repeat 7
    python benchmarks/bench_server_scale.py --configs store:1000 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

D, R = 2048, 16


def adapter(layers: int):
    import torch  # noqa: PLC0415

    state = {}
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            base = f"base_model.model.layers.{i}.self_attn.{m}"
            state[f"{base}.lora_A.weight"] = torch.zeros(R, D)
            state[f"{base}.lora_B.weight"] = torch.zeros(D, R)
    return state


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(kind: str, num_clients: int, rounds: int, layers: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch  # noqa: PLC0415

    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.federation.server import FederatedServer  # noqa: PLC0415
    from fedllm.types import ClientUpdate  # noqa: PLC0415

    torch.set_num_threads(1)
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [
        f"partition.num_clients={num_clients}", "federation.fraction=0.1", "federation.algorithm=scaffold",
        "compression.codec=topk", "compression.topk_fraction=0.01", "compression.error_feedback=true",
        "eval.lora_error=false", "checkpoint.keep=2", f"federation.rounds={rounds}"])
    state = adapter(layers)
    sizes = [20 + (k * 7) % 50 for k in range(num_clients)]
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-") as tmp:
        server = FederatedServer(recipe, state, sizes, state_dir=Path(tmp) / "client_state" if kind == "store" else None)
        if kind == "memory":
            server.streams = False
        gen = torch.Generator().manual_seed(0)
        base_rss, times, ckpt, written = current_rss_mb(), [], [], 0
        for rnd in range(1, rounds + 1):
            t_server = 0.0
            t0 = time.perf_counter()
            plan = server.begin_round(rnd)
            t_server += time.perf_counter() - t0
            for k in plan.training:
                delta = {key: 1e-3 * torch.randn(v.shape, generator=gen) for key, v in state.items()}
                upd = ClientUpdate(k, delta, sizes[k], 10, 1.0)
                t0 = time.perf_counter()
                server.upload(rnd, upd, state)
                t_server += time.perf_counter() - t0
                del delta, upd
            t0 = time.perf_counter()
            state, metrics = server.finish_round(rnd, state)
            buf = io.BytesIO()
            torch.save(server.state_dict(), buf)  # what the engine's checkpoint writes
            t_server += time.perf_counter() - t0
            assert metrics["applied"], metrics
            # the per-client files a checkpoint names (not the round's own spool and pending controls)
            stores = sum(s.bytes_written for s in server._stores if s.keep > 0)
            ckpt.append(buf.tell() + stores - written)
            written = stores
            times.append(t_server)
    return {"kind": kind, "clients": num_clients, "per_round": recipe.clients_per_round, "rounds": rounds,
            "params": sum(v.numel() for v in state.values()), "peak_rss_mb": rss_mb(), "base_rss_mb": base_rss,
            "round_s": times, "checkpoint_bytes": ckpt}


def aggregate_part(layers: int, updates: int, repeat: int) -> dict:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from flwr.server.strategy.aggregate import aggregate  # noqa: PLC0415

    from fedllm.algorithms.aggregate import mean_delta  # noqa: PLC0415
    from fedllm.types import ClientUpdate  # noqa: PLC0415

    gen = torch.Generator().manual_seed(1)
    template = adapter(layers)
    counts = [int(x) for x in torch.randint(10, 200, (updates,), generator=gen)]
    ups = [ClientUpdate(i, {k: torch.randn(v.shape, generator=gen) for k, v in template.items()}, n, 1, 0.0)
           for i, n in enumerate(counts)]
    arrays = [([v.numpy() for v in u.delta.values()], u.num_examples) for u in ups]

    def best(fn) -> float:
        out = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    ours = mean_delta(ups, weighted=True)
    theirs = aggregate(arrays)
    agree = max(float(np.max(np.abs(ours[k].numpy() - t))) for k, t in zip(template, theirs))
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    pool = ThreadPoolExecutor(torch.get_num_threads())  # the floor reads on as many threads as fedllm folds
    keys = list(template)
    times = {"fedllm": best(lambda: mean_delta(ups, weighted=True)),
             "flower": best(lambda: aggregate(arrays)),
             "floor": best(lambda: list(pool.map(lambda k: [float(u.delta[k].sum()) for u in ups], keys)))}
    nbytes = sum(v.numel() * v.element_size() for u in ups for v in u.delta.values())
    return {"updates": updates, "params": sum(v.numel() for v in template.values()), "bytes": nbytes,
            "seconds": times, "max_abs_difference_vs_flower": agree, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["scale", "aggregate", "both"], default="both")
    ap.add_argument("--configs", default="store:2,store:100,store:1000,memory:2,memory:100,memory:1000",
                    help="KIND:CLIENTS,... (KIND store or memory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16, help="LoRA layers (16: 2.1 M parameters)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # KIND:CLIENTS, in a child process
    args = ap.parse_args()
    if args.one:
        kind, n = args.one.split(":")
        print(json.dumps(one(kind, int(n), args.rounds, args.layers)))
        return
    report: dict = {}
    if args.part in ("scale", "both"):
        rows = []
        for cfg in args.configs.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", cfg, "--rounds", str(args.rounds),
                                  "--layers", str(args.layers)], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{cfg} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        report["scale"] = rows
        print(f"server side, SCAFFOLD + top-k 1 % with error feedback, 10 % of clients per round, "
              f"{rows[0]['params'] / 1e6:.2f} M-parameter LoRA adapter, {args.rounds} rounds")
        print(f"{'kind':7s} {'clients':>7s} {'per rnd':>7s} {'peak RSS MB':>11s} {'above start':>11s} "
              f"{'s/round (last)':>14s} {'ckpt MB/round (last)':>20s}")
        for r in rows:
            print(f"{r['kind']:7s} {r['clients']:7d} {r['per_round']:7d} {r['peak_rss_mb']:11.0f} "
                  f"{r['peak_rss_mb'] - r['base_rss_mb']:11.0f} {r['round_s'][-1]:14.3f} "
                  f"{r['checkpoint_bytes'][-1] / 1e6:20.2f}")
        by = {(r["kind"], r["clients"]): r for r in rows}
        for kind in ("store", "memory"):
            if (kind, 2) in by and (kind, 1000) in by:
                print(f"{kind}: peak RSS 1000 clients / 2 clients = "
                      f"{by[(kind, 1000)]['peak_rss_mb'] / by[(kind, 2)]['peak_rss_mb']:.2f}")
    if args.part in ("aggregate", "both"):
        agg = aggregate_part(args.layers, 100, args.repeat)
        report["aggregate"] = agg
        s = agg["seconds"]
        print(f"weighted mean of {agg['updates']} updates x {agg['params'] / 1e6:.2f} M parameters "
              f"({agg['bytes'] / 1e6:.0f} MB), best of {args.repeat}, {agg['threads']} threads:")
        print(f"  fedllm {s['fedllm'] * 1e3:.0f} ms   Flower aggregate {s['flower'] * 1e3:.0f} ms   "
              f"read-once floor {s['floor'] * 1e3:.0f} ms")
        print(f"  fedllm throughput = {s['flower'] / s['fedllm']:.2f} x Flower's; {s['fedllm'] / s['floor']:.2f} x "
              f"the floor; max |fedllm - Flower| = {agg['max_abs_difference_vs_flower']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
