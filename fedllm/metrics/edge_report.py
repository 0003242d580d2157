"""Tables and plots of the cloned-KD edge studies, built from their result files only.

The vision study (:func:`fedllm.studies.edge.run_edge_study`) leaves ``edge_study.json`` (config:
the edge recipe's values, seeds, variants and one row per returned edge: the core's test accuracy
after it);
:func:`write_edge_report` turns it into ``edge_study.md`` (one line per variant) and
``edge_study.png`` (one panel per group of the paper's figures). The LM workload
(:mod:`fedllm.edge.lm`) leaves ``edge_lm.json``; :func:`write_lm_report` writes
``edge_lm.md`` and ``edge_lm.png`` (held-out eval loss / perplexity of the core after each edge).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

STUDY_JSON, STUDY_MD, STUDY_PNG = "edge_study.json", "edge_study.md", "edge_study.png"
LM_JSON, LM_MD, LM_PNG = "edge_lm.json", "edge_lm.md", "edge_lm.png"


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant, averaged over seeds: final / mean / min core accuracy, the final accuracy's paired
    difference to its group's first variant, final consensus IoU and wall time."""
    curves: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in rows:
        curves.setdefault((r["group"], r["variant"]), {}).setdefault(r["seed"], []).append(r)
    final = {k: {s: rs[-1]["acc"] for s, rs in v.items()} for k, v in curves.items()}
    ref: dict[str, str] = {}
    for group, name in curves:
        ref.setdefault(group, name)
    out = []
    for (group, name), per_seed in curves.items():
        runs, base = list(per_seed.values()), final[(group, ref[group])]
        diffs = [final[(group, name)][s] - base[s] for s in per_seed]
        ious = [rs[-1]["consensus_iou"] for rs in runs if "consensus_iou" in rs[-1]]
        out.append({"group": group, "variant": name, "seeds": len(runs), "points": len(runs[0]),
                    "final_acc": statistics.fmean(final[(group, name)].values()),
                    "final_sd": statistics.stdev(final[(group, name)].values()) if len(runs) > 1 else 0.0,
                    "delta_vs_ref": statistics.fmean(diffs), "reference": ref[group],
                    "mean_acc": statistics.fmean(statistics.fmean(r["acc"] for r in rs) for rs in runs),
                    "min_acc": statistics.fmean(min(r["acc"] for r in rs) for rs in runs),
                    "final_iou": statistics.fmean(ious) if ious else None,
                    "time_s": statistics.fmean(rs[-1]["time_s"] for rs in runs)})
    return out


def _setting(config: dict) -> tuple[str, int, float, float]:
    """(model, edges, core fraction, edge alpha) of a study's config block: the edge recipe's values
    (``EdgeRecipe.to_dict()``), or the flat config that studies written before it recorded."""
    if "edges" in config:
        edges = config["edges"]
        return config["vision"]["model"], edges["count"], config["core"]["fraction"], edges["alpha"]
    return config["model"], config["num_edges"], config["core_fraction"], config["edge_alpha"]


def write_table(summary: list[dict], config: dict, seeds: list[int], path: Path) -> None:
    """The study's markdown table; ``config`` is the study JSON's config block (see :func:`_setting`)."""
    model, edges, fraction, alpha = _setting(config)
    skew = f"Dirichlet α={alpha}" if alpha else "iid"
    lines = ["# Asynchronous edge learning by cloned KD: study", "",
             f"Model `{model}`, {edges} edges, core fraction {fraction}, "
             f"edges {skew} unless named, seeds {seeds}; edge ids are 0-based. "
             "Core test accuracy after each returned edge (FedAvg: after each round), mean over seeds; "
             "final ± sd over seeds; Δ = final minus its group's first variant, paired by seed.", "",
             "Produced by `python -m fedllm.studies.edge --out DIR` (the defaults; the same as `fedllm edge "
             "recipes/edge/fashion_mnist_cloned_kd.yaml --out DIR`); the table and plot are rebuilt from "
             "edge_study.json by `fedllm.metrics.edge_report.write_edge_report(DIR)`.", "",
             "| group | variant | points | final acc | Δ final | mean acc | min acc | final IoU | time s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        iou = "" if s["final_iou"] is None else f"{s['final_iou']:.3f}"
        lines.append(f"| {s['group']} | {s['variant']} | {s['points']} | {s['final_acc']:.4f} ± "
                     f"{s['final_sd']:.4f} | {s['delta_vs_ref']:+.4f} | {s['mean_acc']:.4f} | {s['min_acc']:.4f} | "
                     f"{iou} | {s['time_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def _pyplot():
    import matplotlib  # noqa: PLC0415  (plotting is optional and slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_study(rows: list[dict], path: Path) -> None:
    """One panel per group: core accuracy (mean over seeds) against returned edges processed."""
    plt = _pyplot()
    groups = [g for g in dict.fromkeys(r["group"] for r in rows) if g != "baseline"]
    cols = max(1, min(2, len(groups)))
    rows_ = max(1, -(-len(groups) // cols))
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.5 * rows_), squeeze=False)
    lines = {s["variant"]: s["final_acc"] for s in summarize([r for r in rows if r["group"] == "baseline"])}
    for ax, group in zip(axes.flat, groups):
        for name in dict.fromkeys(r["variant"] for r in rows if r["group"] == group):
            curve: dict[int, list[float]] = {}
            for r in rows:
                if r["group"] == group and r["variant"] == name:
                    curve.setdefault(r["position"], []).append(r["acc"])
            ax.plot(list(curve), [statistics.fmean(v) for v in curve.values()], marker="o", ms=3, label=name)
        for i, (name, acc) in enumerate(lines.items()):
            ax.axhline(acc, ls="--", lw=1, color=f"C{7 + i}", label=f"{name} (final)")
        ax.set(title=group, xlabel="returned edges processed", ylabel="core test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_edge_report(out_dir: str | Path, plots: bool = True) -> Path:
    """Read ``edge_study.json`` in ``out_dir``; write ``edge_study.md`` (and ``.png``). Returns the .md.

    The summary is recomputed from the rows, so a past study can be re-reported.
    """
    out = Path(out_dir)
    result = json.loads((out / STUDY_JSON).read_text())
    write_table(summarize(result["rows"]), result["config"], result["seeds"], out / STUDY_MD)
    if plots:
        plot_study(result["rows"], out / STUDY_PNG)
    return out / STUDY_MD


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "" if x is None or not math.isfinite(x) else format(x, spec)


def write_lm_report(out_dir: str | Path, plots: bool = True) -> Path:
    """Read ``edge_lm.json``; write ``edge_lm.md`` (one line per returned edge) and ``edge_lm.png``."""
    out = Path(out_dir)
    result = json.loads((out / LM_JSON).read_text())
    rows, core0 = result["rows"], result["core"]
    lines = ["# Cloned KD of next-token distributions: LoRA core and edges", "",
             f"Model `{result['model']}` + LoRA r={result['lora_r']}; {result['num_edges']} edges, "
             f"{result['core_examples']} core examples, {result['eval_examples']} held-out examples; "
             "eval loss = mean response-token NLL on the held-out split, ppl = exp(loss). "
             f"Core after Phase 0: loss {_fmt(core0['eval_loss'])}, ppl {_fmt(core0['perplexity'], '.2f')}.", "",
             "| # | edge | lag | teachers | teacher loss | core loss before | core loss after | core ppl after | s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['position']} | {r['edge']} | {r['lag']} | {r['teachers']} | {_fmt(r['teacher_loss'])} | "
                     f"{_fmt(r['loss_before'])} | {_fmt(r['eval_loss'])} | {_fmt(r['perplexity'], '.2f')} | "
                     f"{r['time_s']:.1f} |")
    alone = result.get("core_only")
    if alone:
        lines += ["", f"Control (no teachers): the Phase-0 core trained on the core set for the same "
                  f"{alone['steps']} steps reaches loss {_fmt(alone['eval_loss'])}, "
                  f"ppl {_fmt(alone['perplexity'], '.2f')}."]
    (out / LM_MD).write_text("\n".join(lines) + "\n")
    if plots and rows:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        pos = [0] + [r["position"] for r in rows]
        ax.plot(pos, [core0["eval_loss"]] + [r["eval_loss"] for r in rows], marker="o", label="core (student)")
        ax.plot([r["position"] for r in rows], [r["teacher_loss"] for r in rows], marker="x", ls=":",
                label="returned edge (teacher)")
        if alone:
            ax.axhline(alone["eval_loss"], ls="--", color="C2", label="core, same steps, no teachers")
        ax.set(xlabel="returned edges processed", ylabel="held-out eval loss (response tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / LM_PNG, dpi=120)
        plt.close(fig)
    return out / LM_MD
