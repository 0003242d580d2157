"""The Flower app objects of the ``flower`` engine: what a Flower App Bundle (FAB) points at.

``flwr run`` ships a FAB whose ``pyproject.toml`` names ``server_app`` and ``client_app`` below
(:func:`fedllm.federation.flower.launch.write_app` writes it). Flower 1.41's deployment runtime
starts a fresh ``flwr-clientapp`` process for every message, in both isolation modes, so this
module stays light at import (flwr and :mod:`~fedllm.federation.flower.run_config`; no torch,
Lightning or transformers): a site that runs a warm worker
(``python -m fedllm.federation.flower worker --socket PATH``) only forwards the message's records
to it, and its model and data are loaded once, not per message. Without a worker the ClientApp
imports :mod:`fedllm.federation.flower.site` and trains itself.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedllm.federation.flower.run_config import NODE_RECORD, FlowerRunConfig, NodeSpec
from fedllm.federation.flower.worker import forward_to_worker


def _run_config(context: Context, fixed: FlowerRunConfig | None) -> FlowerRunConfig:
    return fixed if fixed is not None else FlowerRunConfig.from_user_config(context.run_config)


def _query(msg: Message, context: Context, fixed: FlowerRunConfig | None) -> RecordDict:
    """Say which fedllm client this node is and how many examples it holds (loads model and data)."""
    cfg, node = _run_config(context, fixed), NodeSpec.from_node_config(context.node_config)
    n = _request(node, ("prepare", cfg, node, None))
    return RecordDict({NODE_RECORD: ConfigRecord({"partition-id": node.partition_id, "num-examples": int(n),
                                                  "own-data": node.data_path is not None})})


def _request(node: NodeSpec, request: tuple) -> Any:
    """Run a site request on the node's warm worker, or here when it has none."""
    if node.worker is not None:
        return forward_to_worker(node.worker, request)
    from fedllm.federation.flower.site import handle_request  # noqa: PLC0415  (heavy: torch, Lightning)

    return handle_request(*request)


def _train(msg: Message, context: Context, fixed: FlowerRunConfig | None) -> RecordDict:
    cfg, node = _run_config(context, fixed), NodeSpec.from_node_config(context.node_config)
    return _request(node, ("train", cfg, node, msg.content))


def make_client_app(fixed: FlowerRunConfig | None = None) -> ClientApp:
    """A ClientApp: ``query`` names this node's client (and warms its model), ``train`` trains."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(_query(msg, context, fixed), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(_train(msg, context, fixed), reply_to=msg)

    return app


def make_server_app(fixed: FlowerRunConfig | None = None) -> ServerApp:
    """A ServerApp running :func:`fedllm.federation.flower.coordinator.serve` (sampling and math are fedllm's)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedllm.federation.flower.coordinator import serve  # noqa: PLC0415  (heavy: the model)
        from fedllm.federation.flower.gate import quicken_object_pulls  # noqa: PLC0415

        quicken_object_pulls()  # the replies' objects (a no-op for the simulation's in-memory grid)
        serve(grid, _run_config(context, fixed))

    return app


server_app = make_server_app()
client_app = make_client_app()
