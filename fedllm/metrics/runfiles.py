"""A run directory's files as reports read them, checked first: a report is built from files that
may be cut short (a run killed mid-write), edited, or not fedllm's at all.

- ``metrics.jsonl``: a last line cut off mid-JSON (no final newline: a run killed while writing
  it) is skipped with a warning; any other line that is not a metrics row is a one-line
  :class:`~fedllm.config.RecipeError` naming ``file line N`` and what was expected.
- ``summary.json``, ``config.yaml``: unreadable or ill-typed files are one-line errors naming them.

A row must be one fedllm writes (:func:`~fedllm.federation.rundir.row_problem`): the required
fields, ``round`` a non-negative integer, ``mode`` a string, metrics numbers or null
(NaN/Infinity included: a diverged run's values are still values), counts non-negative integers.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from fedllm.config import RecipeError
from fedllm.errors import read_regular, read_regular_text
from fedllm.federation.rundir import is_count, is_number, row_problem

log = logging.getLogger(__name__)

SUMMARY_FIELDS = {"total_bytes_up": "count", "total_bytes_down": "count", "mean_round_time_s": "number",
                  "skipped_updates": "count"}


def read_rows(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The checked rows of ``path/metrics.jsonl`` (see the module docstring)."""
    file = path / "metrics.jsonl"
    try:
        data = read_regular(file)
    except OSError as exc:
        raise RecipeError(str(file), f"could not be read ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{file} line {i + 1}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            if i == last and not data.endswith(b"\n"):  # cut off while being written
                if warn:
                    log.warning("%s is cut off (a run stopped while writing it?); reporting the %d complete "
                                "rows before it", where, len(rows))
                continue
            why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
            raise RecipeError(where, f"{why}; expected one metrics object per line") from None
        if (why := row_problem(row)) is not None:
            raise RecipeError(where, why)
        rows.append(row)
    if not rows:
        raise RecipeError(str(file), "holds no metrics rows; expected one object (round, mode, ...) per line")
    return rows


def read_summary(path: Path) -> dict[str, Any]:
    """``path/summary.json`` checked for the fields a report shows; ``{}`` for an unfinished run."""
    file = path / "summary.json"
    if not file.exists():
        return {}
    try:
        summary = json.loads(read_regular_text(file))
    except OSError as exc:
        raise RecipeError(str(file), f"could not be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        summary = None
    if not isinstance(summary, dict):
        raise RecipeError(str(file), "not a JSON object; expected the summary fedllm writes at the end of a "
                          "run (delete it to report the run as unfinished)")
    for key, kind in SUMMARY_FIELDS.items():
        v = summary.get(key)
        if not (is_count(v) if kind == "count" else is_number(v)):
            want = "a non-negative integer" if kind == "count" else "a number"
            raise RecipeError(f"{file} {key}", f"expected {want}, got {v!r:.40}")
    if not isinstance(summary.get("name", ""), str):
        raise RecipeError(f"{file} name", f"expected a string, got {summary['name']!r:.40}")
    return summary


def read_targets(path: Path) -> list[float]:
    """``eval.targets`` of the run's resolved recipe (``config.yaml``), if any: accuracies in (0, 1]."""
    file = path / "config.yaml"
    if not file.exists():
        return []
    try:
        values = yaml.safe_load(read_regular_text(file))
    except OSError as exc:
        raise RecipeError(str(file), f"could not be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        raise RecipeError(str(file), "not valid YAML; expected the run's resolved recipe") from None
    group = values.get("eval") if isinstance(values, dict) else None
    targets = group.get("targets") if isinstance(group, dict) else None
    if targets is None:
        return []
    if not isinstance(targets, list) or not all(is_number(x) and 0 < x <= 1 for x in targets):
        raise RecipeError(f"{file} eval.targets", f"expected a list of accuracies in (0, 1], got {targets!r:.60}")
    return [float(x) for x in targets]


def finite(v: Any) -> bool:
    """A value a plot can draw."""
    return v is not None and math.isfinite(v)
