"""Plots that read at a glance, and ``fedllm report`` on run and compare directories (files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.metrics.report import figure, panels, rebuild

MODES = ("federated", "centralized", "local")


def _rows(mode: str, rounds: int = 3, vision: bool = False, bleu: float | None = 0.0,
          epsilon: bool = False) -> list[dict]:
    rows = []
    for r in range(rounds + 1):
        loss = 2.3 - 0.1 * r * (2 if mode == "centralized" else 1)
        row = {"round": r, "mode": mode, "train_loss": None if r == 0 else loss + 0.1, "eval_loss": loss,
               "perplexity": 2.718 ** loss, "bleu": None if vision else bleu,
               "accuracy": 0.1 + 0.05 * r if vision else None, "round_time_s": 0.0 if r == 0 else 1.5,
               "train_time_s": 0.0, "aggregate_time_s": 0.0, "eval_time_s": 0.1,
               "bytes_up": 1000 * (r > 0) if mode == "federated" else 0,
               "bytes_down": 1000 * (r > 0) if mode == "federated" else 0,
               "clients": [] if r == 0 else [0, 1]}
        if epsilon:
            row["epsilon"] = 0.5 * r
        if mode == "local":
            row["per_client"] = {"0": {"eval_loss": loss - 0.05, "perplexity": 1.0, "bleu": bleu},
                                 "1": {"eval_loss": loss + 0.05, "perplexity": 1.0, "bleu": bleu}}
        rows.append(row)
    return rows


def _keys(series) -> list[str]:
    return [p.key for p in panels(series)]


def test_lm_panels_show_bleu_even_when_every_value_is_zero():
    assert _keys({"federated": _rows("federated", bleu=0.0)}) == [
        "eval_loss", "perplexity", "bleu", "bytes", "round_time_s"]
    assert "bleu" not in _keys({"federated": _rows("federated", bleu=None)})  # BLEU not computed
    assert "epsilon" in _keys({"federated": _rows("federated", epsilon=True)})


def test_vision_panels_have_accuracy_not_perplexity():
    keys = _keys({m: _rows(m, vision=True) for m in MODES})
    assert keys == ["eval_loss", "accuracy", "bytes", "round_time_s"]


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison]


def test_figure_reads_without_the_table():
    import matplotlib.pyplot as plt

    series = {m: _rows(m, rounds=3) for m in MODES}
    fig = figure(series, "demo: federated vs centralized vs local")
    try:
        axes = _visible_axes(fig)
        assert len(axes) == len(panels(series))
        for ax in axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks  # whole rounds only
            assert ax.get_xlabel() == "round" and ax.get_ylabel() and ax.get_title()
        assert fig.get_suptitle() == "demo: federated vs centralized vs local"
        legend = next(a.get_legend() for a in fig.axes if a.get_legend() is not None)
        texts = [t.get_text() for t in legend.get_texts()]
        assert any(t.startswith("federated: final eval loss 2.0000") for t in texts), texts
        assert any(t.startswith("local") and "mean of 2 clients" in t for t in texts), texts
        # each mode is told apart by colour, marker AND line style, and drawn translucent
        lines = {ln.get_label(): ln for ln in axes[0].get_lines()}
        looks = [(lines[m].get_color(), lines[m].get_marker(), lines[m].get_linestyle()) for m in MODES]
        for i in range(3):
            assert len({look[i] for look in looks}) == 3, looks
        assert all(0 < lines[m].get_alpha() < 1 for m in MODES)
        # cumulative bytes: federated sends 2 kB a round
        bytes_ax = axes[[p.key for p in panels(series)].index("bytes")]
        fed = next(ln for ln in bytes_ax.get_lines() if ln.get_label() == "federated")
        assert list(fed.get_ydata()) == [0, 2000, 4000, 6000]
        time_ax = axes[-1]
        assert list(next(iter(time_ax.get_lines())).get_xdata()) == [1, 2, 3]  # round 0 trains nothing
    finally:
        plt.close(fig)


def test_vision_accuracy_axis_is_zero_to_one():
    import matplotlib.pyplot as plt

    series = {"federated": _rows("federated", vision=True)}
    fig = figure(series, "vision")
    try:
        acc = _visible_axes(fig)[_keys(series).index("accuracy")]
        assert acc.get_ylim() == (0.0, 1.0)
    finally:
        plt.close(fig)


def _write_run(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_rebuilds_a_compare_directory(tmp_path, capsys):
    root = tmp_path / "demo"
    for m in MODES:
        _write_run(root / m, _rows(m))
    assert main(["report", str(root)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(root / m / "report.md") for m in MODES] + [str(root / "comparison.md")]
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (root / name).stat().st_size > 0
    for m in MODES:
        assert (root / m / "metrics.png").stat().st_size > 0
        assert (root / m / "report.md").read_text().startswith(f"# demo — {m}")
    assert set(json.loads((root / "comparison.json").read_text())) == set(MODES)


def test_report_on_one_run_directory(tmp_path):
    _write_run(tmp_path / "demo" / "federated", _rows("federated"))
    assert rebuild(tmp_path / "demo" / "federated") == [tmp_path / "demo" / "federated" / "report.md"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "a_file", "garbled", "no_rows"])
def test_report_on_a_non_run_path_is_one_line(tmp_path, capsys, case):
    path = tmp_path / case
    if case == "empty_dir":
        path.mkdir()
    elif case == "a_file":
        path.write_text("hello")
    elif case in ("garbled", "no_rows"):
        path.mkdir()
        (path / "metrics.jsonl").write_text("{not json\n" if case == "garbled" else "\n")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedllm: error: {path}") and "Errno" not in err, err
    assert "expected" in err
