"""Peak RSS of one federated round with 2 vs 50 simulated clients on the demo model.

One base model per process: clients swap only their adapter state, so memory should barely
depend on the number of clients. Each count runs in a fresh subprocess (peak RSS is per process).
Prints both peaks and their ratio (target: <= 1.3).

    python benchmarks/bench_memory.py [--preset smollm2-135m|tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

from _common import demo_recipe, quiet


def one(num_clients: int, preset: str) -> dict:
    quiet()
    from fedllm.experiments.lm import LMExperiment
    from fedllm.federation.modes import run_federated

    recipe = demo_recipe(f"model.preset={preset}", f"partition.num_clients={num_clients}",
                         "partition.method=iid", "partition.column=null", "federation.rounds=1",
                         "train.local_steps=1", "train.batch_size=2", "data.max_length=64",
                         "data.max_examples=240", "data.eval_size=8", "eval.bleu_samples=0",
                         "output.save_adapter=false", f"name=mem{num_clients}")
    exp = LMExperiment(recipe)
    with tempfile.TemporaryDirectory() as out:
        run_federated(exp, out)
    return {"clients": num_clients, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.preset)))
        return
    res = {}
    for n in (2, 50):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--preset", args.preset],
                             capture_output=True, text=True, check=True)
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"{n:>3} clients: peak RSS {res[n]:8.1f} MB")
    print(f"ratio 50/2 clients: {res[50] / res[2]:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
