"""From a recipe to tokenized examples, a held-out eval split and per-client partitions.

Rows that cannot become an example are handled by ``data.bad_rows``: a malformed row (missing,
empty or mistyped field, bad message list) or a row whose prompt fills ``data.max_length`` stops
the run with a one-line error naming the file and line (``error``), or is skipped and counted
(``skip``). Rows of the built-in corpus that do not fit ``data.max_length`` are always skipped and
counted. The counts (``stats``, saved in summary.json under ``data``) and a warning naming the
first skipped rows are the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fedllm.config import Recipe, RecipeError
from fedllm.data.partition import holdout, partition
from fedllm.data.text import Example, RowTooLong, load_records, tokenize

log = logging.getLogger(__name__)


@dataclass
class TextData:
    """Everything the three modes share: the same examples, eval split and client partition."""

    examples: list[Example]
    eval_idx: list[int]
    clients: list[list[int]]  # positions into ``examples``
    source: str
    stats: dict[str, int] = field(default_factory=dict)
    client_eval: list[list[int]] = field(default_factory=list)  # eval.client_holdout: each client's own held-out slice

    def client_examples(self, k: int) -> list[Example]:
        return [self.examples[i] for i in self.clients[k]]

    def client_eval_examples(self, k: int) -> list[Example]:
        return [self.examples[i] for i in self.client_eval[k]] if self.client_eval else []

    @property
    def eval_examples(self) -> list[Example]:
        return [self.examples[i] for i in self.eval_idx]

    @property
    def train_examples(self) -> list[Example]:
        return [self.examples[i] for part in self.clients for i in part]

    def partition_json(self) -> dict:
        """client id -> source row ids, and the eval ids (the run directory's partition.json)."""
        return {
            "source": self.source,
            "clients": {str(k): [self.examples[i].index for i in part] for k, part in enumerate(self.clients)},
            "eval": [self.examples[i].index for i in self.eval_idx],
            **({"client_eval": {str(k): [self.examples[i].index for i in part] for k, part in enumerate(self.client_eval)}}
               if self.client_eval else {}),
        }


def build_text_data(recipe: Recipe, tokenizer) -> TextData:
    """Load, tokenize (response-only labels), hold out eval, partition. Deterministic from the seed."""
    cfg = recipe.data
    rows, source, places = load_records(cfg)
    order = list(range(len(rows)))
    if cfg.max_examples is not None and cfg.max_examples < len(rows):
        order = sorted(np.random.default_rng(recipe.seed).choice(len(rows), cfg.max_examples, replace=False).tolist())
    column = recipe.partition.column
    if column is not None and not any(column in rows[i] for i in order):
        raise RecipeError("partition.column", f"column {column!r} not found in {source}; "
                          f"available: {sorted(map(str, rows[order[0]]))}")
    examples: list[Example] = []
    stats = {"rows": len(order), "skipped_bad_rows": 0, "skipped_no_response_tokens": 0, "truncated": 0}
    skipped: list[str] = []
    for i in order:
        where = f"{source} {places[i]}"
        try:
            ex = tokenize(rows[i], i, tokenizer, cfg, where, column)
        except RowTooLong:
            if cfg.bad_rows == "error" and cfg.path is not None:
                raise
            stats["skipped_no_response_tokens"] += 1
            skipped.append(places[i])
            continue
        except RecipeError:
            if cfg.bad_rows == "error":
                raise
            stats["skipped_bad_rows"] += 1
            skipped.append(places[i])
            continue
        stats["truncated"] += ex.truncated
        examples.append(ex)
    if skipped:
        log.warning("%s: skipped %d of %d rows (%d malformed, %d with no room for a response in "
                    "data.max_length=%d; first: %s)", source, len(skipped), len(order), stats["skipped_bad_rows"],
                    stats["skipped_no_response_tokens"], cfg.max_length, ", ".join(skipped[:3]))
    if len(examples) < 2:
        raise RecipeError(source, f"only {len(examples)} usable examples; expected at least 2")
    train_pos, eval_pos = holdout(len(examples), cfg.eval_size, recipe.seed)
    labels = [examples[i].topic for i in train_pos] if column else None
    parts = partition(len(train_pos), labels, recipe.partition, recipe.seed)
    clients = [[train_pos[j] for j in part] for part in parts]
    client_eval = split_client_holdout(clients, recipe.eval.client_holdout, recipe.seed)
    stats["examples"] = len(examples)
    return TextData(examples=examples, eval_idx=eval_pos, clients=clients, source=source, stats=stats,
                    client_eval=client_eval)


def split_client_holdout(clients: list[list[int]], fraction: float, seed: int) -> list[list[int]]:
    """Move max(1, round(fraction·n)) of each client's n >= 2 examples (seeded per client) into its own
    held-out slice; returns the slices ([] when ``fraction`` is 0). ``clients`` keeps the rest."""
    if fraction <= 0:
        return []
    held = []
    for k, part in enumerate(clients):
        n = len(part)
        m = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        pick = set(np.random.default_rng([seed, k, 77]).choice(n, m, replace=False).tolist()) if m else set()
        held.append([part[j] for j in range(n) if j in pick])
        part[:] = [part[j] for j in range(n) if j not in pick]
    return held
