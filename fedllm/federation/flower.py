"""The Flower engine: fedllm's rounds carried by Flower 1.41's runtimes, translated, not reimplemented.

The ServerApp runs :func:`fedllm.federation.modes.run_federated` unchanged — the same
:class:`~fedllm.federation.server.FederatedServer` samples the clients (seeded; Flower's own
strategies draw from the global ``random``), plans their steps, validates, aggregates (robust
aggregators, server optimizers, DP, compression, FedProx/SCAFFOLD/FedNova), evaluates on the
held-out split, checkpoints and writes the run directory. The only difference is the experiment
it drives: :class:`RemoteExperiment`, whose :meth:`~RemoteExperiment.fit` sends the client's
start state to that client's SuperNode as a Flower ``Message`` and turns the reply back into a
:class:`~fedllm.types.ClientUpdate`. On the site, :func:`handle_request` runs fedllm's own
``make_experiment(recipe).fit`` on the site's data, with the experiment (model + data) cached per
process.

Wire format (adapter-only payloads; Flower 1.41 chunks large arrays itself):

- server -> client (``train``): ``{"state": ArrayRecord, "instruction": ConfigRecord}`` and, for
  SCAFFOLD, ``{"correction": ArrayRecord}`` (c − cᵢ); FedProx's μ(θ − θ_start) is rebuilt on the
  client from the recipe's μ and the received start state;
- client -> server: ``{"delta": ArrayRecord, "update": MetricRecord, "metrics": MetricRecord,
  "codec": ConfigRecord}``.

Where the transforms run: ``FederatedServer.upload`` (attack simulation, client-side DP noise,
compression, secure-aggregation masking) runs in the ServerApp process on the update as it
arrives, exactly as in-process; on a real deployment those are therefore simulated at the server,
not applied on the site (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm.algorithms.drift import Correction, DriftTerm, Proximal
from fedllm.config import Recipe
from fedllm.federation.experiment import make_experiment
from fedllm.federation.flower_apps import (
    NODE_RECORD,
    TELEMETRY_OFF,
    FlowerRunConfig,
    NodeSpec,
    make_client_app,
    make_server_app,
    recipe_from_yaml,
    site_recipe,
)
from fedllm.federation.modes import run_federated
from fedllm.types import ClientUpdate, StateDict

log = logging.getLogger(__name__)

BF16_KEYS = "bfloat16-keys"  # numpy has no bfloat16: such tensors travel as their int16 bits


# ----------------------------------------------------------------------------- typed <-> records


def pack_state(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, list[str]]:
    """A state dict as an ArrayRecord (keys and order kept) and the keys sent as bfloat16 bits."""
    bf16 = [k for k, v in state.items() if v.dtype == torch.bfloat16]
    arrays = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        arrays[k] = Array((t.view(torch.int16) if k in bf16 else t).numpy())
    return ArrayRecord(arrays), bf16


def unpack_state(record: ArrayRecord, bf16: Iterable[str] = ()) -> StateDict:
    """Inverse of :func:`pack_state` (bit-exact)."""
    bf16 = set(bf16)
    out: StateDict = {}
    for k in record:
        t = torch.from_numpy(record[k].numpy().copy())
        out[k] = t.view(torch.bfloat16) if k in bf16 else t
    return out


@dataclass(frozen=True)
class TrainRequest:
    """What the server sends one sampled client: ``exp.fit``'s arguments, minus the data.

    ``drift`` travels by its type (:data:`fedllm.algorithms.drift.DriftTerm`): a proximal term as
    its μ (its anchor is the start state, or is sent beside it), a correction as its tensors. The
    engine never needs to know which algorithm made it.
    """

    round: int
    client_id: int
    start: StateDict
    steps: int
    drift: DriftTerm | None = None

    def to_records(self) -> RecordDict:
        arrays, bf16 = pack_state(self.start)
        instruction = {"round": self.round, "client-id": self.client_id, "local-steps": self.steps, BF16_KEYS: bf16}
        content = RecordDict({"state": arrays})
        if isinstance(self.drift, Proximal):
            instruction.update({"drift": "proximal", "mu": float(self.drift.mu)})
            if self.drift.anchor is not self.start:
                content["anchor"] = pack_state(self.drift.anchor)[0]
        elif isinstance(self.drift, Correction):
            instruction["drift"] = "correction"
            content["correction"] = pack_state(self.drift.tensors)[0]
        elif self.drift is not None:
            raise TypeError(f"cannot send a drift term of type {type(self.drift).__name__}")
        content["instruction"] = ConfigRecord(instruction)
        return content

    @classmethod
    def from_records(cls, content: RecordDict) -> TrainRequest:
        for key in ("state", "instruction"):
            if key not in content:
                raise ValueError(f"train message lacks the {key!r} record; expected fedllm's TrainRequest records")
        c = content["instruction"]
        bf16 = list(c.get(BF16_KEYS, []))
        start = unpack_state(content["state"], bf16)
        kind = c.get("drift", "none")
        drift: DriftTerm | None = None
        if kind == "proximal":
            anchor = unpack_state(content["anchor"], bf16) if "anchor" in content else start
            drift = Proximal(float(c["mu"]), anchor)
        elif kind == "correction":
            drift = Correction(unpack_state(content["correction"], bf16))
        elif kind != "none":
            raise ValueError(f"unknown drift term {kind!r}; expected 'proximal' or 'correction'")
        return cls(round=int(c["round"]), client_id=int(c["client-id"]), start=start,
                   steps=int(c["local-steps"]), drift=drift)


def update_to_records(upd: ClientUpdate) -> RecordDict:
    arrays, bf16 = pack_state(upd.delta)
    scalars = {"client-id": upd.client_id, "num-examples": upd.num_examples, "local-steps": upd.local_steps,
               "train-loss": float(upd.train_loss), "bytes-up": upd.bytes_up,
               "grad-steps": -1 if upd.grad_steps is None else upd.grad_steps}
    return RecordDict({"delta": arrays, "update": MetricRecord(scalars),
                       "metrics": MetricRecord({k: float(v) for k, v in upd.metrics.items()}),
                       "codec": ConfigRecord({BF16_KEYS: bf16})})


def records_to_update(content: RecordDict) -> ClientUpdate:
    for key in ("delta", "update"):
        if key not in content:
            raise ValueError(f"reply lacks the {key!r} record; expected fedllm's ClientUpdate records")
    u = content["update"]
    bf16 = content["codec"].get(BF16_KEYS, []) if "codec" in content else []
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    return ClientUpdate(client_id=int(u["client-id"]), delta=unpack_state(content["delta"], bf16),
                        num_examples=int(u["num-examples"]), local_steps=int(u["local-steps"]),
                        train_loss=float(u["train-loss"]), bytes_up=int(u["bytes-up"]), metrics=metrics,
                        grad_steps=int(u["grad-steps"]) if int(u.get("grad-steps", -1)) >= 0 else None)


# ----------------------------------------------------------------------------- the site (client side)


class _SiteCache:
    """One experiment per process (model and data loaded once), rebuilt only for another recipe."""

    def __init__(self) -> None:
        self.key: tuple[str, str | None] | None = None
        self.exp: Any = None

    def get(self, cfg: FlowerRunConfig, node: NodeSpec):
        key = (cfg.recipe_yaml, node.data_path)
        if self.key != key:
            self.exp = None  # drop the old model before loading the next one
            self.exp, self.key = make_experiment(site_recipe(cfg.recipe_yaml, node)), key
        return self.exp


_SITE = _SiteCache()


def site_examples(exp, node: NodeSpec):
    """The site's training examples: its own file whole, or its slice of the recipe's corpus."""
    return exp.data.examples if node.data_path else exp.data.client_examples(node.partition_id)


def handle_request(kind: str, cfg: FlowerRunConfig, node: NodeSpec, content: RecordDict | None) -> Any:
    """A site's request: ``prepare`` loads model and data (returns its example count), ``train`` trains."""
    exp = _SITE.get(cfg, node)
    examples = site_examples(exp, node)
    if kind == "prepare":
        return len(examples)
    if kind != "train" or content is None:
        raise ValueError(f"unknown client request {kind!r}; expected 'prepare' or 'train'")
    return site_train(exp, node.partition_id, examples, content)


def site_train(exp, client_id: int, examples: Any, content: RecordDict) -> RecordDict:
    """One train message on a site: decode the request (its drift term included), run ``exp.fit``."""
    req = TrainRequest.from_records(content)
    if req.client_id != client_id:
        raise ValueError(f"instruction for client {req.client_id} reached the node of client {client_id}")
    upd = exp.fit(req.client_id, examples, req.start, req.round, req.steps, grad_term=req.drift)
    return update_to_records(upd)


def serve_worker(address: str) -> None:
    """Serve one site's ClientApp requests from this long-lived process until it is terminated.

    Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message in both isolation
    modes; this worker keeps the site's model and data loaded across them. It listens on a Unix
    socket (same machine, same user); the authentication key is written beside it
    (``<address>.key``, mode 0600) and read by :func:`fedllm.federation.flower_apps.forward_to_worker`.
    """
    key_path = Path(address + ".key")
    key = secrets.token_bytes(32)
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    Path(address).unlink(missing_ok=True)
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        while True:
            try:
                conn = listener.accept()
            except OSError as exc:  # includes a peer failing authentication
                log.warning("fedllm worker: rejected a connection (%s)", exc)
                continue
            with conn:
                kind, cfg, node, content = conn.recv()
                t0 = time.perf_counter()
                try:
                    conn.send(("ok", handle_request(kind, cfg, node, content)))
                    log.info("fedllm worker: %s request served in %.2f s", kind, time.perf_counter() - t0)
                except Exception as exc:  # the server counts it as a failed client
                    log.warning("fedllm worker: %s request failed (%s: %s)", kind, type(exc).__name__, exc)
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ----------------------------------------------------------------------------- the server side


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

    def __init__(self, data, sites: dict[int, Site]) -> None:
        self._data, self._sites = data, sites

    def client_examples(self, k: int) -> range:
        return range(self._sites[k].num_examples)

    def partition_json(self) -> dict:
        if not any(s.own_data for s in self._sites.values()):
            return self._data.partition_json()  # the same slices of the recipe's corpus as in-process
        return {"source": "per-site data (never sent to the server)",
                "clients": {str(k): {"node_id": s.node_id, "num_examples": s.num_examples}
                            for k, s in sorted(self._sites.items())},
                "eval": self._data.partition_json().get("eval", [])}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


class RemoteExperiment:
    """The server's experiment (model for evaluation, held-out split) whose ``fit`` runs on a site.

    Everything but :meth:`fit` and ``data.client_examples`` is the local experiment's.
    """

    def __init__(self, exp, grid: Grid, sites: dict[int, Site], timeout_s: float) -> None:
        self._exp, self.grid, self.sites, self.timeout_s = exp, grid, sites, timeout_s
        self.data = _SiteSizes(exp.data, sites)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._exp, name)

    def fit(self, client_id: int, examples: Any, start: StateDict, rnd: int, steps: int,
            grad_term=None) -> ClientUpdate:
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
        upd = records_to_update(reply.content)
        if upd.client_id != client_id:
            raise ValueError(f"round {rnd}: the node of client {client_id} answered as client {upd.client_id}")
        return upd


def serve(grid: Grid, cfg: FlowerRunConfig) -> dict[str, Any]:
    """The ServerApp's body: discover the sites, then fedllm's own federated loop over them."""
    recipe = recipe_from_yaml(cfg.recipe_yaml)
    exp = make_experiment(recipe)
    sites = discover_sites(grid, recipe.partition.num_clients, cfg.timeout_s)
    log.info("flower: clients -> nodes %s", {k: s.node_id for k, s in sorted(sites.items())})
    return run_federated(RemoteExperiment(exp, grid, sites, cfg.timeout_s), cfg.out, resume=cfg.resume)


# ----------------------------------------------------------------------------- simulation (in-process)


def run_simulation(recipe: Recipe, out: str | None = None, num_cpus: int | None = None,
                   timeout_s: float = 3600.0, resume: bool = False) -> dict[str, Any]:
    """Run the recipe on Flower's simulation runtime in this process; return ``summary.json``.

    One virtual SuperNode per client (``partition-id`` = client id); the ClientApps run in Flower's
    Ray actors, each keeping its experiment loaded across messages; the ServerApp runs here.
    """
    import importlib.util
    import json

    if importlib.util.find_spec("ray") is None:
        from fedllm.config import RecipeError

        raise RecipeError("federation.engine", "Flower's simulation runtime needs Ray: "
                          "pip install 'flwr[simulation]==1.41.0'")
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedllm.config import dump_recipe
    from fedllm.federation.rundir import run_dir
    from fedllm.models.llm import pick_device

    out_root = str(Path(out or recipe.output.dir).resolve())
    cfg = FlowerRunConfig(dump_recipe(recipe), out_root, timeout_s, "flower-simulation", resume)
    summary = run_dir(recipe, "federated", out_root) / "summary.json"
    started = time.time()
    cpus = num_cpus or max(1, min(recipe.partition.num_clients, os.cpu_count() or 1))
    # On CUDA every ClientApp actor must see the GPU (Ray hides it from actors that ask for none);
    # the actors share it, each holding its own copy of the base, loaded once per actor.
    gpus = 1.0 / cpus if pick_device(recipe.model) == "cuda" else 0.0
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error",
                             "log_to_driver": False}}
    flwr_run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                        num_supernodes=recipe.partition.num_clients, backend_config=backend)
    if not summary.exists() or summary.stat().st_mtime < started:
        raise RuntimeError(f"the Flower simulation wrote no {summary}; see the Flower log above")
    return json.loads(summary.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Site and coordinator helpers (see docs/deploy.md)::

        python -m fedllm.federation.flower worker --socket PATH          # a site's warm worker
        python -m fedllm.federation.flower app RECIPE [overrides] --app-dir DIR --out RUNS
    """
    p = argparse.ArgumentParser(prog="python -m fedllm.federation.flower")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="serve this site's ClientApp requests with its model loaded once")
    w.add_argument("--socket", required=True, help="Unix socket path (its key is written to PATH.key, mode 0600)")
    a = sub.add_parser("app", help="write a Flower App directory that runs RECIPE (for flwr run)")
    a.add_argument("recipe")
    a.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=2")
    a.add_argument("--app-dir", required=True, help="folder to write (pyproject.toml)")
    a.add_argument("--out", required=True, help="run directories' root on the coordinator (absolute)")
    a.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for one client's reply")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "app":
        from fedllm.config import dump_recipe, load_recipe
        from fedllm.federation.flower_launch import write_app

        cfg = FlowerRunConfig(dump_recipe(load_recipe(args.recipe, args.overrides)), str(Path(args.out).resolve()),
                              args.timeout_s)
        print(write_app(Path(args.app_dir), cfg) / "pyproject.toml")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve_worker(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
