"""Three modes, one partition: federated, centralized (pooled client data) and local-only.

All three call the same ``exp.fit`` (:class:`fedllm.experiments.base.Experiment`: same
LightningModule, same optimizer settings) on the same partition and evaluate on the same held-out
split; only the orchestration differs:

- federated: each round, sampled clients train ``local_steps`` from the global state; the server
  aggregates their deltas (GradualDiff-Fed or FedAvg) and applies them.
- centralized: one model on the union of the clients' training data, trained each round for as
  many optimizer steps as the whole federation ran that round (sampled clients x local_steps), or
  with ``train.local_epochs`` E passes over the sampled clients' pooled examples.
- local: every client trains alone for the same rounds; metrics per client and their mean.

With a validation split every mode keeps its best round and may stop early
(:mod:`fedllm.federation.convergence`).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from fedllm.algorithms.selection import UniformSampler
from fedllm.config import Recipe, RecipeError, one_line
from fedllm.errors import IntegrityError
from fedllm.experiments.base import Experiment, FitJob
from fedllm.federation import build
from fedllm.federation.audit import attach_audit
from fedllm.federation.audit_report import audit_at_end
from fedllm.federation.build import local_steps
from fedllm.federation.checkpoint import (
    ServerState,
    capture_rng,
    checkpoint_dir,
    recipe_fingerprint,
    restore_rng,
    resume_state,
    rows_problem,
    save_checkpoint,
)
from fedllm.federation.convergence import LocalWatch, RunWatch, carried, nll_of
from fedllm.federation.guard import check_progress
from fedllm.federation.rundir import RunWriter, run_dir, same_split, summarize
from fedllm.federation.server import FederatedServer
from fedllm.federation.topology import make_server
from fedllm.types import StateDict, add, clone_state

log = logging.getLogger(__name__)

MODES = ("federated", "centralized", "local")


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The uniform sample of round ``rnd`` (the federated default; centralized mode matches its steps)."""
    return UniformSampler(fraction, seed).sample(rnd, range(num_clients))


def _eval_row(exp: Experiment, state: StateDict, clients: list[int] | None = None):
    """(metrics, samples, per-example losses): the held-out split's metrics; with
    ``data.validation_fraction`` also ``val_loss``; with ``eval.client_holdout`` also ``client_eval_loss``
    (client -> loss of ``state`` on that client's own held-out slice; ``clients`` limits which) and its spread."""
    t0 = time.perf_counter()
    res = exp.evaluate(state)
    row = {"eval_loss": res.eval_loss, "perplexity": res.perplexity, "bleu": res.bleu, "accuracy": res.accuracy}
    if res.eval_loss_se is not None:
        row["eval_loss_se"] = res.eval_loss_se
    if getattr(res, "val_loss", None) is not None:
        row["val_loss"] = res.val_loss
    if getattr(res, "backdoor_success", None) is not None:
        row["backdoor_success"] = res.backdoor_success
    if exp.recipe.eval.client_holdout > 0:
        own = exp.evaluate_clients(state, clients)
        row["client_eval_loss"] = {str(k): v for k, v in sorted(own.items())}
        row.update(_spread(list(own.values())))
    row["eval_time_s"] = time.perf_counter() - t0
    return row, res.samples, nll_of(res)


def _spread(losses: list[float], name: str = "client_eval_loss") -> dict[str, float | None]:
    finite = [v for v in losses if math.isfinite(v)]
    return {f"{name}_min": min(finite) if finite else None,
            f"{name}_max": max(finite) if finite else None,
            f"{name}_mean": statistics.fmean(finite) if finite else None}


def _personal_eval(exp: Experiment, server: FederatedServer, state: StateDict) -> dict[str, Any]:
    """``federation.personalize``: each client's own model on its own held-out slice, and the spread.

    Set beside ``client_eval_loss`` (the global model on the same slices); a client that has not
    trained yet holds the global B, so its personal model is the global one.
    """
    t0 = time.perf_counter()
    own: dict[int, float] = {}
    for k in range(exp.recipe.partition.num_clients):
        own.update(exp.evaluate_clients(server.personal_state(k, state), [k]))
    return {"personal_eval_loss": {str(k): v for k, v in sorted(own.items())},
            **_spread(list(own.values()), "personal_eval_loss"), "personal_eval_time_s": time.perf_counter() - t0}


def _round0(mode: str, exp: Experiment, state: StateDict):
    metrics, samples, nll = _eval_row(exp, state)
    row = {"round": 0, "mode": mode, "train_loss": None, **metrics, "round_time_s": 0.0,
           "train_time_s": 0.0, "aggregate_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": []}
    if mode == "federated" and exp.recipe.privacy.enabled:
        row["epsilon"] = 0.0  # nothing spent before the first round
    if exp.recipe.train.local_epochs is not None:
        row["epochs"] = 0.0  # data passes so far (convergence.RunWatch)
    return row, samples, nll


class Hooks:
    """Progress callbacks the CLI plugs in (all optional): a round starts (``on_round(r, rounds)``; in
    local mode once per client and round), a client starts training, an evaluation of round ``r``
    starts (``on_eval(r)``; round 0 is the starting state)."""

    def __init__(self, on_round: Callable[[int, int], None] | None = None,
                 on_client: Callable[[int], None] | None = None,
                 on_eval: Callable[[int], None] | None = None) -> None:
        self.on_round = on_round or (lambda r, total: None)
        self.on_client = on_client or (lambda k: None)
        self.on_eval = on_eval or (lambda r: None)


def _start(exp: Experiment, mode: str, out: str | None, hooks: Hooks | None):
    """A fresh run directory with its round-0 row, the starting state, the hooks to use, and
    (round-0 row, its per-example losses) for the run's watch."""
    writer = RunWriter(run_dir(exp.recipe, mode, out), exp.recipe, exp.data.partition_json())
    state = clone_state(exp.initial_state)
    hooks = hooks or Hooks()
    hooks.on_eval(0)
    row, samples, nll = _round0(mode, exp, state)
    writer.log_round(row, samples)
    return writer, state, _with_loggers(exp, writer, hooks), (row, nll)


def _with_loggers(exp: Experiment, writer: RunWriter, hooks: Hooks) -> Hooks:
    """With ``output.loggers``: every client fit logs its step losses under the client it trains."""
    if writer.loggers is None:
        return hooks
    logs, inner = writer.loggers, hooks.on_client
    callback = logs.callback()
    exp.step_callbacks.append(callback)

    def detach() -> None:  # the experiment outlives the run (compare runs three modes on it)
        if callback in exp.step_callbacks:
            exp.step_callbacks.remove(callback)

    writer.detach = detach

    def on_client(k: int) -> None:
        logs.client = k
        inner(k)

    return Hooks(hooks.on_round, on_client, hooks.on_eval)


def _draw_key(rnd: int, attempt: int) -> int:
    """The sampling key of a round's attempt: the round itself first, a distinct one per retry."""
    return rnd if attempt == 0 else rnd + attempt * 10_000_019


def _train_clients(exp: Experiment, server: FederatedServer, plan, state: StateDict, rnd: int,
                   hooks: Hooks) -> tuple[list[float], dict[str, int]]:
    """Run the plan's clients and hand each update to the server's upload path.

    The round's raw updates (before any upload transform) must show that training happened
    (:func:`~fedllm.federation.guard.check_progress`).
    """
    losses, counts, arrived, jobs = [], {"failed_clients": 0}, [], []
    for k in plan.training:  # every start and drift term is fixed before any upload (a round's inputs)
        examples = exp.data.client_examples(k)
        steps = build.client_steps(exp.recipe, len(examples), k in plan.stragglers)
        start = server.start_state(k, state)
        jobs.append(FitJob(k, examples, start, steps, server.grad_term(k, start)))
    for job, upd in zip(jobs, exp.fit_many(jobs, rnd, hooks.on_client)):
        k, start = job.client_id, job.start
        if isinstance(upd, IntegrityError):  # not one client's failure: nothing the run computes can be trusted
            raise upd
        if isinstance(upd, Exception):  # a failing client never takes the round down
            log.warning("round %d: client %d failed (%s: %s); left out of aggregation",
                        rnd, k, type(upd).__name__, one_line(str(upd)))
            counts["failed_clients"] += 1
            continue
        if math.isfinite(upd.train_loss):
            losses.append(upd.train_loss)
        arrived.append(upd)
        server.upload(rnd, upd, start)
    check_progress(exp.recipe, arrived, f"round {rnd}")
    return losses, counts


def _resume(exp: Experiment, mode: str, out: str | None, hooks: Hooks | None,
            load: Callable[[ServerState], None] = lambda ckpt: None, holder: str = "state"):
    """(writer, checkpoint, hooks) continuing ``mode``'s run after its newest checkpoint that verifies;
    None when it has none. ``load`` restores what else the checkpoint holds (the server's state)
    before any file of the run is touched."""
    path = run_dir(exp.recipe, mode, out)
    ckpt = resume_state(checkpoint_dir(path), exp.recipe, exp.initial_state)
    if ckpt is None:
        if (path / "summary.json").exists():
            raise RecipeError("--resume", f"{path} holds a finished run without checkpoints "
                              "(checkpoint.enabled: false?); run without --resume to start over")
        return None
    if not same_split(path, exp.data.partition_json()):
        raise RecipeError("--resume", f"the data split differs from {path / 'partition.json'} (the data file "
                          "or its partition changed since the run started); run without --resume to start over")
    if (why := rows_problem(ckpt)) is not None:  # the rows the resumed run's files continue from
        raise RecipeError(str(checkpoint_dir(path)), f"the checkpoint of round {ckpt.round} is not this run's: "
                          f"its {why}; run without --resume to start over")
    try:
        load(ckpt)
        restore_rng(ckpt.rng_states)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise RecipeError(str(checkpoint_dir(path)), f"the checkpoint of round {ckpt.round} does not fit this "
                          f"run's {holder} ({type(exc).__name__}: {one_line(str(exc))[:200]}); run without "
                          "--resume to start over") from None
    writer = RunWriter(path, exp.recipe, exp.data.partition_json(), resume_rows=ckpt.metrics_rows)
    log.info("resuming %s after %s", path, f"round {ckpt.round}" if mode != "local"
             else f"clients {sorted(ckpt.client_states)} (each client's rounds run in turn)")
    return writer, ckpt, _with_loggers(exp, writer, hooks or Hooks())


def _checkpoint(exp: Experiment, writer: RunWriter, rnd: int, state: StateDict, **parts: Any) -> None:
    """With ``checkpoint.enabled``: everything a resume needs after round ``rnd`` (``parts``: the
    mode's own pieces, e.g. the server's state)."""
    if exp.recipe.checkpoint.enabled:
        save_checkpoint(checkpoint_dir(writer.path), ServerState(
            round=rnd, global_state=state, rng_states=capture_rng(), metrics_rows=writer.rows,
            fingerprint=recipe_fingerprint(exp.recipe), **parts), keep=exp.recipe.checkpoint.keep)


def _resume_or_start(exp: Experiment, server: FederatedServer, out: str | None, hooks: Hooks | None,
                     resume: bool):
    """(writer, global state, hooks, first round, watch): from the last good checkpoint, or fresh."""
    got = _resume(exp, "federated", out, hooks, lambda ckpt: server.load_state_dict(ckpt.server_state),
                  "server") if resume else None
    if got is None:
        writer, state, hooks, first = _start(exp, "federated", out, hooks)
        watch = RunWatch(exp, writer.path)
        watch.observe(*first, server.eval_state(state))
        return writer, state, hooks, 1, watch
    writer, ckpt, hooks = got
    return writer, clone_state(ckpt.global_state), hooks, ckpt.round + 1, RunWatch(exp, writer.path, writer.rows)


def run_federated(exp: Experiment, out: str | None = None, hooks: Hooks | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Rounds of: sample, train, upload, validate, aggregate, apply, evaluate, checkpoint.

    With ``resume`` the run continues after the newest checkpoint that verifies (identical
    results to an uninterrupted run: sampling and client seeds depend only on (seed, round), and
    every stateful piece of the server is in the checkpoint).
    """
    recipe, fed = exp.recipe, exp.recipe.federation
    sizes = [len(exp.data.client_examples(k)) for k in range(recipe.partition.num_clients)]
    server = make_server(exp, sizes, run_dir(recipe, "federated", out))  # federation.topology / clusters
    writer, state, hooks, first, watch = _resume_or_start(exp, server, out, hooks, resume)
    auditor = attach_audit(exp, server, writer.path, first)  # privacy.audit: canaries scored as the server sees them
    for rnd in range(first, fed.rounds + 1):
        if watch.stopped:  # eval.patience: no new best val_loss in that many evaluations
            break
        hooks.on_round(rnd, fed.rounds)
        t0 = time.perf_counter()
        train_s = 0.0
        spent = {"bytes_up": 0, "bytes_down": 0, "failed_clients": 0}  # summed over every attempt
        for attempt in range(fed.max_retries + 1 if fed.on_too_few == "retry" else 1):
            plan = server.begin_round(_draw_key(rnd, attempt))
            t_train = time.perf_counter()
            losses, counts = _train_clients(exp, server, plan, state, rnd, hooks)
            train_s += time.perf_counter() - t_train
            new_state, extra = server.finish_round(rnd, state)
            for key in spent:
                spent[key] += (counts if key in counts else extra)[key]
            if extra["applied"]:
                break
        if auditor is not None:
            auditor.after_round(rnd, state, new_state)
        state = new_state
        t2 = time.perf_counter()
        metrics, samples, nll = _maybe_eval(exp, server.eval_state(state), rnd, hooks=hooks)
        if server.personal_keys and metrics["eval_loss"] is not None:
            metrics.update(_personal_eval(exp, server, state))
            metrics["eval_time_s"] += metrics.pop("personal_eval_time_s")
        nonfinite = sum("non-finite" in why for why in extra["rejected"].values())
        row = {"round": rnd, "mode": "federated", "train_loss": statistics.fmean(losses) if losses else None,
               **metrics, "round_time_s": 0.0, "train_time_s": train_s,
               "aggregate_time_s": t2 - t0 - train_s, "clients": plan.sampled, "attempts": attempt + 1,
               "dropped_clients": plan.dropped, "stragglers": plan.stragglers,
               "skipped_nonfinite": nonfinite, **counts, **extra, **spent}
        row["round_time_s"] = row["train_time_s"] + row["aggregate_time_s"] + row["eval_time_s"]
        watch.passes(row, [(n, build.client_steps(recipe, n, k in plan.stragglers))
                           for k in plan.training for n in [len(exp.data.client_examples(k))]])
        writer.log_round(row, samples)
        watch.observe(row, nll, server.eval_state(state))
        _checkpoint(exp, writer, rnd, state, server_state=server.state_dict())
    personal = ((k, server.personal_state(k, state)) for k in sorted(server.personal))  # one at a time
    summary = _finish(exp, writer, state, {**watch.finish(writer.rows), **audit_at_end(auditor, state, writer.rows)},
                      personal=personal)
    if not recipe.checkpoint.enabled:  # no checkpoint names the per-client files: nothing can resume from them
        shutil.rmtree(writer.path / "client_state", ignore_errors=True)
    return summary


def _evaluates(exp: Experiment, rnd: int) -> bool:
    return rnd % exp.recipe.eval.every == 0 or rnd == exp.recipe.federation.rounds


def _maybe_eval(exp: Experiment, state: StateDict, rnd: int, clients: list[int] | None = None,
                hooks: Hooks | None = None):
    """Evaluate every ``eval.every`` rounds and at the last round; otherwise null metrics.

    All three modes go through here, so a comparison evaluates them at the same rounds.
    """
    if _evaluates(exp, rnd):
        if hooks is not None:
            hooks.on_eval(rnd)
        return _eval_row(exp, state, clients)
    return {"eval_loss": None, "perplexity": None, "bleu": None, "accuracy": None, "eval_time_s": 0.0}, [], None


def run_centralized(exp: Experiment, out: str | None = None, hooks: Hooks | None = None,
                    resume: bool = False) -> dict[str, Any]:
    """One model on the pooled data; with ``resume`` it continues after its newest checkpoint (the
    same rows and state as an uninterrupted run: each fit's seed depends only on (seed, round))."""
    recipe, fed = exp.recipe, exp.recipe.federation
    if (got := _resume(exp, "centralized", out, hooks) if resume else None) is not None:
        writer, ckpt, hooks = got
        state, start, watch = clone_state(ckpt.global_state), ckpt.round + 1, RunWatch(exp, writer.path, writer.rows)
    else:
        writer, state, hooks, first = _start(exp, "centralized", out, hooks)
        start, watch = 1, RunWatch(exp, writer.path)
        watch.observe(*first, state)
    pooled = exp.data.train_examples
    for rnd in range(start, fed.rounds + 1):
        if watch.stopped:  # eval.patience
            break
        hooks.on_round(rnd, fed.rounds)
        t0 = time.perf_counter()
        sampled = sample_clients(recipe.partition.num_clients, fed.fraction, recipe.seed, rnd)
        sizes = [len(exp.data.client_examples(k)) for k in sampled]
        steps = build.centralized_steps(recipe, sizes)
        upd = exp.fit(-1, pooled, state, rnd, steps)
        check_progress(recipe, [upd], f"centralized round {rnd}")
        if upd.is_finite():
            state = add(state, upd.delta)
        else:
            log.warning("round %d: centralized update is non-finite; state unchanged", rnd)
        t1 = time.perf_counter()
        metrics, samples, nll = _maybe_eval(exp, state, rnd, hooks=hooks)
        row = {"round": rnd, "mode": "centralized", "train_loss": upd.train_loss, **metrics,
               "round_time_s": t1 - t0 + metrics["eval_time_s"], "train_time_s": t1 - t0,
               "aggregate_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": [],
               "local_steps": upd.local_steps}
        watch.passes(row, [(sum(sizes), steps)])
        writer.log_round(row, samples)
        watch.observe(row, nll, state)
        _checkpoint(exp, writer, rnd, state)
    return _finish(exp, writer, state, watch.finish(writer.rows))


def run_local(exp: Experiment, out: str | None = None, hooks: Hooks | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Each client alone; rows carry the mean over clients and a ``per_client`` breakdown.

    The clients train one after another; with ``checkpoint.enabled`` a checkpoint after each client
    holds every finished client (its model, its rows, its watch), so ``resume`` continues with the
    first client that had not finished."""
    recipe, fed = exp.recipe, exp.recipe.federation
    per_round: dict[int, dict[int, dict[str, Any]]] = {r: {} for r in range(1, fed.rounds + 1)}
    finals: dict[int, StateDict] = {}
    if (got := _resume(exp, "local", out, hooks) if resume else None) is not None:
        writer, ckpt, hooks = got
        watch = LocalWatch(exp, writer.path, *ckpt.server_state["round0"])
        for k, done in sorted(ckpt.client_states.items()):
            finals[k] = done["final"]
            for rnd, entry in done["rounds"].items():
                per_round[rnd][k] = entry
            watch.restore(k, done["watch"])
    else:
        writer, _, hooks, first = _start(exp, "local", out, hooks)
        watch = LocalWatch(exp, writer.path, *first)
    for k in range(recipe.partition.num_clients):
        if k in finals:  # finished before the run was interrupted
            continue
        finals[k] = _train_alone(exp, k, watch, per_round, hooks)
        _checkpoint(exp, writer, 0, exp.initial_state, server_state={"round0": watch.round0_pair()},
                    client_states={j: {"final": finals[j], "rounds": {r: got[j] for r, got in per_round.items()
                                                                      if j in got},
                                       "watch": watch.client_state(j)} for j in finals})
    names = exp.data.partition_json().get("client_names")  # shown beside each client's numbers
    rounds = max((r for r, rows in per_round.items() if any(not v.get("carried") for v in rows.values())), default=0)
    for rnd in range(1, rounds + 1):
        row, samples = _local_row(recipe, rnd, per_round[rnd], names)
        writer.log_round(row, samples)
    best = min(finals, key=lambda k: per_round[rounds][k]["eval_loss"])
    named = {"adapter_client_name": names[best]} if names else {}
    return _finish(exp, writer, finals[best], {"adapter_client": best, **named, **watch.finish(writer.rows)})


def _train_alone(exp: Experiment, k: int, watch: LocalWatch, per_round: dict[int, dict[int, dict[str, Any]]],
                 hooks: Hooks) -> StateDict:
    """Client ``k``'s rounds on its own data from the initial state (``per_round[r][k]``: its entries);
    returns its final model."""
    recipe, fed = exp.recipe, exp.recipe.federation
    hooks.on_client(k)
    state, last = clone_state(exp.initial_state), None
    watch.start(k)
    for rnd in range(1, fed.rounds + 1):
        if watch.stopped(k):  # eval.patience: client k's model stays as it is; its scores are known
            per_round[rnd][k] = carried(last, _evaluates(exp, rnd))
            continue
        hooks.on_round(rnd, fed.rounds)
        t0 = time.perf_counter()
        examples = exp.data.client_examples(k)
        upd = exp.fit(k, examples, state, rnd, local_steps(recipe, len(examples)))
        check_progress(recipe, [upd], f"local round {rnd}")
        if upd.is_finite():
            state = add(state, upd.delta)
        t1 = time.perf_counter()
        metrics, samples, nll = _maybe_eval(exp, state, rnd, [k], hooks)  # client k's own slice only
        per_round[rnd][k] = entry = {"train_loss": upd.train_loss, **metrics, "train_time_s": t1 - t0,
                                     "samples": samples}
        if recipe.train.local_epochs is not None:
            entry["epochs"] = (last or {}).get("epochs", 0.0) + build.data_passes(recipe, len(examples),
                                                                                    upd.local_steps)
        last = entry
        watch.see(k, {"round": rnd, **entry}, nll, state)
    return state


def _local_row(recipe: Recipe, rnd: int, rows: dict[int, dict[str, Any]],
               names: list[str] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Local mode's row of round ``rnd`` (the mean over clients, and each client's numbers) and its samples."""
    mean = {key: _mean([v[key] for v in rows.values()])
            for key in ("train_loss", "eval_loss", "bleu", "accuracy", "train_time_s", "eval_time_s")}
    mean.update({key: _mean([v.get(key) for v in rows.values()]) for key in ("val_loss", "epochs")
                 if any(key in v for v in rows.values())})
    mean["eval_time_s"] = mean["eval_time_s"] or 0.0
    mean["perplexity"] = None if mean["eval_loss"] is None else math.exp(min(mean["eval_loss"], 700.0))
    row = {"round": rnd, "mode": "local", **mean, "aggregate_time_s": 0.0, "bytes_up": 0,
           "bytes_down": 0, "clients": sorted(rows),
           "per_client": {str(k): {**({"name": names[k]} if names else {}),
                                   **{m: v[m] for m in ("train_loss", "eval_loss", "perplexity", "bleu", "accuracy")}}
                          for k, v in rows.items()}}
    if recipe.eval.client_holdout > 0:  # each local model on its own client's slice
        own = {str(k): v["client_eval_loss"][str(k)] for k, v in rows.items()
               if str(k) in v.get("client_eval_loss", {})}
        row["client_eval_loss"] = own
        row.update(_spread(list(own.values())))
    row["round_time_s"] = row["train_time_s"] + row["eval_time_s"]
    return row, [{"client": k, **s} for k, v in rows.items() for s in v["samples"]]


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _finish(exp: Experiment, writer: RunWriter, state: StateDict, extra: dict | None = None,
            personal: Iterable[tuple[int, StateDict]] = ()) -> dict:
    if exp.recipe.output.save_adapter:
        exp.save_adapter(state, writer.path / "adapter")
        for k, own in personal:  # federation.personalize: each client's own adapter
            exp.save_adapter(own, writer.path / "personal" / f"client_{k}")
    # the numeric path this run's numbers came from (versions, CPU flags, the 4-bit kernel)
    if exp.recipe.privacy.enabled:  # who the epsilon holds against, for which mechanism
        extra = {"privacy": build.privacy_claim(exp.recipe), **(extra or {})}
    summary = summarize(writer.rows, {"name": exp.recipe.name, "data": exp.data.stats,
                                      "machine": exp.runtime_info(), **(extra or {})})
    writer.detach()
    writer.finish(summary)
    return summary


RUNNERS = {"federated": run_federated, "centralized": run_centralized, "local": run_local}
