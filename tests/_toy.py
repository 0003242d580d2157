"""A tiny in-test Experiment: linear least squares trained by plain SGD, no LLM, no Lightning.

It implements :class:`fedllm.experiments.base.Experiment` (the members
:func:`fedllm.federation.modes.run_federated` and the server read), so
engine-level tests can drive real rounds in milliseconds and compare the result against the pure
algorithm functions.

Model and data (all deterministic from the recipe seed):

- a linear map ``y = W x + b`` (keys ``lin.weight``, ``lin.bias``), or with ``lora=True`` a LoRA
  layer ``y = (W0 + B A) x`` whose trainable state is ``lin.lora_A.weight`` (r×in, random shared
  init) and ``lin.lora_B.weight`` (out×r, zero init), exactly peft's key layout and init;
- client k holds ``sizes[k]`` examples with targets from its own map ``(k + 1)·W*`` (non-IID, and
  client k's loss at a common model grows with k);
- ``fit`` runs ``steps`` full-batch SGD steps with the recipe's ``train.lr``; ``grad_term`` (FedProx,
  SCAFFOLD) is added to the gradient after backward, as the protocol says; with
  ``recipe.federation.lora_aggregation == "frozen_a"`` the A factor gets no update.

Every call is recorded (``fits``, ``evaluated``, ``saved``) so tests can rebuild what the server
received and check what it did with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedllm.algorithms.drift import DriftTerm
from fedllm.client.evaluate import EvalResult
from fedllm.config import Recipe, build
from fedllm.experiments.base import fit_each
from fedllm.models.quant import kernel_info
from fedllm.types import ClientUpdate, StateDict, clone_state, serialized_bytes

BASE = {
    "name": "toy", "seed": 0,
    "model": {"preset": "tiny"},
    "data": {"builtin": "coralmap"},
    "partition": {"method": "iid", "num_clients": 4},
    "federation": {"algorithm": "fedavg", "rounds": 2, "fraction": 1.0},
    "train": {"local_steps": 3, "batch_size": 4, "lr": 0.05},
    "output": {"save_adapter": True},
    "checkpoint": {"enabled": False},
}


def toy_recipe(**groups: dict[str, Any]) -> Recipe:
    """The base toy recipe with groups merged in: ``toy_recipe(federation={"algorithm": "fedprox"})``."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for name, group in groups.items():
        if isinstance(group, dict):
            values[name] = {**values.get(name, {}), **group}
        else:
            values[name] = group
    return build(Recipe, values)


@dataclass
class ToyData:
    """The partition: client k holds examples ``offsets[k] .. offsets[k] + sizes[k]``."""

    sizes: list[int]
    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor  # client id per example
    stats: dict[str, Any] = field(default_factory=dict)

    def client_examples(self, k: int) -> list[int]:
        return [i for i, o in enumerate(self.owner.tolist()) if o == k]

    @property
    def train_examples(self) -> list[int]:
        return list(range(len(self.owner)))

    def partition_json(self) -> dict[str, Any]:
        return {"clients": [self.client_examples(k) for k in range(len(self.sizes))]}


@dataclass(frozen=True)
class Fit:
    """One recorded ``fit`` call: who, from which round, what it returned."""

    round: int
    update: ClientUpdate
    start: StateDict
    used_grad_term: bool


class ToyExperiment:
    """The Experiment protocol over a linear model (see the module docstring)."""

    mask = None  # dense
    mask_bytes = 0
    uplink_on_site = False

    def __init__(self, recipe: Recipe, sizes: list[int] | None = None, dim: int = 6, out: int = 3,
                 lora: bool = False, rank: int = 2) -> None:
        self.recipe = recipe
        n = recipe.partition.num_clients
        sizes = list(sizes) if sizes is not None else [8 + 4 * k for k in range(n)]
        if len(sizes) != n:
            raise ValueError(f"{len(sizes)} sizes for {n} clients")
        gen = torch.Generator().manual_seed(recipe.seed)
        w_star = torch.randn(out, dim, generator=gen, dtype=torch.float64)
        owner = torch.tensor([k for k, s in enumerate(sizes) for _ in range(s)], dtype=torch.long)
        x = torch.randn(len(owner), dim, generator=gen, dtype=torch.float64)
        y = torch.stack([(owner[i].item() + 1) * (w_star @ x[i]) for i in range(len(owner))]) if len(owner) else x
        self.data = ToyData(sizes, x, y, owner, {"examples": int(sum(sizes))})
        self.lora = lora
        if lora:
            self.w0 = 0.1 * torch.randn(out, dim, generator=gen, dtype=torch.float64)
            a = torch.randn(rank, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
            self.initial_state: StateDict = {"lin.lora_A.weight": a,
                                             "lin.lora_B.weight": torch.zeros(out, rank, dtype=torch.float64)}
        else:
            self.initial_state = {"lin.weight": torch.zeros(out, dim, dtype=torch.float64),
                                  "lin.bias": torch.zeros(out, dtype=torch.float64)}
        self.eval_x = torch.randn(32, dim, generator=gen, dtype=torch.float64)
        self.eval_y = self.eval_x @ w_star.T * (n + 1) / 2
        self.step_callbacks: list = []
        self.fits: list[Fit] = []
        self.evaluated: list[StateDict] = []
        self.saved: StateDict | None = None
        self.grad_terms: dict[tuple[int, int], StateDict] = {}  # (round, client) -> term at the first step

    # ------------------------------------------------------------------ the model

    def _predict(self, state: StateDict, x: torch.Tensor) -> torch.Tensor:
        if self.lora:
            return x @ (self.w0 + state["lin.lora_B.weight"] @ state["lin.lora_A.weight"]).T
        return x @ state["lin.weight"].T + state["lin.bias"]

    def _loss(self, state: StateDict, idx: list[int]) -> torch.Tensor:
        return ((self._predict(state, self.data.x[idx]) - self.data.y[idx]) ** 2).mean()

    # ------------------------------------------------------------------ the protocol

    def fit_many(self, jobs: list, rnd: int, on_client=None) -> list:
        """The clients of a round one after another (the sequential implementation)."""
        return fit_each(self, jobs, rnd, on_client)

    def fit(self, client_id: int, examples: list[int], start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate:
        """``steps`` full-batch SGD steps from ``start``; ``grad_term(params)`` added to the gradient."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        frozen = {k for k in params if self.recipe.federation.lora_aggregation == "frozen_a" and ".lora_A" in k}
        losses = []
        for _ in range(steps):
            loss = self._loss(params, list(examples))
            grads = torch.autograd.grad(loss, list(params.values()))
            extra = grad_term({k: p.detach() for k, p in params.items()}) if grad_term is not None else {}
            if extra and not losses:
                self.grad_terms[(rnd, client_id)] = clone_state(extra)
            with torch.no_grad():
                for (k, p), g in zip(params.items(), grads):
                    if k in frozen:
                        continue
                    p -= self.recipe.train.lr * (g + extra.get(k, 0.0))
            losses.append(float(loss.detach()))
        delta = {k: (p.detach() - start[k]) for k, p in params.items()}
        update = ClientUpdate(client_id=client_id, delta=delta, num_examples=len(examples), local_steps=steps,
                              train_loss=sum(losses) / len(losses), bytes_up=serialized_bytes(delta))
        self.fits.append(Fit(rnd, update, clone_state(start), grad_term is not None))
        return update

    def evaluate_clients(self, state, clients=None):
        return {}

    def loss_on(self, state: StateDict, examples: list[int]) -> float:
        return float(self._loss(state, list(examples)))

    def evaluate(self, state: StateDict) -> EvalResult:
        self.evaluated.append(clone_state(state))
        loss = float(((self._predict(state, self.eval_x) - self.eval_y) ** 2).mean())
        return EvalResult(eval_loss=loss, perplexity=math.exp(min(loss, 700.0)), bleu=None, samples=[])

    def payload_bytes(self, state: StateDict) -> int:
        return serialized_bytes(state)

    def save_adapter(self, state: StateDict, path: Path) -> None:
        self.saved = clone_state(state)
        Path(path).mkdir(parents=True, exist_ok=True)

    def runtime_info(self) -> dict:
        return kernel_info()  # versions and flags; no 4-bit model

    # ------------------------------------------------------------------ helpers for tests

    def updates(self, rnd: int) -> list[ClientUpdate]:
        """The updates the clients returned in round ``rnd`` (in training order)."""
        return [f.update for f in self.fits if f.round == rnd]
