"""Per-round wall time of the same tiny recipe on the in-process engine, Flower's simulation runtime
and a Flower deployment on 127.0.0.1 (SuperLink + one SuperNode per client), as ratios against the
in-process engine measured in the same run (target: deployment <= 5x).

A round's time is the engine's own ``round_time_s`` (train + aggregate + evaluate, the client
messages included), averaged over rounds 1..R; start-up (process starts, model and data loading,
node discovery) is reported apart as the whole run's wall time.

    python benchmarks/bench_flower.py [--rounds 3] [--configs inprocess,simulation,deploy-warm,...]
                                      [--json docs/flower_bench.json]

Configurations: ``inprocess``; ``simulation`` (Flower simulation, Ray actors keep the model);
``deploy-warm`` (isolation subprocess, one warm fedllm worker per site: model loaded once);
``deploy-warm-process`` (``--isolation process`` with fedllm's executor: every ClientApp task runs in one
long-lived process per site, no process per message);
``deploy-cold`` (Flower's default: every message starts a ClientApp process that loads the model
and data itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import ROOT, quiet

CONFIGS = ("inprocess", "simulation", "deploy-warm", "deploy-warm-process", "deploy-cold")
DEFAULT = ("inprocess", "simulation", "deploy-warm", "deploy-warm-process", "inprocess")


def tiny(rounds: int):
    from fedllm.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny.yaml", [
        "partition.num_clients=2", f"federation.rounds={rounds}", "train.local_steps=2", "eval.bleu_samples=0",
        "output.save_adapter=false", "name=bench_flower"])


def run_one(config: str, recipe, out: str) -> dict:
    """Run one configuration; return its mean per-round time and whole-run wall time."""
    from fedllm.federation.flower.launch import LaunchOptions, run_deployment
    from fedllm.federation.rundir import read_metrics, run_dir

    t0 = time.perf_counter()
    if config == "inprocess":
        from fedllm.experiments import make_experiment
        from fedllm.federation.modes import run_federated

        run_federated(make_experiment(recipe), out)
    elif config == "simulation":
        from fedllm.federation.flower.simulation import run_simulation

        run_simulation(recipe, out)
    else:
        isolation = "process" if config.endswith("-process") else "subprocess"
        opts = LaunchOptions(isolation=isolation, warm_workers=config != "deploy-cold", timeout_s=1800,
                             allow_insecure=isolation == "subprocess")  # loopback only: see docs/deploy.md
        run_deployment(recipe, out, opts)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir(recipe, "federated", out)) if r["round"] > 0]
    return {"config": config, "round_s": statistics.fmean(r["round_time_s"] for r in rows),
            "train_s": statistics.fmean(r["train_time_s"] for r in rows),
            "eval_loss": rows[-1]["eval_loss"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(DEFAULT),
                   help=f"comma-separated, from {CONFIGS}; repeat one to run it again (ratios use the mean "
                        "of the in-process runs)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or "inprocess" not in configs:
        p.error(f"--configs: expected 'inprocess' and a subset of {CONFIGS}, got {bad or configs}")
    quiet()
    from fedllm.federation.flower.run_config import TELEMETRY_OFF

    for k, v in TELEMETRY_OFF.items():  # before flwr is imported, and inherited by Ray and Flower's processes
        os.environ.setdefault(k, v)
    recipe = tiny(args.rounds)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        for i, config in enumerate(configs):
            results.append(run_one(config, recipe, str(Path(tmp) / f"{i}-{config}")))
            print(f"{config}: {results[-1]['round_s']:.2f} s/round", flush=True)
    # a configuration listed twice (e.g. inprocess first and last) brackets the machine's load drift
    base = statistics.fmean(r["round_s"] for r in results if r["config"] == "inprocess")
    for r in results:
        r["ratio"] = r["round_s"] / base
    print(f"\n{'configuration':<22}{'s/round':>9}{'train s':>9}{'ratio':>8}{'run wall s':>12}{'eval loss':>11}")
    for r in results:
        print(f"{r['config']:<22}{r['round_s']:>9.2f}{r['train_s']:>9.2f}{r['ratio']:>7.2f}x{r['wall_s']:>12.1f}"
              f"{r['eval_loss']:>11.5f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
