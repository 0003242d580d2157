"""Who averages with whom: the round loop's server for the recipe's topology.

:func:`fedllm.federation.modes.run_federated` drives one round protocol (``begin_round``,
``start_state``, ``grad_term``, ``upload``, ``finish_round``, ``eval_state``, ``personal_state``,
``state_dict``); three objects speak it:

- :class:`~fedllm.federation.server.FederatedServer`: one server model (every algorithm, the default);
- :class:`~fedllm.federation.gossip.GossipPeers`: ``federation.topology: gossip``, no server model;
- :class:`~fedllm.federation.clustered.ClusterServer`: ``federation.clusters`` > 1, IFCA's k models.

So the rows, checkpoints, ``--resume`` and ``fedllm compare`` are the same code for all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedllm.experiments.base import Experiment
from fedllm.federation.clustered import ClusterServer
from fedllm.federation.gossip import GossipPeers
from fedllm.federation.server import FederatedServer


def make_server(exp: Experiment, client_sizes: Sequence[int],
                run_path: Path) -> FederatedServer | GossipPeers | ClusterServer:
    """The server object of ``exp.recipe``'s topology (``run_path``: the federated run's directory)."""
    fed = exp.recipe.federation
    if fed.topology == "gossip":
        return GossipPeers(exp.recipe, exp.initial_state, client_sizes, exp.payload_bytes)
    if fed.clusters > 1:
        return ClusterServer(exp, client_sizes, run_path)
    labels = exp.data.label_histograms() if exp.recipe.selection.method == "diversity" else None  # vision only
    return FederatedServer(exp.recipe, exp.initial_state, client_sizes, exp.payload_bytes, exp.mask, exp.mask_bytes,
                           uplink_on_site=exp.uplink_on_site, state_dir=run_path / "client_state",
                           client_labels=labels)
