"""Three modes, one partition: federated, centralized (pooled client data) and local-only.

All three call the same :meth:`LMExperiment.fit` (same LightningModule, same optimizer settings)
on the same partition and evaluate on the same held-out split; only the orchestration differs:

- federated: each round, sampled clients train ``local_steps`` from the global state; the server
  aggregates their deltas (GradualDiff-Fed or FedAvg) and applies them.
- centralized: one model on the union of the clients' training data, trained each round for as
  many optimizer steps as the whole federation ran that round (sampled clients x local_steps).
- local: every client trains alone for the same rounds; metrics per client and their mean.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedllm.algorithms.aggregate import ApplyDelta, MeanAggregator
from fedllm.federation.experiment import LMExperiment
from fedllm.federation.rundir import RunWriter, run_dir, summarize
from fedllm.types import ClientUpdate, StateDict, add, clone_state, serialized_bytes

log = logging.getLogger(__name__)

MODES = ("federated", "centralized", "local")


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """Seeded uniform sample of ``max(1, round(fraction*K))`` clients (stateless: resumable)."""
    m = max(1, round(fraction * num_clients))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, rnd, 17])
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def _eval_row(exp: LMExperiment, state: StateDict) -> tuple[dict[str, Any], list[dict]]:
    t0 = time.perf_counter()
    res = exp.evaluate(state)
    return ({"eval_loss": res.eval_loss, "perplexity": res.perplexity, "bleu": res.bleu,
             "accuracy": res.accuracy, "eval_time_s": time.perf_counter() - t0}, res.samples)


def _round0(mode: str, exp: LMExperiment, state: StateDict) -> tuple[dict[str, Any], list[dict]]:
    metrics, samples = _eval_row(exp, state)
    row = {"round": 0, "mode": mode, "train_loss": None, **metrics, "round_time_s": 0.0,
           "train_time_s": 0.0, "aggregate_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": []}
    return row, samples


class Hooks:
    """Progress callbacks the CLI plugs in (all optional)."""

    def __init__(self, on_round: Callable[[int, int], None] | None = None,
                 on_client: Callable[[int], None] | None = None) -> None:
        self.on_round = on_round or (lambda r, total: None)
        self.on_client = on_client or (lambda k: None)


def _start(exp: LMExperiment, mode: str, out: str | None, hooks: Hooks | None):
    """A fresh run directory with its round-0 row, the starting state, and the hooks to use."""
    writer = RunWriter(run_dir(exp.recipe, mode, out), exp.recipe, exp.data.partition_json())
    state = clone_state(exp.initial_state)
    writer.log_round(*_round0(mode, exp, state))
    return writer, state, hooks or Hooks()


def collect_updates(exp: LMExperiment, clients: list[int], global_state: StateDict, rnd: int,
                    hooks: Hooks) -> tuple[list[ClientUpdate], dict[str, int]]:
    """Run the sampled clients; leave out failed or non-finite updates (warned and counted)."""
    updates, counts = [], {"failed_clients": 0, "skipped_nonfinite": 0}
    steps = exp.recipe.train.local_steps
    for k in clients:
        hooks.on_client(k)
        try:
            upd = exp.fit(k, exp.data.client_examples(k), global_state, rnd, steps)
        except Exception as exc:  # a failing client never takes the round down
            log.warning("round %d: client %d failed (%s: %s); left out of aggregation",
                        rnd, k, type(exc).__name__, exc)
            counts["failed_clients"] += 1
            continue
        if not upd.is_finite():
            log.warning("round %d: client %d sent a non-finite update (NaN/Inf); left out of aggregation",
                        rnd, k)
            counts["skipped_nonfinite"] += 1
            continue
        updates.append(upd)
    return updates, counts


def run_federated(exp: LMExperiment, out: str | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    recipe, fed = exp.recipe, exp.recipe.federation
    writer, state, hooks = _start(exp, "federated", out, hooks)
    aggregate, server = MeanAggregator(weighted=fed.is_weighted), ApplyDelta()
    down_bytes = serialized_bytes(state)
    for rnd in range(1, fed.rounds + 1):
        hooks.on_round(rnd, fed.rounds)
        t0 = time.perf_counter()
        clients = sample_clients(recipe.partition.num_clients, fed.fraction, recipe.seed, rnd)
        updates, counts = collect_updates(exp, clients, state, rnd, hooks)
        t1 = time.perf_counter()
        applied = len(updates) >= fed.min_clients
        if applied:
            state = server.step(state, aggregate(updates))
        else:
            log.warning("round %d: %d valid updates < federation.min_clients=%d; global state unchanged",
                        rnd, len(updates), fed.min_clients)
        t2 = time.perf_counter()
        metrics, samples = _eval_row(exp, state)
        row = {"round": rnd, "mode": "federated",
               "train_loss": statistics.fmean(u.train_loss for u in updates) if updates else None,
               **metrics, "round_time_s": 0.0, "train_time_s": t1 - t0, "aggregate_time_s": t2 - t1,
               "bytes_up": sum(u.bytes_up for u in updates), "bytes_down": down_bytes * len(clients),
               "clients": clients, "aggregated_clients": [u.client_id for u in updates],
               "applied": applied, **counts}
        row["round_time_s"] = row["train_time_s"] + row["aggregate_time_s"] + row["eval_time_s"]
        writer.log_round(row, samples)
    return _finish(exp, writer, state)


def run_centralized(exp: LMExperiment, out: str | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    recipe, fed = exp.recipe, exp.recipe.federation
    writer, state, hooks = _start(exp, "centralized", out, hooks)
    pooled = exp.data.train_examples
    for rnd in range(1, fed.rounds + 1):
        hooks.on_round(rnd, fed.rounds)
        t0 = time.perf_counter()
        sampled = sample_clients(recipe.partition.num_clients, fed.fraction, recipe.seed, rnd)
        upd = exp.fit(-1, pooled, state, rnd, recipe.train.local_steps * len(sampled))
        if upd.is_finite():
            state = add(state, upd.delta)
        else:
            log.warning("round %d: centralized update is non-finite; state unchanged", rnd)
        t1 = time.perf_counter()
        metrics, samples = _eval_row(exp, state)
        row = {"round": rnd, "mode": "centralized", "train_loss": upd.train_loss, **metrics,
               "round_time_s": t1 - t0 + metrics["eval_time_s"], "train_time_s": t1 - t0,
               "aggregate_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": [],
               "local_steps": upd.local_steps}
        writer.log_round(row, samples)
    return _finish(exp, writer, state)


def run_local(exp: LMExperiment, out: str | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    """Each client alone; rows carry the mean over clients and a ``per_client`` breakdown."""
    recipe, fed = exp.recipe, exp.recipe.federation
    writer, _, hooks = _start(exp, "local", out, hooks)
    per_round: dict[int, dict[int, dict[str, Any]]] = {r: {} for r in range(1, fed.rounds + 1)}
    finals: dict[int, StateDict] = {}
    for k in range(recipe.partition.num_clients):
        hooks.on_client(k)
        state = clone_state(exp.initial_state)
        for rnd in range(1, fed.rounds + 1):
            t0 = time.perf_counter()
            upd = exp.fit(k, exp.data.client_examples(k), state, rnd, recipe.train.local_steps)
            if upd.is_finite():
                state = add(state, upd.delta)
            t1 = time.perf_counter()
            metrics, samples = _eval_row(exp, state)
            per_round[rnd][k] = {"train_loss": upd.train_loss, **metrics, "train_time_s": t1 - t0,
                                 "samples": samples}
        finals[k] = state
    for rnd in range(1, fed.rounds + 1):
        rows = per_round[rnd]
        mean = {key: _mean([v[key] for v in rows.values()])
                for key in ("train_loss", "eval_loss", "bleu", "accuracy", "train_time_s", "eval_time_s")}
        mean["perplexity"] = math.exp(min(mean["eval_loss"], 700.0))
        row = {"round": rnd, "mode": "local", **mean, "aggregate_time_s": 0.0, "bytes_up": 0,
               "bytes_down": 0, "clients": sorted(rows),
               "per_client": {str(k): {m: v[m] for m in ("train_loss", "eval_loss", "perplexity", "bleu", "accuracy")}
                              for k, v in rows.items()}}
        row["round_time_s"] = row["train_time_s"] + row["eval_time_s"]
        samples = [{"client": k, **s} for k, v in rows.items() for s in v["samples"]]
        writer.log_round(row, samples)
    best = min(finals, key=lambda k: per_round[fed.rounds][k]["eval_loss"])
    return _finish(exp, writer, finals[best], {"adapter_client": best})


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _finish(exp: LMExperiment, writer: RunWriter, state: StateDict, extra: dict | None = None) -> dict:
    if exp.recipe.output.save_adapter:
        exp.save_adapter(state, writer.path / "adapter")
    summary = summarize(writer.rows, {"name": exp.recipe.name, "data": exp.data.stats, **(extra or {})})
    writer.finish(summary)
    return summary


RUNNERS = {"federated": run_federated, "centralized": run_centralized, "local": run_local}
