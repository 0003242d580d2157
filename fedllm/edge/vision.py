"""Asynchronous edge learning by cloned knowledge distillation (the paper's Algorithm 1), and a study.

"Asynchronous Edge Learning using Cloned Knowledge Distillation" (ICLR 2021 submission,
OpenReview MqWHrrIfBMN). One core model, edges that each show up once, in a stream:

  Phase 0  train the core on the small labeled core dataset D_c (cross-entropy).
  per edge e, when it arrives:
    downlink  send a clone of the current core θ_c (CPP). Baselines: a freshly initialized model
              from another seed (IsPP, "independent"), or one such model first trained on D_c
              (IPP, "independent_pretrained").
    Phase 1   the edge trains its copy on its own data D_e (cross-entropy, SGD) for ``edges.steps``
              or until the mean of its last 20 losses ≤ ``edges.loss_threshold``; with an ensemble,
              n copies, each with its own batch order.
    uplink    the trained model(s) go back; the core never waits for them (see EdgeSchedule).
  on each return:
    Phase 2   push the returned model(s) into the temporal memory (the last M edges) and train
              the core on D_c with L = CE + α·t²·mean_k KL(teacher_k/t ‖ core/t)
              (:func:`fedllm.algorithms.distill.kd_loss`) for ``distill.steps``.

Every function takes the edge recipe (:class:`fedllm.edge.recipe.EdgeRecipe`) itself and
runs with its first seed. Data (Fashion-MNIST here; the paper used CIFAR-100 and ResNet-32): a seeded
shuffle of the training set (optionally cut to ``vision.max_train_examples``) gives the first
``core.fraction`` to the core and splits the rest into ``edges.count`` equal iid parts (or
Dirichlet(α) label skew when ``edges.alpha`` > 0). Accuracy is on the test set. :func:`run_sync_fedavg` runs synchronous FedAvg on
the same splits from the same Phase-0 core. The paper's comparisons (variants, seeds, baselines) are
the study's: :func:`fedllm.studies.edge.run_edge_study`, reported by :mod:`fedllm.metrics.edge_report`.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedllm.algorithms.aggregate import ApplyDelta, mean_delta
from fedllm.algorithms.distill import TeacherMemory, consensus_iou, kd_loss, shuffle_labels
from fedllm.data.partition import dirichlet
from fedllm.data.vision import VisionData
from fedllm.edge.recipe import EdgeRecipe
from fedllm.models.vision import build_vision_model
from fedllm.types import ClientUpdate, StateDict, clone_state, subtract

_CORE, _EDGE, _DISTILL, _INDEP, _NOISE, _FEDAVG = range(6)  # tags that keep each RNG stream apart


@dataclass(frozen=True)
class EdgeSchedule:
    """Arrival order, lag and label noise of each edge, as a list of protocol events.

    Edge ``arrival[s]`` is sent a clone at step s. An edge with lag j returns at step s + j, after
    the on-time edges that arrived in between have been processed (the core never waits for it);
    lag 0 returns at once. Edges in ``never`` are sent a clone but never come back.
    """

    arrival: tuple[int, ...]
    lag: dict[int, int] = field(default_factory=dict)
    never: frozenset[int] = frozenset()
    noise: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = set(self.arrival)
        if len(known) != len(self.arrival):
            raise ValueError(f"arrival {self.arrival} lists an edge twice; expected each edge once")
        for what, ids in (("lags", self.lag), ("never_return", self.never), ("noisy_edges", self.noise)):
            if not set(ids) <= known:
                raise ValueError(f"{what} names edges {sorted(set(ids) - known)} not in arrival {self.arrival}")
        if any(j < 0 for j in self.lag.values()) or any(not 0 <= p <= 1 for p in self.noise.values()):
            raise ValueError(f"expected lags >= 0 and noise p in [0, 1], got {self.lag} and {self.noise}")

    @classmethod
    def from_recipe(cls, recipe: EdgeRecipe) -> EdgeSchedule:
        """The recipe's stream (``edges``: arrival, lags, never_return, noisy) for either workload."""
        e = recipe.edges
        return cls(tuple(e.arrival) or tuple(range(e.count)), {x.edge: x.by for x in e.lags},
                   frozenset(e.never_return), {x.edge: x.p for x in e.noisy})

    def events(self) -> list[tuple[int, str, int]]:
        """(step, "send" | "return", edge) in processing order."""
        due: dict[int, list[int]] = {}
        for s, e in enumerate(self.arrival):
            if e not in self.never:
                due.setdefault(s + self.lag.get(e, 0), []).append(e)
        out: list[tuple[int, str, int]] = []
        for step in range(max([len(self.arrival) - 1, *due]) + 1):
            if step < len(self.arrival):
                out.append((step, "send", self.arrival[step]))
            out += [(step, "return", e) for e in sorted(due.get(step, []), key=lambda e: self.lag.get(e, 0))]
        return out


@dataclass(frozen=True)
class EdgeSplits:
    """Index tensors: the core dataset and each edge's data (train set), and the test examples."""

    core: Tensor
    edges: tuple[Tensor, ...]
    test: Tensor


def make_splits(recipe: EdgeRecipe, data: VisionData) -> EdgeSplits:
    rng, v = np.random.default_rng([recipe.seed, _CORE]), recipe.vision
    n, count, alpha = len(data.train_y), recipe.edges.count, recipe.edges.alpha
    pool = rng.permutation(n)[: v.max_train_examples or n]
    n_core = round(recipe.core.fraction * len(pool))
    core, rest = pool[:n_core], pool[n_core:]
    if alpha > 0:
        parts = [rest[p] for p in dirichlet(data.train_y[rest].tolist(), count, alpha, rng)]
    else:
        parts = np.array_split(rest, count)
    if n_core < 1 or min(len(p) for p in parts) < 1:
        raise ValueError(f"split left the core {n_core} and edges {[len(p) for p in parts]} examples; "
                         "expected >= 1 each (raise vision.max_train_examples or core.fraction)")
    n_test = len(data.test_y)
    test = np.random.default_rng([recipe.seed, _CORE, 1]).permutation(n_test)[: v.max_test_examples or n_test]
    as_t = lambda a: torch.as_tensor(np.sort(a), dtype=torch.long)  # noqa: E731
    return EdgeSplits(as_t(core), tuple(as_t(p) for p in parts), as_t(test))


def _seed(recipe: EdgeRecipe, *tags: int) -> int:
    return int(np.random.SeedSequence([recipe.seed, *tags]).generate_state(1)[0])


def _noise(recipe: EdgeRecipe, edge: int) -> float:
    """The probability that edge ``edge``'s labels are shuffled (``edges.noisy``; 0: clean)."""
    return next((x.p for x in recipe.edges.noisy if x.edge == edge), 0.0)


def new_model(recipe: EdgeRecipe, state: StateDict | None = None, init_seed: int = 0) -> nn.Module:
    """A model from ``state``, or freshly initialized from ``init_seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_vision_model(recipe.vision.model)
    if state is not None:
        model.load_state_dict(state)
    return model


def fit(model: nn.Module, x: Tensor, y: Tensor, recipe: EdgeRecipe, steps: int, seed: int,
        teacher_logits: Tensor | None = None, loss_threshold: float = 0.0) -> float:
    """SGD on (x, y): cross-entropy, or the KD loss with ``teacher_logits`` [K, N, C] over the same x.

    The learning rate decays from ``train.lr`` to 0 along a cosine over ``steps`` (so each phase ends
    on a settled model). Batches are drawn without replacement, reshuffled every epoch from ``seed``.
    Returns the mean of the last 20 losses (stops early once it is ≤ ``loss_threshold`` > 0).
    """
    t, d = recipe.train, recipe.distill
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen, order, recent = torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long), deque(maxlen=20)
    model.train()
    for _ in range(steps):
        if order.numel() < min(t.batch_size, len(y)):
            order = torch.cat([order, torch.randperm(len(y), generator=gen)])
        b, order = order[: t.batch_size], order[t.batch_size:]
        out = model(x[b])
        loss = (F.cross_entropy(out, y[b]) if teacher_logits is None
                else kd_loss(out, list(teacher_logits[:, b]), y[b], d.temperature, d.alpha))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent.append(loss.item())
        if loss_threshold > 0 and len(recent) == recent.maxlen and statistics.fmean(recent) <= loss_threshold:
            break
    return statistics.fmean(recent)


@torch.no_grad()
def logits_of(recipe: EdgeRecipe, state: StateDict, x: Tensor, chunk: int = 4096) -> Tensor:
    model = new_model(recipe, state).eval()
    return torch.cat([model(x[i: i + chunk]) for i in range(0, len(x), chunk)])


def accuracy(recipe: EdgeRecipe, state: StateDict, x: Tensor, y: Tensor) -> float:
    return float((logits_of(recipe, state, x).argmax(1) == y).float().mean())


def train_core(recipe: EdgeRecipe, data: VisionData, splits: EdgeSplits, init: int = 0) -> StateDict:
    """Phase 0: a model (init stream ``init``; 0 = the core) trained on the core dataset."""
    model = new_model(recipe, init_seed=_seed(recipe, _CORE, init))
    x, y = data.train_x[splits.core], data.train_y[splits.core]
    fit(model, x, y, recipe, recipe.core.steps, _seed(recipe, _CORE, init, 1))
    return clone_state(model.state_dict())


def edge_data(recipe: EdgeRecipe, data: VisionData, splits: EdgeSplits, edge: int) -> tuple[Tensor, Tensor]:
    """Edge ``edge``'s images and labels, its labels shuffled when the recipe calls it noisy."""
    idx = splits.edges[edge]
    y, p = data.train_y[idx], _noise(recipe, edge)
    if p > 0:
        y = shuffle_labels(y, p, torch.Generator().manual_seed(_seed(recipe, _NOISE, edge)))
    return data.train_x[idx], y


def train_edge(recipe: EdgeRecipe, data: VisionData, splits: EdgeSplits, edge: int,
               core_state: StateDict) -> tuple[list[StateDict], float]:
    """Downlink + Phase 1: the ``distill.ensemble`` trained edge models and their mean final loss."""
    init, e = recipe.distill.teacher_init, recipe.edges
    if init == "clone":
        start = core_state
    elif init == "independent":
        start = clone_state(new_model(recipe, init_seed=_seed(recipe, _INDEP, edge)).state_dict())
    else:
        start = train_core(recipe, data, splits, init=1 + edge)
    x, y = edge_data(recipe, data, splits, edge)
    states, losses = [], []
    for i in range(recipe.distill.ensemble):
        model = new_model(recipe, start)
        losses.append(fit(model, x, y, recipe, e.steps, _seed(recipe, _EDGE, edge, i),
                          loss_threshold=e.loss_threshold))
        states.append(clone_state(model.state_dict()))
    return states, statistics.fmean(losses)


def run_edge_learning(recipe: EdgeRecipe, data: VisionData, core_state: StateDict | None = None) -> list[dict]:
    """Algorithm 1 over the schedule; one row per returned edge (the core's test accuracy after it).

    ``core_state`` skips Phase 0 (pass :func:`train_core`'s result to share it between runs).
    ``teacher_acc`` and ``consensus_iou`` use the edge's ensemble (mean softmax) on the test set.
    """
    t0, splits, schedule = time.perf_counter(), make_splits(recipe, data), EdgeSchedule.from_recipe(recipe)
    x_test, y_test = data.test_x[splits.test], data.test_y[splits.test]
    x_core, y_core = data.train_x[splits.core], data.train_y[splits.core]
    core = new_model(recipe, core_state if core_state is not None else train_core(recipe, data, splits))
    memory, pending, rows = TeacherMemory(recipe.distill.memory * recipe.distill.ensemble), {}, []
    acc = accuracy(recipe, core.state_dict(), x_test, y_test)
    for step, kind, edge in schedule.events():
        if kind == "send":
            pending[edge] = (step, *train_edge(recipe, data, splits, edge, clone_state(core.state_dict())))
            continue
        sent, states, edge_loss = pending.pop(edge)
        for state in states:
            memory.push(state)
        z = torch.stack([logits_of(recipe, s, x_core) for s in memory.teachers()])
        fit(core, x_core, y_core, recipe, recipe.distill.steps, _seed(recipe, _DISTILL, len(rows)), teacher_logits=z)
        core_pred = logits_of(recipe, core.state_dict(), x_test).argmax(1)
        teacher_pred = torch.stack([logits_of(recipe, s, x_test).softmax(1) for s in states]).mean(0).argmax(1)
        before, acc = acc, float((core_pred == y_test).float().mean())
        rows.append({"position": len(rows) + 1, "edge": edge, "sent_at": sent, "returned_at": step,
                     "lag": step - sent, "noise_p": _noise(recipe, edge), "acc_before": before,
                     "acc": acc, "teacher_acc": float((teacher_pred == y_test).float().mean()),
                     "consensus_iou": consensus_iou(teacher_pred, core_pred, y_test),
                     "edge_loss": edge_loss, "teachers": len(memory), "time_s": time.perf_counter() - t0})
    return rows


def run_sync_fedavg(recipe: EdgeRecipe, data: VisionData, rounds: int,
                    core_state: StateDict | None = None) -> list[dict]:
    """Synchronous FedAvg baseline: every round all edges train ``edges.steps`` from the global model,
    which moves by their example-weighted mean delta. Same splits and Phase-0 start as the edges."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    t0, splits, steps = time.perf_counter(), make_splits(recipe, data), recipe.edges.steps
    state = clone_state(core_state) if core_state is not None else train_core(recipe, data, splits)
    rows = []
    for rnd in range(1, rounds + 1):
        updates = []
        for edge in range(recipe.edges.count):
            x, y = edge_data(recipe, data, splits, edge)
            model = new_model(recipe, state)
            loss = fit(model, x, y, recipe, steps, _seed(recipe, _FEDAVG, rnd, edge))
            updates.append(ClientUpdate(edge, subtract(model.state_dict(), state), len(y), steps, loss))
        state = ApplyDelta().step(state, mean_delta(updates, weighted=True))
        rows.append({"round": rnd, "edge_visits": rnd * recipe.edges.count, "time_s": time.perf_counter() - t0,
                     "acc": accuracy(recipe, state, data.test_x[splits.test], data.test_y[splits.test])})
    return rows
