"""Recipes: typed, frozen, validated configuration groups loaded from YAML.

A recipe is a YAML file whose top-level keys are the groups below. Each group is a frozen
dataclass; every field carries a one-line doc (its ``metadata["doc"]``) and range checks live in
``__post_init__``. Loading walks the dataclasses generically, so a new field needs no parser code.

Every problem raises :class:`RecipeError` naming the dotted field (or file) and what was expected;
the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise RecipeError(where, message)


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["smollm2-135m", "tiny"] = doc("built-in model: SmolLM2-135M-Instruct or a tiny random llama", "smollm2-135m")
    path: str | None = doc("local Hugging Face model directory; overrides the preset's weights", None)
    quantization: Literal["nf4", "none"] = doc("load the base in 4-bit NF4 (bitsandbytes) or full precision", "nf4")
    device: Literal["auto", "cpu", "cuda"] = doc("where to train; auto picks CUDA when present", "auto")

    def __post_init__(self) -> None:
        if self.path is not None:
            _check(self.path.strip() != "" and Path(self.path).is_dir(), "model.path",
                   f"directory {self.path!r} does not exist")


@dataclass(frozen=True)
class LoraConfig:
    r: int = doc("LoRA rank", 8)
    alpha: float = doc("LoRA alpha (scaling = alpha / r)", 16.0)
    dropout: float = doc("dropout on the LoRA branch", 0.1)
    target_modules: list[str] = doc("module names that get adapters", ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        _check(1 <= self.r <= 1024, "lora.r", f"expected an integer in [1, 1024], got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"expected > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"expected in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "expected at least one module name")


@dataclass(frozen=True)
class DataConfig:
    builtin: Literal["coralmap"] | None = doc("built-in demo corpus (instruction pairs built from an installed package)", None)
    path: str | None = doc("JSONL, CSV, parquet file or a saved `datasets` directory", None)
    prompt_field: str = doc("column with the user prompt", "prompt")
    response_field: str = doc("column with the reference response", "response")
    messages_field: str | None = doc("column with a chat `messages` list (overrides prompt/response)", None)
    system_prompt: str | None = doc("system message prepended to every conversation", None)
    max_length: int = doc("truncate tokenized examples to this many tokens", 256)
    max_examples: int | None = doc("use at most this many examples (seeded subsample)", None)
    eval_size: int = doc("held-out evaluation examples (taken before partitioning)", 32)
    bad_rows: Literal["error", "skip"] = doc("a row with a missing/empty field: stop with its line, or skip and count", "error")

    def __post_init__(self) -> None:
        _check((self.builtin is None) != (self.path is None), "data",
               "set exactly one of data.builtin or data.path")
        if self.path is not None:
            _check(self.path.strip() != "" and Path(self.path).exists(), "data.path",
                   f"file {self.path!r} does not exist")
        _check(8 <= self.max_length <= 32768, "data.max_length", f"expected in [8, 32768], got {self.max_length}")
        _check(self.eval_size >= 1, "data.eval_size", f"expected >= 1, got {self.eval_size}")
        if self.max_examples is not None:
            _check(self.max_examples >= 2, "data.max_examples", f"expected >= 2, got {self.max_examples}")


@dataclass(frozen=True)
class PartitionConfig:
    method: Literal["iid", "dirichlet", "natural", "quantity_skew", "shards"] = doc("how examples are split across clients", "iid")
    num_clients: int = doc("number of simulated clients", 3)
    column: str | None = doc("label/topic column for dirichlet, natural and shards", None)
    alpha: float = doc("Dirichlet concentration (dirichlet: over labels; quantity_skew: over sizes)", 0.5)
    shards_per_client: int = doc("shards each client gets (shards method)", 2)
    min_examples: int = doc("every client must hold at least this many examples", 1)

    def __post_init__(self) -> None:
        _check(1 <= self.num_clients <= 100_000, "partition.num_clients", f"expected in [1, 100000], got {self.num_clients}")
        _check(self.alpha > 0, "partition.alpha", f"expected > 0, got {self.alpha}")
        _check(self.shards_per_client >= 1, "partition.shards_per_client", "expected >= 1")
        _check(self.min_examples >= 1, "partition.min_examples", "expected >= 1")
        if self.method in ("dirichlet", "natural", "shards"):
            _check(self.column is not None, "partition.column", f"method {self.method!r} needs a column name")


@dataclass(frozen=True)
class FederationConfig:
    algorithm: Literal["gradualdiff", "fedavg"] = doc("gradualdiff: mean of deltas (1/K); fedavg: example-weighted mean", "gradualdiff")
    weighted: bool | None = doc("weight the mean by examples (default: false for gradualdiff, true for fedavg)", None)
    rounds: int = doc("federated rounds", 3)
    fraction: float = doc("fraction of clients sampled each round (seeded)", 1.0)
    min_clients: int = doc("fewest valid updates needed to apply a round", 1)

    def __post_init__(self) -> None:
        _check(1 <= self.rounds <= 100_000, "federation.rounds", f"expected in [1, 100000], got {self.rounds}")
        _check(0 < self.fraction <= 1, "federation.fraction", f"expected in (0, 1], got {self.fraction}")
        _check(self.min_clients >= 1, "federation.min_clients", f"expected >= 1, got {self.min_clients}")

    @property
    def is_weighted(self) -> bool:
        return self.weighted if self.weighted is not None else self.algorithm == "fedavg"


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = doc("optimizer steps each client runs per round", 10)
    batch_size: int = doc("examples per step", 4)
    lr: float = doc("AdamW learning rate", 2e-4)
    weight_decay: float = doc("AdamW weight decay", 0.001)
    warmup_ratio: float = doc("fraction of a client's steps with linear warm-up", 0.03)
    max_grad_norm: float = doc("gradient clipping norm (0 disables)", 0.3)

    def __post_init__(self) -> None:
        _check(1 <= self.local_steps <= 1_000_000, "train.local_steps", f"expected >= 1, got {self.local_steps}")
        _check(1 <= self.batch_size <= 4096, "train.batch_size", f"expected in [1, 4096], got {self.batch_size}")
        _check(self.lr >= 0, "train.lr", f"expected >= 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"expected >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"expected in [0, 1), got {self.warmup_ratio}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"expected >= 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = doc("examples per evaluation forward pass", 8)
    bleu_samples: int = doc("eval prompts answered greedily for BLEU (0 disables)", 8)
    max_new_tokens: int = doc("tokens generated per BLEU prompt", 48)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", f"expected >= 1, got {self.batch_size}")
        _check(self.bleu_samples >= 0, "eval.bleu_samples", f"expected >= 0, got {self.bleu_samples}")
        _check(1 <= self.max_new_tokens <= 4096, "eval.max_new_tokens", f"expected in [1, 4096], got {self.max_new_tokens}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = doc("root folder for run directories", "runs")
    plots: bool = doc("write PNG plots", True)
    save_adapter: bool = doc("save the final adapter (PeftModel.from_pretrained loads it)", True)


@dataclass(frozen=True)
class FaultsConfig:
    nan_clients: list[int] = doc("clients whose update is replaced by NaN (fault injection for tests/demos)", [])
    error_clients: list[int] = doc("clients that raise an exception during local training", [])
    rounds: list[int] = doc("rounds in which the faults fire (empty: every round)", [])

    def fires(self, client_id: int, rnd: int, kind: str) -> bool:
        ids = self.nan_clients if kind == "nan" else self.error_clients
        return client_id in ids and (not self.rounds or rnd in self.rounds)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str = doc("run name; run files go to <output.dir>/<name>/<mode>/", "run")
    mode: Literal["federated", "centralized", "local"] = doc("what `fedllm run` trains", "federated")
    seed: int = doc("seed for partition, sampling and training", 0)
    model: ModelConfig = doc("base model", ModelConfig())
    lora: LoraConfig = doc("LoRA adapter", LoraConfig())
    data: DataConfig = doc("dataset", dataclasses.MISSING)
    partition: PartitionConfig = doc("split across clients", PartitionConfig())
    federation: FederationConfig = doc("federated loop", FederationConfig())
    train: TrainConfig = doc("client training", TrainConfig())
    eval: EvalConfig = doc("evaluation", EvalConfig())
    output: OutputConfig = doc("run directory", OutputConfig())
    faults: FaultsConfig = doc("injected client faults", FaultsConfig())

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()) and not any(c in self.name for c in "/\\\0")
               and self.name not in (".", "..") and len(self.name.encode("utf-8", "replace")) <= 200,
               "name", f"expected a plain folder name (no / or \\, at most 200 bytes), got {_show(self.name)}")
        _check(0 <= self.seed < 2**32, "seed", f"expected an integer in [0, 2**32), got {self.seed}")
        _check(self.federation.min_clients <= self.partition.num_clients, "federation.min_clients",
               f"expected <= partition.num_clients ({self.partition.num_clients}), got {self.federation.min_clients}")
        for kind in ("nan_clients", "error_clients"):
            for c in getattr(self.faults, kind):
                _check(0 <= c < self.partition.num_clients, f"faults.{kind}",
                       f"client ids must be in [0, {self.partition.num_clients}), got {c}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if not path.is_file():
        raise RecipeError(str(path), "recipe file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    """Load, override and validate a recipe. Relative data/model paths resolve from the CWD."""
    try:
        values = apply_overrides(read_yaml(path), overrides or [])
        values.setdefault("name", Path(path).stem)
        return build(Recipe, values)
    except RecursionError:
        raise RecipeError(str(path), "a value is nested too deeply") from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to each run directory as config.yaml)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
