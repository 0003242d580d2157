"""Does clustering beat one global model on each client's own held-out data? A natural-partition study.

    python benchmarks/clustered_study.py [--quick] [--seeds 0,1,2] [--lr 0.05] [--variants global,ifca-farthest]
        [--out runs/clustered_study] [--doc docs/clustered_study]

The federation (synthetic, stated as such): two helpdesks answer the same 60 questions of
``data/helpdesk.jsonl`` differently. Helpdesk A answers as the file does; helpdesk B answers every
question with one ticket-portal reply. Each helpdesk has two sites (clients), each holding every
other question; the partition is natural (``partition.column: site``, one client per site), and
``eval.client_holdout`` keeps a quarter of each site's rows as its own held-out slice. One global
adapter must split its probability between the two answer styles; a cluster adapter need not.

Per seed, four federated runs on the same partition (tiny llama + NF4 + LoRA, the engine's own
:func:`~fedllm.federation.modes.run_federated`), read back from their ``metrics.jsonl``:

- ``global``: one model (GradualDiff-Fed), scored with ``client_eval_loss`` (the global adapter on
  each site's held-out slice) after the same number of rounds as IFCA, and one round later
  (``global_plus1``: as many client fits as IFCA ``farthest``'s warm start adds, one per client);
- ``ifca-perturb``, ``ifca-clients``, ``ifca-farthest``: IFCA with k = 2 and each cluster init,
  scored with ``personal_eval_loss`` (each site's slice under the cluster it picks).

Each run is persisted as ``<doc>/parts/<variant>-seed<s>.json`` as soon as it ends, and a part
already there is not run again (a killed study resumes by rerunning the same command; parts made
with other settings are refused). ``<doc>/clustered_study.json`` is rebuilt from all parts after each
run: per variant and seed the per-site losses and the final assignment, and the paired difference
to the global model (same seed, same site), with a 95 % t-interval over the per-seed means (seeds
are the independent draws) and one over the site × seed pairs (sites of one run are not independent:
the narrower, optimistic one). Wrap it in ``flock /tmp/fedllm-bench.lock`` on a shared machine.
``--quick``: 3 rounds x 2 steps (a smoke run); the full form: 8 rounds x 4 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in out))
    return len(out)


def _write_atomic(path: Path, text: str) -> None:
    """Several seeds may run as parallel processes: nobody reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def rounds_steps(quick: bool) -> tuple[int, int]:
    return (3, 2) if quick else (8, 4)


def recipe_values(data: Path, name: str, seed: int, quick: bool, federation: dict, lr: float = 0.05) -> dict:
    return {
        "name": name, "seed": seed, "mode": "federated",
        "model": {"preset": "tiny", "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "prompt_field": "question", "response_field": "answer", "max_length": 96,
                 "eval_size": 12, "system_prompt": "You are the office IT helpdesk."},
        "partition": {"method": "natural", "column": "site", "num_clients": 4},
        "federation": {"algorithm": "gradualdiff", "rounds": rounds_steps(quick)[0], **federation},
        "train": {"local_steps": rounds_steps(quick)[1], "batch_size": 4, "lr": lr},
        "eval": {"batch_size": 8, "bleu_samples": 0, "client_holdout": 0.25},
        "output": {"save_adapter": False, "plots": False}, "checkpoint": {"enabled": False},
    }


VARIANTS = {  # the global run trains one round more, read at both round counts (module docstring)
    "global": ({"rounds": "+1"}, "client_eval_loss"),
    "ifca-perturb": ({"clusters": 2, "cluster_init": "perturb"}, "personal_eval_loss"),
    "ifca-clients": ({"clusters": 2, "cluster_init": "clients"}, "personal_eval_loss"),
    "ifca-farthest": ({"clusters": 2, "cluster_init": "farthest"}, "personal_eval_loss"),
}


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}  # Student t, 0.975 quantile


def t_interval(xs: list[float]) -> dict:
    """Mean and two-sided 95 % Student-t interval (df above 30 or between the table's rows: the next lower df's t)."""
    n, m = len(xs), statistics.fmean(xs)
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": n}
    t = T975[max(d for d in T975 if d <= n - 1)]
    half = t * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _sites(run: Path, data: Path) -> dict[str, str]:
    """client id -> site, read back from the run's ``partition.json`` and the data file."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    clients = json.loads((run / "partition.json").read_text())["clients"]
    return {c: rows[idx[0]]["site"] for c, idx in clients.items()}


def _split(assignment: dict[str, int] | None) -> bool | None:
    """True when the two helpdesks' sites sit in two different clusters, each helpdesk in one."""
    if not assignment:
        return None
    a = {j for site, j in assignment.items() if site.startswith("a")}
    b = {j for site, j in assignment.items() if site.startswith("b")}
    return len(a) == len(b) == 1 and a != b


def _scores(row: dict, key: str, sites: dict[str, str]) -> dict:
    per_site = {sites[c]: v for c, v in sorted(row[key].items(), key=lambda kv: sites[kv[0]])}
    return {"per_site": per_site, "mean": statistics.fmean(per_site.values()), "round": row["round"],
            "shared_eval_loss": row["eval_loss"]}


def run_part(out: Path, doc: Path, variant: str, seed: int, quick: bool, lr: float) -> dict:
    """One variant at one seed, persisted as ``<doc>/parts/<variant>-seed<seed>.json`` (or that part, if there)."""
    rounds, steps = rounds_steps(quick)
    settings = {"quick": quick, "lr": lr, "rounds": rounds, "local_steps": steps}
    part = doc / "parts" / f"{variant}-seed{seed}.json"
    if part.exists():
        done = json.loads(part.read_text())
        if done["settings"] != settings:
            raise SystemExit(f"{part} was made with {done['settings']}, not {settings}: pass another --doc")
        return done
    import torch

    from fedllm.config import Recipe, build
    from fedllm.experiments import make_experiment
    from fedllm.federation.modes import run_federated

    data = out / "two_helpdesks.jsonl"
    n = write_data(data)
    federation, key = dict(VARIANTS[variant][0]), VARIANTS[variant][1]
    if federation.pop("rounds", None):
        federation["rounds"] = rounds + 1
    name = f"{variant}-seed{seed}"
    recipe = build(Recipe, recipe_values(data, name, seed, quick, federation, lr))
    t0 = time.perf_counter()
    run_federated(make_experiment(recipe), out=str(out / "runs"))
    seconds = time.perf_counter() - t0
    run = out / "runs" / name / "federated"
    rows, sites = _rows(run), _sites(run, data)
    at = {r["round"]: r for r in rows}
    result = {"variant": variant, "seed": seed, "settings": settings, "metric": key, "run": str(run),
              "data": {"rows": n, "kind": "synthetic two-population (stated)"}, "sites": sites,
              **_scores(at[rounds], key, sites), "seconds": seconds, "torch_threads": torch.get_num_threads()}
    if variant == "global":
        result["plus1"] = _scores(at[rounds + 1], key, sites)
    else:
        clusters = json.loads((run / "clusters.json").read_text())
        final = {sites[c]: j for c, j in at[rounds]["cluster_assignment"].items()}
        result.update({"assignment": dict(sorted(final.items())), "split_by_helpdesk": _split(final),
                       "init": clusters["init"], "init_sites": [sites[str(c)] for c in clusters["init"].get("clients", [])],
                       "trained_by_round": [{sites[c]: j for c, j in r["cluster_of"].items()} for r in rows[1:]],
                       "cluster_sizes_by_round": [r["cluster_sizes"] for r in rows[1:]]})
    _write_atomic(part, json.dumps(result, indent=2) + "\n")
    return result


def summarize(doc: Path) -> dict:
    """Every part under ``<doc>/parts``, and each IFCA init's paired difference to the global model."""
    parts = [json.loads(p.read_text()) for p in sorted((doc / "parts").glob("*.json"))]
    by = {(p["variant"], p["seed"]): p for p in parts}
    for p in parts:  # the global run one round later is a baseline of its own
        if p["variant"] == "global":
            by[("global+1", p["seed"])] = {**p["plus1"], "variant": "global+1", "seed": p["seed"]}
    names = [v for v in ("global", "global+1", *list(VARIANTS)[1:]) if any(k[0] == v for k in by)]
    common = sorted(set.intersection(*({s for (w, s) in by if w == v} for v in names))) if names else []
    out = {"settings": parts[0]["settings"] if parts else None, "common_seeds": common, "variants": {}, "vs_global": {}}
    for v in names:
        seeds = sorted(s for (w, s) in by if w == v)
        out["variants"][v] = {"mean": statistics.fmean(by[(v, s)]["mean"] for s in seeds),
                              "mean_common_seeds": statistics.fmean(by[(v, s)]["mean"] for s in common), "seeds": {
            s: {k: by[(v, s)].get(k) for k in ("mean", "per_site", "assignment", "split_by_helpdesk", "init_sites",
                                                 "seconds")} for s in seeds}}
    for v in names[2:]:
        for base in ("global", "global+1"):
            seeds = sorted(s for (w, s) in by if w == v and (base, s) in by)
            if not seeds:
                continue
            pairs = {s: {site: by[(v, s)]["per_site"][site] - by[(base, s)]["per_site"][site]
                         for site in by[(v, s)]["per_site"]} for s in seeds}
            flat = [d for s in seeds for d in pairs[s].values()]
            per_seed = {s: statistics.fmean(pairs[s].values()) for s in seeds}
            out["vs_global"][f"{v} - {base}"] = {
                "per_seed": per_seed, "over_seeds": t_interval(list(per_seed.values())),
                "over_common_seeds": t_interval([per_seed[s] for s in common]),
                "over_site_seed_pairs": t_interval(flat), "pairs_below_zero": sum(d < 0 for d in flat),
                "pairs": len(flat), "per_pair": pairs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds x 2 steps")
    ap.add_argument("--out", default=str(ROOT / "runs" / "clustered_study"), help="run folders")
    ap.add_argument("--doc", default=None, help="parts and clustered_study.json (default docs/clustered_study; "
                    "--quick: <out>/doc)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--lr", type=float, default=0.05, help="train.lr of every run (default 0.05)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (parallel seeds: 1)")
    args = ap.parse_args()
    out = Path(args.out)
    doc = Path(args.doc) if args.doc else (out / "doc" if args.quick else ROOT / "docs" / "clustered_study")
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; expected some of {list(VARIANTS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in variants:
            run_part(out, doc, variant, seed, args.quick, args.lr)
            _write_atomic(doc / "clustered_study.json", json.dumps(summarize(doc), indent=2) + "\n")
    res = summarize(doc)
    print(f"| run | mean per-site held-out loss (seeds {res['common_seeds']}) | per seed | final assignment per seed |")
    print("|---|---:|---|---|")
    for name, r in res["variants"].items():
        per_seed = ", ".join(f"{s}: {x['mean']:.4f}" for s, x in r["seeds"].items())
        assign = "; ".join(" ".join(f"{site}:{j}" for site, j in (x["assignment"] or {}).items()) or "-"
                           for x in r["seeds"].values())
        print(f"| {name} | {r['mean_common_seeds']:.4f} | {per_seed} | {assign} |")
    for name, d in res["vs_global"].items():
        s, p = d["over_seeds"], d["over_site_seed_pairs"]
        ci = "" if s["lo"] is None else f" [{s['lo']:+.4f}, {s['hi']:+.4f}] over {s['n']} seeds"
        print(f"{name}: {s['mean']:+.4f}{ci}; pairs {p['n']}, {d['pairs_below_zero']} below 0"
              + ("" if p["lo"] is None else f", [{p['lo']:+.4f}, {p['hi']:+.4f}] over site x seed pairs"))


if __name__ == "__main__":
    main()
