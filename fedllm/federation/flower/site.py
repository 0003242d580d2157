"""A site's side of the Flower engine: its experiment, cached per process, and the requests it serves.

A SuperNode's ClientApp (or the site's warm worker, :mod:`fedllm.federation.flower.worker`) hands
each request to :func:`handle_request`: ``prepare`` loads the site's model and data and reports
its example count, ``train`` decodes a :class:`~fedllm.federation.flower.codec.TrainRequest`, runs
fedllm's own ``make_experiment(recipe).fit`` on the site's data and encodes the update.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from fedllm.experiments import Experiment, make_experiment
from fedllm.federation.flower.codec import TrainRequest, update_to_records
from fedllm.federation.flower.run_config import FlowerRunConfig, NodeSpec, site_recipe


class _SiteCache:
    """One experiment per process (model and data loaded once), rebuilt only for another recipe."""

    def __init__(self) -> None:
        self.key: tuple[str, str | None] | None = None
        self.exp: Experiment | None = None

    def get(self, cfg: FlowerRunConfig, node: NodeSpec) -> Experiment:
        key = (cfg.recipe_yaml, node.data_path)
        if self.key != key:
            self.exp = None  # drop the old model before loading the next one
            self.exp, self.key = make_experiment(site_recipe(cfg.recipe_yaml, node)), key
        return self.exp


_SITE = _SiteCache()


def site_examples(exp: Experiment, node: NodeSpec) -> Any:
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


def site_train(exp: Experiment, client_id: int, examples: Any, content: RecordDict) -> RecordDict:
    """One train message on a site: decode the request (its drift term included), run ``exp.fit``."""
    req = TrainRequest.from_records(content)
    if req.client_id != client_id:
        raise ValueError(f"instruction for client {req.client_id} reached the node of client {client_id}")
    upd = exp.fit(req.client_id, examples, req.start, req.round, req.steps, grad_term=req.drift)
    return update_to_records(upd)
