"""Aggregation math: pure functions over client deltas.

Every aggregator here maps a list of :class:`~fedllm.types.ClientUpdate` to one aggregated delta
Δ (a ``dict[str, Tensor]``); a :class:`ServerUpdate` then turns (θ_g, Δ) into the next global state.
Keeping the two apart lets robust aggregators, DP and secure aggregation wrap the first, and
server optimizers (FedAvgM, FedAdam, ...) replace the second, in any combination.

GradualDiff-Fed (the paper's Algorithm 2): each client i sends Δᵢ = θᵢ − θ_g over the trainable
(adapter) state; the server sets θ_g ← θ_g + (1/K) Σᵢ Δᵢ. With ``weighted=True`` the mean is
weighted by each client's number of examples instead.

FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): θ_g ← Σᵢ (nᵢ/n) θᵢ, which equals θ_g + Σᵢ (nᵢ/n) Δᵢ; so it is the weighted
mean of deltas applied with step 1.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedllm.types import ClientUpdate, StateDict, add, weighted_sum


class Aggregator(Protocol):
    """Maps the round's valid client updates to one aggregated delta."""

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict: ...


class ServerUpdate(Protocol):
    """Turns the global state and the aggregated delta into the next global state.

    Stateful implementations (server optimizers) expose their state for checkpoints.
    """

    def step(self, global_state: StateDict, delta: StateDict) -> StateDict: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Registered:
    """An aggregator a recipe can name (``robust.aggregator``; FedNova by ``federation.algorithm``)."""

    factory: Callable[..., Aggregator]        # options -> the aggregator
    options: Callable[[Any], dict[str, Any]]  # the recipe -> its options
    needs: Callable[[Any], int]               # the recipe -> fewest updates it can combine


_AGGREGATORS: dict[str, Registered] = {}


def register_aggregator(name: str, options: Callable[[Any], dict[str, Any]] = lambda recipe: {},
                        needs: Callable[[Any], int] = lambda recipe: 1):
    """Class/function decorator: make ``name`` an aggregator a recipe can choose.

    Adding an aggregator is one module in ``fedllm/algorithms/`` that decorates its class (and
    its test); :func:`aggregators` finds it. The recipe's ``robust.aggregator`` names are held
    against this registry by ``tests/test_registries.py``.
    """
    def decorate(factory):
        if name in _AGGREGATORS and _AGGREGATORS[name].factory is not factory:
            raise ValueError(f"aggregator {name!r} is registered twice")
        _AGGREGATORS[name] = Registered(factory, options, needs)
        return factory

    return decorate


@functools.cache
def _discover() -> None:
    """Import every module of ``fedllm.algorithms`` once, so each registers its aggregators."""
    import fedllm.algorithms as package  # noqa: PLC0415  (the package itself: same layer)

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def aggregators() -> dict[str, Registered]:
    """Every registered aggregator by name."""
    _discover()
    return dict(_AGGREGATORS)


def client_weights(updates: Sequence[ClientUpdate], weighted: bool, max_weight: float | None = None) -> list[float]:
    """Weights summing to 1: by number of examples when ``weighted``, else uniform (1/K); with
    ``max_weight`` no one weight exceeds it (:func:`cap_weights`)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if not weighted:
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("weighted aggregation needs a positive total number of examples")
    return cap_weights([u.num_examples / total for u in updates], max_weight)


def cap_weights(weights: Sequence[float], cap: float | None) -> list[float]:
    """``weights`` (summing to 1) with none above ``cap``: the excess of a clipped weight goes to
    the unclipped ones in proportion to their weights (water-filling), so the sum stays 1.

    The cap a round can honour is at least 1/K (K equal shares), so the cap applied is
    ``max(cap, 1/K)``. Weights already within it are returned unchanged, the same floats: the
    cap is a no-op (bit for bit) for every round where no client holds more than ``cap``. The
    loop ends within K passes (each pass clips at least one more weight or stops).
    """
    weights = [float(w) for w in weights]
    if cap is None or not weights:
        return weights
    cap = max(float(cap), 1.0 / len(weights))
    if max(weights) <= cap:
        return weights
    clipped: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in clipped]
        rest = sum(weights[i] for i in free)
        share = (1.0 - cap * len(clipped)) / rest if rest > 0 else 0.0
        over = {i for i in free if weights[i] * share > cap}
        if not over:
            return [cap if i in clipped else weights[i] * share for i in range(len(weights))]
        clipped |= over


def mean_delta(updates: Sequence[ClientUpdate], weighted: bool = False) -> StateDict:
    """(1/K) Σ Δᵢ, or Σ (nᵢ/n) Δᵢ when ``weighted`` (GradualDiff-Fed and FedAvg)."""
    return weighted_sum([u.delta for u in updates], client_weights(updates, weighted))


@register_aggregator("mean", options=lambda recipe: {"weighted": recipe.federation.is_weighted,
                                                     "max_weight": recipe.federation.max_client_weight})
class MeanAggregator:
    """The plain (optionally example-weighted) mean of the client deltas; ``max_weight``: no client's
    weight above that share of the round (``federation.max_client_weight``, :func:`cap_weights`)."""

    def __init__(self, weighted: bool = False, max_weight: float | None = None) -> None:
        self.weighted, self.max_weight = weighted, max_weight

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        return weighted_sum([u.delta for u in updates], client_weights(updates, self.weighted, self.max_weight))


class ApplyDelta:
    """θ_g ← θ_g + Δ: the server step of GradualDiff-Fed and FedAvg (stateless)."""

    def step(self, global_state: StateDict, delta: StateDict) -> StateDict:
        return add(global_state, delta)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def build_named(kind: str, registry: Mapping[str, Callable[..., Any]], name: str, **kw: Any) -> Any:
    """``registry[name](**kw)``, with one-line errors naming the ``kind`` for an unknown name or bad
    options (the recipe-facing builders of aggregators, server optimizers and samplers share it)."""
    factory = registry.get(name)
    if factory is None:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(registry)}")
    try:
        return factory(**kw)
    except TypeError as err:
        raise ValueError(f"{kind} {name!r} got bad options {sorted(kw)}: {err}") from err
