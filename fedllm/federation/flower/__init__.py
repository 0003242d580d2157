"""The Flower engine: fedllm's rounds carried by Flower 1.41's runtimes, translated, not reimplemented.

The ServerApp runs :func:`fedllm.federation.modes.run_federated` unchanged — the same
:class:`~fedllm.federation.server.FederatedServer` samples the clients (seeded; Flower's own
strategies draw from the global ``random``), plans their steps, validates, aggregates (robust
aggregators, server optimizers, DP, compression, FedProx/SCAFFOLD/FedNova), evaluates on the
held-out split, checkpoints and writes the run directory. The only difference is the experiment
it drives: :class:`~fedllm.federation.flower.coordinator.RemoteExperiment`, whose ``fit`` sends
the client's start state to that client's SuperNode as a Flower ``Message`` and turns the reply
back into a :class:`~fedllm.types.ClientUpdate`. On the site,
:func:`~fedllm.federation.flower.site.handle_request` runs fedllm's own
``make_experiment(recipe).fit`` on the site's data, with the experiment (model + data) cached per
process.

One job per module (imports flow down this list; nothing here imports a module above it):

- :mod:`.run_config`: what a run (:class:`FlowerRunConfig`) and a node (:class:`NodeSpec`) are
  configured with, and the recipe a site builds; light (no flwr, no torch);
- :mod:`.codec`: the wire format, typed messages <-> Flower records (bit-exact);
- :mod:`.site`: a site's side: its cached experiment, ``prepare`` and ``train`` requests;
- :mod:`.worker`: a site's warm worker process (model loaded once) and the forwarding to it;
- :mod:`.coordinator`: the server's side: node discovery, :class:`RemoteExperiment`, ``serve``;
- :mod:`.apps`: the ClientApp and ServerApp objects a Flower App Bundle names (light at import);
- :mod:`.simulation`: the recipe on Flower's simulation runtime, in this process;
- :mod:`.launch`: a whole loopback deployment (SuperLink, SuperNodes, workers) for tests;
- :mod:`.gate`: what each port exposes, and the pin to fedllm's apps (SuperLink, SuperNode);
- ``__main__``: ``python -m fedllm.federation.flower superlink|supernode|worker|app`` (see docs/deploy.md).

Wire format (adapter-only payloads; Flower 1.41 chunks large arrays itself):

- server -> client (``train``): ``{"state": ArrayRecord, "instruction": ConfigRecord}``; a drift
  term travels by its type: a proximal term as its μ (and an ``anchor`` ArrayRecord when it is not
  the start state), a correction as a ``correction`` ArrayRecord;
- client -> server: ``{"delta": ArrayRecord, "update": MetricRecord, "metrics": MetricRecord}``;
  under a codec the site's payload travels instead (``"encoded"``);
- each state dict is one Array holding a safetensors blob: one Flower object, not one per tensor.

Where the transforms run: the site applies its own client DP noise and codec
(:class:`~fedllm.federation.flower.site.SiteUplink`, its residuals on the site's disk) and the
coordinator's :class:`~fedllm.federation.server.FederatedServer` gets the update as the server
decodes it (``uplink_on_site``); what cannot run on a site is refused by
:func:`fedllm.config.flower_problem`. :mod:`.gate` starts the SuperLink and SuperNodes so that
only the Fleet API is public and only fedllm's apps run.

Importing this package (or :mod:`.run_config`, :mod:`.apps`) loads neither torch nor the model:
Flower starts a fresh ClientApp process for every message.
"""
