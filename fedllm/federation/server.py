"""The server side of a federated round: validate, aggregate, apply, account.

One round, as :func:`fedllm.federation.modes.run_federated` drives it::

    plan = server.begin_round(rnd)               # sampler + availability -> who trains, how long
    for k in plan.training:                      # each client, from server.start_state(k):
        upd = exp.fit(..., grad_term=server.grad_term(k, start))      # a typed DriftTerm or None
        server.upload(rnd, upd, start)           # arrival: structure check, then the client's uplink
    state, metrics = server.finish_round(rnd, state)

The algorithm objects come built from the recipe (:mod:`fedllm.federation.build`); what a client
does to its update before it leaves the device (attack simulation, SCAFFOLD's control, client DP,
compression, masking) is :mod:`fedllm.federation.uplink`. ``finish_round`` is what the server
does with what arrived: the norm bound, aggregation (mean / robust / FedNova / LoRA, wrapped by
server-side DP), the server optimizer, SCAFFOLD's control variates, hierarchical tiers
(:mod:`fedllm.federation.hierarchy`) and the privacy ledger. Under secure aggregation the server
only ever holds masked tensors and their sum.

Everything stateful (optimizer moments, control variates, error-feedback residuals, sampler,
DP clip, privacy ledger, regional models) is in :meth:`state_dict`, so a checkpointed run resumes
to the same result. Memory does not grow with the clients: where the rule is a mean the round's
updates are folded as they arrive (:meth:`_fold_arrival`), and per-client state lives in a store
on disk (:mod:`fedllm.federation.store`) whose index is what the checkpoint keeps. (The validation
rules are pure functions in :mod:`fedllm.federation.screening`.)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedllm.algorithms.afa import AFA
from fedllm.algorithms.aggregate import MeanAggregator, client_weights
from fedllm.algorithms.attacks import COLLUDING, collude
from fedllm.algorithms.audit import CanaryClients
from fedllm.algorithms.cclip import CenteredClipping
from fedllm.algorithms.drift import (
    Correction,
    DriftTerm,
    FedNovaAggregator,
    Proximal,
    ScaffoldState,
    fednova_coefficients,
    scaffold_correction,
)
from fedllm.algorithms.he import HERound
from fedllm.algorithms.lora_agg import RankLayout, lora_aggregate, lora_pairs
from fedllm.algorithms.privacy import (
    DPAggregator,
    PrivacyLedger,
)
from fedllm.algorithms.robust import NormBound
from fedllm.algorithms.secure import MaskedSum, SecAggRound
from fedllm.algorithms.selection import Availability
from fedllm.config import Recipe
from fedllm.federation import build
from fedllm.federation.hierarchy import Regions
from fedllm.federation.screening import (
    NORM_HISTORY,
    check_counts,
    few_norm_violations,
    global_change_problem,
    norm_violation,
    relative_norm_violations,
    validate_update,
)
from fedllm.federation.store import DiskStates
from fedllm.federation.uplink import Uplink
from fedllm.types import (
    ClientStates,
    ClientUpdate,
    RunningSum,
    StateDict,
    clone_state,
    global_norm,
    serialized_bytes,
)

log = logging.getLogger(__name__)

SECAGG_SCALE_BITS, SECAGG_MODULUS_BITS = 30, 62  # per-coordinate rounding 2^-31; |sum| < 2^31 / K


@dataclass
class RoundPlan:
    """Who was sampled, who trains and for how many steps; who dropped or straggled."""

    round: int
    sampled: list[int]
    steps: dict[int, int]  # clients that will report -> local steps they complete
    dropped: list[int] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)

    @property
    def training(self) -> list[int]:
        return sorted(self.steps)


class FederatedServer:
    """The federated server for one recipe (see the module docstring for the round protocol)."""

    def __init__(self, recipe: Recipe, initial_state: StateDict, client_sizes: Sequence[int],
                 payload_bytes: Callable[[Mapping[str, torch.Tensor]], int] | None = None,
                 mask: Mapping[str, torch.Tensor] | None = None, mask_bytes: int = 0,
                 uplink_on_site: bool = False, state_dir: str | Path | None = None,
                 client_labels: Mapping[int, Sequence[float]] | None = None) -> None:
        self.recipe, r = recipe, recipe
        # per-client state (SCAFFOLD controls, error-feedback residuals, personal B): on disk under
        # ``state_dir`` (a run directory's client_state/), else in memory
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._stores: list[DiskStates] = []
        self.uplink_on_site = uplink_on_site  # sites noise and encode their updates themselves (Flower)
        fed, seed = r.federation, r.seed
        self.num_clients, self.per_round = len(client_sizes), r.clients_per_round
        self.client_sizes = [int(n) for n in client_sizes]  # what the server knows; reports must match
        self.template = clone_state(initial_state)
        self.payload_bytes = payload_bytes or serialized_bytes
        self.model_bytes = self.payload_bytes(self.template)  # every state/delta/control has its layout
        self.mask, self.mask_bytes = (dict(mask) if mask else None), mask_bytes
        self.has_mask: set[int] = set()  # clients that already downloaded the mask (sent once)
        self.sampler = build.sampler(r, dict(enumerate(self.client_sizes)), client_labels)  # labels: diversity
        f = r.faults
        self.availability = Availability(f.dropout_prob, seed, f.straggler_fraction, f.straggler_speed)
        self.server_opt = build.server_optimizer(r)
        self.aggregator = build.aggregator(r)
        self.min_updates = build.aggregator_needs(r)
        dp = build.privacy(r, self.aggregator, self.num_clients)
        self.dp: DPAggregator | None = dp.aggregator if dp else None
        self.ledger: PrivacyLedger | None = dp.ledger if dp else None  # the guarantee that holds
        self.central: PrivacyLedger | None = dp.central if dp else None  # aggregate-only ε, when it differs
        self.dpsgd_epsilon: dict[int, float] = {}  # privacy.dpsgd: each client's per-example ε so far
        self.sigma = dp.sigma if dp else 0.0
        self.scaffold = ScaffoldState(initial_state, self._store("scaffold")) if fed.algorithm == "scaffold" else None
        self.uplink = Uplink(r, self.num_clients, self.payload_bytes, self.mask, self.dp, self._store("feedback"))
        self.has_lora = bool(lora_pairs(initial_state))
        self.regions = (Regions(r, self.num_clients, self.has_lora, self.model_bytes, self.payload_bytes)
                        if r.hierarchy.regions else None)  # hierarchy: the regional tier
        ranks = r.lora.client_ranks
        # heterogeneous ranks (lora.client_ranks): each client trains and sends its own slots only
        self.ranks = (RankLayout(initial_state, ranks) if self.has_lora and ranks is not None
                      and any(rk != r.lora.r for rk in ranks) else None)
        wire_bytes = {rk: self.payload_bytes(self.ranks.wire(self.template, self.ranks.ranks.index(rk)))
                      for rk in set(self.ranks.ranks)} if self.ranks else {}  # one serialization per rank
        self._down_bytes = [wire_bytes[self.ranks.rank(k)] if self.ranks else self.model_bytes
                            for k in range(self.num_clients)]
        # federation.personalize: shared_a — each client's own B factors (FedSA-LoRA), kept between rounds
        self.personal_keys = ([k for k in initial_state if ".lora_B" in k] if fed.personalize == "shared_a" else [])
        self.personal = self._store("personal")
        self._controls = self._store("controls", keep=0)  # the round's uploaded cᵢ⁺, until it is applied
        # the relative norm bound decides at the end: folded updates are spooled so that an
        # outlier (or a client that never reported) can be left out of the sum exactly
        # (FedNova too: its coefficients are final only once every client's step count is in)
        # (a weight cap too: the capped weights of the valid clients are not a rescale of the planned)
        self._spool = (self._store("spool", keep=0, durable=False)
                       if fed.reject_norm_factor is not None or fed.algorithm == "fednova"
                       or fed.max_client_weight is not None else None)
        self.norm_history: list[float] = []  # norms accepted in the last applied rounds (few_norm_violations)
        # privacy.audit (fedllm.federation.audit): sees each decoded upload; canary clients join each mean
        self.on_upload: Callable[[int, ClientUpdate, StateDict], None] | None = None
        self.canaries: CanaryClients | None = None
        self._round = 0
        self.streams = self._streams()
        self._reset_round()

    def _store(self, name: str, keep: int | None = None, durable: bool = True) -> ClientStates | DiskStates:
        """Per-client state dicts: a :class:`DiskStates` folder of ``state_dir``, or in memory."""
        if self.state_dir is None:
            return ClientStates()
        store = DiskStates(self.state_dir / name, self.recipe.checkpoint.keep if keep is None else keep, durable)
        self._stores.append(store)
        return store

    def _at_round(self, rnd: int) -> None:
        for store in self._stores:  # files written from now on are this round's version
            store.version = rnd

    def _streams(self) -> bool:
        """Whether the round's mean can be folded as updates arrive (see :meth:`_fold_arrival`).

        Not when the rule needs every update at the end: robust aggregators (their memory is the
        round's updates), colluding attackers (built from the honest updates),
        hierarchical tiers, SVD LoRA aggregation, and LoRA's ``lora_aggregation_error``
        (``eval.lora_error``: every client's factors). Secure aggregation has its own fold: the
        masked inputs are summed (mod 2^62, exact) as they arrive (:class:`MaskedSum`).
        """
        r, fed = self.recipe, self.recipe.federation
        colluding = self.uplink.attack is not None and self.uplink.attack.kind in COLLUDING
        return (type(self.aggregator) in (MeanAggregator, FedNovaAggregator) and not r.privacy.secure_aggregation
                and self.regions is None
                and fed.lora_aggregation != "svd" and not (self.has_lora and r.eval.lora_error) and not colluding)

    # ------------------------------------------------------------------ the round, client side

    def _reset_round(self) -> None:
        self._arrived: list[ClientUpdate] = []  # streaming: each without its delta (folded into _sum)
        self._sum: RunningSum | None = None
        self._weights: dict[int, float] = {}  # streaming: each planned client's weight in the mean
        self._norms: dict[int, float] = {}  # streaming: each folded update's L2 norm
        self._masked = MaskedSum(SECAGG_MODULUS_BITS)  # secure aggregation: folded as the inputs arrive
        self._secagg: SecAggRound | HERound | None = None
        self._controls.clear()
        if self._spool is not None:
            self._spool.clear()
        self._bytes_up = self._bytes_down = 0
        self._rejected: dict[int, str] = {}
        self._late: set[int] = set()  # secure aggregation: dropped after masking (this round)
        self._starts: dict[int, StateDict] = {}  # what each client trained from (heterogeneous ranks)
        self._held: list[tuple[ClientUpdate, StateDict]] = []  # colluding attackers, until the honest are in

    def begin_round(self, rnd: int) -> RoundPlan:
        """Sample the round's clients and decide (seeded) who drops out or straggles."""
        self._reset_round()
        sampled = sorted(self.sampler.sample(rnd, list(range(self.num_clients))))
        fate = self.availability.decide(rnd, sampled, self.recipe.train.local_steps)
        steps = dict(fate.steps)
        if self.recipe.faults.stragglers == "drop":
            for k in fate.stragglers:
                steps.pop(k, None)
        plan = RoundPlan(rnd, sampled, steps, list(fate.dropped), list(fate.stragglers))
        if self.streams and plan.training:
            self._sum, self._weights = RunningSum(), self._planned_weights(plan)
        for k in sampled:  # every sampled client downloads the model, including those who then drop
            self._bytes_down += self._down_bytes[k] * (2 if self.scaffold is not None else 1)  # + SCAFFOLD's c
            if self.mask is not None and k not in self.has_mask:
                self._bytes_down += self.mask_bytes
                self.has_mask.add(k)
        if self.recipe.privacy.secure_aggregation and len(plan.training) >= 2:
            self._begin_secure(rnd, plan)
        return plan

    def _begin_secure(self, rnd: int, plan: RoundPlan) -> None:
        """The round's secure aggregation: pairwise masks (keys advertised and shared now), or HE
        (a fresh key holder; the server folds ciphertexts under its public context)."""
        if self.recipe.privacy.secagg_scheme == "he":
            self._secagg = HERound(plan.training)
            self._secagg.advertise_keys()
            self._masked = self._secagg.new_sum()
            return
        n = len(plan.training)
        threshold = min(n, max(2, math.ceil(self.recipe.privacy.secagg_threshold * n)))
        self._secagg = SecAggRound(plan.training, threshold, SECAGG_MODULUS_BITS, SECAGG_SCALE_BITS,
                                   seed=self.recipe.seed * 100_003 + rnd)
        self._secagg.advertise_keys()
        self._secagg.share_keys()

    def _mass(self, clients: Sequence[int]) -> int:
        """The mean's denominator over ``clients``: their examples (weighted) or their count."""
        return sum(self.client_sizes[k] for k in clients) if self.aggregator.weighted else len(clients)

    def _coefficients(self, records: Sequence[ClientUpdate]) -> dict[int, float]:
        """client -> its update's coefficient in the round's sum, from the counts alone (the mean's
        weights, or FedNova's τ_eff pᵢ/τᵢ), exactly as the held aggregator computes them."""
        ids, cap = [u.client_id for u in records], self.aggregator.max_weight
        if isinstance(self.aggregator, FedNovaAggregator):
            return dict(zip(ids, fednova_coefficients(records, self.aggregator.weighted, cap)))
        return dict(zip(ids, client_weights(records, self.aggregator.weighted, cap)))

    def _planned_weights(self, plan: RoundPlan) -> dict[int, float]:
        """Each client's coefficient if the whole plan reports as planned: the sizes the server
        knows (the ones a valid report carries, :func:`check_counts`) and the steps it asked for."""
        return self._coefficients([ClientUpdate(k, {}, self.client_sizes[k], build.client_steps(
            self.recipe, self.client_sizes[k], k in plan.stragglers), 0.0) for k in plan.training])

    def start_state(self, client_id: int, global_state: StateDict | None) -> StateDict:
        """The state client ``client_id`` starts from: its region's model or the global one, truncated
        to its rank (``lora.client_ranks``), with its own B factors (``federation.personalize``)."""
        if self.regions is not None and (regional := self.regions.start_state(client_id)) is not None:
            return regional
        state = global_state if global_state is not None else self.template
        if self.personal_keys:
            self._global = state  # the B the clients' personal uploads are measured against
            state = {**state, **self.personal.get(client_id, {})}
        return self.ranks.truncate(state, client_id) if self.ranks is not None else state

    def personal_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """Client ``client_id``'s own model: the shared factors with its B (the global B before it trained)."""
        state = {**global_state, **self.personal.get(client_id, {})}
        return self.ranks.truncate(state, client_id) if self.ranks is not None else state

    def grad_term(self, client_id: int, start: StateDict) -> DriftTerm | None:
        """FedProx's μ(θ − θ_start) or SCAFFOLD's c − cᵢ, added to the client's gradients."""
        fed = self.recipe.federation
        if fed.algorithm == "fedprox" and fed.mu > 0:
            return Proximal(fed.mu, start)
        if self.scaffold is not None:
            return Correction(scaffold_correction(self.scaffold.c, self.scaffold.client_control(client_id)))
        return None

    def upload(self, rnd: int, update: ClientUpdate, start: StateDict) -> None:
        """An update arrives: structure-checked first, then sent through the client's uplink."""
        k = update.client_id
        self._at_round(rnd)
        known = self.client_sizes[k] if 0 <= k < self.num_clients else None
        reason = validate_update(update, self.template) or check_counts(update, known,
                                                                        self.recipe.federation.max_client_examples)
        if reason is not None:  # malformed (keys, shapes, dtypes, NaN/Inf, counts): rejected as it arrives
            self._reject(rnd, k, reason)
            return
        update, start = self._own_slots(update, start)
        if self.uplink.attack is not None and self.uplink.attack.kind in COLLUDING and k in self.uplink.attackers:
            self._held.append((update, start))  # sent once the honest updates it imitates are in
            return
        self._send(rnd, update, start)

    def _send(self, rnd: int, update: ClientUpdate, start: StateDict) -> None:
        """Through the client's uplink (attack simulation, control, DP noise, codec, mask) to the server."""
        k = update.client_id
        wire = (lambda d: self.payload_bytes(self.ranks.wire(d, k))) if self.ranks is not None else None
        try:
            sent = self.uplink.send(rnd, update, self.scaffold, self._secagg, on_site=self.uplink_on_site,
                                    payload_bytes=wire)
        except (ArithmeticError, ValueError, RuntimeError) as exc:  # e.g. a codec that cannot encode it
            self._reject(rnd, k, f"the uplink could not encode it ({type(exc).__name__}: {exc})")
            return
        if sent.masked is None and not sent.update.is_finite():  # e.g. fp16 overflowing to inf
            self._reject(rnd, k, "non-finite after encoding (the codec overflowed)")
            return
        if self.on_upload is not None and sent.masked is None:  # privacy.audit: the upload as decoded here
            self.on_upload(rnd, sent.update, start)
        if "dpsgd_epsilon" in update.metrics:  # the client's cumulative per-example ε (DP-SGD)
            self.dpsgd_epsilon[k] = max(self.dpsgd_epsilon.get(k, 0.0), float(update.metrics["dpsgd_epsilon"]))
        if sent.control is not None:
            self._controls[k] = sent.control
        if sent.masked is not None:
            self._masked.add(k, sent.masked)
        self._bytes_up += sent.bytes_up
        if self._sum is not None:
            self._fold_arrival(rnd, sent.update)
            return
        self._arrived.append(sent.update)
        self._starts[k] = start

    def _fold_arrival(self, rnd: int, update: ClientUpdate) -> None:
        """Streaming: the norm bound now, then Δᵢ folded into the round's sum with its planned
        weight and dropped; what stays is the record without its delta.

        Bit-identical to the held aggregator (same operations in the same order) when every
        planned client reports as planned; otherwise :meth:`_streamed_mean` folds again or rescales.
        """
        norm = global_norm(update.delta)
        if (reason := norm_violation(update, self.recipe.federation.reject_norm, norm)) is not None:
            self._reject(rnd, update.client_id, reason)
            return
        if update.client_id not in self._weights or update.client_id in self._norms:
            self._reject(rnd, update.client_id, "not a client of this round, or a second update from it")
            return
        self._norms[update.client_id] = norm
        delta = update.delta
        if self.dp is not None and self.recipe.privacy.dp == "server":  # clipped to this round's C
            delta = self.dp.clip_update(delta)
        self._sum.add(delta, self._weights[update.client_id])
        if self._spool is not None:
            self._spool[update.client_id] = delta
        self._arrived.append(dataclasses.replace(update, delta={}))

    def _own_slots(self, update: ClientUpdate, start: StateDict) -> tuple[ClientUpdate, StateDict]:
        """The update as the server aggregates it, and the state it is measured from.

        Heterogeneous ranks: only the client's own slots count (the rest is zeroed). Personal B
        (``shared_a``): the client keeps its trained B, and its B delta is re-expressed against the
        global B, so the server's B becomes the clients' average adapter while A is shared.
        """
        k, delta = update.client_id, update.delta
        if self.ranks is not None:
            delta = self.ranks.truncate(delta, k)
        if self.personal_keys:
            trained = {key: start[key] + delta[key] for key in self.personal_keys}
            self.personal[k] = trained
            base = self._global if self.ranks is None else self.ranks.truncate(self._global, k)
            delta = {**delta, **{key: trained[key] - base[key] for key in self.personal_keys}}
            start = {**start, **{key: base[key] for key in self.personal_keys}}
        return (update if delta is update.delta else dataclasses.replace(update, delta=delta)), start

    def _reject(self, rnd: int, client_id: int, reason: str) -> None:
        log.warning("round %d: update of client %d rejected: %s", rnd, client_id, reason)
        self._rejected[client_id] = reason

    # ------------------------------------------------------------------ the round, server side

    def _release_colluders(self, rnd: int) -> None:
        """ALIE / IPM: the held attackers send the vector built from this round's honest updates."""
        held, self._held = self._held, []
        honest = [u.delta for u in self._arrived]
        # with no honest update to imitate, an attacker can only send its own
        fake = collude(self.uplink.attack, honest, len(held)) if held and honest else None
        for update, start in held:
            self._send(rnd, update if fake is None else dataclasses.replace(update, delta=fake), start)

    def finish_round(self, rnd: int, global_state: StateDict) -> tuple[StateDict, dict[str, Any]]:
        """Norm-check, aggregate and apply what arrived; the global state is unchanged if too few."""
        fed = self.recipe.federation
        self._at_round(rnd)
        self._round = rnd
        self._release_colluders(rnd)
        valid = []
        for u in self._arrived:
            # structure was checked on arrival; the bound applies to what the server received
            # (streaming: checked before folding)
            reason = None if self._secagg is not None or self._sum is not None else norm_violation(u, fed.reject_norm)
            if reason is None:
                valid.append(u)
            else:
                self._reject(rnd, u.client_id, reason)
        norms: dict[int, float] = {}  # each valid update's L2 norm (the secure sum's are never seen)
        if self._secagg is None and fed.reject_norm_factor is not None:
            norms = {u.client_id: self._norms[u.client_id] if self._sum is not None else global_norm(u.delta)
                     for u in valid}
            outliers = (relative_norm_violations(valid, fed.reject_norm_factor, norms) if len(norms) >= 3
                        else few_norm_violations(norms, fed.reject_norm_factor, self.norm_history,
                                                 global_norm(global_state) if norms else 0.0, fed.max_change_ratio))
            for k, reason in outliers.items():
                self._reject(rnd, k, reason)
            valid = [u for u in valid if u.client_id not in outliers]
        metrics: dict[str, Any] = {"rejected": dict(sorted(self._rejected.items())),
                                   "aggregated_clients": [u.client_id for u in valid]}
        # secure aggregation: clients that sent their masked update but do not answer the unmasking
        # request; their inputs stay in the sum, the other survivors' shares remove their masks
        self._late = {u.client_id for u in valid if self._secagg is not None
                      and self.recipe.faults.fires(u.client_id, rnd, "unmask")}
        if self._late:
            metrics["unmask_dropouts"] = sorted(self._late)
        needed = max(self.recipe.federation.min_clients, 1 if self.regions is not None else self.aggregator_needs())
        survivors = len(valid) - len(self._late)
        applied = len(valid) >= needed and (self._secagg is None or survivors >= self._secagg.threshold)
        metrics["applied"] = applied
        if not applied:
            log.warning("round %d: %d valid updates, fewer than the %d needed (federation.min_clients, "
                        "the aggregator, secure aggregation's threshold); global state unchanged",
                        rnd, len(valid), needed)
            if self.recipe.privacy.dp == "client" and self._secagg is None and self._arrived:
                # the clients' noised uploads were seen all the same (a retried attempt too); masked
                # uploads whose sum cannot be unmasked reveal nothing
                self._charge()
            elif self.ledger is not None and self.ledger.sampling == "poisson":
                self._charge()  # Poisson accounting counts every round's draw, an empty or failed one too
            return global_state, self._round_metrics(metrics)
        if self.regions is not None:
            new_state = self.regions.round(rnd, global_state, valid, metrics, self._aggregate, self.aggregator_needs(),
                                           self.server_opt.step)
        else:
            delta = self._aggregate(global_state, valid, metrics)
            new_state = self.server_opt.step(global_state, delta)
        self._sum = None  # the folded sum is spent (or, if not applied, dropped with the round)
        why = global_change_problem(global_state, new_state, fed.max_change_ratio)
        if why is not None:  # the round is rejected, never the model: the global state stays as it was
            log.warning("round %d: %s; round rejected, global state unchanged", rnd, why)
            metrics.update({"applied": False, "round_rejected": why})
            self._charge()  # the noised aggregate (or the noised uploads) were computed: charge them anyway
            return global_state, self._round_metrics(metrics)
        if self.ranks is not None:  # what a client of each rank loses when it receives the new global state
            by_rank = self.ranks.truncation_error(new_state)
            metrics["lora_truncation_error_by_rank"] = {str(rk): e for rk, e in by_rank.items()}
            metrics["lora_truncation_error"] = statistics.fmean(by_rank[rk] for rk in self.ranks.ranks)
        if self.scaffold is not None:
            ids = [u.client_id for u in valid if u.client_id in self._controls]
            self.scaffold.server_update(ids, (self._controls[k] for k in ids), self.num_clients)
        self._charge()
        if self.recipe.selection.method == "power_of_choice":
            self.sampler.record_losses({u.client_id: u.train_loss for u in valid if math.isfinite(u.train_loss)})
        if norms:  # the scale of accepted updates, for later rounds with too few for a median
            self.norm_history = (self.norm_history + [norms[u.client_id] for u in valid])[-NORM_HISTORY:]
        return new_state, self._round_metrics(metrics)

    def _charge(self) -> None:
        """One more release of the DP mechanism in the ledgers (nothing without DP)."""
        for ledger in (self.ledger, self.central):
            if ledger is not None:
                ledger.step()

    def aggregator_needs(self) -> int:
        """Fewest updates the aggregator can combine (Krum: n > 2f + 2; multi-Krum: also >= m)."""
        return self.min_updates

    def _aggregate(self, global_state: StateDict, updates: list[ClientUpdate], metrics: dict) -> StateDict:
        delta = (self._streamed_mean(updates, metrics) if self._sum is not None
                 else self._combine(global_state, updates, metrics))
        if self.recipe.federation.lora_aggregation == "frozen_a":
            # A stays at its shared init: DP noise or compression error never moves it
            delta = {k: torch.zeros_like(v) if ".lora_A" in k else v for k, v in delta.items()}
        return delta

    def _streamed_mean(self, updates: list[ClientUpdate], metrics: dict) -> StateDict:
        """The round's mean from the folded sum.

        The sum was folded with the coefficients of the plan (every planned client reporting its
        known size and the steps it was asked for). When the valid updates' own counts give other
        coefficients (a client failed, was rejected, or ran other steps), with the spool
        (``federation.reject_norm_factor`` set, or FedNova) the valid updates are folded again from
        it: the held aggregator's bits. Without it (the mean only) one float64 rescale turns the
        weights into weights over the valid clients: then within one float64 rounding per entry of
        the held mean (after the cast to float32, equal except where that rounding crosses a
        float32 boundary).
        """
        valid = [u.client_id for u in updates]
        actual = self._coefficients(updates)  # from the counts the valid updates reported
        if actual != self._weights and self._spool is not None:
            self._sum = RunningSum()
            for k in valid:  # in arrival order, as the held aggregator
                self._sum.add(self._spool[k], actual[k])
        elif actual != self._weights:  # the mean without a spool: only the set of clients differs
            self._sum.scale(self._mass(list(self._weights)) / self._mass(valid))
        mean = self._with_canaries(self._sum.result(), len(valid))
        if self.dp is None:
            return mean
        delta = self.dp.release(mean, [self._norms[k] for k in valid])  # server DP: noise; client DP: counted
        metrics.update({f"dp_{k}": v for k, v in self.dp.last_stats.items()})
        return delta

    def _combine(self, global_state: StateDict, updates: list[ClientUpdate], metrics: dict) -> StateDict:
        fed = self.recipe.federation
        if self._secagg is not None:
            if sorted(u.client_id for u in updates) != sorted(self._masked):  # nothing is rejected after masking
                raise RuntimeError("secure aggregation: the updates to aggregate are not the masked inputs summed")
            total = self._secagg.unmask(self._masked, dropped_after_masking=self._late, dtype=torch.float64)
            mean = self._with_canaries({k: v / len(updates) for k, v in total.items()}, len(updates))
            if self.dp is not None and self.recipe.privacy.dp == "server":  # clients clipped before masking
                mean = self.dp.noise_secure_sum(mean, len(updates))
                metrics.update({f"dp_{k}": v for k, v in self.dp.last_stats.items()})
            return {k: v.to(global_state[k].dtype) for k, v in mean.items()}
        if self.dp is not None:
            delta = self.dp(updates) if self.canaries is None else self._dp_with_canaries(updates)
            metrics.update({f"dp_{k}": v for k, v in self.dp.last_stats.items()})
        elif fed.lora_aggregation == "svd" and self.has_lora:
            delta, err = lora_aggregate(global_state, updates, "svd", fed.is_weighted, self._starts_of(updates),
                                        fed.max_client_weight)
            metrics["lora_aggregation_error"] = err
            return delta
        else:
            delta = self._with_canaries(self.aggregator(updates), len(updates))
            report = getattr(self.aggregator, "last_report", None)  # what a robust rule excluded or clipped
            if report:
                metrics["robust"] = report
        if (self.has_lora and self.recipe.robust.aggregator == "mean" and fed.algorithm != "fednova"
                and self.recipe.eval.lora_error):
            # what averaging the factors loses against averaging the products B_i A_i
            metrics["lora_aggregation_error"] = lora_aggregate(global_state, updates, fed.lora_aggregation
                                                               if fed.lora_aggregation != "svd" else "factorwise",
                                                               fed.is_weighted, self._starts_of(updates),
                                                               fed.max_client_weight)[1]
        return delta

    def _with_canaries(self, mean: StateDict, count: int) -> StateDict:
        """``privacy.audit`` canary clients: their updates C·uⱼ join the round's mean, over the real
        clients' count and before any DP noise (:class:`~fedllm.algorithms.audit.CanaryClients`)."""
        if self.canaries is None:
            return mean
        clip = self.dp.clip if self.dp is not None else self.recipe.privacy.clip
        return self.canaries.add_to_mean(mean, count, clip, self._round)

    def _dp_with_canaries(self, updates: list[ClientUpdate]) -> StateDict:
        """``DPAggregator.__call__`` with the canary clients added to the clipped mean before its noise."""
        norms = [global_norm(u.delta) for u in updates]
        if self.recipe.privacy.dp == "server":
            updates = [dataclasses.replace(u, delta=self.dp.clip_update(u.delta)) for u in updates]
        return self.dp.release(self._with_canaries(self.dp.inner(updates), len(updates)), norms)

    def _starts_of(self, updates: list[ClientUpdate]) -> list[StateDict] | None:
        """The states the updates were trained from, when they differ from the global state."""
        if self.ranks is None and not self.personal_keys:
            return None
        return [self._starts[u.client_id] for u in updates]

    def eval_state(self, global_state: StateDict) -> StateDict:
        """What to evaluate: the global model, or (between hierarchical syncs) the regions' mean."""
        return global_state if self.regions is None else self.regions.eval_state(global_state)

    def _round_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics.update({"bytes_up": self._bytes_up, "bytes_down": self._bytes_down,
                        "rejected_updates": len(self._rejected)})
        if self._secagg is not None:
            metrics["secagg_overhead_bytes"] = sum(b.overhead for b in self._secagg.bytes_up.values())
            if isinstance(self._secagg, HERound):  # the summed ciphertexts the key holder decrypts
                metrics["he_sum_bytes"] = self._secagg.sum_bytes
        if self.ledger is not None:
            metrics["epsilon"] = self.ledger.epsilon()
            metrics["noise_multiplier"] = self.sigma
        if self.central is not None:
            metrics["epsilon_central"] = self.central.epsilon()
        if self.dpsgd_epsilon:  # sample-level DP-SGD: the worst client's per-example ε so far
            metrics["epsilon_dpsgd"] = max(self.dpsgd_epsilon.values())
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _stateful_aggregator(self) -> Any:
        """The aggregator (or the one a norm bound wraps) that carries state between rounds, or None."""
        agg = self.aggregator.inner if isinstance(self.aggregator, NormBound) else self.aggregator
        return agg if isinstance(agg, (CenteredClipping, AFA)) else None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server_opt": self.server_opt.state_dict(), "sampler": self.sampler.state_dict(),
                               "availability": self.availability.state_dict(),
                               "has_mask": sorted(self.has_mask),
                               "dpsgd_epsilon": dict(self.dpsgd_epsilon),
                               "norm_history": list(self.norm_history),
                               "personal": self.personal.state_dict()}
        for name in ("dp", "ledger", "central", "scaffold"):
            part = getattr(self, name)
            if part is not None:
                out[name] = part.state_dict()
        if self.regions is not None:
            out.update(self.regions.state_dict())  # "regional", "region_examples", "sync_clients"
        if (agg := self._stateful_aggregator()) is not None:  # e.g. centered clipping's last aggregate
            out["aggregator"] = agg.state_dict()
        out.update(self.uplink.state_dict())  # "feedback", "codec"
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_opt.load_state_dict(state["server_opt"])
        self.sampler.load_state_dict(state["sampler"])
        self.availability.load_state_dict(state["availability"])
        self.has_mask = set(state["has_mask"])
        if self.regions is not None:
            self.regions.load_state_dict(state)
        self.dpsgd_epsilon = {int(k): float(v) for k, v in state.get("dpsgd_epsilon", {}).items()}
        self.norm_history = [float(n) for n in state.get("norm_history", [])][-NORM_HISTORY:]
        self.personal.load_state_dict(state.get("personal", {}))
        for name in ("dp", "ledger", "central", "scaffold"):
            part = getattr(self, name)
            if name in state and part is not None:
                part.load_state_dict(state[name])
        if (agg := self._stateful_aggregator()) is not None and "aggregator" in state:
            agg.load_state_dict(state["aggregator"])
        self.uplink.load_state_dict(state)
