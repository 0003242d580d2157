"""What a Flower run and a Flower node are configured with, and the recipe a site builds from them.

Everything a run needs travels in Flower's run config (:class:`FlowerRunConfig`); what is
particular to a site comes from the SuperNode's ``--node-config`` (:class:`NodeSpec`). Light at
import (yaml and :mod:`fedllm.config`; no flwr, no torch): the ClientApp, the CLI and the
launcher read it before anything heavy is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedllm.config import PartitionConfig, Recipe, build

ENGINES = ("flower-simulation", "flower-deployment")
NODE_RECORD = "node"  # the ConfigRecord a ClientApp answers a discovery query with
# set by the entry points that start Flower (fedllm.cli, ``python -m fedllm.federation.flower``) and
# in the environment of the launcher's child processes: no telemetry, no update check, no Ray usage stats
TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class FlowerRunConfig:
    """What every ServerApp and ClientApp of one run reads from Flower's run config."""

    recipe_yaml: str  # the resolved recipe (``fedllm.config.dump_recipe``)
    out: str  # absolute root folder for the run directory (written where the ServerApp runs)
    timeout_s: float = 600.0  # longest wait for client replies in one round, and for discovery
    engine: str = "flower-deployment"
    resume: bool = False  # continue the run directory's federated run from its last checkpoint

    def __post_init__(self) -> None:
        if not self.recipe_yaml.strip():
            raise ValueError("FlowerRunConfig.recipe_yaml: expected the recipe as YAML text, got an empty string")
        if not Path(self.out).is_absolute():
            raise ValueError(f"FlowerRunConfig.out: expected an absolute path, got {self.out!r}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"FlowerRunConfig.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
        if self.engine not in ENGINES:
            raise ValueError(f"FlowerRunConfig.engine: expected one of {ENGINES}, got {self.engine!r}")

    def to_user_config(self) -> dict[str, Any]:
        """Flat TOML-able keys for ``[tool.flwr.app.config]``."""
        return {"recipe": self.recipe_yaml, "out": self.out, "timeout-s": float(self.timeout_s),
                "engine": self.engine, "resume": self.resume}

    @classmethod
    def from_user_config(cls, values: Any) -> FlowerRunConfig:
        missing = [k for k in ("recipe", "out") if k not in values]
        if missing:
            raise ValueError(f"Flower run config lacks {missing}; expected the keys written by "
                             "FlowerRunConfig.to_user_config (recipe, out, timeout-s, engine)")
        return cls(recipe_yaml=str(values["recipe"]), out=str(values["out"]),
                   timeout_s=float(values.get("timeout-s", 600.0)),
                   engine=str(values.get("engine", "flower-deployment")),
                   resume=bool(values.get("resume", False)))


@dataclass(frozen=True)
class NodeSpec:
    """A SuperNode's ``--node-config``: which fedllm client it is, and where its data lives.

    ``partition-id``: the fedllm client id this node serves (Flower's simulation sets it too).
    ``num-partitions``: optional; when given it must equal the recipe's ``partition.num_clients``.
    ``data-path``: optional; the site's own data file (all its rows are this client's training
    examples) instead of a slice of the recipe's data.
    ``worker``: optional; the Unix socket of this site's warm worker.
    ``state-dir``: optional; where the site keeps its uplink state (error-feedback residuals, the
    codec's RNG) between rounds and across restarts (default ``$FEDLLM_SITE_STATE`` or
    ``~/.cache/fedllm/site-state``).
    """

    partition_id: int
    num_partitions: int | None = None
    data_path: str | None = None
    worker: str | None = None
    state_dir: str | None = None

    @classmethod
    def from_node_config(cls, values: Any) -> NodeSpec:
        if "partition-id" not in values:
            raise ValueError("SuperNode --node-config lacks partition-id; expected e.g. "
                             "--node-config 'partition-id=0 num-partitions=2'")
        pid = values["partition-id"]
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise ValueError(f"node config partition-id: expected an integer >= 0, got {pid!r}")
        num = values.get("num-partitions")
        data, worker, state = values.get("data-path"), values.get("worker"), values.get("state-dir")
        return cls(partition_id=pid, num_partitions=None if num is None else int(num),
                   data_path=None if data in (None, "") else str(data),
                   worker=None if worker in (None, "") else str(worker),
                   state_dir=None if state in (None, "") else str(state))

    def check(self, num_clients: int) -> None:
        """Raise ValueError when this node cannot be a client of a recipe with ``num_clients``."""
        if not 0 <= self.partition_id < num_clients:
            raise ValueError(f"node config partition-id={self.partition_id}: expected in [0, {num_clients}) "
                             "(the recipe's partition.num_clients)")
        if self.num_partitions is not None and self.num_partitions != num_clients:
            raise ValueError(f"node config num-partitions={self.num_partitions}: expected the recipe's "
                             f"partition.num_clients ({num_clients})")


def _recipe_values(text: str) -> dict[str, Any]:
    values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError("Flower run config recipe: expected a YAML mapping of recipe groups")
    return values


def recipe_from_yaml(text: str) -> Recipe:
    """The recipe a run config carries (validated again here, on the receiving side)."""
    return build(Recipe, _recipe_values(text))


def _site_data(values: dict[str, Any], node: NodeSpec) -> dict[str, Any]:
    return {**(values.get("data") or {}), "builtin": None, "path": node.data_path, "max_examples": None,
            "eval_size": 1}


def uplink_recipe(text: str, node: NodeSpec) -> Recipe:
    """The recipe a site's uplink steps read: the run's own (its client count, privacy, codec, seed).

    Only the data group is the site's (the server's file need not exist here).
    """
    values = _recipe_values(text)
    return build(Recipe, values if node.data_path is None else {**values, "data": _site_data(values, node)})


def site_recipe(text: str, node: NodeSpec) -> Recipe:
    """The recipe a site builds its model and data from.

    A node with its own ``data-path`` reads that file whole: all its rows are this client's
    training data (the held-out split is the server's), so the server's data source, sampling and
    partition settings are replaced before validation (the server's file need not exist here).
    """
    values = _recipe_values(text)
    if node.data_path is None:
        recipe = build(Recipe, values)
        node.check(recipe.partition.num_clients)
        return recipe
    part = dict(values.get("partition") or {})
    node.check(int(part.get("num_clients", PartitionConfig.num_clients)))
    part.update(method="iid", column=None, num_clients=1, min_examples=1)
    return build(Recipe, {**values, "data": _site_data(values, node), "partition": part})
