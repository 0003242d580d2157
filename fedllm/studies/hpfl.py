"""The HP-FL / SNIP / compression study (issue 3): what it costs to reach an accuracy.

Federated variants (``recipes/vision/hpfl*.yaml``: 100 clients with 2 label shards each,
LeNet-300-100, batch 60, lr 0.1, 10 % of the clients per round, 1 local epoch), run through the
real engine (:func:`fedllm.federation.modes.run_federated`, whose server applies the masks and
the codecs and counts the encoded bytes):

- dense FL from a random init, and the same with 8-bit stochastic quantized uploads (q8);
- DAE pre-training only (no pruning);
- a random mask keeping 10 % of every weight matrix;
- HP-FL: the lottery-ticket mask (10 cycles of DAE → prune 20.6 % → rewind) keeping 10 %,
  starting from the rewound init (the protocol) or from the DAE weights (``prune.pretrain``);
- SNIP keeping 10 % (one 100-image batch of pooled client data scores the connections at init).

Centralized: LeNet-300-100 dense on all 60k training images, and SNIP at 90 % and 95 % sparsity
with the same schedule (``recipes/vision/lenet_centralized.yaml``, ``snip.yaml``).

For every run: final and best test accuracy, and the HP-FL paper's NRA@x (rounds to reach x),
CCA@x (bytes up + down to reach x) and CTA@x (client training seconds to reach x) from
:func:`fedllm.metrics.cost.cost_to_accuracy`. One command writes ``hpfl_study.md`` (tables),
``hpfl_study.json`` (every round of every run) and ``hpfl_study.png``::

    nice -n 19 python -m fedllm.studies.hpfl --out docs/hpfl_study [--quick]

Run directories go to ``--runs`` (default ``runs/hpfl_study``); the tables are built from their
``metrics.jsonl`` files. ``--quick`` (a smoke test) shrinks data, clients and rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "vision"
SNIP_POINTS = 2.0  # SNIP at 90 % / 95 % sparsity should stay within this many points of dense


@dataclass(frozen=True)
class Variant:
    """One run: a recipe file, overrides, and the mode it runs in."""

    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    group: str = "federated"  # "federated" (HP-FL table) or "centralized" (SNIP table)


VARIANTS = (
    Variant("dense FL", "hpfl_dense.yaml"),
    Variant("dense FL + q8 uploads", "hpfl_dense.yaml", ["compression.codec=q8", "name=hpfl_dense_q8"]),
    Variant("DAE pre-training only", "hpfl_dae_only.yaml"),
    Variant("random mask (10 %)", "hpfl_random.yaml"),
    Variant("HP-FL (10 %)", "hpfl.yaml"),
    Variant("HP-FL (10 %, DAE weights)", "hpfl.yaml", ["prune.pretrain=true", "name=hpfl_pretrained"]),
    Variant("SNIP (10 %)", "snip_federated.yaml"),
    Variant("dense centralized", "lenet_centralized.yaml", group="centralized"),
    Variant("SNIP 90 % sparse", "snip.yaml", ["name=snip90"], group="centralized"),
    Variant("SNIP 95 % sparse", "snip.yaml", ["prune.remaining=0.05", "name=snip95"], group="centralized"),
)

QUICK = {
    "federated": ["federation.rounds=2", "partition.num_clients=10", "data.open_data=2000",
                  "data.max_examples=3000", "data.eval_size=1000", "prune.iterations=2"],
    "centralized": ["federation.rounds=1", "data.max_examples=3000", "data.eval_size=1000"],
}


def run_variant(v: Variant, runs: Path, quick: bool) -> dict[str, Any]:
    """Build the experiment (HP-FL's server-side search included), run it, read its rows back."""
    from fedllm.algorithms.prune import remaining_rate  # noqa: PLC0415
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.modes import RUNNERS  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415
    from fedllm.metrics.cost import cost_to_accuracy  # noqa: PLC0415

    overrides = [*v.overrides, *(QUICK[v.group] if quick else [])]
    recipe = load_recipe(RECIPES / v.recipe, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    exp = make_experiment(recipe)
    prep_s = time.perf_counter() - t0
    RUNNERS[recipe.mode](exp, out=str(runs))
    rows = read_metrics(runs / recipe.name / recipe.mode)
    keep = ("round", "accuracy", "eval_loss", "train_loss", "bytes_up", "bytes_down", "train_time_s")
    rows = [{k: r.get(k) for k in keep} for r in rows]
    return {"label": v.label, "recipe": v.recipe, "overrides": overrides, "mode": recipe.mode,
            "group": v.group, "targets": list(recipe.eval.targets),
            "remaining": remaining_rate(exp.mask) if exp.mask is not None else 1.0,
            "mask_bytes": exp.mask_bytes, "prep_s": prep_s,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "cost": cost_to_accuracy(rows, recipe.eval.targets), "rows": rows}


# ----------------------------------------------------------------------------- tables


def _accs(run: dict[str, Any]) -> list[float]:
    return [100 * r["accuracy"] for r in run["rows"][1:] if r.get("accuracy") is not None]


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "not reached" if value is None else f"{value / scale:.{digits}f}"


def federated_table(runs: list[dict[str, Any]]) -> str:
    targets = runs[0]["targets"]
    head = ["variant", "kept weights", "final acc (%)", "best acc (%)", "MB up / round"]
    for x in targets:
        head += [f"NRA@{x:g}", f"CCA@{x:g} (MB)", f"CTA@{x:g} (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        trained = run["rows"][1:]
        up = sum(r["bytes_up"] for r in trained) / max(len(trained), 1)
        cells = [run["label"], f"{100 * run['remaining']:.1f} %", f"{_accs(run)[-1]:.2f}", f"{max(_accs(run)):.2f}",
                 f"{up / 1e6:.3f}"]
        for x in targets:
            c = run["cost"][f"{x:g}"]
            cells += [_fmt(c["rounds"], digits=0), _fmt(c["bytes"], 1e6), _fmt(c["train_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def centralized_table(runs: list[dict[str, Any]]) -> str:
    dense = _accs(runs[0])[-1]
    lines = ["| variant | kept weights | final acc (%) | vs dense (points) | within 2 points | epochs |",
             "|---|---:|---:|---:|:---:|---:|"]
    for run in runs:
        acc = _accs(run)[-1]
        ok = "-" if run is runs[0] else ("yes" if dense - acc <= SNIP_POINTS else "no")
        lines.append(f"| {run['label']} | {100 * run['remaining']:.1f} % | {acc:.2f} | {acc - dense:+.2f} | {ok} | "
                     f"{run['rows'][-1]['round']} |")
    return "\n".join(lines)


def compression_line(runs: dict[str, dict[str, Any]]) -> str:
    dense, q8 = runs.get("dense FL"), runs.get("dense FL + q8 uploads")
    if not dense or not q8:
        return ""
    up = [sum(r["bytes_up"] for r in run["rows"][1:]) for run in (dense, q8)]
    diff = _accs(q8)[-1] - _accs(dense)[-1]
    return (f"8-bit uploads: {up[0] / 1e6:.2f} MB -> {up[1] / 1e6:.2f} MB uploaded in total "
            f"({up[0] / up[1]:.2f}x smaller, measured encoded bytes); final accuracy {diff:+.2f} points vs fp32.")


def write_report(results: list[dict[str, Any]], out: Path, quick: bool) -> str:
    fed = [r for r in results if r["group"] == "federated"]
    cen = [r for r in results if r["group"] == "centralized"]
    by_label = {r["label"]: r for r in results}
    cpu = sum(r["cpu_s"] for r in results)
    parts = ["# HP-FL, SNIP and compressed updates on Fashion-MNIST (measured)", "",
             f"Command: `python -m fedllm.studies.hpfl --out {out}{' --quick' if quick else ''}`; "
             f"{cpu / 60:.1f} CPU-minutes in total.", ""]
    if fed:
        parts += ["## Federated: 100 clients x 2 label shards, LeNet-300-100, 10 clients/round, 1 local epoch", "",
                  federated_table(fed), "",
                  "NRA@x: rounds to reach test accuracy x; CCA@x: bytes up + down (all clients, the mask's one-time "
                  "download included) until then; CTA@x: client training seconds until then (this machine).", "",
                  "Server-side preparation (not in CTA): " + ", ".join(
                      f"{r['label']} {r['prep_s']:.0f} s" for r in fed) + ".", ""]
        line = compression_line(by_label)
        if line:
            parts += [line, ""]
    if cen:
        parts += ["## Centralized: LeNet-300-100 on all training images, SNIP sparsity sweep", "",
                  centralized_table(cen), ""]
    return "\n".join(parts)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in results:
        rows = [r for r in run["rows"] if r.get("accuracy") is not None]
        rounds, accs = [r["round"] for r in rows], [100 * r["accuracy"] for r in rows]
        if run["group"] == "federated":
            axes[0].plot(rounds, accs, label=run["label"])
            total, mbs, macc = 0, [], []
            for r in run["rows"][1:]:  # round 0 costs nothing: no point on a log axis
                total += (r["bytes_up"] or 0) + (r["bytes_down"] or 0)
                if r.get("accuracy") is not None:
                    mbs.append(total / 1e6)
                    macc.append(100 * r["accuracy"])
            axes[1].plot(mbs, macc, label=run["label"])
        else:
            axes[2].plot(rounds, accs, marker="o", label=run["label"])
    titles = ("federated: accuracy per round", "federated: accuracy vs total MB (up + down)",
              "centralized: accuracy per epoch")
    xlabels = ("round", "cumulative MB (log)", "epoch")
    for ax, title, xl in zip(axes, titles, xlabels):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/hpfl_study", help="folder for the .md/.json/.png")
    ap.add_argument("--runs", default="runs/hpfl_study", help="folder for the run directories")
    ap.add_argument("--quick", action="store_true", help="smoke test: small data, 2 rounds")
    ap.add_argument("--only", choices=("federated", "centralized"), help="run one group only")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL",
                    help="run only this variant (repeatable); other runs are kept from --out's json")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the .md/.png from --out's json (targets re-read from the recipes)")
    args = ap.parse_args(argv)
    import lightning.pytorch  # noqa: F401, PLC0415  (configures its loggers on import; quiet them after)
    import torch  # noqa: PLC0415  (process-wide settings belong to the entry point)

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in VARIANTS if (not args.only or v.group == args.only)
              and (not args.variant or v.label in args.variant)]
    if args.report_only:
        chosen = []
    results = []
    if (args.only or args.variant or args.report_only) and (out / "hpfl_study.json").is_file():
        old = json.loads((out / "hpfl_study.json").read_text(encoding="utf-8"))
        results = [retarget(r) for r in old if r["label"] not in {v.label for v in chosen}]
    for v in chosen:
        res = run_variant(v, runs, args.quick)
        results.append(res)
        accs = _accs(res)
        print(f"  {v.label:26s} final {accs[-1]:.2f} %  best {max(accs):.2f} %  cost {res['cost']}  "
              f"({res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s cpu)", flush=True)
    order = [v.label for v in VARIANTS]
    results.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    (out / "hpfl_study.json").write_text(json.dumps(results, indent=1, default=_json_default), encoding="utf-8")
    (out / "hpfl_study.md").write_text(write_report(results, out, args.quick), encoding="utf-8")
    plot(results, out / "hpfl_study.png")
    print(f"wrote {out / 'hpfl_study.md'}")
    return 0


def retarget(run: dict[str, Any]) -> dict[str, Any]:
    """A stored run with NRA/CCA/CTA recomputed for its recipe's current ``eval.targets``."""
    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.metrics.cost import cost_to_accuracy  # noqa: PLC0415

    targets = list(load_recipe(RECIPES / run["recipe"], run["overrides"]).eval.targets)
    return {**run, "targets": targets, "cost": cost_to_accuracy(run["rows"], targets)}


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
