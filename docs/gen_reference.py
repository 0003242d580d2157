"""The generated reference pages: every recipe field and every CLI command, never hand-copied.

Used two ways:

- as an mkdocs hook (``hooks: [docs/gen_reference.py]`` in mkdocs.yml): ``reference/recipe.md`` and
  ``reference/cli.md`` are added to the site at build time; and pages that link from the repository
  root (the study blocks the study CLIs render, ``![...](docs/x.png)``) get their links made
  relative to the page;
- as a script: ``python docs/gen_reference.py recipe|cli`` prints a page.

The recipe page reads the same source as ``fedllm validate --explain`` (:func:`fedllm.config.explain`):
each field's one-line ``doc`` metadata, its annotation (named by the loader's own ``_type_name``, as
its error messages name it) and its default. The CLI page is each sub-command's argparse help.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import sys
import typing
from pathlib import Path
from typing import Any

PAGES = {"reference/recipe.md": "recipe", "reference/cli.md": "cli"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(group)"
    return f"`{value!r}`" if value is not None else "`null`"


def _rows(cls: type, prefix: str = "") -> tuple[list[str], list[tuple[str, type, str]]]:
    """Table rows for ``cls``'s plain fields, and its nested groups (name, class, doc)."""
    from fedllm.config import _type_name

    hints = typing.get_type_hints(cls)
    rows, groups = [], []
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(hints[f.name]):
            groups.append((f"{prefix}{f.name}", hints[f.name], doc))
            continue
        rows.append(f"| `{prefix}{f.name}` | {_cell(_type_name(hints[f.name]))} | {_cell(_default(f))} | {_cell(doc)} |")
    return rows, groups


def recipe_page() -> str:
    """Every recipe field: name, type, default, meaning (the dataclasses of :mod:`fedllm.config`)."""
    from fedllm.config import Recipe

    head = "| field | type | default | meaning |\n|---|---|---|---|"
    top, groups = _rows(Recipe)
    out = ["# Recipe reference", "",
           "Generated from the recipe dataclasses in `fedllm/config/groups.py` — the same one-line docs "
           "`fedllm validate --explain RECIPE` prints next to a recipe's values. A recipe is YAML; "
           "any field can be overridden on the command line as `group.field=value` "
           "(`fedllm run recipes/tiny.yaml federation.rounds=3 lora.r=8`). Unknown keys are refused "
           "with the nearest valid one; combinations that cannot work are refused by name.", "",
           "## Top level", "", head, *top]
    while groups:
        name, cls, doc = groups.pop(0)
        rows, inner = _rows(cls, f"{name}.")
        out += ["", f"## {name}", "", f"{doc[:1].upper()}{doc[1:]} (`{cls.__name__}`).", "", head, *rows]
        groups = inner + groups
    return "\n".join(out) + "\n"


def _sub_parsers(parser) -> dict[str, Any]:
    import argparse

    for action in parser._actions:  # argparse keeps sub-commands in its one _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    """``fedllm --help`` and each sub-command's help, and the exit codes from the CLI's docstring."""
    import fedllm.cli as cli

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: make the page the same everywhere
    try:
        parser = cli._parser()
        out = ["# CLI reference", "",
               "Generated from the `fedllm` command's argument parser (`fedllm/cli.py`). "
               "`fedllm COMMAND --help` prints the same.", "", "```text", parser.format_help().strip(), "```"]
        for name, sub in _sub_parsers(parser).items():
            out += ["", f"## fedllm {name}", "", "```text", sub.format_help().strip(), "```"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    codes = cli.__doc__.split("Exit codes:", 1)[1].strip()
    out += ["", "## Exit codes", "", "From `fedllm/cli.py`:", "", codes]
    return "\n".join(out) + "\n"


def render(kind: str) -> str:
    return {"recipe": recipe_page, "cli": cli_page}[kind]()


# ----------------------------------------------------------------------------- mkdocs hooks


def on_files(files, config):
    """Add the generated reference pages to the site (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    for uri, kind in PAGES.items():
        files.append(File.generated(config, uri, content=render(kind)))
    return files


_ROOT_LINK = re.compile(r"(\]\()docs/")


def on_page_markdown(markdown, page, config, files):
    """Links written from the repository root (``](docs/...)``, as the study blocks are rendered for
    any page the studies' ``--readme`` names) made relative to this page."""
    up = posixpath.relpath(".", posixpath.dirname(page.file.src_uri) or ".")
    return _ROOT_LINK.sub(lambda m: f"{m.group(1)}{'' if up == '.' else up + '/'}", markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(render(sys.argv[1] if len(sys.argv) > 1 else "recipe"), end="")
