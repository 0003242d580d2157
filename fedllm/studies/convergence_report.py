"""Tables and plots of the convergence study (:mod:`fedllm.studies.convergence`), from its JSON only.

- the GradualDiff-Fed paper's Tables III/IV shape (perplexity, BLEU, seconds per round) at each
  run's best-validation round and at its last round, mean ± sd over seeds;
- federated / centralized and local / federated perplexity, paired over the same held-out examples
  (:func:`fedllm.federation.convergence.ratio_with_interval`), per seed, at best and last;
- the goals of issue 34, read from those ratios; the pilots' validation loss per learning rate;
- ``loss_<partition>.png``: held-out loss against data passes (epochs), every seed drawn;
- ``ratio_<partition>.png``: the best federated recipe over centralized against epochs, with its
  paired 95 % interval, where both evaluated at the same number of passes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from fedllm.federation.convergence import ratio_with_interval
from fedllm.studies import replace_block
from fedllm.studies.gradualdiff import PAPER, client_round_seconds, round_seconds

MARK_START, MARK_END = "<!-- convergence-study:start -->", "<!-- convergence-study:end -->"
GOALS = {"iid": 1.05, "natural": 1.10}  # best federated recipe <= this x centralized perplexity
GOAL_LOCAL_OVER_FED = 1.15


def rate_text(x: float) -> str:
    """A learning rate as a reader writes it: 3e-5, 1e-4, 0.1, 1 (not Python's 3e-05 and 0.0001)."""
    if x == 0 or abs(x) >= 0.1:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def recipe_label(part: dict[str, Any]) -> str:
    if part["mode"] != "federated":
        return part["mode"]
    return f"federated {part['variant']} (work {part['work']:g} ep)"


def full_runs(doc: dict[str, Any]) -> dict[str, dict[str, dict[int, dict]]]:
    """partition -> recipe label -> seed -> record, full runs only."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for rec in doc["records"].values():
        part = rec["part"]
        if part["phase"] == "full":
            out.setdefault(part["partition"], {}).setdefault(recipe_label(part), {})[part["seed"]] = rec
    return out


def at(rec: dict[str, Any], when: str, key: str) -> float | None:
    """``key`` at the best-validation round (``when="best"``) or the last evaluated round."""
    if key == "bleu" and rec.get("bleu"):  # scored after the run on its saved adapters
        return rec["bleu"].get(when)
    if when == "best":
        return (rec["summary"].get("best") or {}).get(key)
    rows = [r for r in rec["rows"] if r.get("eval_loss") is not None]
    return rows[-1].get(key) if rows else None


def ended_by(rec: dict[str, Any]) -> str:
    """What ended a full run: early stopping ("patience") or the cap, per client in local mode;
    "(continued)" when a run the first cap cut off went on to ``--continue-to``'s epochs."""
    stop = rec["summary"].get("stopped_early") or {}
    best_round = (rec["summary"].get("best") or {}).get("round")
    if isinstance(best_round, dict):  # local mode: each client stopped on its own validation loss
        stopped = {str(k) for k in stop.get("clients", ())}
        capped = sorted((k for k in best_round if k not in stopped), key=int)
        if not capped:
            return "patience (every client)"
        if not stopped:
            return "cap (every client)"
        return f"patience (clients {', '.join(sorted(stopped, key=int))}), cap (clients {', '.join(capped)})"
    return ("patience" if stop else "cap") + (" (continued)" if rec["part"].get("cap") else "")


def _ended_cell(seeds: dict[int, dict]) -> str:
    """:func:`ended_by` once when every seed ended the same way, else per seed."""
    said = {seed: ended_by(rec) for seed, rec in sorted(seeds.items())}
    return next(iter(said.values())) if len(set(said.values())) == 1 else "; ".join(
        f"seed {seed}: {why}" for seed, why in said.items())


def _cell(vals: list[float | None], fmt: str) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.fmean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def best_federated(recipes: dict[str, dict[int, dict]]) -> str | None:
    """The federated recipe with the lowest mean best-round perplexity."""
    fed = {label: [at(r, "best", "perplexity") for r in seeds.values()] for label, seeds in recipes.items()
           if label.startswith("federated")}
    fed = {k: [v for v in vals if v is not None] for k, vals in fed.items()}
    fed = {k: v for k, v in fed.items() if v}
    return min(fed, key=lambda k: statistics.fmean(fed[k])) if fed else None


def headline_table(doc: dict[str, Any]) -> str:
    lines = ["| partition | recipe | lr | seeds | best epoch | perplexity (best) | BLEU (best) | perplexity (last) "
             "| BLEU (last) | last epoch | ended by | s / round | s / client round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for partition, recipes in full_runs(doc).items():
        for label, seeds in sorted(recipes.items()):
            recs = list(seeds.values())
            lines.append(f"| {partition} | {label} | {rate_text(recs[0]['part']['lr'])} | {len(recs)} | "
                         f"{_cell([at(r, 'best', 'epochs') for r in recs], '.2f')} | "
                         f"{_cell([at(r, 'best', 'perplexity') for r in recs], '.2f')} | "
                         f"{_cell([at(r, 'best', 'bleu') for r in recs], '.2f')} | "
                         f"{_cell([at(r, 'last', 'perplexity') for r in recs], '.2f')} | "
                         f"{_cell([at(r, 'last', 'bleu') for r in recs], '.2f')} | "
                         f"{_cell([at(r, 'last', 'epochs') for r in recs], '.2f')} | "
                         f"{_ended_cell(seeds)} | "
                         f"{_cell([round_seconds(r) for r in recs], '.1f')} | "
                         f"{_cell([client_round_seconds(r, r['part']['mode']) for r in recs], '.1f')} |")
    return "\n".join(lines)


def paired_ratio(a: dict | None, b: dict | None, when: str) -> dict[str, Any] | None:
    """a / b perplexity with its paired interval from the two records' per-example losses."""
    if not (a and b and a.get("eval_nll") and b.get("eval_nll")):
        return None
    x, y = a["eval_nll"].get(when), b["eval_nll"].get(when)
    if not (x and y):
        return None
    try:
        return ratio_with_interval(x, y)
    except ValueError:
        return None


def ratios(doc: dict[str, Any]) -> dict[str, Any]:
    """partition -> {fed label -> seed -> {best, final}} over centralized; and local over the best federated."""
    out: dict[str, Any] = {}
    for partition, recipes in full_runs(doc).items():
        cen, loc = recipes.get("centralized", {}), recipes.get("local", {})
        top = best_federated(recipes)
        entry: dict[str, Any] = {"best_federated": top, "fed_over_central": {}, "local_over_fed": {}}
        for label, seeds in recipes.items():
            if label.startswith("federated"):
                entry["fed_over_central"][label] = {
                    str(s): {w: paired_ratio(r, cen.get(s), w) for w in ("best", "final")} for s, r in seeds.items()}
        if top:
            entry["local_over_fed"] = {str(s): {w: paired_ratio(r, recipes[top].get(s), w) for w in ("best", "final")}
                                       for s, r in loc.items()}
        out[partition] = entry
    return out


def _ratio_text(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    ci = f" [{r['lo']:.3f}, {r['hi']:.3f}]" if r.get("lo") is not None else ""
    return f"{r['ratio']:.3f}{ci}"


def ratio_table(pairs: dict[str, Any]) -> str:
    lines = ["| partition | ratio | seed | at best validation (95 % paired) | at last round (95 % paired) |",
             "|---|---|---|---|---|"]
    for partition, entry in pairs.items():
        for label, seeds in sorted(entry["fed_over_central"].items()):
            for seed, r in seeds.items():
                lines.append(f"| {partition} | {label} / centralized | {seed} | {_ratio_text(r['best'])} | "
                             f"{_ratio_text(r['final'])} |")
        for seed, r in entry["local_over_fed"].items():
            lines.append(f"| {partition} | local / {entry['best_federated']} | {seed} | {_ratio_text(r['best'])} | "
                         f"{_ratio_text(r['final'])} |")
    return "\n".join(lines)


def goals_table(pairs: dict[str, Any]) -> str:
    lines = ["| partition | goal | measured at best validation (per seed) | met? |", "|---|---|---|---|"]
    for partition, entry in pairs.items():
        top = entry["best_federated"]
        fed = [r["best"]["ratio"] for r in entry["fed_over_central"].get(top, {}).values() if r["best"]]
        loc = [r["best"]["ratio"] for r in entry["local_over_fed"].values() if r["best"]]
        goal = GOALS.get(partition, 1.10)
        for what, vals, ok in ((f"best federated recipe ({top or 'no full run yet'}) ≤ {goal} × centralized", fed,
                                lambda v, g=goal: v <= g),
                               (f"local mean ≥ {GOAL_LOCAL_OVER_FED} × federated", loc,
                                lambda v: v >= GOAL_LOCAL_OVER_FED)):
            shown = ", ".join(f"{v:.3f}" for v in vals) or "not measured"
            met = "–" if not vals else "yes" if all(ok(v) for v in vals) else "no" if not any(ok(v) for v in vals) \
                else "mixed"
            lines.append(f"| {partition} | {what} | {shown} | {met} |")
    return "\n".join(lines)


def pilot_table(doc: dict[str, Any]) -> str:
    """Best validation loss of every pilot; the chosen rate of each row in bold."""
    grid: dict[tuple, dict[str, float | None]] = {}
    for rec in doc["records"].values():
        p = rec["part"]
        if p["phase"] == "pilot":
            key = (p["partition"], recipe_label(p).replace(f" {p['variant']}", f" {p['variant'].split('@')[0]}"))
            rates = (p["lr"], float(p["variant"].split("@")[1]) if "@" in p["variant"] else 0.0)
            grid.setdefault(key, {})[rates] = (rec["summary"].get("best") or {}).get("val_loss")
    lines = ["| partition | recipe | validation loss by rate (client lr [/ server lr]) |", "|---|---|---|"]
    for (partition, label), vals in sorted(grid.items()):
        finite = {k: v for k, v in vals.items() if v is not None and math.isfinite(v)}
        low = min(finite, key=finite.get) if finite else None
        cells = ", ".join(f"{'**' if k == low else ''}{rate_text(k[0])}{f' / server {rate_text(k[1])}' if k[1] else ''}: "
                          f"{'–' if v is None else format(v, '.4f')}{'**' if k == low else ''}"
                          for k, v in sorted(vals.items()))
        lines.append(f"| {partition} | {label} | {cells} |")
    return "\n".join(lines)


def curve_ratios(fed: dict[str, Any], cen: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(epochs, paired ratio) wherever both runs were scored after the same number of data passes."""
    def by_epochs(rec):
        return {round(r["epochs"], 6): str(r["round"]) for r in rec["rows"] if r.get("epochs") is not None
                and r.get("eval_loss") is not None}

    if not (fed.get("eval_nll") and cen.get("eval_nll")):
        return []
    a, b = by_epochs(fed), by_epochs(cen)
    counts = fed["eval_nll"]["final"]["counts"]
    out = []
    for ep in sorted(set(a) & set(b)):
        x, y = fed["eval_nll"].get("rounds", {}).get(a[ep]), cen["eval_nll"].get("rounds", {}).get(b[ep])
        if x is not None and y is not None:
            out.append((ep, ratio_with_interval({"sums": x, "counts": counts}, {"sums": y, "counts": counts})))
    return out


def figure_panels(doc: dict[str, Any]) -> list[tuple[str, dict, str | None, bool]]:
    """Per partition with full runs: (partition, its recipes, the best federated one, whether it has a
    ratio curve). Every partition gets its loss curves; the ratio needs a federated and a centralized run."""
    out = []
    for partition, recipes in full_runs(doc).items():
        top = best_federated(recipes)
        out.append((partition, recipes, top, bool(top and recipes.get("centralized"))))
    return out


def plot(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = []
    styles = {"centralized": ("#d62728", "--"), "local": ("#2ca02c", ":")}
    for partition, recipes, top, with_ratio in figure_panels(doc):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, seeds in sorted(recipes.items()):
            if label.startswith("federated") and label != top:
                continue
            color, ls = styles.get(label, ("#1f77b4", "-"))
            for i, (_seed, rec) in enumerate(sorted(seeds.items())):
                pts = [(r["epochs"], r["eval_loss"]) for r in rec["rows"] if r.get("epochs") is not None
                       and r.get("eval_loss") is not None]
                if pts:
                    ax.plot(*zip(*pts), color=color, linestyle=ls, marker="o", markersize=3, alpha=0.85,
                            label=f"{label}" if i == 0 else None)
                best = rec["summary"].get("best") or {}
                if best.get("epochs") is not None and best.get("eval_loss") is not None:
                    ax.plot(best["epochs"], best["eval_loss"], color=color, marker="*", markersize=11, linestyle="none")
        ax.plot([], [], color="grey", marker="*", markersize=9, linestyle="none",
                label="best validation (local: each client at its own)")
        ax.set(xlabel="data passes (epochs)", ylabel="held-out loss (NLL)", title=f"{partition}: every seed drawn")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"loss_{partition}.png", dpi=120)
        plt.close(fig)
        names.append(f"loss_{partition}.png")
        if with_ratio:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for seed, rec in sorted(recipes[top].items()):
                pts = curve_ratios(rec, recipes["centralized"].get(seed, {}))
                if pts:
                    xs = [p[0] for p in pts]
                    ax.plot(xs, [p[1]["ratio"] for p in pts], marker="o", label=f"seed {seed}")
                    if all(p[1]["lo"] is not None for p in pts):
                        ax.fill_between(xs, [p[1]["lo"] for p in pts], [p[1]["hi"] for p in pts], alpha=0.2)
            ax.axhline(GOALS.get(partition, 1.10), color="grey", linestyle=":", label="goal")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set(xlabel="data passes (epochs)", ylabel="perplexity ratio (paired 95 %)",
                   title=f"{partition}: {top} / centralized")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"ratio_{partition}.png", dpi=120)
            plt.close(fig)
            names.append(f"ratio_{partition}.png")
    return names


def paper_ratios() -> tuple[dict[str, float], float, float]:
    """The GradualDiff-Fed paper's Table III perplexities, its federated / centralized and local / federated."""
    ppl = PAPER["perplexity"]
    return ppl, ppl["federated"] / ppl["centralized"], ppl["local"] / ppl["federated"]


def paper_line() -> str:
    """The paper's Table III ratios, to read the measured ones against."""
    ppl, fed_over_central, local_over_fed = paper_ratios()
    return (f"The paper (Table III, 4-bit Llama-2-7B, 15 rounds of local training on each client's whole share): "
            f"federated / centralized {fed_over_central:.3f} "
            f"({ppl['federated']} vs {ppl['centralized']}), local / federated {local_over_fed:.3f}.")


def against_paper(measured: list[dict[str, Any]], paper: float) -> str:
    """Where the paper's ratio sits against each seed's paired 95 % interval, in words."""
    spans = [(r["lo"], r["hi"]) for r in measured if r.get("lo") is not None]
    if not spans:
        return "no interval to read it against"
    if all(lo <= paper <= hi for lo, hi in spans):
        return f"agrees: the paper's {paper:.3f} is inside every seed's interval"
    if all(lo > paper for lo, _ in spans):
        return f"larger than the paper's {paper:.3f} (every seed's interval lies above it)"
    if all(hi < paper for _, hi in spans):
        return f"smaller than the paper's {paper:.3f} (every seed's interval lies below it)"
    return f"mixed against the paper's {paper:.3f} (inside some seeds' intervals, outside others)"


def agreement(pairs: dict[str, Any]) -> list[str]:
    """Per partition, one sentence each for federated / centralized and local / federated at the best
    validation round, read against the paper's Table III (a different model, so only the shape compares)."""
    _, fed_over_central, local_over_fed = paper_ratios()
    out = []
    for partition, entry in pairs.items():
        top = entry["best_federated"]
        for what, seeds, paper in ((f"{top} / centralized", entry["fed_over_central"].get(top, {}), fed_over_central),
                                   (f"local / {top}", entry["local_over_fed"], local_over_fed)):
            measured = [r["best"] for r in seeds.values() if r.get("best")]
            if measured:
                shown = ", ".join(_ratio_text(r) for r in measured)
                out.append(f"- {partition}: {what} perplexity at best validation {shown}: "
                           f"{against_paper(measured, paper)}.")
    return out


def figure_names(doc: dict[str, Any]) -> list[str]:
    """The plots :func:`plot` draws for ``doc`` (without drawing them)."""
    return [name for partition, _, _, with_ratio in figure_panels(doc)
            for name in (f"loss_{partition}.png", *([f"ratio_{partition}.png"] if with_ratio else []))]


def progress_line(doc: dict[str, Any]) -> list[str]:
    """While some planned full runs are not recorded: how many are (a paragraph), else nothing."""
    done = sum(len(seeds) for recipes in full_runs(doc).values() for seeds in recipes.values())
    planned = doc.get("full_planned") or done
    if done >= planned:
        return []
    return [f"The study is **running**: {done} of its {planned} full runs recorded. Every number below is "
            "partial: a ratio appears once both of its runs are recorded, and each goal is read only from the ratios that exist.", ""]


def readme_block(doc: dict[str, Any], figures: str | None = None) -> str:
    """The block of the docs page and of the README's headline, from the study JSON only (tests hold
    both to it). ``figures``: the study folder relative to the file the block goes in (its plots are
    drawn there). Before any full run has finished the block says the study is running, and how far."""
    if not full_runs(doc):
        n = len(doc["records"])
        pilots = sum(r["part"]["phase"] == "pilot" for r in doc["records"].values())
        which = ("a pilot" if n == 1 else "all pilots") if pilots == n else f"{pilots} of them pilots"
        return "\n".join([MARK_START, "", f"The study is **running**: {n} part{'s' * (n != 1)} recorded so far "
                          f"({which}); its tables and curves appear here when its full runs are in "
                          "(what runs, and what was cut to fit the budget: docs/results/convergence.md).", "",
                          MARK_END])
    pairs = doc.get("ratios") or ratios(doc)
    plots = [f"![{name[:-4]}]({figures}/{name})" for name in figure_names(doc)] if figures is not None else []
    said = agreement(pairs)
    return "\n".join([MARK_START, "", *progress_line(doc), headline_table(doc), "", ratio_table(pairs), "",
                      goals_table(pairs), "",
                      paper_line(), "", *(said + [""] if said else []), *(plots + [""] if plots else []), MARK_END])


def slim(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON to commit: every record without its per-example losses (the ratios are computed)."""
    return {**doc, "records": {k: {kk: vv for kk, vv in v.items() if kk != "eval_nll"}
                               for k, v in doc["records"].items()}}


def write_report(doc: dict[str, Any], out: Path, readmes: list[Path] = ()) -> None:
    """The study's JSON, page and plots under ``out``; the block in each of ``readmes`` (with the
    plots linked relative to that file)."""
    out.mkdir(parents=True, exist_ok=True)
    doc["ratios"] = ratios(doc)
    doc["curves"] = {p: {str(s): curve_ratios(rec, recipes.get("centralized", {}).get(s, {}))
                         for s, rec in recipes.get(best_federated(recipes) or "", {}).items()}
                     for p, recipes in full_runs(doc).items()}
    pngs = plot(doc, out)
    (out / "convergence_study.json").write_text(json.dumps(slim(doc), indent=1), encoding="utf-8")
    md = ["# The headline at convergence", "", f"`{doc['meta']['command']}`", "", *progress_line(doc),
          "## At the best-validation round and at the last round", "", headline_table(doc), "",
          "## Paired ratios", "", ratio_table(doc["ratios"]), "", "## Goals", "", goals_table(doc["ratios"]), "",
          paper_line(), "", *agreement(doc["ratios"]), "",
          "## Pilots (best validation loss per learning rate)", "", pilot_table(doc), "",
          *[f"![{p}]({p})" for p in pngs], "", f"Machine: {doc['meta']['machine']}.", ""]
    (out / "convergence_study.md").write_text("\n".join(md), encoding="utf-8")
    for readme in readmes:
        rel = Path(os.path.relpath(out.resolve(), readme.resolve().parent)).as_posix()
        replace_block(readme, MARK_START, MARK_END, readme_block(slim(doc), rel))
