"""Studies whose measured tables go into docs/ (each: python -m fedllm.studies.<name>; its page: docs/results/)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any


def quiet_process() -> None:
    """A study's entry point: offline, no tokenizer threads, no warnings or Lightning chatter
    (process-wide settings belong to the entry point, ARCHITECTURE.md decision 9)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "fedllm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def study_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments every resumable study takes: where its parts and runs go, report-only, the docs page's block."""
    parser = argparse.ArgumentParser(prog=f"python -m fedllm.studies.{name}", description=(doc or "").split("\n")[0])
    parser.add_argument("--out", default=f"docs/{name}_study", help="folder for parts/, the .json, .md and .png")
    parser.add_argument("--runs", default=f"runs/{name}_study", help="folder for the run directories")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the recorded parts")
    parser.add_argument("--readme", help=f"also replace the {name}-study block of this Markdown page (docs/results/{name}.md)")
    return parser


def finished_run(path: Path, recipe) -> bool:
    """A finished run of the same recipe: its saved ``config.yaml`` parses to an equal recipe (fields
    added to fedllm since it ran take their defaults, which reproduce earlier runs)."""
    from fedllm.config import RecipeError, load_recipe  # noqa: PLC0415  (heavy imports only when running)

    if not ((path / "summary.json").is_file() and (path / "config.yaml").is_file()):
        return False
    try:
        return load_recipe(path / "config.yaml") == recipe
    except RecipeError:
        return False


def parts_folder(out: Path, quick: bool) -> Path:
    """Where a study's finished parts are recorded (quick ones apart, so they never replace full ones)."""
    return out / ("parts_quick" if quick else "parts")


def recorded(path: Path, recipe) -> dict[str, Any] | None:
    """The part saved at ``path`` when its ``recipe`` field parses to a recipe equal to ``recipe``, else
    None (fields added to fedllm since it ran take their defaults, which reproduce earlier runs)."""
    import yaml  # noqa: PLC0415  (heavy imports only when running)

    from fedllm.config import Recipe, RecipeError, build  # noqa: PLC0415

    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        return doc if build(Recipe, yaml.safe_load(doc.get("recipe", "")) or {}) == recipe else None
    except (RecipeError, yaml.YAMLError, TypeError):
        return None


def replace_block(readme: Path, start: str, end: str, block: str) -> None:
    """Replace the text from marker ``start`` to marker ``end`` (both included) with ``block``."""
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1], encoding="utf-8")


def machine_line() -> str:
    """CPU model, cores and Python: where a study's times were measured."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
