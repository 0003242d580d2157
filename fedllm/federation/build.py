"""Recipe -> algorithm objects: the one place that reads recipe groups to build the pure algorithms.

The server (:mod:`fedllm.federation.server`) and the client side of the wire
(:mod:`fedllm.federation.uplink`) receive built objects and never look up a name. Each builder
passes the recipe's fields to a registry of :mod:`fedllm.algorithms` (aggregators, server
optimizers, samplers, codecs), whose keys are the names a recipe accepts
(``tests/test_registries.py`` holds the config's ``Literal`` names against them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
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
from fedllm.types import ClientStates


def sampler(recipe: Recipe, sizes: Mapping[int, int],
            labels: Mapping[int, Sequence[float]] | None = None) -> ClientSampler:
    """``selection.method`` with its options; ``sizes`` are the clients' example counts, ``labels``
    their label histograms (diversity sampling only)."""
    sel, seed, m = recipe.selection, recipe.seed, recipe.clients_per_round
    fraction, n = recipe.federation.fraction, len(sizes)
    kw: dict[str, Any] = {
        "uniform": {"fraction": fraction, "seed": seed},
        "poisson": {"fraction": fraction, "seed": seed},
        "round_robin": {"per_round": m},
        "importance": {"fraction": fraction, "seed": seed, "num_examples": dict(sizes)},
        "power_of_choice": {"d": min(n, sel.candidates or 2 * m), "m": m, "seed": seed,
                            "num_examples": dict(sizes)},
        "diversity": {"fraction": fraction, "seed": seed, "label_histograms": labels},
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
    """The DP mechanism of a run: the wrapped aggregator, its ledger and the resolved σ.

    ``ledger`` accounts the guarantee that holds (:func:`privacy_claim`); ``central`` is the
    aggregate-only ε beside it when that differs (client DP without secure aggregation).
    """

    aggregator: DPAggregator
    ledger: PrivacyLedger
    sigma: float
    central: PrivacyLedger | None = None


def sampling_scheme(recipe: Recipe) -> str:
    """How the accountant models client selection (see :class:`fedllm.algorithms.privacy.PrivacyLedger`)."""
    m, n = recipe.clients_per_round, recipe.partition.num_clients
    if recipe.selection.method == "poisson":
        return "full" if recipe.federation.fraction >= 1 else "poisson"
    if recipe.selection.method == "uniform":
        return "full" if m >= n else "without_replacement"
    return "full"  # round_robin (deterministic), importance (size-weighted): no amplification claimed


def steps_per_epoch(recipe: Recipe, num_examples: int) -> int:
    """Optimizer steps of one pass over ``num_examples``: ceil(n / batch_size) batches, and with
    ``grad_accum`` > 1 one step per ``grad_accum`` batches (Lightning steps on an epoch's last batch too);
    with ``train.devices`` N a batch is the N processes' batches together (N x batch_size examples)."""
    t = recipe.train
    return max(1, math.ceil(math.ceil(num_examples / (t.batch_size * t.devices)) / t.grad_accum))


def local_steps(recipe: Recipe, num_examples: int) -> int:
    """Optimizer steps a client runs per round: ``train.local_steps``, or ``train.local_epochs`` whole
    passes over its ``num_examples``."""
    t = recipe.train
    if t.local_epochs is not None:  # integer epochs: exactly E passes; a fraction rounds up to whole steps
        return max(1, math.ceil(steps_per_epoch(recipe, num_examples) * t.local_epochs - 1e-9))
    return t.local_steps


def centralized_steps(recipe: Recipe, client_sizes: list[int]) -> int:
    """Steps of a centralized round matched to a federated round whose clients hold ``client_sizes``:
    with ``local_epochs`` E, E passes over their pooled examples (all clients sampled: the whole pooled
    data E times); with ``local_steps``, as many steps as the clients ran together."""
    if recipe.train.local_epochs is not None:
        return local_steps(recipe, sum(client_sizes))
    return sum(local_steps(recipe, n) for n in client_sizes)


def data_passes(recipe: Recipe, num_examples: int, steps: int) -> float:
    """Passes over ``num_examples`` that ``steps`` optimizer steps make (exact under ``local_epochs``)."""
    return steps / steps_per_epoch(recipe, num_examples)


def client_steps(recipe: Recipe, num_examples: int, straggler: bool = False) -> int:
    """The steps a client is asked for in a round: :func:`local_steps`, a straggler's share of them."""
    steps = local_steps(recipe, num_examples)
    return max(1, math.floor(steps * recipe.faults.straggler_speed)) if straggler else steps


def privacy_claim(recipe: Recipe) -> dict[str, Any]:
    """Who the run's ε holds against, and for which mechanism (written to ``summary.json``)."""
    p = recipe.privacy
    scheme = sampling_scheme(recipe)
    if p.dp == "server":
        against = "anyone who sees the global models; the server itself is trusted (it adds the noise)"
    elif p.secure_aggregation:
        against = "the server too: secure aggregation hides each upload, the noise of all uploads protects the sum"
    else:
        against = "the server too: each upload carries only its own share of the noise (sigma/sqrt(m))"
    return {"epsilon_holds_against": against, "dp": p.dp, "sampling": scheme,
            "neighbouring": "replace one client" if scheme == "without_replacement" else "add or remove one client",
            "delta": p.delta, "accountant": "rdp (dp_accounting)" if scheme == "without_replacement" else p.accountant}


def privacy(recipe: Recipe, inner: Aggregator, num_clients: int) -> Privacy | None:
    """Client-level DP around ``inner`` (σ resolved from ``target_epsilon`` if set), or None.

    Under ``dp: client`` without secure aggregation the server sees every upload with its own
    noise N(0, σ²C²/m): the ledger accounts that upload's noise multiplier σ/√m (and
    ``target_epsilon`` is met by it); the aggregate-only ε is kept beside it (``central``).
    """
    p = recipe.privacy
    if not p.enabled:
        return None
    per_round = recipe.clients_per_round
    q, scheme = per_round / num_clients, sampling_scheme(recipe)
    expected = None
    if recipe.selection.method == "poisson":  # q is the inclusion probability; the mean's denominator is qK
        q = recipe.federation.fraction
        expected = q * num_clients
    local = p.dp == "client" and not p.secure_aggregation
    scale = math.sqrt(per_round) if local else 1.0  # aggregate sigma / the sigma the ledger accounts
    cfg = DPConfig(noise_multiplier=p.noise_multiplier, clip_norm=p.clip, mode=p.dp, adaptive=p.adaptive_clip,
                   target_quantile=p.target_quantile, delta=p.delta, target_epsilon=p.target_epsilon)
    if p.target_epsilon is not None:
        sigma = scale * resolve_noise_multiplier(cfg, q, recipe.federation.rounds, p.accountant, scheme, num_clients)
    else:
        sigma = p.noise_multiplier
    cfg = dataclasses.replace(cfg, noise_multiplier=sigma, target_epsilon=None)

    def ledger(noise: float) -> PrivacyLedger:
        return PrivacyLedger(noise, q, p.delta, p.accountant, scheme, num_clients)

    return Privacy(DPAggregator(inner, cfg, per_round, recipe.seed, expected), ledger(sigma / scale), sigma,
                   ledger(sigma) if local else None)


def codec(recipe: Recipe, residuals: ClientStates | None = None) -> tuple[Codec, ErrorFeedback | None]:
    """``compression.codec`` with its options, and error feedback where it applies (lossy codecs),
    its residuals kept in ``residuals`` (in memory when None)."""
    c = recipe.compression
    kw: dict[str, Any] = {"topk": {"fraction": c.topk_fraction}}.get(c.codec, {})
    if c.codec in ("q8", "q4", "q2"):
        kw = {"seed": recipe.seed}
    feedback = ErrorFeedback(residuals) if c.error_feedback and c.codec not in ("none", "fp16") else None
    return build_codec(c.codec, **kw), feedback


def attack(recipe: Recipe, num_clients: int) -> tuple[Attack | None, set[int]]:
    """The simulated attack and the (seeded) attacking clients; (None, set()) without one."""
    a = recipe.attack
    if a.kind == "none":
        return None, set()
    scale = (a.boost or float(recipe.clients_per_round)) if a.kind == "backdoor" else a.scale  # γ = n/η, η = 1
    rounds = tuple(a.backdoor_rounds) if a.kind == "backdoor" and a.backdoor_rounds is not None else None
    spec = Attack(a.kind, a.fraction, scale, a.noise_std, recipe.seed, a.ipm_epsilon, a.alie_z, rounds)
    return spec, attackers(range(num_clients), spec)
