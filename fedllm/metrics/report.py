"""Reports built from run-directory files only (never from live training objects), so any past
run can be re-reported: ``report.md`` and PNG plots per mode, and the three-mode comparison."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import RecipeError
from fedllm.errors import read_regular_text
from fedllm.federation.rundir import naming, write_json_atomic, write_text_atomic
from fedllm.metrics.axes import amount_axis, loss_axis, round_axis
from fedllm.metrics.cost import cost_to_accuracy
from fedllm.metrics.labels import (
    client_label,
    column_digits,
    listed,
    per_client_table,
    read_client_names,
    row_client_names,
)
from fedllm.metrics.runfiles import finite, read_rows, read_summary, read_targets

OPTIONAL_COLUMNS = ("accuracy", "epsilon", "client_eval_loss_min", "client_eval_loss_max", "personal_eval_loss_min",
                    "personal_eval_loss_max", "lora_aggregation_error", "lora_truncation_error", "rejected_updates",
                    "failed_clients")

# One look per mode: colour, marker and line style all differ, so lines that coincide (federated
# and local often do early on) stay apart; hollow federated markers show the line drawn over them.
STYLES = {"federated": {"color": "#1f77b4", "marker": "o", "linestyle": "-", "markersize": 8,
                        "markerfacecolor": "none", "markeredgewidth": 1.8, "linewidth": 2.2},
          "centralized": {"color": "#d62728", "marker": "s", "linestyle": "--", "markersize": 5},
          "local": {"color": "#2ca02c", "marker": "^", "linestyle": ":", "markersize": 6, "linewidth": 2.2}}
EXTRA_STYLES = ({"color": "#9467bd", "marker": "D", "linestyle": "-."}, {"color": "#8c564b", "marker": "v", "linestyle": "-"})
ALPHA = 0.8


@dataclass(frozen=True)
class Panel:
    key: str  # a metrics.jsonl field, or "bytes" (cumulative bytes up + down)
    title: str
    ylabel: str


def _present(rows: list[dict], key: str) -> bool:
    """Whether any row has a real (non-null, non-zero for counts) value for ``key``."""
    return any(r.get(key) not in (None, 0) for r in rows)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def is_vision(series: dict[str, list[dict]]) -> bool:
    """A run is a classifier's when any row has an accuracy."""
    return any(r.get("accuracy") is not None for rows in series.values() for r in rows)


def panels(series: dict[str, list[dict]]) -> list[Panel]:
    """The panels a figure of these runs shows: eval loss; perplexity (LM) or accuracy (vision);
    BLEU when the run computed it (even if every value is 0); DP ε when spent; bytes; time."""
    rows = [r for rs in series.values() for r in rs]
    vision = is_vision(series)
    out = [Panel("eval_loss", "eval loss (lower is better)",
                 "cross-entropy" if vision else "NLL per response token")]
    if vision:
        out.append(Panel("accuracy", "accuracy (higher is better)", "accuracy"))
    else:
        out.append(Panel("perplexity", "perplexity (lower is better)", "exp(eval loss)"))
    if any(r.get("bleu") is not None for r in rows):
        out.append(Panel("bleu", "BLEU of greedy answers (higher is better)", "sacreBLEU (0-100)"))
    if _present(rows, "epsilon"):
        out.append(Panel("epsilon", "DP epsilon spent", "epsilon"))
    out.append(Panel("bytes", "communication so far (up + down)", "bytes, cumulative"))
    out.append(Panel("round_time_s", "time per round", "seconds"))
    return out


def _points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(round, value) of ``key``'s drawable values (NaN/Inf stay in the table, not on the axes)."""
    if key == "bytes":
        total, pts = 0, []
        for r in rows:
            total += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
            pts.append((r["round"], total))
        return pts
    if key == "round_time_s":  # round 0 is the initial evaluation, not a round of training
        return [(r["round"], r[key]) for r in rows if r["round"] > 0 and finite(r.get(key))]
    return [(r["round"], r[key]) for r in rows if finite(r.get(key))]


def _client_range(rows: list[dict], key: str) -> list[tuple[int, float, float]]:
    """(round, min, max) over a local run's per-client values of ``key``."""
    out = []
    for r in rows:
        vals = [c[key] for c in (r.get("per_client") or {}).values() if finite(c.get(key))]
        if vals:
            out.append((r["round"], min(vals), max(vals)))
    return out


def _label(name: str, rows: list[dict], vision: bool) -> str:
    last = rows[-1]
    key, what = ("accuracy", "accuracy") if vision else ("eval_loss", "eval loss")
    label = name if last.get(key) is None else f"{name}: final {what} {last[key]:.4f}"
    if last.get("per_client"):
        named = any("name" in c for c in last["per_client"].values())
        which = f": {listed(row_client_names(last))}" if named else ""
        label += f"\n(mean of {len(last['per_client'])} clients' own models{which})"
    return label


def _human_bytes(v: float, _pos=None) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:.0f} B"


def _draw(ax, panel: Panel, series: dict[str, list[dict]]) -> None:
    for i, (name, rows) in enumerate(series.items()):
        style = STYLES.get(name) or EXTRA_STYLES[i % len(EXTRA_STYLES)]
        pts = _points(rows, panel.key)
        if pts:
            ax.plot(*zip(*pts), alpha=ALPHA, label=name, **style)
        band = _client_range(rows, panel.key) if panel.key not in ("bytes", "round_time_s") else []
        if len(band) > 1 and any(lo != hi for _, lo, hi in band):
            xs, lo, hi = zip(*band)
            named = next((r for r in reversed(rows) if any("name" in c for c in (r.get("per_client") or {}).values())), None)
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.12, linewidth=0, label=f"{name}: range over "
                            f"clients{f' ({listed(row_client_names(named))})' if named else ''}")
    round_axis(ax, [r["round"] for rows in series.values() for r in rows])
    ax.set_xlabel("round")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(alpha=0.3)
    _limits(ax, panel, series)


def _limits(ax, panel: Panel, series: dict[str, list[dict]]) -> None:
    """Axes that read at a glance (:mod:`fedllm.metrics.axes`): accuracy on 0-1, amounts and BLEU
    from 0, an all-zero BLEU said in words, losses fitted to their curves rather than a client band."""
    from matplotlib.ticker import FuncFormatter

    lines = [v for rows in series.values() for _, v in _points(rows, panel.key)]
    top = max(lines, default=0.0)
    if panel.key == "accuracy":
        ax.set_ylim(0, 1)
    elif panel.key == "bleu":
        amount_axis(ax, top, "BLEU 0 in every round")
    elif panel.key in ("eval_loss", "perplexity"):
        band = [v for rows in series.values() for _, lo, hi in _client_range(rows, panel.key) for v in (lo, hi)]
        loss_axis(ax, lines, (min(band), max(band)) if band else None)
    elif panel.key in ("bytes", "round_time_s"):  # amounts: from 0, so sizes compare
        if panel.key == "bytes":
            ax.yaxis.set_major_formatter(FuncFormatter(_human_bytes))
        amount_axis(ax, top, "no client/server traffic in this mode" if panel.key == "bytes" else "no time")


def figure(series: dict[str, list[dict]], title: str):
    """The matplotlib figure of :func:`panels` for runs ``{name: metrics rows}``: one shared
    legend (with each run's final eval loss or accuracy), labelled axes, integer round ticks."""
    # a pyplot-free Figure: no backend is chosen or switched, so a notebook's inline figures keep working
    # after a run wrote its plots (forcing Agg here used to turn them off for the whole kernel)
    from matplotlib.figure import Figure

    shown = panels(series)
    ncols = min(len(shown), 3)
    nrows = -(-len(shown) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, shown):
        _draw(ax, panel, series)
    for ax in flat[len(shown):]:
        ax.set_visible(False)
    vision = is_vision(series)
    handles, names = [], []
    for ax in flat[: len(shown)]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    labels = [_label(n, series[n], vision) if n in series else n for n in names]
    spare = flat[len(shown):]
    if spare:  # the legend fills the first empty slot of the grid
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", frameon=False, title="held-out split")
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    fig.suptitle(title, fontweight="bold")
    return fig


def _plot(series: dict[str, list[dict]], out: Path, title: str) -> None:
    fig = figure(series, title)  # not registered with pyplot: nothing to close
    with naming(out):
        fig.savefig(out, dpi=110)


def write_report(path: Path, plots: bool = True) -> Path:
    """``report.md`` (+ ``metrics.png``) for one mode's run directory (its files checked:
    :mod:`fedllm.metrics.runfiles`)."""
    rows = read_rows(path)
    summary = read_summary(path)
    cols = ["round", "train_loss", "eval_loss", "perplexity", "bleu", "round_time_s", "bytes_up", "bytes_down"]
    cols += [c for c in OPTIONAL_COLUMNS if _present(rows, c)]
    lines = [f"# {summary.get('name', path.parent.name)} — {rows[0]['mode']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    if summary:
        lines += ["", f"Total bytes up {summary['total_bytes_up']:,}, down {summary['total_bytes_down']:,}; "
                  f"mean round time {summary['mean_round_time_s']:.2f} s; "
                  f"skipped updates {summary['skipped_updates']}."]
        final = summary.get("final", {})
        names = read_client_names(path)
        if names:  # partition natural: which column value each client id holds
            lines += ["", "Clients (partition.json): " + ", ".join(f"{k} = {n}" for k, n in enumerate(names)) + "."]
        if rows[-1].get("per_client"):
            lines += ["", "Each client's own model at the last round:", "",
                      *per_client_table(rows[-1], ("train_loss", "eval_loss", "perplexity", "bleu", "accuracy"), _fmt)]
        # eval.client_holdout: the final model(s) on each client's own held-out slice; personal models too
        for name, what in (("client_eval_loss", "Final eval loss on each client's own held-out slice"),
                           ("personal_eval_loss", "Each client's personal model on its own slice")):
            if final.get(name):
                lines += ["", f"{what}: " + ", ".join(f"{client_label(k, names)} {_fmt(v)}" for k, v in final[name].items())
                          + f" (min {_fmt(final.get(f'{name}_min'))}, max {_fmt(final.get(f'{name}_max'))})."]
    targets = read_targets(path)
    if summary and targets:  # HP-FL's cost-to-accuracy: rounds, bytes and client time to reach x
        summary["cost_to_accuracy"] = cost = cost_to_accuracy(rows, targets)
        write_json_atomic(path / "summary.json", summary)
        lines += ["", "| target accuracy | rounds (NRA) | bytes up+down (CCA) | client train s (CTA) |",
                  "|---|---|---|---|"]
        lines += [f"| {x} | {_fmt(c['rounds'])} | {_fmt(c['bytes'])} | {_fmt(c['train_time_s'])} |"
                  for x, c in cost.items()]
    if plots:
        name = summary.get("name", path.parent.name)
        _plot({rows[0]["mode"]: rows}, path / "metrics.png", f"{name}: {rows[0]['mode']} run, held-out split")
        lines += ["", "![metrics](metrics.png)"]
    write_text_atomic(path / "report.md", "\n".join(lines) + "\n")
    return path / "report.md"


def write_comparison(root: Path, modes: list[str], plots: bool = True) -> dict[str, Any]:
    """``comparison.{md,json,png}`` under ``<output.dir>/<name>/`` from each mode's files."""
    series = {m: read_rows(root / m, warn=False) for m in modes if (root / m / "metrics.jsonl").exists()}
    runs = {m: compare_invocation(root / m) for m in series}
    table = {}
    for mode, rows in series.items():
        first, last = rows[0], rows[-1]
        table[mode] = {"rounds": last["round"], "initial_eval_loss": first["eval_loss"],
                       "final_eval_loss": last["eval_loss"], "final_perplexity": last["perplexity"],
                       "final_bleu": last["bleu"], "final_accuracy": last.get("accuracy"),
                       "bytes_up": sum(r["bytes_up"] for r in rows),
                       "bytes_down": sum(r["bytes_down"] for r in rows),
                       "time_s": sum(r["round_time_s"] for r in rows), "invocation": runs[mode]}
    _add_ratios(root, table)
    write_json_atomic(root / "comparison.json", table)
    cols = ["rounds", "initial_eval_loss", "final_eval_loss", "final_perplexity", "final_bleu", "final_accuracy",
            "bytes_up", "bytes_down", "time_s"]
    cols = [c for c in cols if any(v[c] is not None for v in table.values())]
    lines = [f"# {root.name}: federated vs centralized vs local", "",
             "| mode | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    digits = {c: column_digits([v[c] for v in table.values()]) for c in cols}  # different values print differently
    lines += [f"| {m} | " + " | ".join(_fmt(v[c], digits[c]) for c in cols) + " |" for m, v in table.items()]
    lines += ["", "Local-only rows are means over clients (each evaluated on the same held-out split)."]
    if ratios := ratio_lines(table):
        lines += ["", "## Perplexity ratios (paired over the same held-out examples)", "", *ratios]
    if None in runs.values() or len(set(runs.values())) > 1:
        lines += ["", "**Stale comparison:** these modes do not all come from one `fedllm compare` (invocations "
                  + ", ".join(f"{m}: {i or 'unfinished or a single run'}" for m, i in runs.items())
                  + "); rerun `fedllm compare` before reading one against another."]
    if plots and series:
        _plot(series, root / "comparison.png", f"{root.name}: {' vs '.join(series)} on the same held-out split")
        lines += ["", "![comparison](comparison.png)"]
    write_text_atomic(root / "comparison.md", "\n".join(lines) + "\n")
    return table


# Each ratio: (mode, the mode it is divided by); federated / centralized is the price of federating,
# local / federated what federating buys a client.
RATIOS = (("federated", "centralized"), ("local", "federated"))


def _add_ratios(root: Path, table: dict[str, dict[str, Any]]) -> None:
    """Per mode row: its perplexity over its reference mode's, with the paired 95 % interval, from the
    per-example losses both runs wrote (``eval_nll.json``) on the same held-out examples; at the final
    round and, with a validation split, at each mode's best-validation round (``best_*``)."""
    from fedllm.federation.convergence import NLL_FILE, ratio_with_interval  # noqa: PLC0415

    nll = {}
    for mode in table:
        try:
            nll[mode] = json.loads(read_regular_text(root / mode / NLL_FILE))
        except (OSError, ValueError):
            nll[mode] = {}
    for mode, ref in RATIOS:
        if mode not in table or ref not in table:
            continue
        for when, prefix in (("final", ""), ("best", "best_")):
            a, b = nll[mode].get(when), nll[ref].get(when)
            if not (isinstance(a, dict) and isinstance(b, dict)):
                continue
            try:
                r = ratio_with_interval(a, b)
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                continue  # scored on different examples (or an old file): no paired ratio
            table[mode].update({f"{prefix}ppl_ratio_of": f"{mode}/{ref}", f"{prefix}ppl_ratio": r["ratio"],
                                f"{prefix}ppl_ratio_lo": r["lo"], f"{prefix}ppl_ratio_hi": r["hi"],
                                f"{prefix}ppl_ratio_examples": r["examples"]})


def ratio_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """One line per paired ratio in a comparison table (``comparison.md`` and ``fedllm compare``'s output)."""
    out = []
    for prefix, when in (("", "final round"), ("best_", "best-validation round of each")):
        for row in table.values():
            if not isinstance(row, dict) or row.get(f"{prefix}ppl_ratio") is None:
                continue
            lo, hi = row.get(f"{prefix}ppl_ratio_lo"), row.get(f"{prefix}ppl_ratio_hi")
            ci = f"95 % paired interval {lo:.4f}–{hi:.4f}" if lo is not None else "no interval (< 2 examples)"
            out.append(f"- {row[f'{prefix}ppl_ratio_of']} perplexity: {row[f'{prefix}ppl_ratio']:.4f} ({ci}; "
                       f"{row[f'{prefix}ppl_ratio_examples']} held-out examples, {when})")
    return out


def compare_invocation(run: Path) -> str | None:
    """The ``fedllm compare`` invocation a finished mode came from (None: unfinished or a lone run)."""
    summary = run / "summary.json"
    if not summary.exists():
        return None
    try:
        values = json.loads(read_regular_text(summary))
    except (OSError, ValueError, RecursionError):
        return None
    invocation = values.get("invocation") if isinstance(values, dict) else None
    return invocation if isinstance(invocation, str) else None


def rebuild(path: Path) -> list[Path]:
    """``fedllm report PATH``: rebuild a run directory's report, or a compare directory's
    comparison and each of its modes' reports. Any other path is a one-line error."""
    from fedllm.federation.modes import MODES

    if (path / "metrics.jsonl").is_file():
        return [write_report(path)]
    modes = [m for m in MODES if (path / m / "metrics.jsonl").is_file()]
    if not modes:
        what = "does not exist" if not path.exists() else "is not a directory" if not path.is_dir() else \
            "holds no metrics.jsonl"
        raise RecipeError(str(path), f"{what}; expected a run directory (with metrics.jsonl) or a compare "
                          f"directory (with {', '.join(f'{m}/' for m in MODES)} run folders)")
    for m in modes:  # every mode's files are checked before any report is rewritten
        read_rows(path / m, warn=False)
        read_summary(path / m)
    out = [write_report(path / m) for m in modes]
    write_comparison(path, modes)
    return [*out, path / "comparison.md"]
