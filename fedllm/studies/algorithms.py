"""The algorithm-suite study (issue 4): drift corrections, robust aggregation, LoRA aggregation.

Three studies, each a recipe under ``recipes/studies/`` run through the real engine
(:func:`fedllm.federation.modes.run_federated`) once per variant (a list of recipe overrides):

- ``drift``: non-IID Fashion-MNIST (2 label shards per client): FedAvg, FedProx, SCAFFOLD and
  FedNova, test accuracy per round in one plot.
- ``robust``: label-Dirichlet(α = 1.0) Fashion-MNIST, 20 % of the clients send their update
  sign-flipped and scaled ×10: mean (FedAvg), coordinate-wise median, trimmed mean and Krum, each
  against its own clean run (target: robust aggregators within 3 points of clean; FedAvg degrades).
- ``lora``: the tiny llama with LoRA, aggregation ``factorwise`` / ``svd`` / ``frozen_a``:
  perplexity and the per-round aggregation error ‖mean(BᵢAᵢ) − B_g A_g‖_F / ‖mean(BᵢAᵢ)‖_F.

One command writes ``algorithms_study.md`` (tables), ``.json`` (every round of every run) and
``.png`` (accuracy and error curves) to ``--out``::

    nice -n 19 python -m fedllm.studies.algorithms --out docs/algorithms_study [--quick] [--only drift]

Run directories go to ``--runs`` (default ``runs/algorithms_study``); the tables are built from
their ``metrics.jsonl`` files only. ``--quick`` shrinks rounds and data for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.studies import quiet_process

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "studies"
TARGET_POINTS = 3.0  # a robust aggregator under attack should stay within this many accuracy points of clean


@dataclass(frozen=True)
class Study:
    """One recipe and its variants (label -> overrides); ``quick`` overrides shrink it."""

    name: str
    recipe: str
    variants: dict[str, list[str]]
    quick: list[str]
    title: str


_CLEAN = ["attack.kind=none"]
STUDIES = (
    Study("drift", "fmnist_noniid.yaml", {
        "FedAvg": ["federation.algorithm=fedavg"],
        "FedProx (mu=0.1)": ["federation.algorithm=fedprox"],
        "SCAFFOLD": ["federation.algorithm=scaffold"],
        "FedNova": ["federation.algorithm=fednova"],
    }, ["federation.rounds=3", "data.max_examples=1200", "data.eval_size=500"],
        "Non-IID Fashion-MNIST (2 shards per client)"),
    Study("robust", "fmnist_byzantine.yaml", {
        f"{label} {cond}": [f"robust.aggregator={agg}", *(_CLEAN if cond == "clean" else [])]
        for agg, label in (("mean", "FedAvg (mean)"), ("median", "median"), ("trimmed_mean", "trimmed mean"),
                           ("krum", "Krum"))
        for cond in ("clean", "attacked")
    }, ["federation.rounds=3", "data.max_examples=1200", "data.eval_size=500"],
        "Dirichlet(1.0) Fashion-MNIST, 20 % sign-flip x10 attackers"),
    Study("lora", "tiny_lora_agg.yaml", {
        mode: [f"federation.lora_aggregation={mode}"] for mode in ("factorwise", "svd", "frozen_a")
    }, ["federation.rounds=2", "train.local_steps=2"], "Tiny llama, LoRA r=4, 3 clients"),
)


# ----------------------------------------------------------------------------- running


def run_variant(study: Study, label: str, overrides: list[str], runs: Path, quick: bool,
                reuse: bool = False) -> dict[str, Any]:
    """Run one variant federated; return its metrics rows (read back from the run directory).

    With ``reuse``, a finished run directory of the identical recipe is read instead of re-run.
    """
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import run_federated  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()
    extra = [f"name={study.name}_{slug}", *(study.quick if quick else [])]
    recipe = load_recipe(RECIPES / study.recipe, [*overrides, *extra])
    path = runs / recipe.name / "federated"
    if reuse and _finished_same(path, recipe):
        rows = [{k: r.get(k) for k in KEEP} for r in read_metrics(path)]
        same = path / "same_updates.json"
        if same.is_file():
            _merge_same(rows, json.loads(same.read_text()))
        summary = json.loads((path / "summary.json").read_text())
        return {"label": label, "overrides": overrides + extra, "recipe": study.recipe, "reused": True,
                "experiment": summary.get("experiment"), "wall_s": summary.get("study_wall_s"),
                "cpu_s": summary.get("study_cpu_s"), "rows": rows}
    t0, c0 = time.perf_counter(), time.process_time()
    exp = make_experiment(recipe)
    seen = _record_fits(exp) if study.name == "lora" else None
    run_federated(exp, out=str(runs))
    rows = read_metrics(runs / recipe.name / "federated")
    rows = [{k: r.get(k) for k in KEEP} for r in rows]
    summary = json.loads((path / "summary.json").read_text())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (path / "summary.json").write_text(json.dumps({**summary, "experiment": type(exp).__name__,
                                                   "study_wall_s": wall, "study_cpu_s": cpu}), encoding="utf-8")
    if seen is not None:
        _same_update_errors(rows, seen, recipe.federation.is_weighted)
        (path / "same_updates.json").write_text(json.dumps(
            {str(r["round"]): {k: v for k, v in r.items() if k.startswith("same_updates_")} for r in rows[1:]}))
    return {"label": label, "overrides": overrides + extra, "recipe": study.recipe,
            "experiment": type(exp).__name__, "wall_s": wall, "cpu_s": cpu, "rows": rows}


KEEP = ("round", "accuracy", "eval_loss", "perplexity", "train_loss", "lora_aggregation_error", "bytes_up",
        "applied", "clients", "stragglers")


def _finished_same(path: Path, recipe) -> bool:
    """A finished run of the identical recipe through the engine's own experiment.

    Run directories the study wrote before its vision runs went through the engine's
    ``VisionExperiment`` name the plain-torch stand-in it used then; they are not reused.
    """
    from fedllm.config import dump_recipe  # noqa: PLC0415

    if not ((path / "summary.json").is_file() and (path / "config.yaml").is_file()
            and (path / "config.yaml").read_text(encoding="utf-8") == dump_recipe(recipe)):
        return False
    return json.loads((path / "summary.json").read_text()).get("experiment") != "FallbackVision"


def _merge_same(rows: list[dict[str, Any]], same: dict[str, dict[str, float]]) -> None:
    for row in rows:
        row.update(same.get(str(row["round"]), {}))


def _record_fits(exp) -> dict[int, list]:
    """Wrap ``exp.fit`` to keep, per round, the (start state, update) pairs the clients produced."""
    seen: dict[int, list] = {}
    fit = exp.fit

    def recording(client_id, examples, start, rnd, steps, grad_term=None):
        update = fit(client_id, examples, start, rnd, steps, grad_term=grad_term)
        seen.setdefault(rnd, []).append((start, update))
        return update

    exp.fit = recording
    return seen


def _same_update_errors(rows: list[dict[str, Any]], seen: dict[int, list], weighted: bool) -> None:
    """Add, per round, the error factorwise and svd would have had on this run's own updates.

    Runs diverge after round 1, so comparing the modes' reported errors across runs mixes the
    rule with the trajectory; these columns compare the rules on identical client updates.
    """
    from fedllm.algorithms.lora_agg import lora_aggregate  # noqa: PLC0415

    for row in rows[1:]:
        pairs = seen.get(row["round"], [])
        if not pairs:
            continue
        start = pairs[0][0]
        ups = [u for _, u in pairs]
        for mode in ("factorwise", "svd"):
            row[f"same_updates_{mode}"] = lora_aggregate(start, ups, mode, weighted)[1]


def run_study(study: Study, runs: Path, quick: bool, reuse: bool = False) -> dict[str, Any]:
    out = {}
    for label, overrides in study.variants.items():
        logging.getLogger(__name__).info("%s: %s", study.name, label)
        out[label] = run_variant(study, label, overrides, runs, quick, reuse)
        print(f"  {study.name:6s} {label:28s} {_final_summary(out[label])}  ({out[label]['wall_s'] or 0:.0f} s)",
              flush=True)
    return out


def _final_summary(run: dict[str, Any]) -> str:
    last = run["rows"][-1]
    if last.get("accuracy") is not None:
        return f"accuracy {100 * last['accuracy']:.2f} %"
    return f"perplexity {last['perplexity']:.3f}"


# ----------------------------------------------------------------------------- tables


def _acc(run: dict[str, Any], which: str = "final") -> float:
    """Final-round accuracy in percent, or the best over rounds (``which="best"``)."""
    accs = [100 * r["accuracy"] for r in run["rows"][1:] if r.get("accuracy") is not None]
    if not accs:
        return math.nan
    return max(accs) if which == "best" else accs[-1]


def _mean_last(run: dict[str, Any], k: int = 3) -> float:
    accs = [100 * r["accuracy"] for r in run["rows"][1:] if r.get("accuracy") is not None]
    return sum(accs[-k:]) / len(accs[-k:]) if accs else math.nan


def drift_table(runs: dict[str, Any]) -> str:
    lines = ["| algorithm | final accuracy (%) | mean of last 3 rounds (%) | best round (%) | rounds |",
             "|---|---:|---:|---:|---:|"]
    for label, run in runs.items():
        lines.append(f"| {label} | {_acc(run):.2f} | {_mean_last(run):.2f} | {_acc(run, 'best'):.2f} | "
                     f"{run['rows'][-1]['round']} |")
    return "\n".join(lines)


def robust_table(runs: dict[str, Any]) -> str:
    lines = ["| aggregator | clean (%) | attacked (%) | change (points) | within 3 points? |",
             "|---|---:|---:|---:|:---:|"]
    for label in dict.fromkeys(lab.rsplit(" ", 1)[0] for lab in runs):
        clean, attacked = _acc(runs[f"{label} clean"]), _acc(runs[f"{label} attacked"])
        change = attacked - clean
        ok = "yes" if abs(change) <= TARGET_POINTS or change > 0 else "**no**"
        lines.append(f"| {label} | {clean:.2f} | {attacked:.2f} | {change:+.2f} | {ok} |")
    return "\n".join(lines)


def lora_table(runs: dict[str, Any]) -> str:
    lines = ["| LoRA aggregation | round-0 perplexity | final perplexity | reported error per round | max error "
             "| same updates: factorwise / svd (max over rounds) |",
             "|---|---:|---:|---|---:|---|"]
    for label, run in runs.items():
        errs = [r.get("lora_aggregation_error") for r in run["rows"][1:]]
        shown = ", ".join("n/a" if e is None else f"{e:.2e}" for e in errs)
        worst = max((e for e in errs if e is not None), default=math.nan)
        same = [max((r.get(f"same_updates_{m}") or 0.0 for r in run["rows"][1:]), default=math.nan)
                for m in ("factorwise", "svd")]
        lines.append(f"| {label} | {run['rows'][0]['perplexity']:.2f} | {run['rows'][-1]['perplexity']:.2f} | "
                     f"{shown} | {worst:.2e} | {same[0]:.2e} / {same[1]:.2e} |")
    return "\n".join(lines)


TABLES = {"drift": drift_table, "robust": robust_table, "lora": lora_table}


# ----------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per round (drift; robust clean/attacked) and aggregation error per round (LoRA)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [name for name in ("drift", "robust", "lora") if name in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, name in zip(axes[0], panels):
        colors: dict[str, str] = {}  # robust: one colour per aggregator, dashed clean / solid attacked
        for label, run in results[name].items():
            rows = run["rows"]
            if name == "lora":
                pts = [(r["round"], r["lora_aggregation_error"]) for r in rows[1:]
                       if r.get("lora_aggregation_error") is not None]
                ax.semilogy([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", label=label)
                ax.set_ylabel("aggregation error (relative, Frobenius)")
            else:
                pts = [(r["round"], 100 * r["accuracy"]) for r in rows if r.get("accuracy") is not None]
                style = "--" if label.endswith("clean") else "-"
                group = label.rsplit(" ", 1)[0] if name == "robust" else label
                color = colors.setdefault(group, f"C{len(colors)}")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=label, color=color)
                ax.set_ylabel("test accuracy (%)")
        ax.set_xlabel("round")
        ax.set_title({"drift": "non-IID (2 shards/client)", "robust": "Dirichlet(1.0), 20 % sign-flip x10",
                      "lora": "LoRA aggregation (tiny llama)"}[name], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def _setup(study: Study, run: dict[str, Any]) -> str:
    """One sentence with the sizes the study ran at (from the recipe and its overrides)."""
    from fedllm.config import load_recipe  # noqa: PLC0415

    r = load_recipe(RECIPES / study.recipe, run["overrides"])
    t, f = r.train, r.faults
    data = (f"{r.data.max_examples} training / {r.data.eval_size} test images" if r.model.task == "vision"
            else f"{r.data.max_examples} examples, {r.data.eval_size} held out")
    slow = (f", {100 * f.straggler_fraction:.0f} % stragglers doing {100 * f.straggler_speed:.0f} % of their steps"
            if f.straggler_fraction else "")
    return (f"Setup: {r.model.preset}, {data}, {r.partition.num_clients} clients ({r.partition.method}), "
            f"{r.clients_per_round} per round, {r.federation.rounds} rounds, {t.local_steps} local {t.optimizer_for(r.model.task)} "
            f"steps of batch {t.batch_size} at lr {t.lr}{slow}." + (_attack_setup(study) if study.name == "robust" else ""))


def _attack_setup(study: Study) -> str:
    from fedllm.config import load_recipe  # noqa: PLC0415

    r = load_recipe(RECIPES / study.recipe)
    a, rob = r.attack, r.robust
    n = int(a.fraction * r.partition.num_clients + 1e-9)
    return (f" Attacked runs: {n} fixed clients send {a.kind} x{a.scale:g} every round; trimmed mean "
            f"beta = {rob.trim_ratio}, Krum f = {rob.byzantine}. An attacked run has only "
            f"{r.partition.num_clients - n} honest clients' data, its clean run all {r.partition.num_clients}.")


def write_report(results: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "algorithms_study.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                          default=lambda v: None), encoding="utf-8")
    plot(results, out / "algorithms_study.png")
    runs = [r for study in results.values() for r in study.values()]
    cpu = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
    clients = sorted({r["experiment"] for r in runs if r.get("experiment")})
    parts = ["# Algorithm suite study", "",
             f"Produced by `{meta['command']}` ({'quick' if meta['quick'] else 'full'} settings). "
             f"CPU time of the runs: {sum(cpu):.0f} s over the {len(cpu)} of {len(runs)} runs that recorded it "
             "(`cpu_s` per run in the JSON; measured on a shared, heavily loaded 2-core machine). "
             f"Experiments: {', '.join(clients)}. Single seed (0). Recipes: `recipes/studies/`; "
             "raw numbers: `algorithms_study.json`; curves: `algorithms_study.png`.", ""]
    for study in STUDIES:
        if study.name not in results:
            continue
        r0 = next(iter(results[study.name].values()))
        parts += [f"## {study.title}", "", f"Recipe `recipes/studies/{study.recipe}` with "
                  f"`{' '.join(o for o in r0['overrides'] if not o.startswith('name='))}` per variant "
                  f"(first override varies). {_setup(study, r0)}", "", TABLES[study.name](results[study.name]), ""]
    parts += ["![curves](algorithms_study.png)", ""]
    (out / "algorithms_study.md").write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.studies.algorithms", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/algorithms_study", help="folder for the .md/.json/.png")
    parser.add_argument("--runs", default="runs/algorithms_study", help="folder for the run directories")
    parser.add_argument("--quick", action="store_true", help="a few rounds on small subsets (smoke test)")
    parser.add_argument("--only", action="append", choices=[s.name for s in STUDIES],
                        help="run only this study (repeatable); default all")
    parser.add_argument("--reuse", action="store_true",
                        help="read finished run directories of identical recipes instead of re-running them")
    args = parser.parse_args(argv)
    quiet_process()
    t0, c0 = time.perf_counter(), time.process_time()
    results = {}
    for study in STUDIES:
        if args.only and study.name not in args.only:
            continue
        results[study.name] = run_study(study, Path(args.runs), args.quick, args.reuse)
    cmd = "python -m fedllm.studies.algorithms --out " + args.out + (" --quick" if args.quick else "")
    meta = {"command": cmd, "quick": args.quick, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}
    write_report(results, Path(args.out), meta)
    print(f"wrote {args.out}/algorithms_study.md (.json, .png) in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
