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
from fedllm.experiments import Experiment, ExperimentData, make_experiment
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
    """A connected SuperNode as the server knows it."""

    node_id: int
    num_examples: int
    own_data: bool


def discover_sites(grid: Grid, num_clients: int, timeout_s: float) -> dict[int, Site]:
    """fedllm client id -> its site, asking each connected node which client it serves.

    Each node answers with its ``partition-id`` and its number of training examples (the site
    loads its model and data meanwhile); two nodes claiming one id is an error.
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
            src = reply.metadata.src_node_id
            if reply.has_error():
                raise RuntimeError(f"node {src} failed to join: {reply.error.reason}")
            rec = reply.content[NODE_RECORD]
            cid = int(rec["partition-id"])
            if cid in found:
                raise ValueError(f"nodes {found[cid].node_id} and {src} both claim partition-id={cid}")
            found[cid] = Site(src, int(rec["num-examples"]), bool(rec["own-data"]))
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
                "clients": {str(k): {"node_id": s.node_id, "num_examples": s.num_examples}
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

    def payload_bytes(self, state: Mapping[str, torch.Tensor]) -> int:
        return self._exp.payload_bytes(state)

    def runtime_info(self) -> dict:
        """The coordinator's numeric path (it evaluates; the sites train on their own machines)."""
        return self._exp.runtime_info()

    def fit(self, client_id: int, examples: Any, start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate:
        """Train on client ``client_id``'s site; raise if it fails or does not answer in time."""
        site = self.sites[client_id]
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
        upd, enc = records_to_update(reply.content), records_to_encoded(reply.content)
        if upd.client_id != client_id:
            raise ValueError(f"round {rnd}: the node of client {client_id} answered as client {upd.client_id}")
        return upd if enc is None else self._decoded(upd, enc)

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
    sites = discover_sites(grid, recipe.partition.num_clients, cfg.timeout_s)
    log.info("flower: clients -> nodes %s", {k: s.node_id for k, s in sorted(sites.items())})
    return run_federated(RemoteExperiment(exp, grid, sites, cfg.timeout_s), cfg.out, resume=cfg.resume)
