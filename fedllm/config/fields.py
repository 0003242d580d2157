"""What every recipe group is made of: fields that carry a one-line doc, range checks that raise
:class:`RecipeError` (``<dotted field>: <what was expected>``, always one line)."""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import field
from typing import Any


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x85``, ...)."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch
                   for ch in text)


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for error messages (a huge value must not flood the one-line error)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit str limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeError(ValueError):
    """A recipe problem, reported to the user as one line: ``<where>: <what was expected>``.

    Both parts come from user input (keys, values, file names), so line breaks and control
    characters in them are escaped: the message is always exactly one line.
    """

    def __init__(self, where: str, message: str) -> None:
        where = one_line(str(where))
        super().__init__(f"{where}: {one_line(str(message))}")
        self.where = where


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with a one-line doc string (shown by ``fedllm validate --explain``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def require(cond: bool, where: str, message: str) -> None:
    """Raise RecipeError(where, message) unless ``cond`` (the one-line recipe error every check uses)."""
    if not cond:
        raise RecipeError(where, message)
