"""The backdoor study (issue 38): model replacement against each defense, at a small budget.

Recipe ``recipes/studies/fmnist_backdoor.yaml``: LeNet-300-100 on Dirichlet Fashion-MNIST, 10 clients
all in every round, 15 rounds of 20 steps; one attacker (Bagdasaryan et al., 2020, "How To Backdoor
Federated Learning") is honest for 10 rounds, then in rounds 11-15 trains on half trigger-stamped
images relabelled to class 0 and boosts its update by γ = n/η = 10 (:mod:`fedllm.algorithms.backdoor`).

Parts: one clean run (plain mean, no attack: the main accuracy and the trigger's base rate) and the
attack against each defense:

- none (the plain mean);
- norm clipping, every update to L2 norm ``CLIP`` (Sun et al., 2019, "Can You Really Backdoor
  Federated Learning?"), about the honest updates' norm;
- weak DP (same paper): the same clip plus Gaussian noise on the mean, σ = ``WEAK_SIGMA`` or
  ``WEAK_SIGMA_MORE`` × C (``privacy.dp: server``: noise of std σC/K per coordinate of the mean; an ε
  far too large to mean anything: the noise is a defense here);
- the robust rules: coordinate-wise median, trimmed mean (β = 0.2: 2 of 10 cut at each end), Krum
  (f = 1) and AFA.

Scores (:func:`scores`): backdoor success and main accuracy as the mean over the attack's rounds'
evaluations (the boost replaces the model in one round, the honest clients wash part of it out
in the next, so single rounds swing), and both at the last round. Parts are recorded as
``<out>/parts/<part>.json`` (recipe and rows) and not run again while their recipe is unchanged::

    nice -n 19 python -m fedllm.studies.backdoor --out docs/backdoor_study --readme docs/results/backdoor.md
    python -m fedllm.studies.backdoor --quick       # 3 rounds, attack in round 3, smaller data
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedllm.studies import machine_line, parts_folder, quiet_process, recorded, replace_block, study_parser

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "fmnist_backdoor.yaml"
CLIP, WEAK_SIGMA, WEAK_SIGMA_MORE = 1.0, 0.01, 0.05
DEFENSES = {
    "none": ("no defense (mean)", []),
    "norm_clip": (f"norm clipping (C = {CLIP:g})", [f"robust.max_norm={CLIP}"]),
    "weak_dp": (f"weak DP (C = {CLIP:g}, sigma = {WEAK_SIGMA:g} C)",
                ["privacy.dp=server", f"privacy.clip={CLIP}", f"privacy.noise_multiplier={WEAK_SIGMA}"]),
    "weak_dp_more": (f"weak DP (C = {CLIP:g}, sigma = {WEAK_SIGMA_MORE:g} C)",
                     ["privacy.dp=server", f"privacy.clip={CLIP}", f"privacy.noise_multiplier={WEAK_SIGMA_MORE}"]),
    "median": ("coordinate-wise median", ["robust.aggregator=median"]),
    "trimmed_mean": ("trimmed mean (beta = 0.2)", ["robust.aggregator=trimmed_mean"]),
    "krum": ("Krum (f = 1)", ["robust.aggregator=krum"]),
    "afa": ("AFA", ["robust.aggregator=afa"]),
}
QUICK = ["federation.rounds=3", "attack.backdoor_rounds=[3]", "data.max_examples=1500", "data.eval_size=300",
         "train.local_steps=5"]
KEEP = ("round", "accuracy", "backdoor_success", "eval_loss", "robust", "applied", "epsilon")
MARK_START, MARK_END = "<!-- backdoor-study:start -->", "<!-- backdoor-study:end -->"
PARTS = ["clean", *DEFENSES]


def part_recipe(part: str, quick: bool):
    """The part's recipe. The clean part is a backdoor attack on no client (``attack.fraction=0``), so
    that its evaluations still stamp the test images: the trigger's base rate on a clean model."""
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    over = ["attack.kind=backdoor", *(["attack.fraction=0"] if part == "clean" else DEFENSES[part][1])]
    return load_recipe(RECIPE, [f"name=backdoor_{part}", *over, *(QUICK if quick else [])])


def run_parts(parts: list[str], out: Path, runs: Path, quick: bool) -> None:
    """Run every part without a recorded result for its current recipe; record each as it ends."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import run_federated  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    folder = parts_folder(out, quick)
    folder.mkdir(parents=True, exist_ok=True)
    for part in parts:
        recipe = part_recipe(part, quick)
        target = folder / f"{part}.json"
        if recorded(target, recipe) is not None:
            continue
        t0 = time.perf_counter()
        run_federated(make_experiment(recipe), out=str(runs))
        rows = [{k: r.get(k) for k in KEEP} for r in read_metrics(runs / recipe.name / "federated")]
        target.write_text(json.dumps({"recipe": dump_recipe(recipe), "rows": rows,
                                      "wall_s": time.perf_counter() - t0}), encoding="utf-8")
        s = scores(rows, attack_rounds(recipe))
        print(f"  {part:14s} backdoor {s['backdoor']:.1f} %  accuracy {s['accuracy']:.1f} %  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def attack_rounds(recipe) -> list[int]:
    rounds = recipe.attack.backdoor_rounds
    return list(rounds) if rounds is not None else list(range(1, recipe.federation.rounds + 1))


def scores(rows: list[dict[str, Any]], rounds: list[int]) -> dict[str, float]:
    """Backdoor success and accuracy (%), mean over the evaluations of ``rounds``, and at the last row."""
    during = [r for r in rows if r["round"] in rounds and r.get("accuracy") is not None]
    last = rows[-1]

    def pct(rs, key):
        vals = [100 * r[key] for r in rs if r.get(key) is not None]
        return statistics.fmean(vals) if vals else float("nan")

    return {"backdoor": pct(during, "backdoor_success"), "accuracy": pct(during, "accuracy"),
            "backdoor_last": pct([last], "backdoor_success"), "accuracy_last": pct([last], "accuracy")}


def collect(out: Path, quick: bool) -> dict[str, dict[str, Any]]:
    results = {}
    for part in PARTS:
        doc = recorded(parts_folder(out, quick) / f"{part}.json", part_recipe(part, quick))
        if doc is not None:
            results[part] = doc
    return results


def table(results: dict[str, Any], quick: bool) -> str:
    rounds = attack_rounds(part_recipe("none", quick))
    span = f"rounds {rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]}"
    lines = [f"| run | backdoor success, mean of {span} (%) | main accuracy, same rounds (%) | backdoor success, "
             "last round (%) | main accuracy, last round (%) |", "|---|---:|---:|---:|---:|"]
    for part in PARTS:
        label = "clean (no attacker, mean)" if part == "clean" else f"attack vs {DEFENSES[part][0]}"
        doc = results.get(part)
        if doc is None:
            lines.append(f"| {label} | — | — | — | — |")
            continue
        s = scores(doc["rows"], rounds)
        lines.append(f"| {label} | {s['backdoor']:.1f} | {s['accuracy']:.1f} | {s['backdoor_last']:.1f} | "
                     f"{s['accuracy_last']:.1f} |")
    return "\n".join(lines)


def setup_line(quick: bool) -> str:
    r = part_recipe("none", quick)
    a = r.attack
    return (f"{r.model.preset} on {r.data.max_examples} Fashion-MNIST images ({r.data.eval_size} test), "
            f"{r.partition.num_clients} clients (Dirichlet {r.partition.alpha}), all per round, {r.federation.rounds} "
            f"rounds of {r.train.local_steps} SGD steps (lr {r.train.lr}); {int(a.fraction * r.partition.num_clients)} "
            f"attacker poisoning {a.poison_fraction:.0%} of its examples (4x4 checkerboard trigger -> class "
            f"{a.backdoor_target}) in rounds {attack_rounds(r)}, boost gamma = {r.clients_per_round} (n/eta). Backdoor "
            "success: stamped test images of other classes classified as the target.")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("backdoor", __doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds on a small subset (smoke test)")
    parser.add_argument("--part", action="append", choices=PARTS, default=[], help="run only this part (repeatable)")
    args = parser.parse_args(argv)
    quiet_process()
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)  # LeNet on a shared CPU: one thread per process (several parts may run at once)
    out = Path(args.out)
    if not args.report_only:
        run_parts(args.part or PARTS, out, Path(args.runs), args.quick)
    results = collect(out, args.quick)
    cmd = "python -m fedllm.studies.backdoor --out " + args.out + (" --quick" if args.quick else "")
    body = table(results, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    page = ["# Backdoor (model replacement) against defenses", "", f"Produced by `{cmd}`; {len(results)} of "
            f"{len(PARTS)} parts finished. {setup_line(args.quick)}", "", body, "", f"Machine: {machine_line()}.", ""]
    (out / "backdoor_study.md").write_text("\n".join(page), encoding="utf-8")
    if args.readme:
        block = "\n".join([MARK_START, "", f"`{cmd}` ({len(results)} of {len(PARTS)} parts; rendered from "
                           f"`{args.out}/{parts_folder(out, args.quick).name}/`). {setup_line(args.quick)}", "", body,
                           "", MARK_END])
        replace_block(Path(args.readme), MARK_START, MARK_END, block)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
