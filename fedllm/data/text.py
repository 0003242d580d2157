"""Instruction/chat data: load from JSONL, CSV, parquet or a saved ``datasets`` directory, then
tokenize with the model's chat template so that the loss covers response tokens only.

A record becomes a conversation ``[system?, user: prompt, assistant: response]`` (or the recipe's
``messages`` list, whose last turn must be the assistant's). The prompt part is rendered with
``add_generation_prompt=True``; the labels of those tokens are -100, so only the response (and
its end-of-turn token) is learned and scored.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.config import DataConfig, RecipeError
from fedllm.data.coralmap import coralmap_records

IGNORE = -100


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path} line {line_no}", f"not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{path} line {line_no}", "expected a JSON object per line")
            rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return [dict(r) for r in ds]
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                return [dict(r) for r in csv.DictReader(fh)]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except RecipeError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecipeError(str(path), f"could not be read as data ({type(exc).__name__}: {exc})") from None
    raise RecipeError("data.path", f"expected a .jsonl, .csv, .parquet file or a datasets directory, got {path}")


def load_records(cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """The raw rows and a name for error messages."""
    if cfg.builtin == "coralmap":
        return coralmap_records(), "builtin:coralmap"
    path = Path(cfg.path)
    rows = _read_file(path)
    if not rows:
        raise RecipeError(str(path), "contains no rows")
    return rows, str(path)


def conversation(row: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """The chat messages of one row; the last one is the assistant's response."""
    if cfg.messages_field:
        msgs = row.get(cfg.messages_field)
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs
        ):
            raise RecipeError(where, f"field {cfg.messages_field!r}: expected a list of {{role, content}} messages")
        if msgs[-1]["role"] != "assistant":
            raise RecipeError(where, f"field {cfg.messages_field!r}: the last message must be the assistant's")
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


def tokenize(row: dict[str, Any], index: int, tokenizer: Any, cfg: DataConfig, where: str,
             topic_field: str | None = None) -> Example | None:
    """Tokenize one row with the chat template; ``None`` when truncation leaves no response token."""
    msgs = conversation(row, cfg, where)
    prompt_ids = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(msgs, tokenize=True)
    prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
    full_ids = list(getattr(full_ids, "input_ids", full_ids))
    if full_ids[: len(prompt_ids)] != prompt_ids:  # template not prefix-stable: fall back to concat
        full_ids = prompt_ids + tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
    full_ids = full_ids[: cfg.max_length]
    labels = [IGNORE] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    if all(t == IGNORE for t in labels):
        return None
    return Example(index=index, input_ids=full_ids, labels=labels, prompt_ids=prompt_ids,
                   prompt=msgs[-2]["content"], reference=msgs[-1]["content"],
                   topic=row.get(topic_field) if topic_field else None)


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
