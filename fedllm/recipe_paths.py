"""Where the relative paths of a recipe point: a recipe file's from its own folder, an override's
from the working directory.

A recipe travels with its data (``recipes/byo_data.yaml`` next to ``data/``), so a relative
``data.path`` in the file means the same file whatever folder ``fedllm`` is started from, as a
relative include does in a Makefile or a compose file. A value typed on the command line
(``data.path=my.jsonl``) is read from the working directory, as every shell argument is. Both
become absolute paths in the loaded recipe, so the ``config.yaml`` a run writes names the same
files when it is read back from the run directory (``fedllm export``, ``--resume``).

This module knows the fields and the two anchors; :func:`fedllm.config.load_recipe` applies it
and raises the one-line error, which names the absolute path tried and why there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The recipe fields that name files or folders on this machine (group, field, what it names).
PATH_FIELDS = (("data", "path", "data file"), ("data", "root", "data folder"), ("model", "path", "model path"))


Anchored = dict[str, tuple[str, Path, bool]]  # field -> (value as written, the folder it was read from, from the command line)


def anchor(values: dict[str, Any], base: Path, command_line: bool = False) -> Anchored:
    """Make each relative path field of ``values`` absolute from ``base`` (in place; ``~`` expanded).
    Returns ``{"group.field": (the value as written, base, command_line)}`` for the ones it changed."""
    changed = {}
    for group, key, _ in PATH_FIELDS:
        node = values.get(group)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user that does not exist: left as written, and then not found
            path = Path(value)
        if not path.is_absolute():
            node[key] = str(Path(os.path.normpath(base / path)))
            changed[f"{group}.{key}"] = (value, base, command_line)
    return changed


def missing(values: dict[str, Any], anchored: Anchored) -> tuple[str, str] | None:
    """(field, message) for the first relative path field naming nothing on disk: the absolute path
    tried, which folder it was read from, and a path that would work when the file is where the
    working directory would have found it."""
    for group, key, what in PATH_FIELDS:
        node = values.get(group)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip() or _exists(value):
            continue
        name = f"{group}.{key}"
        if name not in anchored:  # written absolute: the field's own check names it
            continue
        written, base, command_line = anchored[name]
        if command_line:
            return name, (f"{what} {written!r} not found at {value} (a path given on the command line is read "
                          f"from the working directory, {base})")
        hint = ""
        if _exists(str(Path.cwd() / written)):  # the recipe was written for another working directory
            hint = (f"; it exists from the working directory: write {os.path.relpath(Path.cwd() / written, base)!r} "
                    "or an absolute path")
        return name, (f"{what} {written!r} not found at {value} (a relative path in a recipe file is read "
                      f"from the recipe's folder, {base}){hint}")
    return None


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # e.g. a NUL byte: nothing on disk has that name
        return False
