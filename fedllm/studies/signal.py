"""The signal-propagation study (issue 22 part 3): Jacobian singular values of pruned nets, plain vs isometric init.

Recipe ``recipes/studies/fmnist_signal.yaml`` (centralized Fashion-MNIST on all 60k images, 5 rounds of
200 SGD steps, batch 60, lr 0.1), through the engine's own centralized path, one part per
(model, sparsity, mask, init, seed):

- models: LeNet-300-100 (``lenet300100``) and the small CNN (``cnn``);
- sparsity 0, 90, 95, 98, 99 % (``prune.remaining`` = 1 − sparsity); masks SNIP and random
  (sparsity 0: one dense part per init, run as a random mask keeping every weight so that the run
  records its own JSV);
- init: plain (the model's own init, masked) or isometry (``prune.init: isometry``, Lee et al. 2020).

Each part records, from the engine's run files, the per-layer mean/min/max Jacobian singular value
of the initial state (``summary.json`` ``machine.signal``: ``before`` the isometric init for plain
parts, ``after`` it for isometric ones), the accuracy after every round and the final accuracy.
Each finished part is kept as ``<out>/parts/<part>.json``; a part whose recipe is unchanged is not
run again, so the study can be completed over several sessions::

    nice -n 19 python -m fedllm.studies.signal --out docs/signal_study --readme docs/results/signal.md
    python -m fedllm.studies.signal --models lenet300100 --seeds 0,1      # a subset
    python -m fedllm.studies.signal --part lenet300100:0.98:snip:isometry:0
    python -m fedllm.studies.signal --report-only --readme docs/results/signal.md
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
RECIPE = ROOT / "recipes" / "studies" / "fmnist_signal.yaml"
MODELS = {"lenet300100": "LeNet-300-100", "cnn": "small CNN"}
SPARSITIES = (0.0, 0.9, 0.95, 0.98, 0.99)
MASKS = ("snip", "random")
INITS = ("plain", "isometry")
QUICK = ["federation.rounds=2", "train.local_steps=5", "data.max_examples=1000", "data.eval_size=500",
         "prune.isometry_steps=50"]
QUICK_SPARSITIES = (0.0, 0.98)
QUICK_MASKS = ("random",)
KEEP = ("round", "accuracy", "eval_loss", "train_loss")
MARK_START, MARK_END = "<!-- signal-study:start -->", "<!-- signal-study:end -->"

Part = tuple[str, float, str, str, int]  # model, sparsity, mask ("none" at sparsity 0), init, seed


def part_name(model: str, sparsity: float, mask: str, init: str, seed: int) -> str:
    return f"{model}_sp{round(1000 * sparsity):04d}_{mask}_{init}_s{seed}"


def parse_part(text: str) -> Part:
    """``MODEL:SPARSITY:MASK:INIT:SEED`` (e.g. ``lenet300100:0.98:snip:isometry:0``) as a part key."""
    try:
        model, sparsity, mask, init, seed = text.split(":")
        key = (model, float(sparsity), mask, init, int(seed))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL:SPARSITY:MASK:INIT:SEED, got {text!r}") from None
    ok_mask = mask == "none" if key[1] == 0 else mask in MASKS
    if model not in MODELS or key[1] not in SPARSITIES or init not in INITS or not ok_mask:
        raise argparse.ArgumentTypeError(f"expected a model in {list(MODELS)}, a sparsity in {list(SPARSITIES)}, "
                                         f"a mask in {list(MASKS)} (none at sparsity 0), an init in {list(INITS)}; "
                                         f"got {text!r}")
    return key


def part_overrides(part: Part, quick: bool) -> list[str]:
    model, sparsity, mask, init, seed = part
    # dense: a random mask keeping every weight is the dense net, and makes the run record its JSV
    method = "random" if mask == "none" else mask
    return [f"name=signal_{part_name(*part)}", f"seed={seed}", f"model.preset={model}", f"prune.method={method}",
            f"prune.remaining={1.0 - sparsity:.6g}", f"prune.init={'none' if init == 'plain' else 'isometry'}",
            *(QUICK if quick else [])]


def part_recipe(part: Part, quick: bool):
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    return load_recipe(RECIPE, part_overrides(part, quick))


def init_jsv(signal: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-layer JSV of the state training starts from: ``after`` the isometric init, else ``before``."""
    return signal.get("after") or signal["before"]


def run_parts(parts: list[Part], out: Path, runs: Path, quick: bool) -> int:
    """Run every part without a recorded result for its current recipe; record each as it ends.
    Returns how many parts ran."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import RUNNERS  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    folder = parts_folder(out, quick)
    folder.mkdir(parents=True, exist_ok=True)
    ran = 0
    for part in parts:
        recipe = part_recipe(part, quick)
        target = folder / f"{part_name(*part)}.json"
        if recorded(target, recipe) is not None:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        RUNNERS[recipe.mode](make_experiment(recipe), out=str(runs))
        path = runs / recipe.name / recipe.mode
        rows = [{k: r.get(k) for k in KEEP} for r in read_metrics(path)]
        signal = json.loads((path / "summary.json").read_text(encoding="utf-8"))["machine"]["signal"]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        target.write_text(json.dumps({"recipe": dump_recipe(recipe), "part": list(part), "signal": signal,
                                      "jsv": init_jsv(signal), "rows": rows, "final_accuracy": final(rows),
                                      "wall_s": wall, "cpu_s": cpu}), encoding="utf-8")
        ran += 1
        print(f"  {part_name(*part):40s} accuracy {100 * final(rows):.2f} %  mean JSV "
              f"{mean_jsv(init_jsv(signal)):.3f}  ({wall:.0f} s)", flush=True)
    return ran


def plan(models: list[str], seeds: list[int], quick: bool = False) -> list[Part]:
    """Every part, the most telling first: per seed and model, dense, then 99 %, 98 %, 95 %, 90 %."""
    sparsities = QUICK_SPARSITIES if quick else SPARSITIES
    masks = QUICK_MASKS if quick else MASKS
    order = [0.0, *sorted((s for s in sparsities if s > 0), reverse=True)]
    parts: list[Part] = []
    for seed in seeds:
        for model in models:
            for sp in order:
                for mask in (("none",) if sp == 0 else masks):
                    parts += [(model, sp, mask, init, seed) for init in INITS]
    return parts


def collect(out: Path, parts: list[Part], quick: bool) -> dict[str, Any]:
    """part name -> recorded part (only the parts recorded for today's recipe)."""
    results = {}
    for part in parts:
        doc = recorded(parts_folder(out, quick) / f"{part_name(*part)}.json", part_recipe(part, quick))
        if doc is not None:
            results[part_name(*part)] = doc
    return results


# ----------------------------------------------------------------------------- numbers and tables


def final(rows: list[dict[str, Any]]) -> float:
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    return accs[-1] if accs else math.nan


def mean_jsv(jsv: dict[str, dict[str, float]]) -> float:
    """The mean over layers of each layer's mean JSV."""
    return statistics.fmean(s["mean"] for s in jsv.values())


def min_jsv(jsv: dict[str, dict[str, float]]) -> float:
    """The smallest JSV of any layer."""
    return min(s["min"] for s in jsv.values())


def _group(results: dict[str, Any], model: str, sp: float, mask: str, init: str, seeds: list[int]) -> list[dict]:
    return [d for s in seeds if (d := results.get(part_name(model, sp, mask, init, s))) is not None]


def _stat(vals: list[float], digits: int, scale: float = 1.0) -> str:
    if not vals:
        return "—"
    spread = f" ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.fmean(vals) * scale:.{digits}f}{spread}"


def table(results: dict[str, Any], model: str, seeds: list[int], sparsities=SPARSITIES, masks=MASKS) -> str:
    """One row per (sparsity, mask); JSV of every layer (mean / min), network mean and accuracy per init."""
    docs = [d for d in results.values() if d["part"][0] == model]
    if not docs:
        return f"No finished {MODELS[model]} parts yet."
    layers = list(docs[0]["jsv"])
    short = [k.removesuffix(".weight") for k in layers]
    head = ["sparsity", "mask", "init", *(f"{s} mean / min" for s in short), "mean JSV", "min JSV",
            "final accuracy (%)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|" + "---:|" * (len(head) - 3)]
    for sp in sparsities:
        for mask in (("none",) if sp == 0 else masks):
            for init in INITS:
                group = _group(results, model, sp, mask, init, seeds)
                if not group:
                    continue
                cells = [f"{sp:.0%}", "dense" if mask == "none" else mask, init]
                cells += [f"{statistics.fmean(d['jsv'][k]['mean'] for d in group):.3f} / "
                          f"{statistics.fmean(d['jsv'][k]['min'] for d in group):.3f}" for k in layers]
                cells += [_stat([mean_jsv(d["jsv"]) for d in group], 3), _stat([min_jsv(d["jsv"]) for d in group], 3),
                          _stat([d["final_accuracy"] for d in group], 2, 100), str(len(group))]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: dict[str, Any], model: str, seeds: list[int], sparsities=SPARSITIES, masks=MASKS) -> list[str]:
    """Per pruned (sparsity, mask): does isometry bring the mean JSV back near 1, and train higher?"""
    out = []
    dense = _group(results, model, 0.0, "none", "plain", seeds)
    for sp in (s for s in sparsities if s > 0):
        for mask in masks:
            plain, iso = (_group(results, model, sp, mask, i, seeds) for i in INITS)
            if not plain or not iso:
                continue
            jp, ji = (statistics.fmean(mean_jsv(d["jsv"]) for d in g) for g in (plain, iso))
            ap, ai = (100 * statistics.fmean(d["final_accuracy"] for d in g) for g in (plain, iso))
            below = ""
            if dense:
                jd = statistics.fmean(mean_jsv(d["jsv"]) for d in dense)
                below = f" (dense {jd:.3f})"
            better = "higher" if ai > ap else "**not higher**"
            out.append(f"- {sp:.0%} {mask}: mean JSV plain {jp:.3f}{below} → isometry {ji:.3f}; final accuracy "
                       f"plain {ap:.2f} % vs isometry {ai:.2f} % ({ai - ap:+.2f} points: isometry {better}).")
    return out


def plot(results: dict[str, Any], path: Path, models: list[str], seeds: list[int], sparsities=SPARSITIES,
         masks=MASKS) -> None:
    """Per model: mean JSV vs sparsity (left) and final accuracy vs sparsity (right), one line per mask × init."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        for i, (mask, init) in enumerate((m, n) for m in masks for n in INITS):
            xs, js, accs = [], [], []
            for sp in sparsities:
                group = _group(results, model, sp, "none" if sp == 0 else mask, init, seeds)
                if group:
                    xs.append(100 * (1 - sp))  # kept weights, on a log axis
                    js.append(statistics.fmean(mean_jsv(d["jsv"]) for d in group))
                    accs.append(100 * statistics.fmean(d["final_accuracy"] for d in group))
            style = {"marker": "o", "color": f"C{i}", "ls": "-" if init == "plain" else "--", "label": f"{mask}, {init}"}
            row[0].plot(xs, js, **style)
            row[1].plot(xs, accs, **style)
        row[0].axhline(1.0, color="grey", lw=0.8)
        for ax, what in zip(row, ("mean JSV at init (over layers)", "final test accuracy (%)")):
            ax.set_title(f"{MODELS[model]}: {what}", fontsize=10)
            ax.set_xscale("log")
            ax.set_xticks([100, 10, 5, 2, 1], ["0", "90", "95", "98", "99"])
            ax.invert_xaxis()
            ax.set_xlabel("sparsity (%), log scale of the kept fraction")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spec(meta: dict[str, Any]) -> dict[str, Any]:
    quick = meta["quick"]
    return {"sparsities": QUICK_SPARSITIES if quick else SPARSITIES, "masks": QUICK_MASKS if quick else MASKS}


def readme_block(doc: dict[str, Any]) -> str:
    meta, results, spec = doc["meta"], doc["results"], _spec(doc["meta"])
    lines = [MARK_START, "", f"`{meta['command']}` ({meta['done']} of {meta['planned']} parts finished; rendered "
             "from `docs/signal_study/signal_study.json`). Per layer: mean / min Jacobian singular value of the "
             "masked init (after the isometric init where used), and final test accuracy (mean ± sd over seeds). "
             + meta["setup"], ""]
    for model in meta["models"]:
        lines += [f"**{MODELS[model]}**", "", table(results, model, meta["seeds"], **spec), "",
                  *verdicts(results, model, meta["seeds"], **spec), ""]
    lines += ["![JSV and accuracy vs sparsity](../signal_study/signal_study.png)", "", MARK_END]
    return "\n".join(lines)


def write_report(doc: dict[str, Any], out: Path) -> None:
    meta, results, spec = doc["meta"], doc["results"], _spec(doc["meta"])
    (out / "signal_study.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    plot(results, out / "signal_study.png", meta["models"], meta["seeds"], **spec)
    parts = ["# Signal propagation in pruned networks: plain vs isometric init", "",
             f"Produced by `{meta['command']}`; {meta['done']} of {meta['planned']} parts finished. {meta['setup']}", ""]
    for model in meta["models"]:
        parts += [f"## {MODELS[model]}", "", table(results, model, meta["seeds"], **spec), "",
                  *verdicts(results, model, meta["seeds"], **spec), ""]
    parts += ["![JSV and accuracy vs sparsity](signal_study.png)", "",
              "JSV: singular values of each layer's masked weight matrix (Dˡ = I; conv kernels as out × in·k·k), "
              "as the engine records them in `summary.json` (`machine.signal`, `fedllm.algorithms.signal`).", "",
              f"Machine: {meta['machine']}.", ""]
    (out / "signal_study.md").write_text("\n".join(parts), encoding="utf-8")


def setup_line(quick: bool) -> str:
    r = part_recipe(("lenet300100", 0.98, "snip", "isometry", 0), quick)
    n = r.data.max_examples or 60000
    return (f"Centralized, {n} Fashion-MNIST training images ({r.data.eval_size} test), {r.federation.rounds} rounds "
            f"of {r.train.local_steps} SGD steps (batch {r.train.batch_size}, lr {r.train.lr}, momentum "
            f"{r.train.momentum}); SNIP scores one batch of {r.prune.snip_batch} images; isometry: "
            f"{r.prune.isometry_steps} descent steps per layer.")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("signal", __doc__)
    parser.add_argument("--quick", action="store_true", help="LeNet, 0 and 98 %% random, a few steps (smoke test)")
    parser.add_argument("--models", default="lenet300100,cnn", help="comma-separated presets (default both)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--part", action="append", type=parse_part, default=[],
                        help="run only MODEL:SPARSITY:MASK:INIT:SEED (repeatable)")
    args = parser.parse_args(argv)
    quiet_process()
    import torch  # noqa: PLC0415  (process-wide settings belong to the entry point)

    torch.set_num_threads(1)
    out = Path(args.out)
    models = [m for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model(s) {bad}; expected some of {list(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    everything = plan(models, seeds, args.quick)
    ran = 0 if args.report_only else run_parts(args.part or everything, out, Path(args.runs), args.quick)
    results = collect(out, everything, args.quick)
    cmd = (f"python -m fedllm.studies.signal --out {args.out} --models {','.join(models)} --seeds "
           f"{','.join(map(str, seeds))}" + (" --quick" if args.quick else ""))
    doc = {"meta": {"command": cmd, "quick": args.quick, "models": models, "seeds": seeds,
                    "setup": setup_line(args.quick), "machine": machine_line(), "done": len(results),
                    "planned": len(everything), "ran_now": ran}, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    write_report(doc, out)
    if args.readme:
        replace_block(Path(args.readme), MARK_START, MARK_END, readme_block(doc))
    print(f"wrote {out}/signal_study.md (.json, .png): {len(results)} of {len(everything)} parts finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
