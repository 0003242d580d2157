"""Training to convergence: data passes, the best-validation round, early stopping, per-example losses.

One :class:`Watch` per run (per client in local mode) follows the rows a mode writes:

- ``epochs`` (with ``train.local_epochs``): cumulative passes over the run's training data, so the
  three modes can be drawn against the same x-axis. Federated: Σ over the round's training
  clients of nₖ·passesₖ / N (N = every client's training examples); centralized: the same for the
  pooled examples it trained on; local: each client's own passes (their mean in the rows).
- ``val_loss`` (with ``data.validation_fraction``): the best round is the one with the lowest
  val_loss (round 0 included: a run that only got worse says so). Its held-out metrics go to
  ``summary.json`` (``best``) and, with ``output.save_adapter``, its adapter to ``adapter_best/``
  as soon as it is found (a resumed run keeps it).
- ``eval.patience`` N: stop after N evaluations without a new lowest val_loss.
- per-example held-out NLL (language models): ``eval_nll.json`` holds the final round's and, with a
  validation split, the best round's response-token NLL sums and token counts in the eval split's
  order, and with a validation split every evaluated round's sums (``rounds``): what :func:`paired_log_ratio` pairs
  between two modes (``fedllm compare``; the convergence study's ratio against rounds).

Everything is rebuilt from the rows on ``--resume`` except the per-example losses, which are on
disk (``eval_nll.json`` is rewritten at every evaluation, before the round's checkpoint). Local mode
keeps each finished client's watch in its checkpoint instead (:meth:`LocalWatch.client_state`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedllm.config import Recipe
from fedllm.federation.build import data_passes
from fedllm.federation.rundir import write_json_atomic

NLL_FILE = "eval_nll.json"
BEST_KEYS = ("val_loss", "eval_loss", "perplexity", "bleu", "accuracy", "epochs")


def nll_of(res: Any) -> dict[str, list] | None:
    """The per-example losses of an :class:`~fedllm.client.evaluate.EvalResult` (None for classifiers)."""
    sums = getattr(res, "example_sums", None)
    return None if sums is None else {"sums": list(sums), "counts": list(res.example_counts)}


def mean_nll(per_client: list[dict[str, list]]) -> dict[str, list] | None:
    """Local mode's per-example losses: the mean over clients of each client model's sums on the same
    examples, whose token-weighted mean is exactly the mean of the clients' eval losses (the row's)."""
    if not per_client or any(p is None for p in per_client):
        return None
    counts = per_client[0]["counts"]
    if any(p["counts"] != counts for p in per_client):
        raise ValueError("local models were scored on different examples")
    return {"sums": [math.fsum(col) / len(per_client) for col in zip(*(p["sums"] for p in per_client))],
            "counts": counts}


def paired_log_ratio(a: dict[str, list], b: dict[str, list]) -> tuple[float, float | None]:
    """log(perplexity_a / perplexity_b) = L_a − L_b on the same examples, and its paired SE.

    Both losses are token-weighted means over the same examples with the same token counts, so the
    difference is one ratio estimator Σ dᵢ / Σ nᵢ with dᵢ = s_a,i − s_b,i; its SE is
    :func:`fedllm.client.evaluate.loss_standard_error` of (dᵢ, nᵢ) (examples are the draws).
    """
    from fedllm.client.evaluate import loss_standard_error  # noqa: PLC0415  (torch only when pairing)

    if a["counts"] != b["counts"]:
        raise ValueError("the two runs were scored on different examples")
    diffs = [x - y for x, y in zip(a["sums"], b["sums"])]
    return math.fsum(diffs) / sum(a["counts"]), loss_standard_error(diffs, a["counts"])


def ratio_with_interval(a: dict[str, list], b: dict[str, list]) -> dict[str, float | None]:
    """perplexity_a / perplexity_b and its paired 95 % interval exp(Δ ± 1.96·SE)."""
    diff, se = paired_log_ratio(a, b)
    lo, hi = (None, None) if se is None else (math.exp(diff - 1.96 * se), math.exp(diff + 1.96 * se))
    return {"ratio": math.exp(diff), "lo": lo, "hi": hi, "log_ratio": diff, "se": se, "examples": len(a["counts"])}


class Watch:
    """The best-validation round and the patience count of one model's evaluations."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_val: float | None = None
        self.best_round: int | None = None
        self.since = 0  # evaluations since the best one

    def see(self, rnd: int, val_loss: float | None) -> bool:
        """Record one row's val_loss; True when it is a new best."""
        if val_loss is None or not math.isfinite(val_loss):
            if val_loss is not None:  # a non-finite validation loss is an evaluation that did not improve
                self.since += 1
            return False
        if self.best_val is None or val_loss < self.best_val:
            self.best_val, self.best_round, self.since = val_loss, rnd, 0
            return True
        self.since += 1
        return False

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.since >= self.patience


class RunWatch:
    """A federated or centralized run's :class:`Watch`, its data passes and its per-example losses."""

    def __init__(self, exp: Any, path: Path, rows: list[dict[str, Any]] = ()) -> None:
        self.exp, self.recipe, self.path = exp, exp.recipe, path
        self.watch = Watch(exp.recipe.eval.patience)
        self.epochs = 0.0
        self.total = sum(len(exp.data.client_examples(k)) for k in range(exp.recipe.partition.num_clients))
        self.nll: dict[str, Any] = _read_nll(path) if rows else {}
        for row in rows:  # a resumed run: everything but the per-example losses is in its rows
            self.epochs = row.get("epochs", self.epochs)
            self.watch.see(row["round"], row.get("val_loss"))

    def passes(self, row: dict[str, Any], trained: list[tuple[int, int]]) -> None:
        """Add a round's data passes (``trained``: (examples, steps) per model trained) to ``row``."""
        if self.recipe.train.local_epochs is None:
            return
        self.epochs += sum(n * data_passes(self.recipe, n, steps) for n, steps in trained) / max(self.total, 1)
        row["epochs"] = self.epochs

    def observe(self, row: dict[str, Any], res_nll: dict[str, list] | None, state) -> None:
        """After a row is built: the final per-example losses so far, and a new best round's files."""
        if res_nll is not None:
            self.nll["final"] = {"round": row["round"], **res_nll}
            if self.recipe.data.validation_fraction > 0:  # a convergence run: its ratio against rounds
                self.nll.setdefault("rounds", {})[str(row["round"])] = res_nll["sums"]
        if self.watch.see(row["round"], row.get("val_loss")):
            if res_nll is not None:
                self.nll["best"] = {"round": row["round"], **res_nll}
            if self.recipe.output.save_adapter:
                self.exp.save_adapter(state, self.path / "adapter_best")
        if res_nll is not None:  # on disk before the round's checkpoint: a resumed run keeps every round's
            write_json_atomic(self.path / NLL_FILE, self.nll)

    @property
    def stopped(self) -> bool:
        return self.watch.stopped

    def finish(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Write ``eval_nll.json``; the summary's ``train_unit`` and ``best`` blocks."""
        if self.nll:
            write_json_atomic(self.path / NLL_FILE, self.nll)
        out: dict[str, Any] = {"train_unit": train_unit(self.recipe, rows[-1].get("epochs"))}
        if self.watch.best_round is not None:
            row = next(r for r in rows if r["round"] == self.watch.best_round)
            out["best"] = {"round": row["round"], **{k: row.get(k) for k in BEST_KEYS if k in row}}
        if self.watch.stopped:
            out["stopped_early"] = {"round": rows[-1]["round"], "patience": self.watch.patience}
        return out


def train_unit(recipe: Recipe, epochs: float | None) -> dict[str, Any]:
    """How much training a round is, in the recipe's unit (summary.json)."""
    t = recipe.train
    if t.local_epochs is None:
        return {"unit": "steps", "local_steps": t.local_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum}
    return {"unit": "epochs", "local_epochs": t.local_epochs, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "epochs": epochs}


def _read_nll(path: Path) -> dict[str, Any]:
    import json  # noqa: PLC0415

    file = path / NLL_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        return {}


def carried(last: dict[str, Any], evaluated: bool) -> dict[str, Any]:
    """A stopped local client's entry: no training; at evaluation rounds the scores of its unchanged model."""
    entry = {**last, "train_loss": None, "train_time_s": 0.0, "eval_time_s": 0.0, "samples": [], "carried": True}
    if not evaluated:
        entry.update({key: None for key in ("eval_loss", "perplexity", "bleu", "accuracy", "val_loss")})
        entry.pop("client_eval_loss", None)
    return entry


class LocalWatch:
    """Local mode: a :class:`Watch` per client (each stops on its own validation loss), the clients'
    per-example losses (their mean is the local row's), and each client's best round."""

    def __init__(self, exp: Any, path: Path, round0: dict[str, Any], round0_nll: dict[str, list] | None) -> None:
        self.exp, self.path, self.round0, self.round0_nll = exp, path, round0, round0_nll
        self.watches: dict[int, Watch] = {}
        self.final_nll: dict[int, dict[str, list] | None] = {}
        self.by_round: dict[int, dict[int, dict[str, list]]] = {}  # round -> client -> per-example losses
        self.best: dict[int, tuple[dict[str, Any], dict[str, list] | None]] = {}

    def start(self, k: int) -> None:
        """Client ``k`` begins from the shared initial state: round 0 is its first evaluation."""
        self.watches[k] = Watch(self.exp.recipe.eval.patience)
        self.see(k, self.round0, self.round0_nll, None)

    def see(self, k: int, entry: dict[str, Any], nll: dict[str, list] | None, state) -> None:
        if nll is not None:
            self.final_nll[k] = nll
            if self.exp.recipe.data.validation_fraction > 0:
                self.by_round.setdefault(entry["round"], {})[k] = nll
        if self.watches[k].see(entry["round"], entry.get("val_loss")):
            self.best[k] = ({key: entry.get(key) for key in ("round", *BEST_KEYS) if key in entry}, nll)
            if state is not None and self.exp.recipe.output.save_adapter:
                self.exp.save_adapter(state, self.path / "adapter_best" / f"client_{k}")

    def stopped(self, k: int) -> bool:
        return self.watches[k].stopped

    def round0_pair(self) -> tuple[dict[str, Any], dict[str, list] | None]:
        """(round-0 row, its per-example losses): what every client starts from (a checkpoint's part)."""
        return self.round0, self.round0_nll

    def client_state(self, k: int) -> dict[str, Any]:
        """Client ``k``'s part of the watch as plain values (local mode's checkpoint after client ``k``)."""
        w = self.watches[k]
        return {"watch": [w.best_val, w.best_round, w.since], "final_nll": self.final_nll.get(k),
                "by_round": {r: got[k] for r, got in self.by_round.items() if k in got},
                "best": self.best.get(k)}

    def restore(self, k: int, saved: dict[str, Any]) -> None:
        """The inverse of :meth:`client_state` for a client that finished before an interruption."""
        w = self.watches[k] = Watch(self.exp.recipe.eval.patience)
        w.best_val, w.best_round, w.since = saved["watch"]
        if saved["final_nll"] is not None:
            self.final_nll[k] = saved["final_nll"]
        for r, nll in saved["by_round"].items():
            self.by_round.setdefault(r, {})[k] = nll
        if saved["best"] is not None:
            self.best[k] = tuple(saved["best"])

    def finish(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``eval_nll.json`` (the clients' mean per-example losses, final and best) and the summary's
        blocks: ``best`` holds each client's best round and the means of its metrics there."""
        out: dict[str, Any] = {"train_unit": train_unit(self.exp.recipe, rows[-1].get("epochs"))}
        nll = {"final": mean_nll([self.final_nll.get(k) for k in sorted(self.watches)])}
        if self.best and len(self.best) == len(self.watches):
            firsts = [self.best[k][0] for k in sorted(self.best)]
            mean = {key: _mean_of([b.get(key) for b in firsts]) for key in BEST_KEYS if key != "perplexity"}
            mean["perplexity"] = None if mean["eval_loss"] is None else math.exp(min(mean["eval_loss"], 700.0))
            out["best"] = {"round": {str(k): self.best[k][0]["round"] for k in sorted(self.best)},
                           **{k: v for k, v in mean.items() if v is not None or k in ("eval_loss", "val_loss")}}
            nll["best"] = mean_nll([self.best[k][1] for k in sorted(self.best)])
        stops = {str(k): w.best_round for k, w in self.watches.items() if w.stopped}
        if stops:
            out["stopped_early"] = {"clients": sorted(stops), "patience": self.exp.recipe.eval.patience}
        nll = {key: {"round": rows[-1]["round"] if key == "final" else None, **v}
               for key, v in nll.items() if v is not None}
        latest: dict[int, dict[str, list]] = {}  # a stopped client's model is scored as it was last
        rounds = {}
        for r, got in sorted(self.by_round.items()):
            latest.update(got)
            if (mean := mean_nll([latest.get(k) for k in sorted(self.watches)])) is not None:
                rounds[str(r)] = mean["sums"]
        if nll and rounds:
            nll["rounds"] = rounds
        if nll:
            write_json_atomic(self.path / NLL_FILE, nll)
        return out


def _mean_of(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return math.fsum(vals) / len(vals) if vals else None
