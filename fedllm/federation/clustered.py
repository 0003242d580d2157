"""Clustered FL (IFCA) in the federated round loop: k cluster models, each client trains its best fit.

``federation.clusters: k`` (k > 1) swaps :class:`~fedllm.federation.server.FederatedServer` for a
:class:`ClusterServer` with the same round protocol, so :func:`fedllm.federation.modes.run_federated`
(rows, checkpoints, ``--resume``, ``fedllm compare``) runs unchanged. One round (the update rule and
its source are in :mod:`fedllm.algorithms.clustered`)::

    sample clients (selection.method, faults as usual)
    each sampled client i downloads the k models, scores each on its own training data (loss_on) and
    trains the one with the lowest loss             start_state(i) = θ_ĵᵢ
    the server averages the deltas per cluster      θ_j ← θ_j + mean_{ĵᵢ = j} Δᵢ   (GradualDiff / FedAvg)

What the run reports and keeps:

- every evaluated round, every client (sampled or not) picks its cluster again under the new models
  (the same rule, IFCA's inference step); ``personal_eval_loss`` is each client's held-out loss
  under that cluster's model (``eval.client_holdout`` is required), ``client_eval_loss`` the
  headline model's on the same slices;
- the headline model (the loop's "global" state: the row's ``eval_loss``, BLEU, ``adapter/``) is the
  cluster serving the most clients in that assignment (``eval_cluster``; ties: lowest index);
- rows carry ``cluster_of`` (who trained which cluster), ``cluster_sizes``, and on evaluated rounds
  ``cluster_assignment``, ``cluster_eval_loss`` (each model on the shared held-out split);
- ``clusters.json``: per round the training choice, every probe loss, the sizes, and the evaluated
  assignment; ``clusters/cluster_<j>/``: each cluster's adapter (``output.save_adapter``), which
  ``fedllm export RUN --cluster j`` exports.

Bytes: a sampled client downloads all k models (the probe needs them) and uploads one delta.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.algorithms.clustered import assign, cluster_means, farthest_first, perturbed_inits, representative
from fedllm.algorithms.drift import DriftTerm, Proximal
from fedllm.algorithms.selection import Availability
from fedllm.experiments.base import Experiment
from fedllm.federation import build
from fedllm.federation.rundir import write_json_atomic
from fedllm.federation.screening import (
    check_counts,
    global_change_problem,
    relative_norm_violations,
    validate_update,
)
from fedllm.federation.server import RoundPlan
from fedllm.types import ClientUpdate, StateDict, add, clone_state, global_norm

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.json"


class ClusterServer:
    """IFCA's server: k models, the clients' cluster choices, per-cluster means (module docstring)."""

    def __init__(self, exp: Experiment, client_sizes: Sequence[int], run_path: Path | None = None) -> None:
        r = self.recipe = exp.recipe
        self.exp, self.run_path, fed = exp, run_path, r.federation
        self.k, self.client_sizes = fed.clusters, [int(s) for s in client_sizes]
        self.template = clone_state(exp.initial_state)
        self.models = perturbed_inits(self.template, self.k, fed.cluster_init_scale, r.seed)
        self.applied = [0] * self.k  # rounds applied to each cluster model
        self.warm_clients: list[int] = []  # cluster_init: clients / farthest — who each model started from
        self.warm_distances: list[float] = []  # farthest: the cosine distance at which each was chosen
        self._warm = fed.cluster_init in ("clients", "farthest")  # done before round 1 (not again on --resume)
        self._zero_init = global_norm(self.template) == 0
        self.model_bytes = exp.payload_bytes(self.template)
        self.sampler = build.sampler(r, dict(enumerate(self.client_sizes)))
        f = r.faults
        self.availability = Availability(f.dropout_prob, r.seed, f.straggler_fraction, f.straggler_speed)
        self.personal_keys = list(self.template)  # each client is scored under its own cluster's model
        self.personal: list[int] = []  # no per-client adapters: the k cluster adapters are saved instead
        self.assignment: dict[int, int] = {}  # every client's choice at the last evaluation
        self.headline = 0
        self.history: list[dict[str, Any]] = []  # clusters.json's rounds
        self._reset()

    def _reset(self) -> None:
        self.cluster_of: dict[int, int] = {}
        self.losses: dict[int, list[float]] = {}
        self._arrived: dict[int, ClientUpdate] = {}
        self._rejected: dict[int, str] = {}
        self._bytes_up = self._bytes_down = 0

    def probe(self, client_id: int) -> tuple[int, list[float]]:
        """Client ``client_id``'s choice: the cluster whose model has the lowest loss on its training data."""
        examples = self.exp.data.client_examples(client_id)
        losses = [self.exp.loss_on(model, examples) for model in self.models]
        return assign(losses), losses

    # ------------------------------------------------------------------ the round protocol

    def _warm_start(self) -> None:
        """``cluster_init: clients``: model j starts as θ₀ + Δ of one local fit of client c_j, the c_j
        k distinct clients drawn with the seed (a data-driven spread, where noise around one
        pretrained base can leave every client preferring the same model). ``farthest``: every client
        fits once, and the c_j are chosen far apart by their updates' directions
        (:func:`~fedllm.algorithms.clustered.farthest_first`; the first drawn with the seed), so two
        clients of one population no longer both seed a model by chance. Cost: n fits instead of k."""
        self._warm = False
        n, rng = len(self.client_sizes), np.random.default_rng([self.recipe.seed, 0xC1F5])
        if self.recipe.federation.cluster_init == "farthest":  # every client fits; k far apart are kept
            deltas = [self._warm_fit(c) for c in range(n)]
            self.warm_clients, self.warm_distances = farthest_first(deltas, self.k, int(rng.integers(n)))
        else:
            self.warm_clients = sorted(int(c) for c in rng.choice(n, size=self.k, replace=False))
            deltas = {c: self._warm_fit(c) for c in self.warm_clients}
        for j, c in enumerate(self.warm_clients):
            self.models[j] = add(self.template, deltas[c])

    def _warm_fit(self, client_id: int) -> StateDict:
        """Client ``client_id``'s Δ from one local fit of the shared initial state (round 0)."""
        examples = self.exp.data.client_examples(client_id)
        upd = self.exp.fit(client_id, examples, self.template, 0, build.client_steps(self.recipe, len(examples)))
        if not upd.is_finite():
            kind = self.recipe.federation.cluster_init
            raise ValueError(f"cluster_init {kind}: client {client_id}'s warm-start fit is not finite")
        return upd.delta

    def begin_round(self, rnd: int) -> RoundPlan:
        if self._warm:
            self._warm_start()
        self._reset()
        sampled = sorted(self.sampler.sample(rnd, list(range(len(self.client_sizes)))))
        fate = self.availability.decide(rnd, sampled, self.recipe.train.local_steps)
        steps = dict(fate.steps)
        if self.recipe.faults.stragglers == "drop":
            for k in fate.stragglers:
                steps.pop(k, None)
        self._bytes_down = len(sampled) * self.k * self.model_bytes  # the probe needs every model
        return RoundPlan(rnd, sampled, steps, list(fate.dropped), list(fate.stragglers))

    def start_state(self, client_id: int, global_state: StateDict | None) -> StateDict:
        self.cluster_of[client_id], self.losses[client_id] = self.probe(client_id)
        return self.models[self.cluster_of[client_id]]

    def grad_term(self, client_id: int, start: StateDict) -> DriftTerm | None:
        fed = self.recipe.federation
        return Proximal(fed.mu, start) if fed.algorithm == "fedprox" and fed.mu > 0 else None

    def upload(self, rnd: int, update: ClientUpdate, start: StateDict) -> None:
        k, fed = update.client_id, self.recipe.federation
        known = self.client_sizes[k] if 0 <= k < len(self.client_sizes) else None
        reason = (validate_update(update, self.template, fed.reject_norm)
                  or check_counts(update, known, fed.max_client_examples))
        if reason is None and (k not in self.cluster_of or k in self._arrived):
            reason = "not a client that chose a cluster this round, or a second update from it"
        if reason is not None:
            self._reject(rnd, k, reason)
            return
        self._arrived[k] = update
        self._bytes_up += self.exp.payload_bytes(update.delta)

    def _reject(self, rnd: int, client_id: int, reason: str) -> None:
        log.warning("round %d: update of client %d rejected: %s", rnd, client_id, reason)
        self._rejected[client_id] = reason

    def finish_round(self, rnd: int, global_state: StateDict) -> tuple[StateDict, dict[str, Any]]:
        """Per-cluster means applied; on evaluated rounds every client's choice, the per-cluster scores
        and the headline model; ``clusters.json`` rewritten."""
        fed = self.recipe.federation
        outliers = relative_norm_violations(list(self._arrived.values()), fed.reject_norm_factor)
        for k, why in outliers.items():
            self._reject(rnd, k, why)
        valid = [u for k, u in sorted(self._arrived.items()) if k not in outliers]
        applied = len(valid) >= fed.min_clients
        cluster_rejected: dict[int, str] = {}
        if applied:
            means = cluster_means(valid, self.cluster_of, self.k, fed.is_weighted, fed.max_client_weight)
            for j, delta in means.items():
                candidate = add(self.models[j], delta)
                # the change bound is measured against the model before its init noise, as the server's is
                # against the initial state: skipped for a cluster's first round when that state is zero
                ratio = None if self.applied[j] == 0 and self._zero_init else fed.max_change_ratio
                why = global_change_problem(self.models[j], candidate, ratio)
                if why is None:
                    self.models[j] = candidate
                    self.applied[j] += 1
                else:
                    log.warning("round %d: cluster %d: %s; cluster unchanged", rnd, j, why)
                    cluster_rejected[j] = why
        sizes = [sum(1 for u in valid if self.cluster_of[u.client_id] == j) for j in range(self.k)]
        metrics: dict[str, Any] = {
            "rejected": dict(sorted(self._rejected.items())), "aggregated_clients": [u.client_id for u in valid],
            "applied": applied, "bytes_up": self._bytes_up, "bytes_down": self._bytes_down,
            "rejected_updates": len(self._rejected), "cluster_of": {str(k): j for k, j in sorted(self.cluster_of.items())},
            "cluster_sizes": sizes}
        if cluster_rejected:
            metrics["clusters_rejected"] = {str(j): why for j, why in cluster_rejected.items()}
        entry = {"round": rnd, "trained": dict(sorted(self.cluster_of.items())),
                 "probe_losses": dict(sorted(self.losses.items())), "sizes": sizes, "applied": applied}
        if rnd % self.recipe.eval.every == 0 or rnd == fed.rounds:  # the rounds the loop evaluates
            metrics.update(self._evaluate(rnd))
            entry.update({k: metrics[k] for k in ("cluster_assignment", "cluster_eval_loss", "eval_cluster")})
        self.history.append(entry)
        self._write_files()
        return self.models[self.headline], metrics

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        """Every client's choice under the new models, the headline cluster, each model's held-out score."""
        t0 = time.perf_counter()
        self.assignment = {k: self.probe(k)[0] for k in range(len(self.client_sizes))}
        self.headline = representative([list(self.assignment.values()).count(j) for j in range(self.k)])
        scores = [self.exp.evaluate(model).eval_loss for model in self.models]
        if self.recipe.output.save_adapter and self.run_path is not None:
            for j, model in enumerate(self.models):
                self.exp.save_adapter(model, self.run_path / "clusters" / f"cluster_{j}")
        return {"cluster_assignment": {str(k): j for k, j in self.assignment.items()},
                "cluster_eval_loss": [s if math.isfinite(s) else None for s in scores],
                "eval_cluster": self.headline, "cluster_eval_time_s": time.perf_counter() - t0}

    def _write_files(self) -> None:
        if self.run_path is None or not self.run_path.exists():
            return
        fed = self.recipe.federation
        lora = any(".lora_B" in key for key in self.template)
        write_json_atomic(self.run_path / CLUSTERS_FILE, {
            "algorithm": "IFCA (Ghosh et al. 2020), model averaging", "clusters": self.k,
            "init": ({"kind": fed.cluster_init, "clients": self.warm_clients, "seed": self.recipe.seed,
                      **({"cosine_distance_when_chosen": self.warm_distances} if self.warm_distances else {})}
                     if fed.cluster_init in ("clients", "farthest") else
                     {"kind": "perturbation", "scale": fed.cluster_init_scale,
                      "tensors": "lora_B" if lora else "all", "seed": self.recipe.seed}),
            "final": {"assignment": {str(k): j for k, j in self.assignment.items()}, "eval_cluster": self.headline,
                      "adapters": {str(j): f"clusters/cluster_{j}" for j in range(self.k)}
                      if self.recipe.output.save_adapter else {}},
            "rounds": [{**e, "trained": {str(k): j for k, j in e["trained"].items()},
                        "probe_losses": {str(k): v for k, v in e["probe_losses"].items()}} for e in self.history]})

    def eval_state(self, global_state: StateDict) -> StateDict:
        return self.models[self.headline]

    def personal_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """The model of the cluster client ``client_id`` chose at the last evaluation."""
        if client_id not in self.assignment:
            self.assignment[client_id] = self.probe(client_id)[0]
        return self.models[self.assignment[client_id]]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"models": [clone_state(m) for m in self.models], "assignment": dict(self.assignment),
                "headline": self.headline, "history": list(self.history), "applied": list(self.applied),
                "warm_clients": list(self.warm_clients), "warm_distances": list(self.warm_distances),
                "sampler": self.sampler.state_dict(),
                "availability": self.availability.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["models"]) != self.k or any(m.keys() != self.template.keys() for m in state["models"]):
            raise ValueError(f"the checkpoint does not hold {self.k} cluster models of this adapter")
        self.models = [clone_state(m) for m in state["models"]]
        self.assignment = {int(k): int(j) for k, j in state["assignment"].items()}
        self.headline = int(state["headline"])
        self.applied = [int(n) for n in state["applied"]]
        self.warm_clients, self._warm = [int(c) for c in state["warm_clients"]], False
        self.warm_distances = [float(d) for d in state.get("warm_distances", [])]
        self.history = [dict(e) for e in state["history"]]
        self.sampler.load_state_dict(state["sampler"])
        self.availability.load_state_dict(state["availability"])
