"""Reports built from run-directory files only (never from live training objects), so any past
run can be re-reported: ``report.md`` and PNG plots per mode, and the three-mode comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedllm.federation.rundir import read_metrics, write_json_atomic
from fedllm.metrics.cost import cost_to_accuracy

CURVES = (("eval_loss", "eval loss"), ("perplexity", "perplexity"), ("bleu", "BLEU"), ("accuracy", "accuracy"),
          ("epsilon", "DP epsilon"))
OPTIONAL_COLUMNS = ("accuracy", "epsilon", "lora_aggregation_error", "rejected_updates", "failed_clients")


def _present(rows: list[dict], key: str) -> bool:
    """Whether any row has a real (non-null, non-zero for counts) value for ``key``."""
    return any(r.get(key) not in (None, 0) for r in rows)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _plot(series: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    curves = [(k, label) for k, label in CURVES if any(_present(rows, k) for rows in series.values())]
    curves = curves or list(CURVES[:1])
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, curves):
        for name, rows in series.items():
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _targets(path: Path) -> list[float]:
    """``eval.targets`` of the run's resolved recipe (``config.yaml``), if any."""
    config = path / "config.yaml"
    if not config.exists():
        return []
    values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return list((values.get("eval") or {}).get("targets") or [])


def write_report(path: Path, plots: bool = True) -> Path:
    """``report.md`` (+ ``metrics.png``) for one mode's run directory."""
    rows = read_metrics(path)
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    cols = ["round", "train_loss", "eval_loss", "perplexity", "bleu", "round_time_s", "bytes_up", "bytes_down"]
    cols += [c for c in OPTIONAL_COLUMNS if _present(rows, c)]
    lines = [f"# {summary.get('name', path.parent.name)} — {rows[0]['mode']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    if summary:
        lines += ["", f"Total bytes up {summary['total_bytes_up']:,}, down {summary['total_bytes_down']:,}; "
                  f"mean round time {summary['mean_round_time_s']:.2f} s; "
                  f"skipped updates {summary['skipped_updates']}."]
    targets = _targets(path)
    if summary and targets:  # HP-FL's cost-to-accuracy: rounds, bytes and client time to reach x
        summary["cost_to_accuracy"] = cost = cost_to_accuracy(rows, targets)
        write_json_atomic(path / "summary.json", summary)
        lines += ["", "| target accuracy | rounds (NRA) | bytes up+down (CCA) | client train s (CTA) |",
                  "|---|---|---|---|"]
        lines += [f"| {x} | {_fmt(c['rounds'])} | {_fmt(c['bytes'])} | {_fmt(c['train_time_s'])} |"
                  for x, c in cost.items()]
    if plots:
        _plot({rows[0]["mode"]: rows}, path / "metrics.png", f"{path.parent.name} ({rows[0]['mode']})")
        lines += ["", "![metrics](metrics.png)"]
    (path / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / "report.md"


def write_comparison(root: Path, modes: list[str], plots: bool = True) -> dict[str, Any]:
    """``comparison.{md,json,png}`` under ``<output.dir>/<name>/`` from each mode's files."""
    series = {m: read_metrics(root / m) for m in modes if (root / m / "metrics.jsonl").exists()}
    table = {}
    for mode, rows in series.items():
        first, last = rows[0], rows[-1]
        table[mode] = {"rounds": last["round"], "initial_eval_loss": first["eval_loss"],
                       "final_eval_loss": last["eval_loss"], "final_perplexity": last["perplexity"],
                       "final_bleu": last["bleu"], "final_accuracy": last.get("accuracy"),
                       "bytes_up": sum(r["bytes_up"] for r in rows),
                       "bytes_down": sum(r["bytes_down"] for r in rows),
                       "time_s": sum(r["round_time_s"] for r in rows)}
    write_json_atomic(root / "comparison.json", table)
    cols = ["rounds", "initial_eval_loss", "final_eval_loss", "final_perplexity", "final_bleu", "final_accuracy",
            "bytes_up", "bytes_down", "time_s"]
    cols = [c for c in cols if any(v[c] is not None for v in table.values())]
    lines = [f"# {root.name}: federated vs centralized vs local", "",
             "| mode | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(_fmt(v[c]) for c in cols) + " |" for m, v in table.items()]
    lines += ["", "Local-only rows are means over clients (each evaluated on the same held-out split)."]
    if plots and series:
        _plot(series, root / "comparison.png", f"{root.name}: three modes")
        lines += ["", "![comparison](comparison.png)"]
    (root / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table
