"""What reports print for clients and numbers: client names, and table cells that keep values apart.

Client names: a ``natural`` partition records each client's column value(s) in ``partition.json``
(``client_names``, one per integer client id; ids stay the key in every file). A local run's metrics
rows carry the name beside each client's numbers (``per_client[k].name``), so its plot reads them
from the rows alone; reports of other modes read ``partition.json``. Runs without names (other
partition methods, runs written before names existed) show ``client k``.

Numbers: a table column prints floats with as many significant digits as it takes for values that
differ to print differently (at least ``MIN_DIGITS``): perplexities 10.775 and 10.774 must not both
read 10.77.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedllm.errors import read_regular_text

MIN_DIGITS, MAX_DIGITS = 4, 12
SHOWN_NAMES = 8  # a plot legend lists at most this many client names


def read_client_names(path: Path) -> list[str] | None:
    """``client_names`` of ``path/partition.json`` (None when absent, unreadable or ill-typed: the
    report then shows client ids, as it did before names existed)."""
    try:
        names = json.loads(read_regular_text(path / "partition.json")).get("client_names")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def client_label(k: Any, names: list[str] | None) -> str:
    """``north`` for client id ``k`` (an int or its string) when named, else ``client k``."""
    try:
        return names[int(k)] if names and 0 <= int(k) < len(names) else f"client {k}"
    except (TypeError, ValueError):
        return f"client {k}"


def row_client_names(row: dict[str, Any]) -> list[str]:
    """The names a local run's metrics row carries in ``per_client`` (client ids where unnamed)."""
    per_client = row.get("per_client") or {}
    return [c["name"] if isinstance(c.get("name"), str) else f"client {k}" for k, c in per_client.items()]


def listed(names: list[str], width: int = 72) -> str:
    """``a, b, c`` for a legend: at most :data:`SHOWN_NAMES` names and about ``width`` characters
    (merged names such as ``a+b+c`` can be long), then how many more."""
    shown: list[str] = []
    for i, name in enumerate(names):
        name = name if len(name) <= width else name[: width - 3] + "..."
        if i >= SHOWN_NAMES or (shown and len(", ".join([*shown, name])) > width):
            return ", ".join(shown) + f" and {len(names) - i} more"
        shown.append(name)
    return ", ".join(shown)


def column_digits(values: list[Any]) -> int:
    """Significant digits at which the distinct finite floats of a column print distinctly."""
    floats = {v for v in values if isinstance(v, float) and math.isfinite(v)}
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        if len({f"{v:.{digits}g}" for v in floats}) == len(floats):
            return digits
    return MAX_DIGITS


def per_client_table(row: dict[str, Any], keys: tuple[str, ...], fmt) -> list[str]:
    """Markdown rows of a local run's last ``per_client`` entry: client id, name and ``keys``."""
    per_client = row.get("per_client") or {}
    keys = tuple(k for k in keys if any(c.get(k) is not None for c in per_client.values()))
    digits = {k: column_digits([c.get(k) for c in per_client.values()]) for k in keys}
    lines = ["| client | name | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for k, c in per_client.items():
        name = c.get("name") if isinstance(c.get("name"), str) else "–"
        lines.append(f"| {k} | {name} | " + " | ".join(fmt(c.get(key), digits[key]) for key in keys) + " |")
    return lines
