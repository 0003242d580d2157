"""Wall time of one federated round (train + aggregate, no evaluation) vs a plain PyTorch loop
doing the same client training steps (same model, batches, AdamW, clipping) — the overhead of
fedllm's Lightning client and orchestration. Prints both times and the ratio (target <= 1.10).

    python benchmarks/bench_round_overhead.py [--preset smollm2-135m|tiny] [--repeats 2] [--local-steps 4]
"""

from __future__ import annotations

import argparse
import time

from _common import demo_recipe, plain_client_fit, quiet


def plain_round(exp, global_state, rnd: int) -> None:
    """What a hand-written loop would do for every client of a round."""
    deltas = [plain_client_fit(exp, exp.data.client_examples(k), global_state, rnd, exp.recipe.train.local_steps)
              for k in range(exp.recipe.partition.num_clients)]
    _ = {n: sum(d[n] for d in deltas) / len(deltas) for n in deltas[0]}


def fedllm_round(exp, global_state, rnd: int) -> None:
    """The engine's own round: FederatedServer selection, Lightning clients, upload, aggregation."""
    from fedllm.federation.modes import Hooks, _train_clients
    from fedllm.federation.server import FederatedServer

    sizes = [len(exp.data.client_examples(k)) for k in range(exp.recipe.partition.num_clients)]
    server = FederatedServer(exp.recipe, global_state, sizes)
    plan = server.begin_round(rnd)
    _train_clients(exp, server, plan, global_state, rnd, Hooks())
    server.finish_round(rnd, global_state)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=4, help="client steps per round (demo: 4)")
    args = ap.parse_args()
    quiet()
    from fedllm.experiments.lm import LMExperiment

    exp = LMExperiment(demo_recipe(f"model.preset={args.preset}", f"train.local_steps={args.local_steps}"))
    state = exp.initial_state
    fedllm_round(exp, state, 1)  # warm-up of both paths (first-call allocations, lazy imports)
    plain_round(exp, state, 1)
    times = {"plain": [], "fedllm": []}
    pair = [("plain", plain_round), ("fedllm", fedllm_round)]
    for rep in range(args.repeats):
        for name, fn in pair if rep % 2 == 0 else pair[::-1]:  # alternate the order: no position bias
            t0 = time.perf_counter()
            fn(exp, state, 1)
            times[name].append(time.perf_counter() - t0)
    plain, fed = min(times["plain"]), min(times["fedllm"])
    steps = exp.recipe.partition.num_clients * exp.recipe.train.local_steps
    print(f"{steps} client steps per round ({args.preset})")
    print(f"plain PyTorch loop : {plain:7.2f} s  (best of {args.repeats})")
    print(f"fedllm round       : {fed:7.2f} s  (best of {args.repeats})")
    print(f"ratio fedllm/plain : {fed / plain:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
