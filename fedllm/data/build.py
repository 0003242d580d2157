"""From a recipe to tokenized examples, a held-out eval split and per-client partitions.

Rows that cannot become an example are handled by ``data.bad_rows``: a malformed row (missing,
empty or mistyped field, bad message list) or a row whose prompt fills ``data.max_length`` stops
the run with a one-line error naming the file and line (``error``), or is skipped and counted
(``skip``). Rows of the built-in corpus that do not fit ``data.max_length`` are always skipped and
counted. The counts (``stats``, saved in summary.json under ``data``) and a warning naming the
first skipped rows are the report.

``data.streaming`` builds the same split from a memory-mapped source (:mod:`fedllm.data.stream`)
without tokenizing: the examples are lazy sequences, every row counts as an example (bad rows stop
the run when first read: ``bad_rows: skip`` is refused), and ``stats`` has no ``truncated`` count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedllm.config import Recipe, RecipeError
from fedllm.data.canaries import plant_canaries
from fedllm.data.partition import client_names, holdout, partition
from fedllm.data.stream import ArrowRows, LazyExamples, RowTokenizer
from fedllm.data.text import Example, RowTooLong, load_records, tokenize

log = logging.getLogger(__name__)


@dataclass
class TextData:
    """Everything the three modes share: the same examples, eval split and client partition.

    ``examples`` is a list, or with ``data.streaming`` a :class:`LazyExamples` whose selections
    (``client_examples(k)``, ...) are lazy too: sequences that tokenize an example when it is read.
    """

    examples: Sequence[Example]
    eval_idx: list[int]
    clients: list[list[int]]  # positions into ``examples``
    source: str
    stats: dict[str, int] = field(default_factory=dict)
    client_eval: list[list[int]] = field(default_factory=list)  # eval.client_holdout: each client's own held-out slice
    val_idx: list[int] = field(default_factory=list)  # data.validation_fraction: carved from the clients' training data
    client_names: list[str] | None = None  # partition natural: each client's column value(s); ids stay the keys
    canaries: list = field(default_factory=list)  # privacy.audit: the planted canaries (fedllm.data.canaries)

    def _take(self, positions: list[int]) -> Sequence[Example]:
        if isinstance(self.examples, LazyExamples):
            return self.examples.take(positions)
        return [self.examples[i] for i in positions]

    def _ids(self, positions: list[int]) -> list[int]:
        """The source rows of ``positions`` (streaming: without tokenizing them)."""
        if isinstance(self.examples, LazyExamples):
            return self.examples.row_ids(positions)
        return [self.examples[i].index for i in positions]

    def client_examples(self, k: int) -> Sequence[Example]:
        return self._take(self.clients[k])

    def client_eval_examples(self, k: int) -> Sequence[Example]:
        return self._take(self.client_eval[k]) if self.client_eval else []

    @property
    def eval_examples(self) -> Sequence[Example]:
        return self._take(self.eval_idx)

    @property
    def validation_examples(self) -> Sequence[Example]:
        """``data.validation_fraction``: the validation split every mode scores (empty when 0)."""
        return self._take(self.val_idx)

    @property
    def train_examples(self) -> Sequence[Example]:
        return self._take([i for part in self.clients for i in part])

    def check_rows(self) -> int:
        """Read every example once and return how many were truncated; streaming tokenizes the
        rows one at a time (memory stays flat) and raises the first bad row's error."""
        return sum(e.truncated for e in self.examples)

    def partition_json(self) -> dict:
        """client id -> source row ids, and the eval ids (the run directory's partition.json)."""
        return {
            "source": self.source,
            "clients": {str(k): self._ids(part) for k, part in enumerate(self.clients)},
            "eval": self._ids(self.eval_idx),
            **({"client_eval": {str(k): self._ids(part) for k, part in enumerate(self.client_eval)}}
               if self.client_eval else {}),
            **({"validation": self._ids(self.val_idx)} if self.val_idx else {}),
            **({"client_names": list(self.client_names)} if self.client_names else {}),
        }


def subsample(n: int, max_examples: int | None, seed: int) -> list[int]:
    """The source rows used: all ``n``, or a seeded sample of ``data.max_examples`` in row order."""
    if max_examples is None or max_examples >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, max_examples, replace=False).tolist())


def _no_column(column: str, source: str, names) -> RecipeError:
    return RecipeError("partition.column", f"column {column!r} not found in {source}; "
                       f"available: {sorted(map(str, names))}")


def _no_field(name: str, column: str, source: str, names) -> RecipeError:
    return RecipeError(name, f"column {column!r} not found in {source} (columns: {', '.join(sorted(map(str, names)))})")


def check_fields(cfg, source: str, columns) -> None:
    """A prompt/response (or messages) column the data does not have at all is named with the file's
    columns, before any row is read as an example ("expected a non-empty string" would blame a row)."""
    fields = {"data.messages_field": cfg.messages_field} if cfg.messages_field else {
        "data.prompt_field": cfg.prompt_field, "data.response_field": cfg.response_field}
    for name, column in fields.items():
        if column not in columns:
            raise _no_field(name, column, source, columns)


def split(n: int, labels: list | None, recipe: Recipe, source: str):
    """(eval positions, each client's positions, each client's held-out positions, client names) of
    ``n`` examples whose ``partition.column`` values (by position) are ``labels``."""
    if n < 2:
        raise RecipeError(source, f"only {n} usable examples; expected at least 2")
    train_pos, eval_pos = holdout(n, recipe.data.eval_size, recipe.seed)
    train_labels = [labels[i] for i in train_pos] if labels is not None else None
    parts = partition(len(train_pos), train_labels, recipe.partition, recipe.seed)
    clients = [[train_pos[j] for j in part] for part in parts]
    return (eval_pos, clients, split_client_holdout(clients, recipe.eval.client_holdout, recipe.seed),
            client_names(train_labels, recipe.partition))


def build_text_data(recipe: Recipe, tokenizer) -> TextData:
    """Load, tokenize (response-only labels), hold out eval, partition. Deterministic from the seed."""
    if recipe.data.streaming:
        return build_streaming_data(recipe, tokenizer)
    cfg = recipe.data
    rows, source, places = load_records(cfg)
    order = subsample(len(rows), cfg.max_examples, recipe.seed)
    column = recipe.partition.column
    if column is not None and not any(column in rows[i] for i in order):
        raise _no_column(column, source, rows[order[0]])
    check_fields(cfg, source, {key for i in order for key in rows[i]})
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
    eval_pos, clients, client_eval, names = split(len(examples), [e.topic for e in examples] if column else None,
                                                  recipe, source)
    stats["examples"] = len(examples)
    data = TextData(examples=examples, eval_idx=eval_pos, clients=clients, source=source, stats=stats,
                    client_eval=client_eval, val_idx=carve_validation(clients, recipe), client_names=names)
    return plant_canaries(data, recipe, tokenizer)  # privacy.audit: members join their clients' data


def build_streaming_data(recipe: Recipe, tokenizer) -> TextData:
    """``data.streaming``: the same split as :func:`build_text_data` on a file with no bad row,
    holding row ids only. ``data.max_examples`` draws the same rows; ``partition.column`` is read
    alone (and its values checked now, naming a bad row); nothing is tokenized here."""
    cfg, column = recipe.data, recipe.partition.column
    rows = ArrowRows(Path(cfg.path))
    source = str(rows.path)
    order = np.asarray(subsample(len(rows), cfg.max_examples, recipe.seed), dtype=np.int64)
    if column is not None and column not in rows.column_names:
        raise _no_column(column, source, rows.column_names)
    check_fields(cfg, source, rows.column_names)
    labels = rows.labels(column, order) if column else None
    eval_pos, clients, client_eval, names = split(len(order), labels, recipe, source)
    stats = {"rows": len(order), "skipped_bad_rows": 0, "skipped_no_response_tokens": 0, "examples": len(order)}
    return TextData(examples=LazyExamples(RowTokenizer(rows, tokenizer, cfg, column), order), eval_idx=eval_pos,
                    clients=clients, source=source, stats=stats, client_eval=client_eval,
                    val_idx=carve_validation(clients, recipe), client_names=names)


def carve_validation(clients: list[list[int]], recipe: Recipe) -> list[int]:
    """``data.validation_fraction``: the validation split, carved from each client's training examples
    (seeded per client, after ``eval.client_holdout``; never from the held-out eval split) and pooled.

    Per client, so that the split is the same for every mode and every partition of one seed's
    examples can be scored by the sites that hold them; pooled, so that the federated server's
    global model, the centralized model and every local model are scored on the same examples
    (what the best round, early stopping and learning-rate selection compare). ``clients`` keeps
    the rest: centralized mode's pooled data excludes the validation split too.
    """
    slices = split_client_holdout(clients, recipe.data.validation_fraction, recipe.seed, salt=91)
    return sorted(i for part in slices for i in part)


def split_client_holdout(clients: list[list[int]], fraction: float, seed: int, salt: int = 77) -> list[list[int]]:
    """Move max(1, round(fraction·n)) of each client's n >= 2 examples (seeded per client) into its own
    held-out slice; returns the slices ([] when ``fraction`` is 0). ``clients`` keeps the rest."""
    if fraction <= 0:
        return []
    held = []
    for k, part in enumerate(clients):
        n = len(part)
        m = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        pick = set(np.random.default_rng([seed, k, salt]).choice(n, m, replace=False).tolist()) if m else set()
        held.append([part[j] for j in range(n) if j in pick])
        part[:] = [part[j] for j in range(n) if j not in pick]
    return held
