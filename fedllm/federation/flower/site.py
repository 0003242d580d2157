"""A site's side of the Flower engine: its experiment, cached per process, and the requests it serves.

A SuperNode's ClientApp (or the site's warm worker, :mod:`fedllm.federation.flower.worker`) hands
each request to :func:`handle_request`: ``prepare`` loads the site's model and data and reports
its example count, ``train`` decodes a :class:`~fedllm.federation.flower.codec.TrainRequest`, runs
fedllm's own ``make_experiment(recipe).fit`` on the site's data and encodes the update.

A site applies its own uplink steps (:class:`SiteUplink`): under ``privacy.dp: client`` it clips
and noises its update with noise drawn from the operating system's randomness (the coordinator
knows the recipe's seed, so seeded noise would be no noise against it), and under
``compression.codec`` it sends the codec's payload, not the tensors. Its error-feedback residual
and codec state are kept on disk per run and round, so a resumed run continues from the state
the site had after the checkpointed round.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from fedllm.config import Recipe
from fedllm.experiments import Experiment, make_experiment
from fedllm.federation import build
from fedllm.federation.flower.codec import TrainRequest, update_to_records
from fedllm.federation.flower.run_config import FlowerRunConfig, NodeSpec, site_recipe, uplink_recipe
from fedllm.federation.rundir import write_atomic
from fedllm.federation.uplink import Uplink
from fedllm.types import ClientUpdate

log = logging.getLogger(__name__)
KEEP_ROUNDS = 10  # uplink states kept per client: a resume may go back this many rounds


def needs_site_uplink(recipe: Recipe) -> bool:
    return recipe.privacy.dp == "client" or recipe.compression.codec != "none"


class SiteUplink:
    """One site's uplink steps for one run, its state on disk under ``state_dir``."""

    def __init__(self, recipe: Recipe, exp: Experiment, client_id: int, state_dir: Path, run_key: str) -> None:
        self.recipe, self.exp = recipe, exp
        dp = build.privacy(recipe, build.aggregator(recipe), recipe.partition.num_clients)  # once: σ may be solved for
        self.dp = dp.aggregator if dp else None
        self.uplink = self._fresh()
        self.stateful = self.uplink.feedback is not None  # residuals; the codec's draws are keyed by round
        self.path = state_dir / f"{run_key}-client{client_id}.pt"

    def _fresh(self) -> Uplink:
        r = self.recipe
        return Uplink(r, r.partition.num_clients, self.exp.payload_bytes, self.exp.mask, self.dp)

    def _load(self, rnd: int, saved: dict[int, Any], dropped: bool) -> None:
        """The state the site had after its latest round before ``rnd`` (fresh when it had none)."""
        before = [r for r in saved if r < rnd]
        self.uplink = self._fresh()
        if before:
            self.uplink.load_state_dict(saved[max(before)])
        elif dropped:
            raise RuntimeError(f"{self.path} keeps uplink states from round {min(saved)} on (the last "
                               f"{KEEP_ROUNDS}); round {rnd} needs an older one")

    def _saved(self) -> tuple[dict[int, Any], bool]:
        """(round -> uplink state, whether older rounds' states were dropped)."""
        if not self.path.exists():
            return {}, False
        try:
            blob = torch.load(self.path, weights_only=True)
            return {int(k): v for k, v in blob["states"].items()}, bool(blob["dropped"])
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: say which, never guess a state
            raise RuntimeError(f"{self.path}: unreadable uplink state ({type(e).__name__}); remove it to "
                               "start this site's residuals afresh") from None

    def apply(self, rnd: int, upd: ClientUpdate) -> tuple[ClientUpdate, Any]:
        """Noise and encode ``upd`` as this site; keep the uplink state it leaves for later rounds."""
        if self.stateful:
            saved, dropped = self._saved()
            self._load(rnd, saved, dropped)
        gen = torch.Generator().manual_seed(secrets.randbits(63))  # the server cannot know this noise
        out = self.uplink.site_part(rnd, upd, gen)
        if self.stateful:
            kept = {r: v for r, v in saved.items() if r < rnd}
            kept[rnd] = self.uplink.state_dict()
            order = sorted(kept)
            buf = io.BytesIO()
            torch.save({"states": {r: kept[r] for r in order[-KEEP_ROUNDS:]},
                        "dropped": dropped or len(order) > KEEP_ROUNDS}, buf)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, buf.getvalue())
        return out


def state_dir(node: NodeSpec) -> Path:
    default = os.environ.get("FEDLLM_SITE_STATE") or Path.home() / ".cache" / "fedllm" / "site-state"
    return Path(node.state_dir or default)


class _SiteCache:
    """One experiment per process (model and data loaded once), rebuilt only for another recipe."""

    def __init__(self) -> None:
        self.key: tuple[str, str | None] | None = None
        self.exp: Experiment | None = None
        self.uplinks: dict[int, SiteUplink | None] = {}

    def get(self, cfg: FlowerRunConfig, node: NodeSpec) -> Experiment:
        key = (cfg.recipe_yaml, node.data_path)
        if self.key != key:
            self.exp, self.uplinks = None, {}  # drop the old model before loading the next one
            self.exp, self.key = make_experiment(site_recipe(cfg.recipe_yaml, node)), key
        return self.exp

    def uplink(self, cfg: FlowerRunConfig, node: NodeSpec) -> SiteUplink | None:
        """Client ``partition_id``'s uplink for this run (built once; ``None`` when it has no steps)."""
        exp, k = self.get(cfg, node), node.partition_id
        if k not in self.uplinks:
            recipe = uplink_recipe(cfg.recipe_yaml, node)
            run_key = hashlib.sha256(cfg.recipe_yaml.encode("utf-8")).hexdigest()[:16]
            self.uplinks[k] = (SiteUplink(recipe, exp, k, state_dir(node), run_key)
                               if needs_site_uplink(recipe) else None)
        return self.uplinks[k]


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
    return site_train(exp, node.partition_id, examples, content, _SITE.uplink(cfg, node))


def site_train(exp: Experiment, client_id: int, examples: Any, content: RecordDict,
               uplink: SiteUplink | None = None) -> RecordDict:
    """One train message on a site: decode the request (its drift term included), run ``exp.fit``,
    then the site's own uplink steps (DP noise, the codec) when the recipe has them."""
    req = TrainRequest.from_records(content)
    if req.client_id != client_id:
        raise ValueError(f"instruction for client {req.client_id} reached the node of client {client_id}")
    upd = exp.fit(req.client_id, examples, req.start, req.round, req.steps, grad_term=req.drift)
    if uplink is None:
        return update_to_records(upd)
    return update_to_records(*uplink.apply(req.round, upd))
