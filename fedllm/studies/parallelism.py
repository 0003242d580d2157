"""The data-parallelism × sparsity study (issue 22 part 4): steps-to-result over batch sizes, sparsities and clients.

After Lee, Ajanthan, Torr & Jaggi (ICLR 2021), "Understanding the effects of data parallelism and
sparsity on neural network training". Recipe ``recipes/studies/fmnist_parallelism.yaml``:
LeNet-300-100 on a seeded 10k subset of the Fashion-MNIST training images, **plain SGD** (no
momentum, weight decay or clipping: the engine builds a fresh optimizer every round, so momentum
would restart at every evaluation and tie the results to the evaluation interval), accuracy on a fixed seeded 5000-image test subset, every run
through the engine's own runners (``RUNNERS[recipe.mode]``) and read back from its ``metrics.jsonl``.

- **Steps-to-result.** A trial is one run at one learning rate. The engine evaluates after every
  round, so a trial runs ``rounds`` rounds of ``E`` SGD steps (``train.local_steps``): ``K`` is the
  first evaluated step count ``r · E`` whose accuracy reaches the target (:func:`steps_to_result`;
  resolution ``E``, no interpolation), ∞ when no round does within the cap. The engine has no early
  stop (no target field in the recipe), so a trial runs to its cap. A point's ``K*`` is the fewest
  steps over its trials; a point whose trials all miss the target has none (shown, not fitted).
- **Learning-rate search**, the same fixed budget at every point: ``TRIALS`` = 8 learning rates,
  stratified log-uniform over ``LR_RANGE`` = [0.005, 1.28] (one seeded uniform draw inside each of
  the 8 octaves, seeded by the point: :func:`lr_trials`). Trials run from the middle octave outward;
  a trial's cap is the point's cap or, when smaller, one evaluation short of the best ``K`` found so
  far: the run is a prefix of the full one (the engine seeds every round by (seed, round)), so a
  trial that has not reached the target by then cannot lower ``K*``. The order changes the cost,
  never ``K*``; such a trial is recorded as "not before the best so far".
- **Grid.** Batch sizes B = 2, 4, …, 1024 (10 powers of two) × SNIP sparsity 0, 90 %, 98 % (one
  mask per sparsity, from the same seeded 100-image batch). Step cap per (B, sparsity):
  ``S₁/B + S₀`` (``CAPS``, about twice the ``K*`` of pilot runs), evaluated ``ROUNDS`` = 50 times, so
  ``E`` = cap / 50 (2 % of the cap, 4–5 % of ``K*``). Target: 80 % test accuracy, which the 98 %
  sparse net reached in pilot runs at B = 16, 64, 128, 1024 (and the dense net at B = 2) in about
  half the cap; at 99 % (the signal study's 67 % after 1000 steps) it would need far more steps.
- **Federated curve**: the degree of parallelism is clients per round ``m`` = 1, 2, 4, 8, 16 of
  ``FED_CLIENTS`` = 64 iid clients (FedAvg, every sampled client runs ``FED_LOCAL_STEPS`` = 5 SGD
  steps of batch 16 from the global model; ``federation.fraction`` = m / 64), dense and 90 %
  sparsity, ``K*`` counted in rounds (evaluated every round), the same search and target, round
  cap ``R₁/m + R₀`` (``FED_CAPS``; pilot, dense: m = 1 at lr 0.2 reached 80 % in 167 rounds, m = 16
  at lr 0.5 in 75). Each round runs only 5 sequential steps however many clients average, so the
  federated curve is expected to flatten early.
- **Fit** per sparsity (and per federated sparsity): ``K* ≈ c₁/B + c₂`` (the form SGD's convergence
  bound gives the paper) by least squares in *relative* error over the points that reached the target,
  c₁, c₂ ≥ 0 (:func:`fit_scaling`). Regimes on the log–log plot, from the fit's slope
  ``d log K*/d log B = −1/(1 + B/B*)`` around the critical batch ``B* = c₁/c₂`` (where the two terms
  are equal): **linear scaling** up to ``B*/4`` (slope ≤ −0.8: doubling B at least 1.74× fewer steps),
  **diminishing returns** between, **maximal data parallelism** from ``4·B*`` (slope ≥ −0.2)
  (:func:`regimes`).

Cost, measured on the shared 2-core machine (``nice 19``, one torch thread, full-size trials at
their full cap): an engine SGD step costs ≈ 5.6 ms + 31 µs · B (B = 2 dense, 10 800 steps: 60 s; at
98 %, 31 600 steps: 158 s; B = 64 at 98 %, 2 550 steps: 25 s; B = 1024 at 98 %, 1 700 steps: 62 s),
plus ≈ 75 ms a round (the Lightning fit, the 5000-image evaluation, the run files); a federated
round ≈ 0.07 s per client + 0.08 s (m = 1, 200 rounds: 34 s; m = 16, 75 rounds: 78 s; at 90 %, 180
rounds: 174 s). With the pilot's K* and about three trials per point running their full cap (the
rest stopped at the best so far), the 30 centralized points take ≈ 1.7 CPU-hours (2–17 min each; B =
2 at 98 % the dearest) and the 10 federated ones ≈ 1.6 (5–21 min; m = 16 the dearest): ≈ 3.3
CPU-hours, about 1.7 h wall as two parallel shards on 2 free cores (``--shard 0/2``, ``--shard
1/2``). Measured later (issue 38): the federated points m = 1–8 took 112–280 CPU-s each, far below
that estimate (their racing trials mostly stop early). ``--quick`` (2 batch sizes × 2 sparsities × 2 trials, 2 federated points, 2000 images) runs
end to end in ≈ 30 s.

Each finished point is kept as ``<out>/parts/<point>.json`` (``parts_quick/`` for ``--quick``) and
each finished trial as its run directory under ``--runs``: a point whose recipe and search are
unchanged is not run again, and a point interrupted mid-way re-reads its finished trials::

    nice -n 19 python -m fedllm.studies.parallelism --out docs/parallelism_study --readme docs/results/parallelism.md
    nice -n 19 python -m fedllm.studies.parallelism --shard 0/2 &  nice -n 19 python -m fedllm.studies.parallelism --shard 1/2
    python -m fedllm.studies.parallelism --part centralized:64:0.9 --part federated:8:0
    python -m fedllm.studies.parallelism --report-only --readme docs/results/parallelism.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from fedllm.studies import (
    finished_run,
    machine_line,
    parts_folder,
    quiet_process,
    recorded,
    replace_block,
    study_parser,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "fmnist_parallelism.yaml"
BATCHES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SPARSITIES = (0.0, 0.9, 0.98)
CLIENTS = (1, 2, 4, 8, 16)  # clients per round: the federated degree of parallelism
FED_SPARSITIES = (0.0, 0.9)
FED_CLIENTS, FED_BATCH, FED_LOCAL_STEPS = 64, 16, 5
TARGET = 0.80
TRIALS = 8
LR_RANGE = (0.005, 1.28)
ROUNDS = 50  # evaluations in a full-cap centralized trial
CAPS = {0.0: (20000, 800), 0.9: (30000, 800), 0.98: (60000, 1600)}  # sparsity -> (S1, S0): cap S1/B + S0 steps
FED_CAPS = {0.0: (240, 120), 0.9: (320, 160)}  # sparsity -> (R1, R0): cap R1/m + R0 rounds

QUICK = {"batches": (16, 128), "sparsities": (0.0, 0.9), "clients": (1, 4), "fed_sparsities": (0.0,),
         "target": 0.5, "trials": 2, "lr_range": (0.05, 0.8), "rounds": 5, "fed_clients": 8,
         "caps": {0.0: (800, 40), 0.9: (800, 40)}, "fed_caps": {0.0: (8, 8)}, "fed_local_steps": 5}
QUICK_OVERRIDES = ["data.max_examples=2000", "data.eval_size=500"]
FULL = {"batches": BATCHES, "sparsities": SPARSITIES, "clients": CLIENTS, "fed_sparsities": FED_SPARSITIES,
        "target": TARGET, "trials": TRIALS, "lr_range": LR_RANGE, "rounds": ROUNDS, "fed_clients": FED_CLIENTS,
        "caps": CAPS, "fed_caps": FED_CAPS, "fed_local_steps": FED_LOCAL_STEPS}
MARK_START, MARK_END = "<!-- parallelism-study:start -->", "<!-- parallelism-study:end -->"
LINEAR_SLOPE, FLAT_SLOPE = -0.8, -0.2  # fitted log-log slopes that bound the regimes: B*/4 and 4·B*

Point = tuple[str, int, float]  # mode, degree (batch size or clients per round), sparsity


def spec(quick: bool) -> dict[str, Any]:
    """The grid, search and caps of the full study or of ``--quick``."""
    return QUICK if quick else FULL


def part_name(mode: str, degree: int, sparsity: float) -> str:
    return f"{mode}_{'b' if mode == 'centralized' else 'm'}{degree:04d}_sp{round(1000 * sparsity):04d}"


def parse_part(text: str) -> Point:
    """``MODE:DEGREE:SPARSITY`` (e.g. ``centralized:64:0.9``, ``federated:8:0``) as a point of the full grid."""
    try:
        mode, degree, sparsity = text.split(":")
        point = (mode, int(degree), float(sparsity))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODE:DEGREE:SPARSITY (e.g. centralized:64:0.9), got {text!r}") from None
    if point not in plan(False) and point not in plan(True):
        raise argparse.ArgumentTypeError(
            f"no point {text!r}: expected centralized:B:S with B in {list(BATCHES)} and S in {list(SPARSITIES)}, "
            f"or federated:M:S with M in {list(CLIENTS)} clients per round and S in {list(FED_SPARSITIES)}")
    return point


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N``: every N-th point of the plan starting at the I-th (0 <= I < N), one shard per process."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N in I/N, got {text!r}")
    return i, n


def plan(quick: bool) -> list[Point]:
    """Every point: centralized per sparsity and batch size, then federated per sparsity and clients."""
    s = spec(quick)
    return ([("centralized", b, sp) for sp in s["sparsities"] for b in s["batches"]]
            + [("federated", m, sp) for sp in s["fed_sparsities"] for m in s["clients"]])


def cap(point: Point, quick: bool) -> tuple[int, int]:
    """(steps per round E, rounds) of a full-cap trial: centralized ``ROUNDS`` evaluations spaced
    evenly over ``S₁/B + S₀`` steps; federated ``R₁/m + R₀`` rounds, evaluated every round."""
    mode, degree, sp = point
    s = spec(quick)
    if mode == "centralized":
        s1, s0 = s["caps"][sp]
        return max(1, math.ceil((s1 / degree + s0) / s["rounds"])), s["rounds"]
    r1, r0 = s["fed_caps"][sp]
    return s["fed_local_steps"], math.ceil(r1 / degree + r0)


def lr_trials(point: Point, quick: bool, seed: int = 0) -> list[float]:
    """The point's learning rates in the order they run: one log-uniform draw in each of ``trials``
    equal log-strata of the range (seeded by the point), middle stratum first, then outward."""
    s = spec(quick)
    lo, hi = s["lr_range"]
    n = s["trials"]
    rng = random.Random(f"parallelism:{seed}:{point[0]}:{point[1]}:{point[2]:g}")  # str seeds hash stably
    lrs = [lo * (hi / lo) ** ((i + rng.random()) / n) for i in range(n)]
    order = sorted(range(n), key=lambda i: (abs(i - (n - 1) / 2), i))
    return [float(f"{lrs[i]:.4g}") for i in order]


def point_overrides(point: Point, quick: bool) -> list[str]:
    """The point's recipe overrides at its full cap (the learning rate stays the recipe's)."""
    mode, degree, sp = point
    every, rounds = cap(point, quick)
    prune = ["prune.method=none"] if sp == 0 else ["prune.method=snip", f"prune.remaining={1.0 - sp:.6g}"]
    out = [f"name=parallelism_{part_name(*point)}", f"mode={mode}", f"federation.rounds={rounds}",
           f"train.local_steps={every}", *prune, *(QUICK_OVERRIDES if quick else [])]
    if mode == "centralized":
        return [*out, f"train.batch_size={degree}"]
    clients = spec(quick)["fed_clients"]
    return [*out, f"train.batch_size={FED_BATCH}", f"partition.num_clients={clients}",
            f"federation.fraction={degree / clients:.6g}"]


def point_recipe(point: Point, quick: bool):
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    return load_recipe(RECIPE, point_overrides(point, quick))


def trial_recipe(point: Point, quick: bool, trial: int, lr: float, rounds: int):
    from fedllm.config import load_recipe  # noqa: PLC0415

    return load_recipe(RECIPE, [*point_overrides(point, quick), f"name=parallelism_{part_name(*point)}_t{trial}",
                                f"train.lr={lr:g}", f"federation.rounds={rounds}"])


def search(point: Point, quick: bool) -> dict[str, Any]:
    """What a point's result depends on besides its recipe: target, learning rates, cap and unit."""
    every, rounds = cap(point, quick)
    unit = "steps" if point[0] == "centralized" else "rounds"
    per_round = every if unit == "steps" else 1
    return {"target": spec(quick)["target"], "lrs": lr_trials(point, quick), "unit": unit, "per_round": per_round,
            "cap": rounds * per_round, "every": every}


# ----------------------------------------------------------------------------- running


def run_point(point: Point, quick: bool, runs: Path) -> dict[str, Any]:
    """Run the point's trials (racing: each capped at the best K so far); returns its record."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import RUNNERS  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    s = search(point, quick)
    per_round, full_rounds = s["per_round"], s["cap"] // s["per_round"]
    best, trials = math.inf, []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, lr in enumerate(s["lrs"]):
        rounds = full_rounds if math.isinf(best) else min(full_rounds, round(best / per_round) - 1)
        if rounds < 1:  # the best so far is the first evaluation: no trial can be earlier
            trials.append({"lr": lr, "k": None, "cap": 0, "status": "not before the best so far"})
            continue
        recipe = trial_recipe(point, quick, i, lr, rounds)
        path = runs / recipe.name / recipe.mode
        t1 = time.perf_counter()
        if not finished_run(path, recipe):
            RUNNERS[recipe.mode](make_experiment(recipe), out=str(runs))
        rows = read_metrics(path)
        k = steps_to_result(rows, s["target"], per_round)
        accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None and math.isfinite(r["accuracy"])]
        status = "reached" if math.isfinite(k) else ("never" if rounds == full_rounds else "not before the best so far")
        trials.append({"lr": lr, "k": None if math.isinf(k) else int(k), "cap": rounds * per_round, "status": status,
                       "best_accuracy": max(accs) if accs else None, "wall_s": time.perf_counter() - t1})
        best = min(best, k)  # the float ∞ until a trial reaches the target
    done = [t for t in trials if t["k"] is not None]
    best_trial = min(done, key=lambda t: t["k"]) if done else None
    return {"recipe": dump_recipe(point_recipe(point, quick)), "point": list(point), "search": s, "trials": trials,
            "k_star": best_trial["k"] if best_trial else None, "best_lr": best_trial["lr"] if best_trial else None,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def run_parts(points: list[Point], out: Path, runs: Path, quick: bool) -> int:
    """Run every point without a record for its current recipe and search; record each as it ends.
    Returns how many points ran."""
    folder = parts_folder(out, quick)
    folder.mkdir(parents=True, exist_ok=True)
    ran = 0
    for point in points:
        target = folder / f"{part_name(*point)}.json"
        if _load(target, point, quick) is not None:
            continue
        doc = run_point(point, quick, runs)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(target)  # a part is there whole or not at all (parallel shards read the folder)
        ran += 1
        k = "not reached" if doc["k_star"] is None else f"K* {doc['k_star']} {doc['search']['unit']} (lr {doc['best_lr']:g})"
        print(f"  {part_name(*point):34s} {k}  ({doc['wall_s']:.0f} s)", flush=True)
    return ran


def _load(path: Path, point: Point, quick: bool) -> dict[str, Any] | None:
    """The point's record when both its recipe and its search are today's."""
    doc = recorded(path, point_recipe(point, quick))
    return doc if doc is not None and doc.get("search") == search(point, quick) else None


def collect(out: Path, points: list[Point], quick: bool) -> dict[str, Any]:
    """part name -> recorded point (only the points recorded for today's recipe and search)."""
    results = {}
    for point in points:
        doc = _load(parts_folder(out, quick) / f"{part_name(*point)}.json", point, quick)
        if doc is not None:
            results[part_name(*point)] = doc
    return results


# ----------------------------------------------------------------------------- numbers


def steps_to_result(rows: list[dict[str, Any]], target: float, per_round: int = 1) -> float:
    """``per_round ·`` the first round (≥ 1) whose accuracy reaches ``target``; ∞ when none does."""
    hits = [r["round"] for r in rows if r.get("round", 0) >= 1 and r.get("accuracy") is not None
            and math.isfinite(r["accuracy"]) and r["accuracy"] >= target]
    return float(min(hits) * per_round) if hits else math.inf


def fit_scaling(degrees: list[float], ks: list[float]) -> tuple[float, float] | None:
    """c₁, c₂ ≥ 0 of ``K ≈ c₁/B + c₂`` minimizing Σ ((c₁/B + c₂ − K)/K)² (relative error, so the large K
    of small batches do not outweigh the rest); None with fewer than 2 distinct degrees."""
    pts = [(float(b), float(k)) for b, k in zip(degrees, ks) if k is not None and math.isfinite(k) and k > 0]
    if len({b for b, _ in pts}) < 2:
        return None
    rows = [(1.0 / (b * k), 1.0 / k) for b, k in pts]  # (c₁, c₂) · row ≈ 1
    a11 = sum(u * u for u, _ in rows)
    a12 = sum(u * v for u, v in rows)
    a22 = sum(v * v for _, v in rows)
    y1, y2 = sum(u for u, _ in rows), sum(v for _, v in rows)
    det = a11 * a22 - a12 * a12
    c1, c2 = (a22 * y1 - a12 * y2) / det, (a11 * y2 - a12 * y1) / det
    if c1 >= 0 and c2 >= 0:
        return c1, c2
    # the unconstrained optimum leaves the feasible set: the best one-term fit (non-negative least squares)
    only_c1, only_c2 = (y1 / a11, 0.0), (0.0, y2 / a22)
    return min((only_c1, only_c2), key=lambda c: sum((c[0] * u + c[1] * v - 1) ** 2 for u, v in rows))


def regimes(c1: float, c2: float) -> dict[str, float]:
    """The critical degree ``B* = c₁/c₂`` and the regime bounds: linear scaling up to ``B*/4``, maximal
    data parallelism from ``4·B*`` (fitted log-log slopes −0.8 and −0.2); all ∞ when c₂ = 0 (linear
    scaling throughout)."""
    if c2 <= 0:
        return {"critical": math.inf, "linear_until": math.inf, "maximal_from": math.inf}
    crit = c1 / c2
    return {"critical": crit, "linear_until": crit * (-1 / LINEAR_SLOPE - 1), "maximal_from": crit * (-1 / FLAT_SLOPE - 1)}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no ∞


def fits(results: dict[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    """mode -> sparsity (as ``f"{s:g}"``) -> fitted c₁, c₂, regimes and the relative RMS error."""
    s = spec(quick)
    out: dict[str, dict[str, Any]] = {}
    for mode, sps, degrees in (("centralized", s["sparsities"], s["batches"]),
                               ("federated", s["fed_sparsities"], s["clients"])):
        out[mode] = {}
        for sp in sps:
            pts = [(d, doc["k_star"]) for d in degrees
                   if (doc := results.get(part_name(mode, d, sp))) is not None and doc["k_star"] is not None]
            fit = fit_scaling([d for d, _ in pts], [k for _, k in pts])
            if fit is None:
                out[mode][f"{sp:g}"] = None
                continue
            c1, c2 = fit
            rms = math.sqrt(sum(((c1 / d + c2 - k) / k) ** 2 for d, k in pts) / len(pts))
            out[mode][f"{sp:g}"] = {"c1": c1, "c2": c2, "points": len(pts), "rel_rms": rms,
                                    **{k: _num(v) for k, v in regimes(c1, c2).items()}}
    return out


# ----------------------------------------------------------------------------- tables, plot, README


def _regime_of(degree: int, fit: dict[str, Any] | None) -> str:
    if fit is None:
        return ""
    lin, flat = fit["linear_until"], fit["maximal_from"]
    if lin is None or degree <= lin:
        return "linear"
    return "maximal" if flat is not None and degree >= flat else "diminishing"


def table(doc: dict[str, Any], mode: str) -> str:
    """One row per degree, one column per sparsity: K* (best learning rate, regime of the fit)."""
    s, results, fitted = spec(doc["meta"]["quick"]), doc["results"], doc["fits"][mode]
    sps, degrees = (s["sparsities"], s["batches"]) if mode == "centralized" else (s["fed_sparsities"], s["clients"])
    what = "batch size B" if mode == "centralized" else "clients per round m"
    unit = "steps" if mode == "centralized" else "rounds"
    head = [what, *(f"sparsity {sp:.0%}: K* {unit} (lr, regime)" for sp in sps)]
    lines = ["| " + " | ".join(head) + " |", "|---:|" + "---:|" * len(sps)]
    for d in degrees:
        cells = [str(d)]
        for sp in sps:
            r = results.get(part_name(mode, d, sp))
            if r is None:
                cells.append("—")
            elif r["k_star"] is None:
                cells.append(f"not reached in {r['search']['cap']} {unit}")
            else:
                cells.append(f"{r['k_star']:g} ({r['best_lr']:g}, {_regime_of(d, fitted.get(f'{sp:g}'))})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "∞" if x is None else f"{x:.3g}"


def fit_table(doc: dict[str, Any], mode: str) -> str:
    """Per sparsity: the fitted constants, the critical degree and where each regime starts."""
    sym = "B" if mode == "centralized" else "m"
    lines = [f"| sparsity | c₁ | c₂ | {sym}* = c₁/c₂ | linear scaling until {sym}*/4 | maximal parallelism from "
             f"4·{sym}* | rel. RMS error | points |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sp, f in doc["fits"][mode].items():
        if f is None:
            lines.append(f"| {float(sp):.0%} | — | — | — | — | — | — | < 2 |")
            continue
        lines.append(f"| {float(sp):.0%} | {f['c1']:.4g} | {f['c2']:.4g} | {_fmt(f['critical'])} | "
                     f"{_fmt(f['linear_until'])} | {_fmt(f['maximal_from'])} | {100 * f['rel_rms']:.1f} % | {f['points']} |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Log–log K* vs degree: one panel per centralized sparsity (fit, regimes shaded, B* marked) and one
    federated panel (K* in rounds vs clients per round, every federated sparsity)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: PLC0415

    s, results = spec(doc["meta"]["quick"]), doc["results"]
    panels = [("centralized", [sp]) for sp in s["sparsities"]] + [("federated", list(s["fed_sparsities"]))]
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (mode, sps) in zip(axes.flat, panels):
        degrees = s["batches"] if mode == "centralized" else s["clients"]
        sym = "B" if mode == "centralized" else "m"
        lo, hi = min(degrees) / 1.5, max(degrees) * 1.5
        for j, sp in enumerate(sps):
            color = f"C{s['sparsities'].index(sp) if sp in s['sparsities'] else j}"
            pts = [(d, r["k_star"]) for d in degrees
                   if (r := results.get(part_name(mode, d, sp))) is not None and r["k_star"] is not None]
            if pts:
                ax.plot(*zip(*pts), "o", color=color, label=f"sparsity {sp:.0%}: K*")
            fit = doc["fits"][mode].get(f"{sp:g}")
            if fit is None:
                continue
            xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
            ax.plot(xs, [fit["c1"] / x + fit["c2"] for x in xs], "-", color=color, lw=1,
                    label=f"fit c₁ = {fit['c1']:.3g}, c₂ = {fit['c2']:.3g}; {sym}* = {_fmt(fit['critical'])} (dashed)")
            _mark_regimes(ax, fit, lo, hi, color, shade=len(sps) == 1)
        title = (f"centralized, sparsity {sps[0]:.0%}: steps to {100 * s['target']:.0f} % accuracy"
                 if mode == "centralized" else f"federated: rounds to {100 * s['target']:.0f} % accuracy")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), title=title,
               xlabel="batch size B" if mode == "centralized" else "clients per round m",
               ylabel="K* (steps)" if mode == "centralized" else "K* (rounds)")
        ax.title.set_fontsize(10)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(list(degrees), [str(d) for d in degrees])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title=f"linear until {sym}*/4, maximal from 4·{sym}*", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark_regimes(ax, fit: dict[str, Any], lo: float, hi: float, color: str, shade: bool) -> None:
    """Shade the three regimes (one sparsity per panel) and mark the critical degree and both bounds."""
    lin, crit, flat = (fit[k] if fit[k] is not None else math.inf for k in ("linear_until", "critical", "maximal_from"))
    if shade:
        for a, b, c, name in ((lo, lin, "tab:green", "linear scaling"), (lin, flat, "tab:orange", "diminishing returns"),
                              (flat, hi, "tab:red", "maximal data parallelism")):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                ax.axvspan(a, b, color=c, alpha=0.08)
                ax.text(math.sqrt(a * b), 0.97, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                        fontsize=7, color=c)
    for x, ls in ((lin, ":"), (crit, "--"), (flat, ":")):
        if lo < x < hi:
            ax.axvline(x, color=color, ls=ls, lw=0.9)


def _setup_line(quick: bool) -> str:
    s = spec(quick)
    r = point_recipe(("centralized", s["batches"][0], s["sparsities"][0]), quick)
    f = point_recipe(("federated", s["clients"][0], s["fed_sparsities"][0]), quick)
    lo, hi = s["lr_range"]
    return (f"LeNet-300-100, {r.data.max_examples} Fashion-MNIST training images, accuracy on {r.data.eval_size} "
            f"test images; plain SGD (momentum {r.train.momentum}, no weight decay); target {100 * s['target']:.0f} % "
            f"accuracy; {s['trials']} learning rates per point, one seeded log-uniform draw in each of "
            f"{s['trials']} log-strata of [{lo:g}, {hi:g}]; SNIP masks (one {r.prune.snip_batch}-image batch); "
            f"centralized: {s['rounds']} evaluations over a step cap of S₁/B + S₀ (S₁, S₀ per sparsity: "
            + ", ".join(f"{sp:.0%}: {a}, {b}" for sp, (a, b) in s["caps"].items())
            + f"); federated: {f.partition.num_clients} iid clients, FedAvg, each sampled client "
            f"{f.train.local_steps} SGD steps of batch {f.train.batch_size} per round, evaluated every round.")


def readme_block(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [MARK_START, "", f"`{meta['command']}` ({meta['done']} of {meta['planned']} points finished; rendered "
             "from `docs/parallelism_study/parallelism.json`). K*: fewest SGD steps (federated: rounds) to the "
             "target over the point's learning-rate trials. " + meta["setup"], "",
             "**Centralized: steps-to-result vs batch size**", "", table(doc, "centralized"), "",
             fit_table(doc, "centralized"), "", "**Federated: rounds-to-result vs clients per round**", "",
             table(doc, "federated"), "", fit_table(doc, "federated"), "",
             "![K* vs batch size and clients per round](../parallelism_study/parallelism.png)", "", MARK_END]
    return "\n".join(lines)


def write_report(doc: dict[str, Any], out: Path) -> None:
    meta = doc["meta"]
    (out / "parallelism.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    plot(doc, out / "parallelism.png")
    parts = ["# Data parallelism and sparsity: steps-to-result vs batch size", "",
             f"Produced by `{meta['command']}`; {meta['done']} of {meta['planned']} points finished. {meta['setup']}",
             "", "K* ≈ c₁/B + c₂ fitted by least squares in relative error over the points that reached the target; "
             "B* = c₁/c₂ (the two terms equal); linear scaling while the fit's log–log slope is ≤ −0.8 "
             "(B ≤ B*/4), maximal data parallelism once it is ≥ −0.2 (B ≥ 4·B*), diminishing returns between.",
             "", "## Centralized: steps-to-result vs batch size", "", table(doc, "centralized"), "",
             fit_table(doc, "centralized"), "", "## Federated: rounds-to-result vs clients per round", "",
             table(doc, "federated"), "", fit_table(doc, "federated"), "", "![K* vs degree of parallelism](parallelism.png)",
             "", "Every trial of every point (learning rate, K or why not, cap) is in `parallelism.json`.", "",
             f"Machine: {meta['machine']}.", ""]
    (out / "parallelism.md").write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("parallelism", __doc__)
    parser.add_argument("--quick", action="store_true", help="2 batch sizes × 2 sparsities × 2 trials, small data")
    parser.add_argument("--part", action="append", type=parse_part, default=[],
                        help="run only MODE:DEGREE:SPARSITY, e.g. centralized:64:0.9 or federated:8:0 (repeatable)")
    parser.add_argument("--shard", type=parse_shard, default=None,
                        help="I/N: run every N-th point from the I-th (one shard per parallel process)")
    args = parser.parse_args(argv)
    quiet_process()
    import torch  # noqa: PLC0415  (process-wide settings belong to the entry point)

    torch.set_num_threads(1)
    out = Path(args.out)
    everything = plan(args.quick)
    if bad := [p for p in args.part if p not in everything]:
        parser.error(f"--part {', '.join(':'.join(map(str, p)) for p in bad)} is not in the "
                     f"{'quick' if args.quick else 'full'} grid")
    todo = args.part or everything
    if args.shard is not None:
        todo = todo[args.shard[0]::args.shard[1]]
    ran = 0 if args.report_only else run_parts(todo, out, Path(args.runs), args.quick)
    results = collect(out, everything, args.quick)
    cmd = f"python -m fedllm.studies.parallelism --out {args.out}" + (" --quick" if args.quick else "")
    doc: dict[str, Any] = {"meta": {"command": cmd, "quick": args.quick, "setup": _setup_line(args.quick),
                                    "machine": machine_line(), "done": len(results), "planned": len(everything),
                                    "ran_now": ran}, "results": results}
    doc["fits"] = fits(results, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    write_report(doc, out)
    if args.readme:
        replace_block(Path(args.readme), MARK_START, MARK_END, readme_block(doc))
    print(f"wrote {out}/parallelism.md (.json, .png): {len(results)} of {len(everything)} points finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
