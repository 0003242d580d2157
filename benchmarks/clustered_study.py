"""Does clustering beat one global model on each client's own held-out data? A tiny natural-partition study.

    python benchmarks/clustered_study.py [--quick] [--out runs/clustered_study] [--seed 0] [--lr 0.05]

The federation (synthetic, stated as such): two helpdesks answer the same 60 questions of
``data/helpdesk.jsonl`` differently. Helpdesk A answers as the file does; helpdesk B answers every
question with one ticket-portal reply. Each helpdesk has two sites (clients), each holding every
other question; the partition is natural (``partition.column: site``, one client per site), and
``eval.client_holdout`` keeps a quarter of each site's rows as its own held-out slice. One global
adapter must split its probability between the two answer styles; a cluster adapter need not.

Three federated runs on the same partition (tiny llama + NF4 + LoRA, the engine's own
:func:`~fedllm.federation.modes.run_federated`), read back from their ``metrics.jsonl``:

- ``global``: one model (GradualDiff-Fed), scored with ``client_eval_loss`` (the global adapter on
  each site's held-out slice);
- ``ifca-perturb`` and ``ifca-clients``: IFCA with k = 2 and each cluster init, scored with
  ``personal_eval_loss`` (each site's slice under the cluster it picks).

Prints a table and writes ``<out>/clustered_study.json``. Wrap it in ``flock /tmp/fedllm-bench.lock``
on a shared machine. ``--quick``: 3 rounds x 2 steps (a smoke run); the full form: 8 rounds x 4 steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKET = "Please open a ticket at the service portal with your desk number; an engineer will call you back today."


def write_data(path: Path) -> int:
    """The two helpdesks' rows as JSONL (question, answer, site); returns the row count."""
    rows = [json.loads(line) for line in (ROOT / "data" / "helpdesk.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        half = i % 2
        out.append({"question": row["question"], "answer": row["answer"], "site": f"a{half}"})
        out.append({"question": row["question"], "answer": TICKET, "site": f"b{half}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return len(out)


def recipe_values(data: Path, name: str, seed: int, quick: bool, federation: dict, lr: float = 0.05) -> dict:
    return {
        "name": name, "seed": seed, "mode": "federated",
        "model": {"preset": "tiny", "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "prompt_field": "question", "response_field": "answer", "max_length": 96,
                 "eval_size": 12, "system_prompt": "You are the office IT helpdesk."},
        "partition": {"method": "natural", "column": "site", "num_clients": 4},
        "federation": {"algorithm": "gradualdiff", "rounds": 3 if quick else 8, **federation},
        "train": {"local_steps": 2 if quick else 4, "batch_size": 4, "lr": lr},
        "eval": {"batch_size": 8, "bleu_samples": 0, "client_holdout": 0.25},
        "output": {"save_adapter": False, "plots": False}, "checkpoint": {"enabled": False},
    }


VARIANTS = {
    "global": ({}, "client_eval_loss"),
    "ifca-perturb": ({"clusters": 2, "cluster_init": "perturb"}, "personal_eval_loss"),
    "ifca-clients": ({"clusters": 2, "cluster_init": "clients"}, "personal_eval_loss"),
}


def run(out: Path, seed: int, quick: bool, lr: float = 0.05) -> dict:
    from fedllm.config import Recipe, build
    from fedllm.experiments import make_experiment
    from fedllm.federation.modes import run_federated

    data = out / "two_helpdesks.jsonl"
    n = write_data(data)
    results = {"data": {"rows": n, "file": str(data), "kind": "synthetic two-population (stated)"},
               "quick": quick, "seed": seed, "lr": lr, "runs": {}}
    for name, (federation, key) in VARIANTS.items():
        recipe = build(Recipe, recipe_values(data, name, seed, quick, federation, lr))
        t0 = time.perf_counter()
        run_federated(make_experiment(recipe), out=str(out / "runs"))
        rows = [json.loads(line) for line in (out / "runs" / name / "federated" / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        results["runs"][name] = {
            "per_client_heldout_loss": last[key], "mean": last[f"{key}_mean"], "metric": key,
            "shared_eval_loss": last["eval_loss"], "assignment": last.get("cluster_assignment"),
            "assignment_by_round": [r.get("cluster_of") for r in rows[1:]], "seconds": time.perf_counter() - t0}
    (out / "clustered_study.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds x 2 steps")
    ap.add_argument("--out", default=str(ROOT / "runs" / "clustered_study"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.05, help="train.lr of every run (default 0.05)")
    args = ap.parse_args()
    res = run(Path(args.out), args.seed, args.quick, args.lr)
    print("| run | mean per-site held-out loss | per client (0..3; sites in partition.json) | final assignment | shared eval loss |")
    print("|---|---:|---|---|---:|")
    for name, r in res["runs"].items():
        sites = ", ".join(f"{v:.3f}" for _, v in sorted(r["per_client_heldout_loss"].items()))
        print(f"| {name} | {r['mean']:.4f} | {sites} | {r['assignment'] or '-'} | {r['shared_eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
