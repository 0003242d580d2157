"""Hierarchical federated learning: regions aggregate their clients every round, the server
combines the regions every ``hierarchy.global_every`` rounds (client-edge-cloud FL, e.g. Liu et
al., "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020).

:class:`Regions` is the regional tier the :class:`~fedllm.federation.server.FederatedServer` holds
when ``hierarchy.regions`` > 0. Both tiers use the server's own aggregation (robust rules, DP and
SVD LoRA aggregation included); regions weigh by the examples they aggregated since the last sync.
Between syncs the global model is unchanged: clients start from their region's model, the
evaluated model is the regions' mean, and the row reports the worst regional LoRA error; at a sync
it reports the global model's error against every client trained since the last one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fedllm.algorithms.aggregate import MeanAggregator, mean_delta
from fedllm.algorithms.lora_agg import aggregation_error, lora_aggregate
from fedllm.config import Recipe
from fedllm.federation.screening import global_change_problem
from fedllm.types import ClientUpdate, StateDict, add, clone_state, subtract

log = logging.getLogger(__name__)

Aggregate = Callable[[StateDict, list[ClientUpdate], dict], StateDict]  # (start, updates, metrics) -> delta


def region_members(num_clients: int, regions: int, by: str) -> list[list[int]]:
    """The clients of each region: ``contiguous`` blocks, or round robin (client k in region k mod R)."""
    if by == "contiguous":
        bounds = [round(i * num_clients / regions) for i in range(regions + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(regions)]
    return [list(range(r, num_clients, regions)) for r in range(regions)]


class Regions:
    """The regional models between global syncs, and what the next sync needs (see the module docstring)."""

    def __init__(self, recipe: Recipe, num_clients: int, has_lora: bool, model_bytes: int,
                 payload_bytes: Callable[[StateDict], int]) -> None:
        h = recipe.hierarchy
        self.recipe, self.has_lora, self.model_bytes, self.payload_bytes = recipe, has_lora, model_bytes, payload_bytes
        self.members = region_members(num_clients, h.regions, h.by)
        self.region_of = {k: i for i, members in enumerate(self.members) for k in members}
        self.regional: dict[int, StateDict] = {}
        self.examples: dict[int, int] = {}  # examples aggregated per region since the last sync
        self.sync_clients: list[tuple[float, StateDict]] = []  # (examples, client state), for the error

    def start_state(self, client_id: int) -> StateDict | None:
        """The model client ``client_id`` starts from: its region's, once the region has one since the last sync."""
        region = self.region_of.get(client_id)
        return self.regional.get(region) if region is not None else None

    def eval_state(self, global_state: StateDict) -> StateDict:
        """What to evaluate: the global model, or between syncs the regions' mean."""
        if not self.regional:
            return global_state
        models = [self.regional.get(i, global_state) for i in range(len(self.members))]
        return MeanAggregator(weighted=True)([ClientUpdate(i, m, len(self.members[i]), 1, 0.0)
                                              for i, m in enumerate(models)])

    def round(self, rnd: int, global_state: StateDict, updates: list[ClientUpdate], metrics: dict,
              aggregate: Aggregate, needs: int, apply: Callable[[StateDict, StateDict], StateDict]) -> StateDict:
        """Each region aggregates its clients' updates (``aggregate``: the server's rule; a region with
        fewer than ``needs`` updates, or whose change fails the global-change check, stays as it was);
        at a sync round the regions' models are combined and ``apply`` (the server optimizer) steps
        the global state. Returns the new global state (the old one between syncs)."""
        by_region: dict[int, list[ClientUpdate]] = {}
        for u in updates:
            by_region.setdefault(self.region_of[u.client_id], []).append(u)
        errors = []
        for region, ups in sorted(by_region.items()):
            if len(ups) < needs:
                log.warning("round %d: region %d has %d updates, fewer than its aggregator needs (%d); "
                            "region unchanged", rnd, region, len(ups), needs)
                continue
            start = self.regional.get(region, global_state)
            regional_metrics: dict[str, Any] = {}
            candidate = add(start, aggregate(start, ups, regional_metrics))
            why = global_change_problem(start, candidate, self.recipe.federation.max_change_ratio)
            if why is not None:  # the region's round is rejected; its model stays as it was
                log.warning("round %d: region %d: %s; region unchanged", rnd, region, why)
                metrics.setdefault("regions_rejected", {})[region] = why
                continue
            if self.has_lora:
                self.sync_clients += [(float(u.num_examples), add(start, u.delta)) for u in ups]
            self.examples[region] = self.examples.get(region, 0) + sum(u.num_examples for u in ups)
            self.regional[region] = candidate
            if "lora_aggregation_error" in regional_metrics:
                errors.append(regional_metrics["lora_aggregation_error"])
        if errors:
            metrics["lora_aggregation_error"] = max(errors)
        metrics["global_sync"] = rnd % self.recipe.hierarchy.global_every == 0
        metrics["bytes_up_regional"] = metrics["bytes_down_regional"] = 0
        if not metrics["global_sync"] or not self.examples:
            return global_state
        return self._sync(global_state, metrics, apply)

    def _sync(self, global_state: StateDict, metrics: dict,
              apply: Callable[[StateDict, StateDict], StateDict]) -> StateDict:
        """The global tier: the regions' models, weighed by their examples, become the global one."""
        region_ups = [ClientUpdate(i, subtract(self.regional[i], global_state), n, 1, 0.0)
                      for i, n in sorted(self.examples.items())]
        if len(region_ups) == 1:  # one region trained: its model is the mean (no re-factorization)
            delta = region_ups[0].delta
        elif self.has_lora and self.recipe.federation.lora_aggregation == "svd":
            delta = lora_aggregate(global_state, region_ups, "svd", weighted=True)[0]
        else:
            delta = mean_delta(region_ups, weighted=True)
        new_state = apply(global_state, delta)
        if self.sync_clients:
            total = sum(w for w, _ in self.sync_clients)
            metrics["lora_aggregation_error"] = aggregation_error(
                new_state, [c for _, c in self.sync_clients], [w / total for w, _ in self.sync_clients])
        metrics["bytes_up_regional"] = sum(self.payload_bytes(u.delta) for u in region_ups)
        metrics["bytes_down_regional"] = self.model_bytes * len(self.members)
        self.regional, self.examples, self.sync_clients = {}, {}, []
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {"regional": {i: clone_state(s) for i, s in self.regional.items()},
                "region_examples": dict(self.examples),
                "sync_clients": [[w, clone_state(c)] for w, c in self.sync_clients]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.regional = {int(i): clone_state(s) for i, s in state["regional"].items()}
        self.examples = {int(i): int(n) for i, n in state["region_examples"].items()}
        self.sync_clients = [(float(w), clone_state(c)) for w, c in state["sync_clients"]]
