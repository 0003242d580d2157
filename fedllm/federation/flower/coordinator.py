"""The coordinator's side of the Flower engine: find the sites, then fedllm's own rounds over them.

:func:`serve` is the ServerApp's body. It discovers which SuperNode serves which fedllm client
(:func:`discover_sites`) and runs :func:`fedllm.federation.modes.run_federated` on a
:class:`RemoteExperiment`: the server's own experiment (model for evaluation, held-out split)
whose ``fit`` is a message to the client's site.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm.algorithms.compress import Encoded
from fedllm.algorithms.drift import DriftTerm
from fedllm.client.evaluate import EvalResult
from fedllm.config import Recipe, RecipeError, flower_problem
from fedllm.experiments import Experiment, ExperimentData, FitJob, fit_each, make_experiment
from fedllm.federation import build
from fedllm.federation.flower.codec import (
    TrainRequest,
    check_reply_size,
    records_to_encoded,
    records_to_update,
)
from fedllm.federation.flower.run_config import NODE_RECORD, FlowerRunConfig, recipe_from_yaml
from fedllm.federation.modes import run_federated
from fedllm.federation.uplink import decode_payload
from fedllm.types import ClientUpdate, StateDict, serialized_bytes

log = logging.getLogger(__name__)


def exchange(grid: Grid, messages: list[Message], timeout_s: float, poll_s: float = 0.05) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout_s`` passed.

    ``Grid.send_and_receive`` sleeps 3 s between pulls in Flower 1.41; polling faster cuts the
    reply latency of every round (the pull is one local HTTP request to the SuperLink).
    """
    pending = set(grid.push_messages(messages))
    deadline, replies = time.monotonic() + timeout_s, []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll_s)
    return replies


@dataclass(frozen=True)
class Site:
    """A connected SuperNode as the server knows it; ``problem``: why it is left out of the run
    (its report could not be used), its client then failing every round it is sampled."""

    node_id: int
    num_examples: int
    own_data: bool
    problem: str | None = None


def site_count(value: Any, name: str, top: int) -> str | None:
    """Why ``value``, a count a site reported as ``name``, cannot be used, or None.

    An integer in 1 .. ``top`` (``federation.max_client_examples``): never a float (1e20, or even
    12.0: fedllm's own sites send integers, so anything else is not one of them), a bool, NaN,
    inf or a string. Flower's records keep an int an int, so nothing honest is refused.
    """
    if type(value) is not int or not 1 <= value <= top:
        return f"reported {name}={value!r:.40}; expected an integer in 1 .. {top} (federation.max_client_examples)"
    return None


def _site_of(reply: Message, num_clients: int, max_examples: int) -> tuple[int | None, Site | None]:
    """(client id, site) from a discovery reply; (None, None) when it names no client of this run."""
    src = reply.metadata.src_node_id
    if reply.has_error():  # the site's own failure (its data, its model): the operator must see it
        raise RuntimeError(f"node {src} failed to join: {reply.error.reason}")
    rec = reply.content.get(NODE_RECORD) if hasattr(reply.content, "get") else None
    cid = rec.get("partition-id") if hasattr(rec, "get") else None
    if type(cid) is not int or not 0 <= cid < num_clients:
        log.warning("flower: node %s answered discovery with partition-id=%.40r; expected an integer in "
                    "0 .. %d; node ignored", src, cid, num_clients - 1)
        return None, None
    n, own = rec.get("num-examples"), rec.get("own-data")
    problem = site_count(n, "num-examples", max_examples) or (
        None if type(own) is bool else f"reported own-data={own!r:.40}; expected true or false")
    if problem is not None:
        log.warning("flower: node %s (client %d) %s; this site is left out of the run (its rounds count as "
                    "failed clients)", src, cid, problem)
        return cid, Site(src, 1, False, problem)
    return cid, Site(src, n, own)


def discover_sites(grid: Grid, num_clients: int, timeout_s: float,
                   max_examples: int = 10_000_000) -> dict[int, Site]:
    """fedllm client id -> its site, asking each connected node which client it serves.

    Each node answers with its ``partition-id`` and its number of training examples (the site
    loads its model and data meanwhile). A report the server cannot use never ends the run
    (:func:`site_count`): a site with a bad count, or a client two nodes claim, is left out
    (kept with its ``problem``); a node naming no client of this run is ignored.
    """
    deadline, found, asked = time.monotonic() + timeout_s, {}, set()
    while len(found) < num_clients:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"only clients {sorted(found)} of {num_clients} answered within {timeout_s:.0f} s; "
                               "is one SuperNode per client connected (partition-id=0..K-1)?")
        new = [n for n in grid.get_node_ids() if n not in asked]
        if not new:
            time.sleep(0.2)
            continue
        asked.update(new)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in exchange(grid, msgs, left):
            cid, site = _site_of(reply, num_clients, max_examples)
            if site is not None and cid in found:
                why = f"nodes {found[cid].node_id} and {site.node_id} both claim partition-id={cid}"
                log.warning("flower: %s; client %d is left out of the run", why, cid)
                site = Site(found[cid].node_id, 1, False, why)
            if site is not None:
                found[cid] = site
    return found


class _SiteSizes:
    """The server's view of the clients' data: only their sizes (data never leaves a site)."""

    def __init__(self, data: ExperimentData, sites: dict[int, Site]) -> None:
        self._data, self._sites = data, sites

    def client_examples(self, k: int) -> range:
        return range(self._sites[k].num_examples)

    @property
    def train_examples(self) -> Any:
        return self._data.train_examples

    @property
    def stats(self) -> dict:
        return self._data.stats

    def partition_json(self) -> dict:
        if not any(s.own_data for s in self._sites.values()):
            return self._data.partition_json()  # the same slices of the recipe's corpus as in-process
        return {"source": "per-site data (never sent to the server)",
                "clients": {str(k): {"node_id": s.node_id, "num_examples": s.num_examples,
                                     **({"left_out": s.problem} if s.problem else {})}
                            for k, s in sorted(self._sites.items())},
                "eval": self._data.partition_json().get("eval", [])}


class RemoteExperiment:
    """The server's experiment (model for evaluation, held-out split) whose ``fit`` runs on a site.

    Every member but :meth:`fit` and ``data.client_examples`` is the local experiment's. The sites
    apply their own uplink steps (client DP noise, the codec: :meth:`Uplink.site_part`), so
    ``uplink_on_site`` is true and :meth:`fit` returns the update as the server decodes it.
    """

    uplink_on_site = True

    def __init__(self, exp: Experiment, grid: Grid, sites: dict[int, Site], timeout_s: float) -> None:
        self._exp, self.grid, self.sites, self.timeout_s = exp, grid, sites, timeout_s
        self._codec = build.codec(exp.recipe)[0]
        self.data = _SiteSizes(exp.data, sites)
        # an update is one delta of the trainable state: twice its size (plus slack) is already a lie
        self.reply_limit = 2 * serialized_bytes(exp.initial_state) + (1 << 20)

    @property
    def recipe(self) -> Recipe:
        return self._exp.recipe

    @property
    def initial_state(self) -> StateDict:
        return self._exp.initial_state

    @property
    def step_callbacks(self) -> list:
        return self._exp.step_callbacks

    @property
    def mask(self) -> Mapping[str, torch.Tensor] | None:
        return self._exp.mask

    @property
    def mask_bytes(self) -> int:
        return self._exp.mask_bytes

    def evaluate(self, state: StateDict) -> EvalResult:
        return self._exp.evaluate(state)

    def evaluate_clients(self, state: StateDict, clients: list[int] | None = None) -> dict[int, float]:
        return {}  # a client's own slice stays on its site (eval.client_holdout is refused on Flower)

    def save_adapter(self, state: StateDict, path: Path) -> None:
        self._exp.save_adapter(state, path)

    def loss_on(self, state: StateDict, examples: Any) -> float:
        """Never called: a site's training data stays on it (federation.clusters is refused on Flower)."""
        raise RuntimeError("the Flower engine does not score models on a site's training data")

    def payload_bytes(self, state: Mapping[str, torch.Tensor]) -> int:
        return self._exp.payload_bytes(state)

    def runtime_info(self) -> dict:
        """The coordinator's numeric path (it evaluates; the sites train on their own machines)."""
        return self._exp.runtime_info()

    def fit_many(self, jobs: list[FitJob], rnd: int, on_client=None) -> list[ClientUpdate | Exception]:
        """Each client on its own site, one after another (:meth:`fit`)."""
        return fit_each(self, jobs, rnd, on_client)

    def fit(self, client_id: int, examples: Any, start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate:
        """Train on client ``client_id``'s site; raise if it fails or does not answer in time."""
        site = self.sites[client_id]
        if site.problem is not None:
            raise ValueError(f"client {client_id} (node {site.node_id}) was left out at discovery: {site.problem}")
        msg = Message(TrainRequest(rnd, client_id, start, steps, grad_term).to_records(),
                      dst_node_id=site.node_id, message_type=MessageType.TRAIN, group_id=str(rnd))
        t0 = time.perf_counter()
        replies = exchange(self.grid, [msg], self.timeout_s)
        log.info("round %d: client %d answered in %.2f s", rnd, client_id, time.perf_counter() - t0)
        if not replies:
            raise TimeoutError(f"client {client_id} (node {site.node_id}) sent no reply within {self.timeout_s:.0f} s")
        reply = replies[0]
        if reply.has_error():
            raise RuntimeError(f"client {client_id} (node {site.node_id}): {reply.error.reason}")
        check_reply_size(reply.content, self.reply_limit)
        try:
            upd, enc = records_to_update(reply.content), records_to_encoded(reply.content)
        except ValueError as exc:
            raise ValueError(f"client {client_id} (node {site.node_id}): {exc}") from None
        if upd.client_id != client_id:
            raise ValueError(f"round {rnd}: the node of client {client_id} answered as client {upd.client_id}")
        if not 0 <= upd.bytes_up <= self.reply_limit:  # the site's own count of what it sent
            raise ValueError(f"client {client_id} (node {site.node_id}) reported bytes-up={upd.bytes_up}; "
                             f"expected 0 .. {self.reply_limit}")
        upd = upd if enc is None else self._decoded(upd, enc)
        if (why := self._trained_nothing(upd)) is not None:
            raise ValueError(f"client {client_id} (node {site.node_id}) {why}; left out of this round")
        return upd

    def _trained_nothing(self, upd: ClientUpdate) -> str | None:
        """Why a site's update shows no training (the engine's guard would end the whole run for it).

        In-process, an update with no gradient or an all-zero delta means this machine's numeric
        path is broken, and :func:`fedllm.federation.guard.check_progress` ends the run. A site's
        report of it is that one site's failure (or a site's way to stop every run): its client
        fails the round instead, and a run where every site does so applies no round and says so.
        """
        if self.recipe.train.lr <= 0 or self.recipe.train.noop_guard == "warn":
            return None
        if upd.grad_steps == 0 and upd.local_steps > 0:
            return f"reported grad-steps=0 for {upd.local_steps} local steps (no parameter received a gradient)"
        if upd.is_finite() and all(not bool(t.ne(0).any()) for t in upd.delta.values()):
            return "sent an update that is exactly zero"
        return None

    def _decoded(self, upd: ClientUpdate, enc: Encoded) -> ClientUpdate:
        """The update a site sent as the codec's payload, as the server reads it."""
        delta = decode_payload(self._codec, enc, self.mask, self.initial_state)
        return dataclasses.replace(upd, delta=delta, bytes_up=enc.nbytes)


def serve(grid: Grid, cfg: FlowerRunConfig) -> dict[str, Any]:
    """The ServerApp's body: discover the sites, then fedllm's own federated loop over them."""
    recipe = recipe_from_yaml(cfg.recipe_yaml)
    problem = flower_problem(recipe)
    if problem is not None:
        raise RecipeError(*problem)
    exp = make_experiment(recipe)
    sites = discover_sites(grid, recipe.partition.num_clients, cfg.timeout_s, recipe.federation.max_client_examples)
    log.info("flower: clients -> nodes %s", {k: s.node_id for k, s in sorted(sites.items())})
    return run_federated(RemoteExperiment(exp, grid, sites, cfg.timeout_s), cfg.out, resume=cfg.resume)
