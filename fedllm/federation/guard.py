"""The engine's guard against training that silently changes nothing.

A run whose clients never trained (every gradient cut, every update exactly zero) would still
write a full set of metrics: unchanged losses, bytes sent, a comparison table. fedllm once did
exactly that on CPUs with AVX512-BF16 (see :mod:`fedllm.models.quant`). The guard makes such a
run fail with one line that names the cause. Two checks, in every mode and for both tasks:

1. **No gradient.** A client fit with ``train.lr > 0`` that ran optimizer steps, yet after none of
   its backward passes held any trainable parameter a non-zero gradient
   (``ClientUpdate.grad_steps == 0``), trained nothing: the backward pass never reached the
   adapter (or the weights).
2. **No change.** Every finite update of a round (federated: the round's arrivals before any
   upload transform; centralized and local: each fit) is exactly zero with ``train.lr > 0``.

``train.noop_guard: warn`` turns both into warnings (for a deliberate experiment, e.g. a learning
rate so small that fp32 rounds every step away); ``train.lr: 0`` is a deliberate no-op and is
never flagged. Updates that do not report ``grad_steps`` (an external engine's, say) skip check 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedllm.config import Recipe
from fedllm.errors import IntegrityError
from fedllm.types import ClientUpdate

log = logging.getLogger(__name__)


class NoTrainingError(IntegrityError):
    """Training ran but changed nothing; the message names where and the likely cause."""


@torch.no_grad()
def _all_zero(upd: ClientUpdate) -> bool:
    return all(not bool(t.ne(0).any()) for t in upd.delta.values())


def _problem(updates: Sequence[ClientUpdate], lr: float, where: str) -> str | None:
    for upd in updates:
        if upd.grad_steps == 0 and upd.local_steps > 0:
            who = "the centralized model" if upd.client_id < 0 else f"client {upd.client_id}"
            return (f"{where}: {who} ran {upd.local_steps} optimizer steps with train.lr={lr:g} but no "
                    "trainable parameter ever received a non-zero gradient (the backward pass does not "
                    "reach the adapter; see fedllm.models.quant for the 4-bit CPU kernel)")
    finite = [u for u in updates if u.is_finite()]
    if finite and all(_all_zero(u) for u in finite):
        n = len(finite)
        which = f"all {n} finite updates are" if n > 1 else "the only finite update is"
        return f"{where}: {which} exactly zero with train.lr={lr:g}: training changed no trainable parameter"
    return None


def check_progress(recipe: Recipe, updates: Sequence[ClientUpdate], where: str) -> None:
    """Raise :class:`NoTrainingError` (or warn, with ``train.noop_guard: warn``) if nothing trained."""
    lr = recipe.train.lr
    if lr <= 0 or not updates:
        return
    problem = _problem(updates, lr, where)
    if problem is None:
        return
    if recipe.train.noop_guard == "warn":
        log.warning("%s (train.noop_guard: warn, continuing)", problem)
        return
    raise NoTrainingError(problem + "; set train.noop_guard=warn to continue anyway")

