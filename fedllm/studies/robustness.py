"""The robustness study (issue 20): each defense against each attack at 10 % and 20 % attackers.

Recipe ``recipes/studies/fmnist_robust.yaml`` (Dirichlet Fashion-MNIST, 20 clients, 40 rounds,
LeNet-300-100 through the engine's own vision client), one part per (defense, condition, seed):

- defenses: the plain mean (FedAvg), coordinate-wise median, trimmed mean, Krum, geometric median
  (RFA), Bulyan, centered clipping and AFA (issue 38 item 7, with the paper's ξ₀ = 2, Δξ = 0.5,
  α₀ = β₀ = 3, δ = 0.95, none tuned here): IPM sends −ε times the honest mean, so its updates sit
  close to the others in L2 (Krum and Bulyan pick them) and only shrink the mean, but point the
  opposite way (cosine ≈ −1 with the aggregate), which is exactly what AFA's cosine filter removes;
- conditions: clean, and sign-flip ×10, ALIE and IPM at 10 % and 20 % of the clients.

A defense's score under an attack is its accuracy minus its own clean run's (same seed), where a
run's accuracy is the mean of its last three evaluated rounds. The goal: some defense within 3
points of clean at 20 % attackers, for every attack. Each finished part is kept as
``<out>/parts/<part>.json`` (its recipe and rows), which is what the tables read; a part whose
recipe is unchanged is not run again, so the study can be completed over several sessions::

    nice -n 19 python -m fedllm.studies.robustness --out docs/robustness_study --readme docs/results/robustness.md
    python -m fedllm.studies.robustness --part bulyan:alie20:0       # one part
    python -m fedllm.studies.robustness --report-only --readme docs/results/robustness.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedllm.studies import machine_line, parts_folder, quiet_process, recorded, replace_block, study_parser

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "fmnist_robust.yaml"
DEFENSES = {"mean": "FedAvg (mean)", "median": "median", "trimmed_mean": "trimmed mean", "krum": "Krum",
            "geomed": "geometric median", "bulyan": "Bulyan", "centered_clip": "centered clipping", "afa": "AFA"}
ATTACKS = {"sign_flip": "sign-flip x10", "alie": "ALIE", "ipm": "IPM"}
FRACTIONS = (10, 20)
CONDITIONS = ("clean", *(f"{a}{p}" for a in ATTACKS for p in FRACTIONS))
TARGET_POINTS = 3.0
QUICK = ["federation.rounds=3", "data.max_examples=2000", "data.eval_size=500", "train.local_steps=2"]
KEEP = ("round", "accuracy", "eval_loss", "train_loss", "robust", "applied")
MARK_START, MARK_END = "<!-- robustness-study:start -->", "<!-- robustness-study:end -->"


def part_name(defense: str, condition: str, seed: int) -> str:
    return f"{defense}_{condition}_s{seed}"


def parse_part(text: str) -> tuple[str, str, int]:
    """``DEFENSE:CONDITION:SEED`` (e.g. ``bulyan:alie20:0``) as a part key."""
    try:
        defense, condition, seed = text.split(":")
        key = (defense, condition, int(seed))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DEFENSE:CONDITION:SEED, got {text!r}") from None
    if defense not in DEFENSES or condition not in CONDITIONS:
        raise argparse.ArgumentTypeError(f"expected a defense in {list(DEFENSES)} and a condition in "
                                         f"{list(CONDITIONS)}, got {text!r}")
    return key


def part_overrides(defense: str, condition: str, seed: int, quick: bool) -> list[str]:
    attack = ["attack.kind=none"] if condition == "clean" else [
        f"attack.kind={condition[:-2]}", f"attack.fraction={int(condition[-2:]) / 100}"]
    return [f"name=robust_{part_name(defense, condition, seed)}", f"seed={seed}", f"robust.aggregator={defense}",
            *attack, *(QUICK if quick else [])]


def part_recipe(defense: str, condition: str, seed: int, quick: bool):
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    return load_recipe(RECIPE, part_overrides(defense, condition, seed, quick))


def run_parts(parts: list[tuple[str, str, int]], out: Path, runs: Path, quick: bool) -> None:
    """Run every part without a recorded result for its current recipe; record each as it ends."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import run_federated  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    folder = parts_folder(out, quick)
    folder.mkdir(parents=True, exist_ok=True)
    for defense, condition, seed in parts:
        recipe = part_recipe(defense, condition, seed, quick)
        target = folder / f"{part_name(defense, condition, seed)}.json"
        if recorded(target, recipe) is not None:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        run_federated(make_experiment(recipe), out=str(runs))
        rows = [{k: r.get(k) for k in KEEP} for r in read_metrics(runs / recipe.name / "federated")]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        target.write_text(json.dumps({"recipe": dump_recipe(recipe), "rows": rows, "wall_s": wall, "cpu_s": cpu}),
                          encoding="utf-8")
        print(f"  {part_name(defense, condition, seed):28s} accuracy {score(rows):.2f} %  ({wall:.0f} s)", flush=True)


def plan(seeds: list[int]) -> list[tuple[str, str, int]]:
    """Every part, the most telling first: per seed, the clean runs, then 20 % attackers, then 10 %."""
    order = ["clean", *(c for c in CONDITIONS if c.endswith("20")), *(c for c in CONDITIONS if c.endswith("10"))]
    return [(d, c, s) for s in seeds for c in order for d in DEFENSES]


def collect(out: Path, parts: list[tuple[str, str, int]], quick: bool) -> dict[str, dict[str, dict[int, Any]]]:
    """defense -> condition -> seed -> recorded part (only the parts recorded for today's recipe)."""
    results: dict[str, dict[str, dict[int, Any]]] = {}
    for defense, condition, seed in parts:
        doc = recorded(parts_folder(out, quick) / f"{part_name(defense, condition, seed)}.json",
                        part_recipe(defense, condition, seed, quick))
        if doc is not None:
            results.setdefault(defense, {}).setdefault(condition, {})[seed] = doc
    return results


# ----------------------------------------------------------------------------- scores and tables


def score(rows: list[dict[str, Any]], last: int = 3) -> float:
    """Accuracy (%) as the mean of the last ``last`` evaluated rounds."""
    accs = [100 * r["accuracy"] for r in rows[1:] if r.get("accuracy") is not None]
    return statistics.fmean(accs[-last:]) if accs else math.nan


def changes(results: dict[str, Any], defense: str, condition: str) -> list[float]:
    """Per seed: accuracy under ``condition`` minus the same seed's clean accuracy (points)."""
    runs = results.get(defense, {})
    clean, attacked = runs.get("clean", {}), runs.get(condition, {})
    return [score(attacked[s]["rows"]) - score(clean[s]["rows"]) for s in sorted(attacked) if s in clean]


def _cell(vals: list[float]) -> str:
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    spread = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
    mark = "" if mean >= -TARGET_POINTS else " ✗"
    return f"{mean:+.1f}{spread}{mark}"


def table(results: dict[str, Any], percent: int) -> str:
    heads = [f"{ATTACKS[a]} {percent} %" for a in ATTACKS]
    lines = ["| defense | clean accuracy (%) | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for defense, label in DEFENSES.items():
        clean = [score(d["rows"]) for d in results.get(defense, {}).get("clean", {}).values()]
        cells = [_cell(changes(results, defense, f"{a}{percent}")) for a in ATTACKS]
        lines.append(f"| {label} | {statistics.fmean(clean):.2f} | " if clean else f"| {label} | — | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def verdicts(results: dict[str, Any], percent: int = 20) -> list[str]:
    """Per attack at ``percent`` %: the best defense (mean change over seeds) and whether it meets 3 points."""
    out = []
    for attack, label in ATTACKS.items():
        scored = [(statistics.fmean(v), d) for d in DEFENSES if (v := changes(results, d, f"{attack}{percent}"))]
        if not scored:
            out.append(f"- {label} at {percent} %: no finished parts yet.")
            continue
        best, defense = max(scored)
        ok = "within" if best >= -TARGET_POINTS else "**not** within"
        out.append(f"- {label} at {percent} %: best defense {DEFENSES[defense]} ({best:+.1f} points), "
                   f"{ok} {TARGET_POINTS:g} points of its clean run.")
    return out


def plot(results: dict[str, Any], path: Path, seed: int = 0) -> None:
    """Accuracy per round at 20 % attackers, one panel per attack, one line per defense (one seed)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5.0 * len(ATTACKS), 3.8), squeeze=False)
    for ax, (attack, label) in zip(axes[0], ATTACKS.items()):
        for i, (defense, name) in enumerate(DEFENSES.items()):
            doc = results.get(defense, {}).get(f"{attack}20", {}).get(seed)
            if doc is None:
                continue
            pts = [(r["round"], 100 * r["accuracy"]) for r in doc["rows"] if r.get("accuracy") is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name, color=f"C{i}")
        ax.set_title(f"{label}, 20 % attackers (seed {seed})", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_block(doc: dict[str, Any]) -> str:
    meta, results = doc["meta"], doc["results"]
    return "\n".join([MARK_START, "", f"`{meta['command']}` ({meta['done']} of {meta['planned']} parts finished; "
                      "rendered from `docs/robustness_study/parts/`). Change in accuracy against each defense's "
                      "own clean run, points, mean ± sd over seeds (✗: more than 3 points lost).", "",
                      table(results, 20), "", *verdicts(results), "", MARK_END])


def write_report(doc: dict[str, Any], out: Path) -> None:
    results, meta = doc["results"], doc["meta"]
    plot(results, out / "robustness_study.png")
    parts = ["# Robustness: defenses against attacks", "", f"Produced by `{meta['command']}`; {meta['done']} of "
             f"{meta['planned']} parts finished. {meta['setup']}", "", "## 20 % attackers", "", table(results, 20), "",
             *verdicts(results), "", "## 10 % attackers", "", table(results, 10), "", *verdicts(results, 10), "",
             "![accuracy per round](robustness_study.png)", "", f"Machine: {meta['machine']}.", ""]
    (out / "robustness_study.md").write_text("\n".join(parts), encoding="utf-8")


def setup_line(quick: bool) -> str:
    from fedllm.algorithms.afa import AFA  # noqa: PLC0415  (heavy imports only when running)

    r, afa = part_recipe("mean", "clean", 0, quick), AFA()  # AFA as the recipe builds it: the paper's defaults
    a = r.attack
    return (f"{r.model.preset} on {r.data.max_examples} Fashion-MNIST images ({r.data.eval_size} test), "
            f"{r.partition.num_clients} clients (Dirichlet {r.partition.alpha}), all per round, "
            f"{r.federation.rounds} rounds of {r.train.local_steps} SGD steps; accuracy = mean of the last 3 "
            f"rounds. Krum/Bulyan f = {r.robust.byzantine}, trimmed mean beta = {r.robust.trim_ratio}, centered "
            f"clipping tau = {r.robust.clip_radius} x {r.robust.clip_iterations} iterations; AFA with the paper's "
            f"xi0 = {afa.xi0:g}, delta_xi = {afa.delta_xi:g}, alpha0 = {afa.alpha0}, beta0 = {afa.beta0}, block at "
            f"{afa.block:g}; sign-flip x{a.scale:g}, "
            f"IPM epsilon = {a.ipm_epsilon}, ALIE with the paper's z_max (omniscient: the attackers see the "
            "round's honest updates).")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("robustness", __doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds on a small subset (smoke test)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--part", action="append", type=parse_part, default=[],
                        help="run only DEFENSE:CONDITION:SEED (repeatable), e.g. bulyan:alie20:0")
    args = parser.parse_args(argv)
    quiet_process()
    out = Path(args.out)
    everything = plan([int(s) for s in args.seeds.split(",") if s.strip()])
    if not args.report_only:
        run_parts(args.part or everything, out, Path(args.runs), args.quick)
    results = collect(out, everything, args.quick)
    done = sum(len(seeds) for conds in results.values() for seeds in conds.values())
    cmd = "python -m fedllm.studies.robustness --out " + args.out + (" --quick" if args.quick else "")
    doc = {"meta": {"command": cmd, "quick": args.quick, "setup": setup_line(args.quick), "machine": machine_line(),
                    "done": done, "planned": len(everything)}, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    write_report(doc, out)
    if args.readme:
        replace_block(Path(args.readme), MARK_START, MARK_END, readme_block(doc))
    print(f"wrote {out}/robustness_study.md (.png): {done} of {len(everything)} parts finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
