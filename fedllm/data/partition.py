"""Partitioners: split example indices across simulated clients, deterministically from a seed.

All functions are pure (numpy only) and return ``list[list[int]]``: client k's example indices,
sorted. They raise :class:`~fedllm.config.RecipeError` naming the recipe field when a split
cannot satisfy the recipe (e.g. more clients than examples).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedllm.config import PartitionConfig, RecipeError


def _finish(parts: list[list[int]], cfg: PartitionConfig) -> list[list[int]]:
    sizes = [len(p) for p in parts]
    if min(sizes) < cfg.min_examples:
        raise RecipeError("partition", f"method {cfg.method!r} left a client with {min(sizes)} examples; "
                          f"expected >= partition.min_examples ({cfg.min_examples}); sizes {sizes}")
    return [sorted(int(i) for i in p) for p in parts]


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """A seeded shuffle cut into near-equal parts."""
    return [list(p) for p in np.array_split(rng.permutation(n), num_clients)]


def dirichlet(labels: Sequence, num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """Label skew: for each label value, client shares ~ Dirichlet(α) (Hsu et al., 2019)."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    by_label: dict = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    for y in sorted(by_label, key=str):
        idx = rng.permutation(by_label[y])
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return parts


SHOWN_VALUES = 12  # a refusal lists at most this many column values


def _groups(labels: Sequence) -> dict:
    groups: dict = defaultdict(list)
    for i, y in enumerate(labels):
        groups[y].append(i)
    return groups


def natural_values(labels: Sequence, cfg: PartitionConfig) -> list[list]:
    """Each client's column values under ``natural``: one value per client, or (with
    ``partition.merge_values``) the largest groups handed to the emptiest client in turn.

    A client count that differs from the number of distinct values is refused, naming the field,
    the column, the count and the values: a fourth clinic silently merged into another one's
    client would read as a three-clinic federation everywhere after.
    """
    groups = _groups(labels)
    values = sorted(groups, key=str)
    shown = ", ".join(map(str, values[:SHOWN_VALUES])) + (", ..." if len(values) > SHOWN_VALUES else "")
    has = f"partition.column {cfg.column!r} has {len(values)} distinct values among the training rows ({shown})"
    if cfg.num_clients > len(values):
        raise RecipeError("partition.num_clients", f"{cfg.num_clients} clients, but {has}; expected num_clients "
                          f"<= {len(values)} for method natural (one client per value)")
    if cfg.num_clients < len(values) and not cfg.merge_values:
        raise RecipeError("partition.num_clients", f"{cfg.num_clients} clients, but {has}; set num_clients: "
                          f"{len(values)} for one client per value, or partition.merge_values: true to let a "
                          "client hold several values")
    assigned: list[list] = [[] for _ in range(cfg.num_clients)]
    sizes = [0] * cfg.num_clients
    for y in sorted(groups, key=lambda v: (-len(groups[v]), str(v))):
        k = min(range(cfg.num_clients), key=lambda c: (sizes[c], c))
        assigned[k].append(y)
        sizes[k] += len(groups[y])
    return assigned


def natural(labels: Sequence, cfg: PartitionConfig) -> list[list[int]]:
    """One client per column value (:func:`natural_values`)."""
    groups = _groups(labels)
    return [[i for y in values for i in groups[y]] for values in natural_values(labels, cfg)]


def client_names(labels: Sequence | None, cfg: PartitionConfig) -> list[str] | None:
    """Display names of the clients :func:`partition` makes: under ``natural`` the column value each
    client holds (several joined by ``+``); None for the other methods, whose clients are numbers.
    The integer client id stays the key in every file; the names are what reports show."""
    if cfg.method != "natural" or labels is None:
        return None
    return ["+".join(map(str, values)) for values in natural_values(labels, cfg)]


def quantity_skew(n: int, num_clients: int, alpha: float, min_examples: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """Sizes ~ Dirichlet(α)·n with a floor of ``min_examples`` each; labels stay iid."""
    spare = n - min_examples * num_clients
    if spare < 0:
        raise RecipeError("partition.min_examples", f"{num_clients} clients x {min_examples} examples "
                          f"exceeds the {n} training examples")
    sizes = min_examples + np.floor(rng.dirichlet([alpha] * num_clients) * spare).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the rounding remainder
    return [list(p) for p in np.split(rng.permutation(n), np.cumsum(sizes)[:-1])]


def shards(labels: Sequence, num_clients: int, per_client: int, rng: np.random.Generator) -> list[list[int]]:
    """HP-FL / McMahan et al. pathological non-IID: sort by label, cut 2K shards, give each client 2."""
    order = sorted(range(len(labels)), key=lambda i: (str(labels[i]), i))
    cut = np.array_split(np.asarray(order), num_clients * per_client)
    assign = rng.permutation(len(cut))
    return [sum((cut[s].tolist() for s in assign[k * per_client:(k + 1) * per_client]), [])
            for k in range(num_clients)]


def partition(n: int, labels: Sequence | None, cfg: PartitionConfig, seed: int) -> list[list[int]]:
    """Split ``range(n)`` across ``cfg.num_clients`` clients by ``cfg.method``."""
    if cfg.num_clients > n:
        raise RecipeError("partition.num_clients", f"expected at most {n} (the number of training "
                          f"examples), got {cfg.num_clients}")
    rng = np.random.default_rng(seed)
    if cfg.method == "iid":
        return _finish(iid(n, cfg.num_clients, rng), cfg)
    if cfg.method == "quantity_skew":
        return _finish(quantity_skew(n, cfg.num_clients, cfg.alpha, cfg.min_examples, rng), cfg)
    if labels is None:
        raise RecipeError("partition.column", f"method {cfg.method!r} needs a label column in the data")
    if cfg.method == "dirichlet":
        for _ in range(100):  # resample until every client reaches min_examples
            parts = dirichlet(labels, cfg.num_clients, cfg.alpha, rng)
            if min(len(p) for p in parts) >= cfg.min_examples:
                break
        return _finish(parts, cfg)
    if cfg.method == "natural":
        return _finish(natural(labels, cfg), cfg)
    return _finish(shards(labels, cfg.num_clients, cfg.shards_per_client, rng), cfg)


def holdout(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded held-out split taken before partitioning."""
    if eval_size >= n:
        raise RecipeError("data.eval_size", f"expected fewer than the {n} examples, got {eval_size}")
    perm = np.random.default_rng(seed + 7919).permutation(n)
    return sorted(perm[eval_size:].tolist()), sorted(perm[:eval_size].tolist())
