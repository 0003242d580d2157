"""Instruction/chat data: load from JSONL, CSV, parquet or a saved ``datasets`` directory, then
tokenize with the model's chat template so that the loss covers response tokens only.

A record becomes a conversation ``[system?, user: prompt, assistant: response]`` (or the recipe's
``messages`` list, whose last turn must be the assistant's). The prompt part is rendered with
``add_generation_prompt=True``; the labels of those tokens are -100, so only the response (and
its end-of-turn token) is learned and scored.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.config import DataConfig, RecipeError
from fedllm.data.chat import chat_messages
from fedllm.data.coralmap import coralmap_records
from fedllm.errors import IntegrityError, read_regular

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One tokenized example; ``index`` is its row in the loaded source (saved in partition.json)."""

    index: int
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    prompt: str
    reference: str
    topic: Any = None
    truncated: bool = False  # the response was cut at data.max_length (still trained on what fits)


Rows = tuple[list[dict[str, Any]], list[str]]  # the rows and where each one is ("line 7", "row 3")


class RowTooLong(RecipeError):
    """A row whose prompt alone fills ``data.max_length``: not one response token would be trained.

    :func:`fedllm.data.build.build_text_data` applies ``data.bad_rows`` to it (stop naming the
    line, or skip and count); rows of the built-in corpus are always skipped and counted.
    """


class StreamedRowError(RecipeError, IntegrityError):
    """A bad row met when ``data.streaming`` first tokenizes it, mid-run: its one-line RecipeError
    (the CLI's exit 2), and an IntegrityError so that no engine leaves its client out of the round
    and carries on: the eval split and the partition counted that row as an example.
    """

    @classmethod
    def of(cls, exc: RecipeError) -> StreamedRowError:
        return cls(exc.where, str(exc).removeprefix(f"{exc.where}: "))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); an encoding error names its line."""
    data = read_regular(path)  # checked on the opened file: a FIFO swapped in after the stat is refused too
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{path} line {line}", f"not UTF-8 text (byte {exc.start})") from None


MAX_ROW_CHARS = 1_000_000  # one prompt/response pair, not a document: longer lines are refused unparsed


def _read_jsonl(path: Path) -> Rows:
    rows, places = [], []
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            raise RecipeError(f"{path} line {line_no}", f"{len(line):,} characters; expected a row of at most "
                              f"{MAX_ROW_CHARS:,} (one prompt/response pair; longer text is truncated to "
                              "data.max_length tokens anyway)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path} line {line_no}", f"not valid JSON ({exc.msg})") from None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            raise RecipeError(f"{path} line {line_no}", f"not valid JSON ({exc})") from None
        except RecursionError:
            raise RecipeError(f"{path} line {line_no}", "not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise RecipeError(f"{path} line {line_no}", "expected a JSON object per line")
        rows.append(row)
        places.append(f"line {line_no}")
    return rows, places


def _read_csv(path: Path) -> Rows:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows, places, start = [], [], 2  # line 1 is the header
    try:
        for row in reader:
            rows.append(dict(row))
            places.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as exc:  # e.g. a field over csv's size limit
        raise RecipeError(f"{path} line {reader.reader.line_num}", f"not valid CSV ({exc})") from None
    return rows, places


def parquet_error(path: Path, exc: Exception) -> RecipeError:
    return RecipeError(str(path), f"could not be read as parquet ({type(exc).__name__}: {exc})")


def row_place(path: Path, file: Path, row: int) -> str:
    """Where row ``row`` (1-based) of ``file`` is, for an error: "row 3", or "part-1.parquet row 3"
    when ``path`` is a directory of parquet files."""
    return f"row {row}" if file == path else f"{file.name} row {row}"


def _read_parquet(path: Path, files: list[Path]) -> Rows:
    import pyarrow.parquet as pq

    rows, places = [], []
    for file in files:
        try:
            part = pq.read_table(file).to_pylist()
        except Exception as exc:  # pyarrow's errors also subclass TypeError, KeyError, NotImplementedError...
            raise parquet_error(file, exc) from None
        rows += part
        places += [row_place(path, file, i) for i in range(1, len(part) + 1)]
    return rows, places


def is_saved_dataset(path: Path) -> bool:
    """A ``datasets`` ``save_to_disk`` directory (a Dataset's state.json or a DatasetDict's index)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def parquet_files(path: Path) -> list[Path]:
    """The parquet files ``path`` names: itself, or a directory's ``*.parquet`` in name order
    (none for a saved ``datasets`` directory)."""
    if not path.is_dir():
        return [path]
    return [] if is_saved_dataset(path) else sorted(path.glob("*.parquet"))


def one_split(ds: Any) -> Any:
    """A saved DatasetDict's ``train`` split (else its first); a Dataset as it is."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        return ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _read_dir(path: Path) -> Rows:
    files = parquet_files(path)
    if files:
        return _read_parquet(path, files)
    import datasets

    rows = [dict(r) for r in one_split(datasets.load_from_disk(str(path)))]
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def check_data_path(cfg: DataConfig) -> None:
    """Raise the one-line RecipeError for a ``data.path`` that is a FIFO, socket or device (reading
    would block or never end), without reading it: engines that start other processes first (the
    Flower simulation, Ray) call this before they start anything."""
    if cfg.builtin is None and cfg.path is not None:
        try:
            mode = Path(cfg.path).stat().st_mode
        except OSError:
            return  # missing or unreadable: the loader names it
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # a FIFO would block the read forever
            raise RecipeError(str(cfg.path), "not a regular file or directory (a FIFO, socket or device); "
                              "expected a data file or a datasets directory")


def _read_file(path: Path) -> Rows:
    try:
        mode = path.stat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # a FIFO would block the read forever
            raise RecipeError(str(path), "not a regular file or directory (a FIFO, socket or device); "
                              "expected a data file or a datasets directory")
        if path.is_dir():
            return _read_dir(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path, [path])
    except RecipeError:
        raise
    except (OSError, ValueError) as exc:
        raise RecipeError(str(path), f"could not be read as data ({type(exc).__name__}: {exc})") from None
    raise RecipeError("data.path", f"expected a .jsonl, .csv, .parquet file, a directory of parquet files or a "
                      f"datasets directory, got {path}")


def load_records(cfg: DataConfig) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The raw rows, a name for error messages, and each row's place in it ("line 7", "row 3")."""
    if cfg.builtin == "coralmap":
        rows = coralmap_records()
        return rows, "builtin:coralmap", [f"row {i}" for i in range(1, len(rows) + 1)]
    path = Path(cfg.path)
    rows, places = _read_file(path)
    if not rows:
        raise RecipeError(str(path), "contains no rows")
    return rows, str(path), places


def conversation(row: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """The chat messages of one row; the last one is the assistant's response."""
    if cfg.messages_field:
        msgs = row.get(cfg.messages_field)
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES for m in msgs
        ):
            raise RecipeError(where, f"field {cfg.messages_field!r}: expected a list of {{role, content}} "
                              f"messages with role in {ROLES}")
        if msgs[-1]["role"] != "assistant":
            raise RecipeError(where, f"field {cfg.messages_field!r}: the last message must be the assistant's")
        if not msgs[-1]["content"].strip():
            raise RecipeError(where, f"field {cfg.messages_field!r}: the assistant's response is empty")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise RecipeError(where, f"field {cfg.messages_field!r}: expected a user message before the "
                              "assistant's response")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    else:
        for name in (cfg.prompt_field, cfg.response_field):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise RecipeError(where, f"field {name!r}: expected a non-empty string")
        msgs = [{"role": "user", "content": row[cfg.prompt_field]},
                {"role": "assistant", "content": row[cfg.response_field]}]
    if cfg.system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": cfg.system_prompt}, *msgs]
    return msgs


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.")


def render_prompt(messages: list[dict[str, str]], template: str) -> str:
    """``data.template`` other than ``chat``: the text of [system?] + one user turn, ending where the
    response begins. ``alpaca`` is Taori et al.'s layout (the system prompt, when given, replaces its
    preamble); any other template is a format string with ``{prompt}`` and optionally ``{system}``."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise RecipeError("data.template", f"template {template if template == 'alpaca' else 'string'} renders one "
                          f"user turn; this conversation has {len(turns)} turns (multi-turn needs a chat template)")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if template == "alpaca":
        return f"{system or ALPACA_PREAMBLE}\n\n### Instruction:\n{turns[0]['content']}\n\n### Response:\n"
    return template.format(prompt=turns[0]["content"], system=system or "")


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]], template: str) -> list[int]:
    """The tokens a model sees before it answers: the chat template's generation prompt, or the
    rendered ``data.template`` with the tokenizer's own special tokens (BOS). Training and serving
    both build prompts here, so an exported model is asked as it was taught."""
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise RecipeError("data.template", "the model's tokenizer has no chat template; set data.template: "
                              "alpaca, or a template string with {prompt}")
        messages = chat_messages(tokenizer, messages)  # a template without a system role: folded (data.chat)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(getattr(ids, "input_ids", ids))  # a BatchEncoding or a plain list, by version
    return list(tokenizer(render_prompt(messages, template), add_special_tokens=True)["input_ids"])


def topic_label(value: Any, topic_field: str, where: str) -> Any:
    """A row's ``partition.column`` value: partitioners group by it, so a string or number equal to itself."""
    if not (isinstance(value, (str, int, float)) and value == value):  # NaN != NaN
        raise RecipeError(where, f"field {topic_field!r}: expected a string or number label, got {value!r:.60}")
    return value


def tokenize(row: dict[str, Any], index: int, tokenizer: Any, cfg: DataConfig, where: str,
             topic_field: str | None = None) -> Example:
    """Tokenize one row with the chat template (responses cut at ``data.max_length``).

    Raises :class:`RowTooLong` when the prompt leaves no room for a single response token.
    """
    msgs = conversation(row, cfg, where)
    topic = topic_label(row.get(topic_field), topic_field, where) if topic_field else None
    if cfg.template == "chat":
        try:
            chat = chat_messages(tokenizer, msgs)  # the system prompt folded where the template has no system role
            prompt_ids = prompt_token_ids(tokenizer, chat[:-1], "chat")
            full_ids = tokenizer.apply_chat_template(chat, tokenize=True)
        except RecipeError:
            raise
        except Exception as exc:  # a template's own checks (jinja raise_exception) on this row's messages
            raise RecipeError(where, f"the tokenizer's chat template rejected it ({type(exc).__name__}: {exc})") from None
        full_ids = list(getattr(full_ids, "input_ids", full_ids))
        if full_ids[: len(prompt_ids)] != prompt_ids:  # template not prefix-stable: fall back to concat
            full_ids = prompt_ids + tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
    else:  # the rendered prompt, the response, then EOS so that the model learns to stop
        try:
            prompt_ids = prompt_token_ids(tokenizer, msgs[:-1], cfg.template)
        except RecipeError as exc:  # name the row too
            raise RecipeError(where, str(exc)) from None
        full_ids = prompt_ids + tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    truncated = len(full_ids) > cfg.max_length
    full_ids = full_ids[: cfg.max_length]
    labels = [IGNORE] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    if all(t == IGNORE for t in labels):
        raise RowTooLong(where, f"the prompt takes {len(prompt_ids)} tokens, filling data.max_length="
                         f"{cfg.max_length}: no response token would be trained (raise data.max_length, "
                         "or set data.bad_rows: skip to drop such rows)")
    prompt = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
    return Example(index=index, input_ids=full_ids, labels=labels, prompt_ids=prompt_ids,
                   prompt=prompt, reference=msgs[-1]["content"], topic=topic, truncated=truncated)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for training and loss evaluation."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
