"""The privacy audit during a federated run: what the server saw, scored on the canaries as it happens.

``privacy.audit.canaries`` plants canaries (:mod:`fedllm.algorithms.audit`): example canaries in
the clients' data (:mod:`fedllm.data.canaries`), or canary clients the server adds to each round's
clipped sum before the noise (:class:`~fedllm.algorithms.audit.CanaryClients`). The run records
only *scores*, never models, so the audit costs a few forward passes per round and kilobytes of
disk, whatever the model size:

- each upload as the server decoded it (after the client's DP noise and codec; none under secure
  aggregation, where the server only holds masked tensors): the canaries of that client under
  start + Δᵢ, and under the start (the reference);
- each round's released global model: every canary under it (example canaries), or ⟨Δ_round, uⱼ⟩
  (canary clients);
- the final model against the initial one.

Files, under ``<run>/audit/``: ``canaries.json`` (the plan: members, owners and, for example
canaries, the secrets: the one file that holds them) and ``scores.jsonl`` (one line per upload /
round / final). :mod:`fedllm.federation.audit_report` turns them into AUCs and the lower bound on ε
(``fedllm audit RUN_DIR``; the end of the run too).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedllm.algorithms.audit import CanaryClients, CanaryPlan, plan_canaries, zlib_bits
from fedllm.config import Recipe, RecipeError
from fedllm.federation.rundir import write_json_atomic
from fedllm.types import ClientUpdate, StateDict, add, clone_state, global_norm, subtract

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"


def canary_clients(recipe: Recipe, template: StateDict, rate: float) -> CanaryClients | None:
    """The recipe's canary clients (``privacy.audit`` of kind client), or None."""
    a = recipe.privacy.audit
    if not a.canaries or a.unit(recipe.privacy.dp) != "client":
        return None
    frozen = recipe.federation.lora_aggregation == "frozen_a"  # A never moves: no canary direction there
    keys = [k for k in template if not (frozen and ".lora_A" in k)]
    return CanaryClients(template, plan_canaries(a.canaries, recipe.seed), recipe.seed, rate, keys)


def _sample_rate(server: Any) -> float:
    """q the canary clients take part with: the accountant's (1 without DP: every round)."""
    ledger = getattr(server, "central", None) or getattr(server, "ledger", None)
    return float(ledger.sample_rate) if ledger is not None else 1.0


class CanaryAudit:
    """Scores the canaries on what the server sees; attached to a :class:`FederatedServer` by
    :func:`fedllm.federation.modes.run_federated` (``server.on_upload``, ``server.canaries``)."""

    def __init__(self, exp: Any, server: Any, path: Path, first_round: int) -> None:
        recipe = exp.recipe
        if not hasattr(server, "on_upload"):
            raise RecipeError("privacy.audit", "the audit needs the server topology (federation.topology: server, "
                              "federation.clusters: 1)")
        self.exp, self.recipe, self.audit = exp, recipe, recipe.privacy.audit
        self.unit = self.audit.unit(recipe.privacy.dp)
        self.dir = path / AUDIT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.initial = clone_state(exp.initial_state)
        self._cache: dict[int, tuple[StateDict, list[float]]] = {}  # id(state) -> (state, all canary losses)
        if self.unit == "example":
            self.canaries = list(exp.data.canaries)
            plan = CanaryPlan(tuple(c.member for c in self.canaries), tuple(c.client for c in self.canaries))
            if not recipe.privacy.secure_aggregation:  # the server sees each upload
                server.on_upload = self.upload
        else:
            server.canaries = canary_clients(recipe, exp.initial_state, _sample_rate(server))
            self.clients = server.canaries
            plan = self.clients.plan
        self.plan = plan
        self._write_plan()
        self._truncate(first_round)

    # ------------------------------------------------------------------ files

    def _write_plan(self) -> None:
        p = self.recipe.privacy
        doc: dict[str, Any] = {"unit": self.unit, "members": list(self.plan.members), "clients": list(self.plan.clients),
                               "delta": p.delta, "confidence": self.audit.confidence, "dp": p.dp,
                               "secure_aggregation": p.secure_aggregation, "dpsgd": p.dpsgd,
                               "clip": p.clip, "seed": self.recipe.seed}
        if self.unit == "example":  # the secrets: this file only, never a report
            doc["records"] = [{"id": c.id, "prompt": c.prompt, "secret": c.secret} for c in self.canaries]
            doc["zlib_bits"] = [zlib_bits(c.secret) for c in self.canaries]
        write_json_atomic(self.dir / "canaries.json", doc)

    def _truncate(self, first_round: int) -> None:
        """A resumed run drops what it recorded after its checkpoint (it scores those rounds again)."""
        path = self.dir / "scores.jsonl"
        if first_round <= 1 or not path.is_file():
            path.write_text("", encoding="utf-8")
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and isinstance(json.loads(line).get("round"), int)
                and json.loads(line)["round"] < first_round]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.dir / "scores.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ scoring

    def _losses(self, state: StateDict, ids: list[int] | None = None) -> list[float]:
        """Every canary's (or ``ids``') mean response NLL under ``state``; the full set is cached per state."""
        hit = self._cache.get(id(state))
        if hit is not None and hit[0] is state:
            full = hit[1]
        elif ids is not None and len(ids) * 2 < len(self.canaries):  # a few canaries: score just them
            return self.exp.example_losses(state, [self.canaries[j].example for j in ids])
        else:
            full = self.exp.example_losses(state, [c.example for c in self.canaries])
            self._cache = {id(state): (state, full)}
        return full if ids is None else [full[j] for j in ids]

    def upload(self, rnd: int, update: ClientUpdate, start: StateDict) -> None:
        """Example canaries: client k's upload as the server decoded it, applied to its start."""
        ids = [j for j, c in enumerate(self.canaries) if c.client == update.client_id]
        if not ids or not update.delta:
            return
        ref = self._losses(start, ids)
        loss = self.exp.example_losses(add(start, update.delta), [self.canaries[j].example for j in ids])
        self._log({"round": rnd, "view": "upload", "client": update.client_id, "ids": ids, "loss": loss, "ref": ref})

    def after_round(self, rnd: int, old: StateDict, new: StateDict) -> None:
        """The round's released global model against the one before it."""
        if self.unit == "client":
            change = subtract(new, old)
            self._log({"round": rnd, "view": "aggregate", "dot": self.clients.scores(change),
                       "norm": global_norm(change)})
            return
        ref = self._losses(old)
        self._cache = {}
        self._log({"round": rnd, "view": "aggregate", "loss": self._losses(new), "ref": ref,
                   "norm": global_norm(subtract(new, old))})

    def finish(self, final: StateDict) -> None:
        """The final model against the initial one (both are what anyone who sees the models sees)."""
        if self.unit == "client":
            change = subtract(final, self.initial)
            self._log({"round": "final", "view": "final", "dot": self.clients.scores(change),
                       "norm": global_norm(change)})
            return
        self._log({"round": "final", "view": "final", "loss": self._losses(final), "ref": self._losses(self.initial)})


def claims(recipe: Recipe, last_row: dict[str, Any]) -> dict[str, float]:
    """The ε each view of the audit is held against (at ``privacy.delta``), from the run's last row.

    ``upload``: one client's upload (client DP without secure aggregation: the per-upload ledger ε;
    a trusted server adding the noise itself sees uploads unprotected: ∞); ``final``: the released
    global models (the aggregate-only ε where it differs). DP-SGD's per-example ε caps both for
    example canaries (a canary is one record of one client).
    """
    p, inf = recipe.privacy, math.inf
    eps, central = last_row.get("epsilon"), last_row.get("epsilon_central")
    upload = final = inf
    if p.enabled:
        final = float(central if central is not None else eps if eps is not None else inf)
        upload = float(eps) if p.dp == "client" and eps is not None else inf
    if p.dpsgd and p.audit.unit(p.dp) == "example" and last_row.get("epsilon_dpsgd") is not None:
        upload, final = min(upload, float(last_row["epsilon_dpsgd"])), min(final, float(last_row["epsilon_dpsgd"]))
    return {"upload": upload, "final": final}


def attach_audit(exp: Any, server: Any, path: Path, first_round: int) -> CanaryAudit | None:
    """The run's :class:`CanaryAudit` (``privacy.audit.canaries`` > 0), hooked into ``server``; else None."""
    return CanaryAudit(exp, server, path, first_round) if exp.recipe.privacy.audit.canaries else None
