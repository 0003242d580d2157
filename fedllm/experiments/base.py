"""The Experiment protocol: what one client's training and one evaluation are, for any task.

An experiment is built once per process (one base model, the partitioned data) and shared by the
federated, centralized and local modes, the server and both engines. The engine reads exactly
the members below — nothing optional, nothing probed with ``getattr`` — so a new task (or a
stand-in for one in a test) implements all of them:

- ``recipe``: the validated :class:`~fedllm.config.Recipe` it was built from;
- ``data``: the partition (:class:`ExperimentData`);
- ``initial_state``: the trainable state every client and mode starts from;
- ``step_callbacks``: Lightning callbacks added to every fit (e.g. the CLI's progress bar); those
  that are also a :class:`~fedllm.client.evaluate.Meter` hear of ``evaluate``'s batches and prompts;
- ``fit(client_id, examples, start, rnd, steps, grad_term=None)``: train from ``start`` for
  ``steps`` optimizer steps and return the :class:`~fedllm.types.ClientUpdate` (Δ = local − start);
  ``grad_term``, a typed :data:`~fedllm.algorithms.drift.DriftTerm`, is added to the gradients
  after every backward pass (FedProx's μ(θ − θ_g), SCAFFOLD's c − cᵢ);
- ``fit_many(jobs, rnd, on_client)``: the clients of one round (:class:`FitJob` each), one result per
  job in order, a :class:`~fedllm.types.ClientUpdate` or the exception that client raised (one
  client's failure never takes the others down); ``on_client(k)`` is called as client k starts.
  :func:`fit_each` is the sequential implementation; the LM experiment also trains them in one
  fused pass (``federation.fused_clients``, :mod:`fedllm.client.fused`);
- ``evaluate(state)``: the held-out metrics of a trainable state;
- ``save_adapter(state, path)``: the final state in the task's own format;
- ``payload_bytes(state)``: bytes of one state or delta on the wire (what communication counts);
- ``mask`` / ``mask_bytes``: a pruning mask clients train and exchange under (``None`` / 0 when
  the model is dense) and the size of its one-time download;
- ``evaluate_clients(state, clients)``: the eval loss of ``state`` on each client's own held-out
  slice (``eval.client_holdout``; ``{}`` without one);
- ``loss_on(state, examples)``: the mean loss of ``state`` on ``examples`` (a client's own training
  data), no gradient and no dropout: how an IFCA client picks its cluster
  (:mod:`fedllm.algorithms.clustered`);
- ``uplink_on_site``: whether the clients apply their own uplink steps (client DP noise, the
  codec) before the update reaches the server, as the Flower engine's sites do; ``False`` when
  the server's :class:`~fedllm.federation.uplink.Uplink` plays every client's part in-process;
- ``runtime_info()``: what the run files record about the numeric path
  (:func:`fedllm.models.quant.kernel_info`: versions, CPU flags, the 4-bit kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fedllm.algorithms.drift import DriftTerm
from fedllm.client.evaluate import EvalResult
from fedllm.config import Recipe
from fedllm.errors import IntegrityError
from fedllm.types import ClientUpdate, StateDict


def round_seed(seed: int, rnd: int) -> int:
    """Per-round training seed shared by the clients of that round.

    Clients holding identical data in the same round therefore produce identical updates, which is
    what makes "K identical clients == one client" hold exactly under GradualDiff.
    """
    return (seed * 1_000_003 + rnd * 7_919) % (2**31 - 1)


class ClientFault(RuntimeError):
    """An injected client failure (recipe ``faults.error_clients``)."""


@dataclass(frozen=True)
class FitJob:
    """One client's part of a round: who, on which examples, from which state, for how many steps."""

    client_id: int
    examples: Any
    start: StateDict
    steps: int
    grad_term: DriftTerm | None = None


def fit_each(exp: Experiment, jobs: list[FitJob], rnd: int,
             on_client: Callable[[int], None] | None = None) -> list[ClientUpdate | Exception]:
    """``exp.fit`` for each job in turn (the sequential ``fit_many``); a client's exception is its result."""
    out: list[ClientUpdate | Exception] = []
    for job in jobs:
        if on_client is not None:
            on_client(job.client_id)
        try:
            out.append(exp.fit(job.client_id, job.examples, job.start, rnd, job.steps, grad_term=job.grad_term))
        except IntegrityError:  # not one client's failure: nothing the run computes can be trusted
            raise
        except Exception as exc:  # noqa: BLE001 - this client's result; the engine leaves it out
            out.append(exc)
    return out


@runtime_checkable
class ExperimentData(Protocol):
    """The partition the three modes share: client splits, the pooled training set, its stats."""

    @property
    def train_examples(self) -> Any:
        """All clients' training examples pooled (centralized mode)."""
        ...

    @property
    def stats(self) -> dict:
        """Sizes for ``summary.json`` (examples, clients, eval split)."""
        ...

    def client_examples(self, k: int) -> Any:
        """Client ``k``'s training examples (``len()`` is its example count)."""
        ...

    def partition_json(self) -> dict:
        """The partition as written to ``partition.json`` (client -> example ids, the eval ids)."""
        ...


@runtime_checkable
class Experiment(Protocol):
    """One task's client training and evaluation (see the module docstring for each member)."""

    recipe: Recipe
    data: ExperimentData
    initial_state: StateDict
    step_callbacks: list
    mask: Mapping[str, torch.Tensor] | None
    mask_bytes: int
    uplink_on_site: bool  # the clients noise and encode their own updates (the Flower engine's sites)

    def fit(self, client_id: int, examples: Any, start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate: ...

    def fit_many(self, jobs: list[FitJob], rnd: int,
                 on_client: Callable[[int], None] | None = None) -> list[ClientUpdate | Exception]: ...

    def evaluate(self, state: StateDict) -> EvalResult: ...

    def evaluate_clients(self, state: StateDict, clients: list[int] | None = None) -> dict[int, float]: ...

    def loss_on(self, state: StateDict, examples: Any) -> float: ...

    def save_adapter(self, state: StateDict, path: Path) -> None: ...

    def payload_bytes(self, state: Mapping[str, torch.Tensor]) -> int: ...

    def runtime_info(self) -> dict: ...
