"""The federated rounds on Flower's simulation runtime, in this process (``fedllm run --engine flower``).

The caller's entry point turns Flower's telemetry off before flwr is imported
(:data:`~fedllm.federation.flower.run_config.TELEMETRY_OFF`; :mod:`fedllm.cli` does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedllm.config import Recipe, RecipeError, dump_recipe
from fedllm.federation.flower.apps import make_client_app, make_server_app
from fedllm.federation.flower.run_config import FlowerRunConfig
from fedllm.federation.rundir import run_dir
from fedllm.models.llm import pick_device

# Ray's dashboard process asks the cloud metadata addresses (169.254.169.254,
# metadata.google.internal) which provider it runs on even with usage stats off (ray 2.55:
# usage_stats_head.run calls get_cluster_config_to_report before it checks). Its requests go
# through HTTP(S)_PROXY: pointed at a closed loopback port, they fail at once and never leave the
# machine; loopback itself is exempt (NO_PROXY), so Ray's own local HTTP is untouched.
DEAD_PROXY = "http://127.0.0.1:9"
NO_PROXY = "127.0.0.1,localhost,::1"


@contextlib.contextmanager
def _no_cloud_probe() -> Iterator[None]:
    """Ray's processes (started inside) inherit a proxy that keeps their HTTP on this machine."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: DEAD_PROXY for k in names[:4]}, NO_PROXY=NO_PROXY, no_proxy=NO_PROXY)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_simulation(recipe: Recipe, out: str | None = None, num_cpus: int | None = None,
                   timeout_s: float = 3600.0, resume: bool = False) -> dict[str, Any]:
    """Run the recipe on Flower's simulation runtime in this process; return ``summary.json``.

    One virtual SuperNode per client (``partition-id`` = client id); the ClientApps run in Flower's
    Ray actors, each keeping its experiment loaded across messages; the ServerApp runs here.
    """
    if importlib.util.find_spec("ray") is None:
        raise RecipeError("federation.engine", "Flower's simulation runtime needs Ray: "
                          "pip install 'flwr[simulation]==1.41.0'")
    from flwr.simulation import run_simulation as flwr_run_simulation  # noqa: PLC0415  (needs Ray)

    out_root = str(Path(out or recipe.output.dir).resolve())
    cfg = FlowerRunConfig(dump_recipe(recipe), out_root, timeout_s, "flower-simulation", resume)
    summary = run_dir(recipe, "federated", out_root) / "summary.json"
    started = time.time()
    cpus = num_cpus or max(1, min(recipe.partition.num_clients, os.cpu_count() or 1))
    # On CUDA every ClientApp actor must see the GPU (Ray hides it from actors that ask for none);
    # the actors share it, each holding its own copy of the base, loaded once per actor.
    gpus = 1.0 / cpus if pick_device(recipe.model) == "cuda" else 0.0
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
               # Ray on loopback only, no dashboard; usage stats are off (TELEMETRY_OFF), so Ray
               # never asks a cloud metadata address which provider it runs on
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error",
                             "log_to_driver": False, "_node_ip_address": "127.0.0.1"}}
    with _no_cloud_probe():
        flwr_run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                            num_supernodes=recipe.partition.num_clients, backend_config=backend)
    if not summary.exists() or summary.stat().st_mtime < started:
        raise RuntimeError(f"the Flower simulation wrote no {summary}; see the Flower log above")
    return json.loads(summary.read_text(encoding="utf-8"))
