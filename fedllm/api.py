"""The Python API: run, compare and read back recipes from a notebook or a script.

``fedllm.run`` and ``fedllm.compare`` do what ``fedllm run`` and ``fedllm compare`` do (the CLI calls
them), and return typed results read back from the run directory's files, as every report is
(ARCHITECTURE.md: reports read files), so ``fedllm.load_run`` on a past run gives the same object::

    import fedllm
    result = fedllm.run("recipes/tiny.yaml", "federation.rounds=1", out="runs/notebook")
    result.metrics            # pandas DataFrame, one row per evaluated round (round 0 included)
    result.final["perplexity"], result.adapter, result.figure()
    cmp = fedllm.compare("recipes/tiny.yaml", out="runs/notebook")
    cmp.table                 # the comparison: one row per mode

Unlike the CLI this module sets no process-wide state (logging, warnings, environment): that
stays in :mod:`fedllm.cli`. A run that ends with a result that cannot be trusted (nothing trained,
no round applied, a non-finite final loss) is returned with ``ok`` false and its ``status``; a bad
recipe raises :class:`~fedllm.config.RecipeError` with the CLI's one-line message.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.config import Recipe, RecipeError, apply_overrides, build, load_recipe

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

MODES = ("federated", "centralized", "local")


@dataclass(frozen=True)
class RunResult:
    """One mode's run directory, read from its files (``config.yaml``, ``metrics.jsonl``, ``summary.json``)."""

    dir: Path
    mode: str
    summary: dict[str, Any]  # summary.json; {} for an unfinished run (summary.json is written last)
    metrics: pd.DataFrame  # metrics.jsonl, one row per evaluated round
    config: dict[str, Any] = field(repr=False)  # the resolved recipe (config.yaml)
    rows: list[dict[str, Any]] = field(repr=False)  # metrics.jsonl as written (nested fields kept)

    @property
    def name(self) -> str:
        return self.summary.get("name") or self.config.get("name") or self.dir.parent.name

    @property
    def finished(self) -> bool:
        return bool(self.summary)

    @property
    def status(self) -> str:
        """``ok``, or why the result cannot be trusted (``unfinished`` when there is no summary.json)."""
        return self.summary.get("status", "ok") if self.summary else "unfinished"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def initial(self) -> dict[str, Any]:
        return self.summary.get("initial", self.rows[0])

    @property
    def final(self) -> dict[str, Any]:
        return self.summary.get("final", self.rows[-1])

    @property
    def adapter(self) -> Path | None:
        """The final adapter (``PeftModel.from_pretrained(base, adapter)``), if the run saved one."""
        return self.dir / "adapter" if (self.dir / "adapter").is_dir() else None

    @property
    def files(self) -> dict[str, Path]:
        """The run directory's contract files that exist (docs: the run directory)."""
        names = ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", "report.md", "metrics.png",
                 "adapter", "checkpoints", "samples")
        return {n: self.dir / n for n in names if (self.dir / n).exists()}

    @property
    def client_names(self) -> list[str] | None:
        """Each client id's name (``partition.json``: the partition column's value under ``natural``), else None."""
        from fedllm.metrics.labels import read_client_names

        return read_client_names(self.dir)

    def figure(self) -> Figure:
        """The report's plot of this run (the figure behind ``metrics.png``), for inline display."""
        from fedllm.metrics.report import figure

        return figure({self.mode: self.rows}, f"{self.name}: {self.mode} run, held-out split")


@dataclass(frozen=True)
class Comparison:
    """A ``compare`` directory: the three modes on one partition and the comparison table."""

    dir: Path
    runs: dict[str, RunResult]
    table: pd.DataFrame  # comparison.json: one row per mode (index ``mode``)

    @property
    def metrics(self) -> pd.DataFrame:
        """Every mode's metrics rows in one frame (the ``mode`` column tells them apart)."""
        import pandas as pd

        return pd.concat([r.metrics for r in self.runs.values()], ignore_index=True)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs.values())

    @property
    def files(self) -> dict[str, Path]:
        names = ("comparison.md", "comparison.json", "comparison.png")
        return {n: self.dir / n for n in names if (self.dir / n).exists()}

    def figure(self) -> Figure:
        """The comparison plot (the figure behind ``comparison.png``), for inline display."""
        from fedllm.metrics.report import figure

        series = {m: r.rows for m, r in self.runs.items()}
        return figure(series, f"{self.dir.name}: {' vs '.join(series)} on the same held-out split")


def load_run(path: str | Path) -> RunResult:
    """A run directory (``<out>/<name>/<mode>``) read from its files; its files are checked as
    ``fedllm report`` checks them (one-line :class:`RecipeError` naming the file otherwise)."""
    import pandas as pd
    import yaml

    from fedllm.metrics.runfiles import read_rows, read_summary

    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        hint = "; a compare directory: use fedllm.load_comparison" if any(
            (path / m / "metrics.jsonl").is_file() for m in MODES) else ""
        raise RecipeError(str(path), f"holds no metrics.jsonl; expected a run directory{hint}")
    rows = read_rows(path, warn=False)
    summary = read_summary(path)
    config_file = path / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        raise RecipeError(str(config_file), "not readable YAML; expected the run's resolved recipe") from None
    return RunResult(dir=path, mode=rows[0]["mode"], summary=summary, metrics=pd.DataFrame(rows),
                     config=config if isinstance(config, dict) else {}, rows=rows)


def load_comparison(path: str | Path) -> Comparison:
    """A compare directory (``<out>/<name>``): each finished mode's run and ``comparison.json``."""
    import json

    import pandas as pd

    path = Path(path)
    runs = {m: load_run(path / m) for m in MODES if (path / m / "metrics.jsonl").is_file()}
    if not runs:
        raise RecipeError(str(path), f"holds no {', '.join(f'{m}/' for m in MODES)} run folders; "
                          "expected a compare directory (<out>/<name>)")
    file = path / "comparison.json"
    if file.is_file():
        table = pd.DataFrame.from_dict(json.loads(file.read_text(encoding="utf-8")), orient="index")
    else:
        table = pd.DataFrame()
    table.index.name = "mode"
    return Comparison(dir=path, runs=runs, table=table)


def resolve(recipe: str | Path | Recipe, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """A recipe from a YAML path or a :class:`Recipe`, with dotted overrides applied and checked."""
    if isinstance(recipe, Recipe):
        return build(Recipe, apply_overrides(recipe.to_dict(), list(overrides))) if overrides else recipe
    return load_recipe(recipe, list(overrides))


def run(recipe: str | Path | Recipe, *overrides: str, out: str | Path | None = None, mode: str | None = None,
        resume: bool = False, engine: str | None = None, progress: bool = True) -> RunResult:
    """Train one mode of a recipe (``fedllm run``): ``mode`` defaults to the recipe's ``mode``,
    ``out`` to its ``output.dir``; ``resume`` continues the run from its last checkpoint (federated
    and centralized: after its last round; local: after its last finished client);
    ``engine="flower"`` runs the federated mode on Flower's simulation runtime. Returns the run
    directory read back from its files."""
    if engine is not None:
        overrides = (*overrides, f"federation.engine={engine}")
    recipe = resolve(recipe, overrides)
    mode = mode or recipe.mode
    if mode not in MODES:
        raise RecipeError("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    out = None if out is None else str(out)
    if recipe.federation.engine == "flower" and mode == "federated":
        _run_flower(recipe, out, resume)
    else:
        _run_modes(recipe, [mode], out, resume, progress=progress)
    return load_run(_mode_dir(recipe, mode, out))


def compare(recipe: str | Path | Recipe, *overrides: str, out: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> Comparison:
    """Train the three modes on one partition (``fedllm compare``) and write
    ``comparison.{md,json,png}``; returns the compare directory read back from its files.

    ``resume`` continues an interrupted compare: each mode that finished in it with this very recipe
    is kept as it is, the others continue from their last checkpoint, and all three keep the
    interrupted compare's invocation (so the comparison is not stale)."""
    from fedllm.metrics.report import write_comparison

    recipe = resolve(recipe, overrides)
    out = None if out is None else str(out)
    root = Path(out or recipe.output.dir) / recipe.name
    for old in ("comparison.md", "comparison.json", "comparison.png"):  # never beside half-new modes
        (root / old).unlink(missing_ok=True)
    invocation, done = _resumable_compare(recipe, out) if resume else (None, [])
    _run_modes(recipe, [m for m in MODES if m not in done], out, resume=resume,
               invocation=invocation or uuid.uuid4().hex[:12], progress=progress)
    write_comparison(root, list(MODES), recipe.output.plots)
    return load_comparison(root)


def _resumable_compare(recipe: Recipe, out: str | None) -> tuple[str | None, list[str]]:
    """(the interrupted compare's invocation, the modes it finished with ``recipe``): the modes that
    finished in one compare, when their run files hold this recipe; (None, []) when there is none."""
    from fedllm.config import dump_recipe
    from fedllm.errors import read_regular_text
    from fedllm.metrics.report import compare_invocation

    dirs = {m: _mode_dir(recipe, m, out) for m in MODES}
    stamps = {m: compare_invocation(d) for m, d in dirs.items()}
    marks = {s for s in stamps.values() if s is not None}
    if len(marks) != 1:  # none finished, or modes of different compares: each mode resumes on its own, new stamp
        return None, []
    mine = dump_recipe(recipe)

    def same_recipe(d: Path) -> bool:
        try:
            return read_regular_text(d / "config.yaml") == mine
        except (OSError, UnicodeDecodeError):
            return False

    done = [m for m, s in stamps.items() if s is not None and same_recipe(dirs[m])]
    return (marks.pop(), done) if done else (None, [])


def _progress(enabled: bool):
    """rich progress bars. In Jupyter, rich draws live bars only through ipywidgets (without it: no
    bars), and its stdout/stderr redirection recursed there when a library's tqdm bar wrote: off.
    Output that is not a terminal (a log file, a pipe) gets none: rich would print the bars' last
    state there once, at the end."""
    import importlib.util

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    jupyter = console.is_jupyter
    if jupyter and importlib.util.find_spec("ipywidgets") is None:
        enabled = False
    if not jupyter and not console.is_terminal:
        enabled = False
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, redirect_stdout=not jupyter, redirect_stderr=not jupyter)


def _run_modes(recipe: Recipe, modes: list[str], out: str | None, resume: bool = False,
               invocation: str | None = None, progress: bool = True) -> dict[str, dict]:
    from fedllm.experiments import make_experiment
    from fedllm.federation.modes import RUNNERS
    from fedllm.federation.progress import StepProgress
    from fedllm.metrics.report import write_report

    summaries = {}
    with _progress(progress) as bars:
        setup = bars.add_task("loading model and data", total=None)
        exp = make_experiment(recipe)
        bars.remove_task(setup)
        steps = StepProgress(bars)
        exp.step_callbacks.append(steps)
        for mode in modes:
            rounds = bars.add_task(f"{mode}: rounds", total=recipe.federation.rounds)
            hooks = _bar_hooks(bars, steps, mode, rounds)
            summaries[mode] = RUNNERS[mode](exp, out, hooks, resume=resume)
            if invocation is not None:  # which `fedllm compare` this mode's files come from
                _stamp(_mode_dir(recipe, mode, out), summaries[mode], invocation)
            bars.update(rounds, completed=recipe.federation.rounds)
            write_report(_mode_dir(recipe, mode, out), recipe.output.plots)
    return summaries


def _bar_hooks(bars, steps, mode: str, rounds_task):
    """The hooks that drive a mode's two bars: its rounds (local mode: each client's rounds in turn)
    and :class:`~fedllm.federation.progress.StepProgress` (what runs now: whose steps, which evaluation)."""
    from fedllm.federation.modes import Hooks

    now = {"round": 0, "client": None}

    def where(r: int) -> str:
        return f"client {now['client']}, round {r}" if mode == "local" and now["client"] is not None else f"round {r}"

    def on_round(r: int, total: int) -> None:
        now["round"] = r
        bars.update(rounds_task, completed=r - 1, total=total)
        steps.label(f"{mode}: {where(r)} steps")

    def on_client(k: int) -> None:
        now["client"] = k
        if mode == "local":  # each client trains all its rounds alone: the rounds bar is this client's
            bars.reset(rounds_task, description=f"local: client {k} rounds")
        else:
            steps.label(f"{mode}: round {now['round']}, client {k} steps")

    return Hooks(on_round, on_client, on_eval=lambda r: steps.label(f"{mode}: evaluating {where(r)}"))


def _stamp(run_path: Path, summary: dict, invocation: str) -> None:
    from fedllm.federation.rundir import write_json_atomic

    summary["invocation"] = invocation
    write_json_atomic(run_path / "summary.json", summary)


def _run_flower(recipe: Recipe, out: str | None, resume: bool) -> dict:
    """The federated mode on Flower's simulation runtime (fedllm.federation.flower), then its report."""
    from fedllm.data.text import check_data_path
    from fedllm.federation.flower.run_config import TELEMETRY_OFF  # light: no flwr yet

    check_data_path(recipe.data)  # a FIFO as data: one line now, not after Flower and Ray have started
    for k, v in TELEMETRY_OFF.items():  # before flwr is imported (it reads them at import), and for Ray
        os.environ.setdefault(k, v)
    from fedllm.federation.flower.simulation import run_simulation
    from fedllm.metrics.report import write_report

    summary = run_simulation(recipe, out, resume=resume)
    write_report(_mode_dir(recipe, "federated", out), recipe.output.plots)
    return summary


def _mode_dir(recipe: Recipe, mode: str, out: str | None) -> Path:
    from fedllm.federation.rundir import run_dir

    return run_dir(recipe, mode, out)
