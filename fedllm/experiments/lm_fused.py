"""The LM experiment's fused ``fit_many`` (``federation.fused_clients``): a round's clients in one pass.

The per-client parts of :meth:`LMExperiment.fit <fedllm.experiments.lm.LMExperiment.fit>` stay per
client here: an injected failure (``faults``) is that client's result and the others train on; its
loader is seeded by the round seed exactly as alone; its update reports its own losses, optimizer
steps and witnessed gradient steps (the engine's "trained nothing" guard reads them per client).
What cannot fuse is refused by the recipe check (:func:`fedllm.config.fused_problem`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from fedllm.client.fused import FusedJob, fit_fused
from fedllm.client.lm import make_loader
from fedllm.experiments.base import ClientFault, FitJob, round_seed
from fedllm.models.precision import resolve_head_positions
from fedllm.types import ClientUpdate, serialized_bytes


def fused_fit_many(exp, jobs: list[FitJob], rnd: int,
                   on_client: Callable[[int], None] | None = None) -> list[ClientUpdate | Exception]:
    """Train ``jobs`` together on ``exp``'s shared model (an :class:`~fedllm.experiments.lm.LMExperiment`)."""
    r, seed = exp.recipe, round_seed(exp.recipe.seed, rnd)
    results: list[ClientUpdate | Exception | None] = [None] * len(jobs)
    fused, where = [], []
    for i, job in enumerate(jobs):
        if on_client is not None:
            on_client(job.client_id)
        if r.faults.fires(job.client_id, rnd, "error"):
            results[i] = ClientFault(f"injected failure of client {job.client_id} in round {rnd}")
            continue
        loader = make_loader(job.examples, r.train.batch_size, exp.tokenizer.pad_token_id, seed,
                             r.train.length_bucketing)
        fused.append(FusedJob(job.client_id, loader, job.start, job.steps, job.grad_term))
        where.append(i)
    if fused:
        labeled = resolve_head_positions(r.train.head_positions, r.train.precision) == "labeled"
        outs = fit_fused(exp.model, exp.state, fused, r.train, rnd, r.federation.rounds, seed,
                         exp.tokenizer.pad_token_id, labeled)
        for i, out in zip(where, outs):
            results[i] = _update(exp, jobs[i], rnd, out)
    return results


def _update(exp, job: FitJob, rnd: int, out) -> ClientUpdate:
    """The client's :class:`ClientUpdate`, as :meth:`LMExperiment.fit` reports it."""
    r, delta = exp.recipe, out.delta
    if r.faults.fires(job.client_id, rnd, "nan"):
        delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    train_loss = statistics.fmean(out.losses) if out.losses and not out.tripped else float("nan")
    return ClientUpdate(client_id=job.client_id, delta=delta, num_examples=len(job.examples),
                        local_steps=len(out.losses) // r.train.grad_accum, train_loss=train_loss,
                        bytes_up=serialized_bytes(delta), grad_steps=out.grad_steps, metrics={})
