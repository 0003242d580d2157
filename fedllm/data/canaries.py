"""Example canaries (``privacy.audit`` with kind example): random-secret records in the clients' data.

Canary j is a question about a random name whose answer is a random string of digits (one token
per digit in SmolLM2's tokenizer, ``privacy.audit.secret_digits`` of them: 40 bits at 12 digits),
drawn from the recipe's seed. Each canary is a member with probability 1/2
(:func:`plan_canaries`); a member joins the training data of its client
(dealt round-robin over ``privacy.audit.clients``), a non-member is kept aside as the control.
Both are tokenized exactly like the data's own rows (the recipe's template and system prompt), so
a model cannot tell a canary's format from its membership. The secrets are written to the run
directory's ``audit/canaries.json`` only, never to a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedllm.config import Recipe
from fedllm.data.text import Example, tokenize

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class CanaryPlan:
    """Which canaries are in (Sᵢ = 1, probability 1/2 each, seeded) and whose data holds each one.

    ``clients[j]``: the client whose data an example canary joins if it is a member (it is scored
    on that client's uploads either way); -1 for client canaries, which are clients of their own.
    """

    members: tuple[bool, ...]
    clients: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.members)


def plan_canaries(count: int, seed: int, clients: Sequence[int] = ()) -> CanaryPlan:
    """``count`` canaries, each a member with probability 1/2 independently (Steinke et al.'s
    Poisson design); example canaries are dealt round-robin over ``clients`` in a seeded order."""
    if count < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {count}")
    rng = np.random.default_rng([seed, 36, 1])
    members = tuple(bool(b) for b in rng.random(count) < 0.5)
    if not clients:
        return CanaryPlan(members, tuple([-1] * count))
    order = rng.permutation(count)
    owner = [0] * count
    for pos, j in enumerate(order):
        owner[int(j)] = int(clients[pos % len(clients)])
    return CanaryPlan(members, tuple(owner))


@dataclass(frozen=True)
class Canary:
    """One planted record: its tokens, whether it is a member, the client whose data holds it."""

    id: int
    example: Example
    member: bool
    client: int
    prompt: str
    secret: str


def canary_rows(count: int, seed: int, digits: int) -> list[tuple[str, str]]:
    """(prompt, secret) of each canary: a random six-letter name and ``digits`` random digits."""
    rng = np.random.default_rng([seed, 36, 3])
    out = []
    for _ in range(count):
        name = "".join(LETTERS[i] for i in rng.integers(0, 26, 6)).capitalize()
        secret = "".join(str(d) for d in rng.integers(0, 10, digits))
        out.append((f"What is the account code of {name}?", secret))
    return out


def _row(recipe: Recipe, prompt: str, secret: str) -> dict[str, Any]:
    cfg = recipe.data
    if cfg.messages_field:
        return {cfg.messages_field: [{"role": "user", "content": prompt}, {"role": "assistant", "content": secret}]}
    return {cfg.prompt_field: prompt, cfg.response_field: secret}


def plant_canaries(data: Any, recipe: Recipe, tokenizer: Any) -> Any:
    """Add the recipe's example canaries to ``data`` (a :class:`~fedllm.data.build.TextData`) in place:
    members into their client's training positions, every canary into ``data.canaries``."""
    audit = recipe.privacy.audit
    if not audit.canaries or audit.unit(recipe.privacy.dp) != "example":
        return data
    owners = audit.clients if audit.clients is not None else range(len(data.clients))
    plan: CanaryPlan = plan_canaries(audit.canaries, recipe.seed, list(owners))
    for j, (prompt, secret) in enumerate(canary_rows(audit.canaries, recipe.seed, audit.secret_digits)):
        example = tokenize(_row(recipe, prompt, secret), -(j + 1), tokenizer, recipe.data, f"privacy.audit canary {j}")
        data.examples.append(example)
        if plan.members[j]:
            data.clients[plan.clients[j]].append(len(data.examples) - 1)
        data.canaries.append(Canary(j, example, plan.members[j], plan.clients[j], prompt, secret))
    data.stats["canaries"] = audit.canaries
    data.stats["canary_members"] = sum(plan.members)
    return data
