"""Recipe -> algorithm objects: the one place that reads recipe groups to build the pure algorithms.

The server (:mod:`fedllm.federation.server`) and the client side of the wire
(:mod:`fedllm.federation.uplink`) receive built objects and never look up a name. Each builder
passes the recipe's fields to a registry of :mod:`fedllm.algorithms` (aggregators, server
optimizers, samplers, codecs), whose keys are the names a recipe accepts
(``tests/test_registries.py`` holds the config's ``Literal`` names against them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedllm.algorithms.aggregate import Aggregator, ServerUpdate, aggregators
from fedllm.algorithms.attacks import Attack, attackers
from fedllm.algorithms.compress import Codec, ErrorFeedback, build_codec
from fedllm.algorithms.privacy import DPAggregator, DPConfig, PrivacyLedger, resolve_noise_multiplier
from fedllm.algorithms.robust import build_aggregator
from fedllm.algorithms.selection import ClientSampler, build_sampler
from fedllm.algorithms.server_opt import build_server_update
from fedllm.config import Recipe


def sampler(recipe: Recipe, sizes: Mapping[int, int]) -> ClientSampler:
    """``selection.method`` with its options; ``sizes`` are the clients' example counts."""
    sel, seed, m = recipe.selection, recipe.seed, recipe.clients_per_round
    fraction, n = recipe.federation.fraction, len(sizes)
    kw: dict[str, Any] = {
        "uniform": {"fraction": fraction, "seed": seed},
        "round_robin": {"per_round": m},
        "importance": {"fraction": fraction, "seed": seed, "num_examples": dict(sizes)},
        "power_of_choice": {"d": min(n, sel.candidates or 2 * m), "m": m, "seed": seed,
                            "num_examples": dict(sizes)},
    }[sel.method]
    return build_sampler(sel.method, **kw)


def _aggregator_name(recipe: Recipe) -> str:
    return "fednova" if recipe.federation.algorithm == "fednova" else recipe.robust.aggregator


def aggregator(recipe: Recipe) -> Aggregator:
    """FedNova's normalized mean, or ``robust.aggregator`` (mean, median, trimmed mean, Krum, ...),
    with the options its registration reads from the recipe; ``robust.max_norm`` clips first."""
    name = _aggregator_name(recipe)
    return build_aggregator(name, max_norm=recipe.robust.max_norm, **aggregators()[name].options(recipe))


def aggregator_needs(recipe: Recipe) -> int:
    """Fewest updates the recipe's aggregator can combine (Krum: 2f + 3; most: 1)."""
    return aggregators()[_aggregator_name(recipe)].needs(recipe)


def server_optimizer(recipe: Recipe) -> ServerUpdate:
    """``server.optimizer``: plain application of the aggregate, FedAvgM, FedAdam/Yogi/Adagrad."""
    opt = recipe.server
    kw = {"none": {}, "fedavgm": {"lr": opt.lr, "momentum": opt.momentum}}.get(
        opt.optimizer, {"lr": opt.lr, "beta1": opt.beta1, "beta2": opt.beta2, "tau": opt.tau})
    return build_server_update(opt.optimizer, **kw)


@dataclass(frozen=True)
class Privacy:
    """The DP mechanism of a run: the wrapped aggregator, its ledger and the resolved σ."""

    aggregator: DPAggregator
    ledger: PrivacyLedger
    sigma: float


def privacy(recipe: Recipe, inner: Aggregator, num_clients: int) -> Privacy | None:
    """Client-level DP around ``inner`` (σ resolved from ``target_epsilon`` if set), or None."""
    p = recipe.privacy
    if not p.enabled:
        return None
    per_round = recipe.clients_per_round
    q = per_round / num_clients
    cfg = DPConfig(noise_multiplier=p.noise_multiplier, clip_norm=p.clip, mode=p.dp, adaptive=p.adaptive_clip,
                   target_quantile=p.target_quantile, delta=p.delta, target_epsilon=p.target_epsilon)
    sigma = resolve_noise_multiplier(cfg, q, recipe.federation.rounds, p.accountant)
    cfg = dataclasses.replace(cfg, noise_multiplier=sigma, target_epsilon=None)
    return Privacy(DPAggregator(inner, cfg, per_round, recipe.seed), PrivacyLedger(sigma, q, p.delta, p.accountant),
                   sigma)


def codec(recipe: Recipe) -> tuple[Codec, ErrorFeedback | None]:
    """``compression.codec`` with its options, and error feedback where it applies (lossy codecs)."""
    c = recipe.compression
    kw: dict[str, Any] = {"topk": {"fraction": c.topk_fraction}}.get(c.codec, {})
    if c.codec in ("q8", "q4", "q2"):
        kw = {"seed": recipe.seed}
    feedback = ErrorFeedback() if c.error_feedback and c.codec not in ("none", "fp16") else None
    return build_codec(c.codec, **kw), feedback


def attack(recipe: Recipe, num_clients: int) -> tuple[Attack | None, set[int]]:
    """The simulated attack and the (seeded) attacking clients; (None, set()) without one."""
    a = recipe.attack
    if a.kind == "none":
        return None, set()
    spec = Attack(a.kind, a.fraction, a.scale, a.noise_std, recipe.seed)
    return spec, attackers(range(num_clients), spec)
