"""Loading a recipe: YAML in, typed and validated groups out, by walking the dataclasses (a new field
needs no parser code); ``key=value`` overrides; the reverse (:func:`dump_recipe`) and the field docs
(:func:`explain`)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fedllm import recipe_paths
from fedllm.config.fields import RecipeError, _show
from fedllm.config.groups import Recipe
from fedllm.errors import read_regular_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- generic loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(where, f"expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if _is_number(value) and value not in typing.get_args(tp) and str(value) in typing.get_args(tp):
            return str(value)  # `precision=32` (an override or unquoted YAML) reads 32 as an int: its text names it
        if value in typing.get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return _coerce(float(value), tp, where)  # `1e-4`: YAML 1.1 reads it as a string; users write it so
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else math.inf  # float(10**400) would overflow
        if not math.isfinite(number):
            raise RecipeError(where, f"expected a finite number, got {_show(value)}")
        return number
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")


def _is_number(value: Any) -> bool:
    """An int or float scalar (not a bool): what YAML makes of an unquoted ``32`` or ``0.5``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4, 2E5, .5e3: no dot needed


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming unknown keys and the nearest valid one."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {'.'.join(filter(None, [where, near[0]]))!r}?" if near else ""
            raise RecipeError(path, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}.{name}" if where else name, "required field is missing")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:  # a check outside the RecipeError helpers
        raise RecipeError(where or cls.__name__, str(exc)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(text, "expected an override of the form group.field=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(text, "expected an override of the form group.field=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        value = raw  # not YAML: keep the text (the field's type check then names it)
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a raw recipe mapping (returns a new mapping)."""
    out = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(".".join(path), f"{part!r} is not a group")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping, with one-line errors for missing or malformed files."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(str(path), "recipe file not found")
    try:  # a FIFO or a device is refused unread (NotRegularFile, an OSError), never waited on
        values = yaml.safe_load(read_regular_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{line}", f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), "not a UTF-8 text file") from None
    except (ValueError, OverflowError) as exc:  # e.g. an invalid date or a 5,000-digit integer
        raise RecipeError(str(path), f"not valid YAML ({exc})") from None
    except RecursionError:
        raise RecipeError(str(path), "not valid YAML (nested too deeply)") from None
    except OSError as exc:
        raise RecipeError(str(path), f"could not be read ({exc.strerror or exc})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(str(path), f"expected a mapping of recipe groups, got {type(values).__name__}")
    return values


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe. Relative data/model paths in the file resolve from the
    recipe's folder, those of ``overrides`` from the working directory (:mod:`fedllm.recipe_paths`)."""
    try:
        values = read_yaml(path)
        anchored = recipe_paths.anchor(values, Path(path).resolve().parent)
        values = apply_overrides(values, overrides or [])
        anchored.update(recipe_paths.anchor(values, Path.cwd(), command_line=True))  # still relative: typed here
        if (problem := recipe_paths.missing(values, anchored)) is not None:
            raise RecipeError(*problem)
        values.setdefault("name", Path(path).stem)
        return build(Recipe, values)
    except RecursionError:
        raise RecipeError(str(path), "a value is nested too deeply") from None


def explain(obj: Any, prefix: str = "") -> list[str]:
    """One line per field of a (resolved) recipe: ``group.field = value  # doc``."""
    lines = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"{name}:  # {f.metadata.get('doc', '')}")
            lines += explain(value, name + ".")
        else:
            lines.append(f"{'  ' if prefix else ''}{name} = {_show(value, 40)}  # {f.metadata.get('doc', '')}")
    return lines


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to each run directory as config.yaml)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
