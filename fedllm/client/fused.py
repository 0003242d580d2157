"""The K clients of a round trained in one fused pass over the shared base (``federation.fused_clients``).

Beside the sequential fit (one Lightning ``fit`` per client, :mod:`fedllm.client.fit`), this loop
steps every client of a round together: each fused step concatenates the clients' batches (right
padded to the longest), runs the frozen base once forward and once backward, routes each client's
rows through its own LoRA factors (:mod:`fedllm.models.multi_lora`), and minimizes
L = Σ_k L_k, where L_k is client k's mean next-token loss over its own labelled tokens. Client k's
factors touch only its rows, so ∂L/∂θ_k = ∂L_k/∂θ_k: exactly the gradient it gets alone.

Everything else is per client, as in :class:`~fedllm.client.lm.CausalLMModule` under Lightning's
automatic optimization: its own optimizer (``train.optimizer``) and learning-rate factor (warm-up
over its own steps × ``train.schedule``), ``train.grad_accum`` (each batch's loss divided by it),
the drift term added after every backward pass (FedProx, SCAFFOLD), gradient clipping to
``train.max_grad_norm`` over its own parameters only, its own batch order (its seeded loader) and
its own dropout RNG stream. A client that has run its steps (a straggler runs fewer) leaves the
batch; one whose loss turns non-finite leaves it at the end of that step (as
:class:`~fedllm.client.lm.StopOnNonFinite` stops a fit). A plain loop rather than a Lightning
``Trainer``: one trainer driving K optimizers that each stop at their own step count is manual
optimization with none of the trainer's loop left to reuse.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader

from fedllm.client.fit import add_grad_term
from fedllm.client.lm import round_schedule, warmup_factor
from fedllm.config import TrainConfig
from fedllm.models.multi_lora import (
    RoutedBatch,
    Segment,
    lora_layers,
    rng_restore,
    rng_snapshot,
    routed_adapters,
)
from fedllm.models.quant import check_exact_kernels
from fedllm.models.state import TrainableState
from fedllm.types import StateDict

IGNORE = -100


@dataclass
class FusedJob:
    """One client of a fused round: its loader, start state, optimizer steps and drift term."""

    client_id: int
    loader: DataLoader
    start: StateDict
    steps: int
    grad_term: object = None  # a DriftTerm: f(named params) -> {name: tensor}


@dataclass(frozen=True)
class FusedResult:
    """What one client's part of a fused fit did (as :class:`~fedllm.client.fit.FitStats` plus Δ)."""

    losses: list[float]
    grad_steps: int
    delta: StateDict
    tripped: bool


def make_optimizer(params: list[torch.Tensor], t: TrainConfig, steps: int, rnd: int, rounds: int):
    """(optimizer, scheduler) exactly as :meth:`CausalLMModule.configure_optimizers` builds them."""
    if t.optimizer_for("lm") == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warm = math.ceil(t.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_factor(s, warm) * round_schedule(t.schedule, rnd, rounds, s, steps))
    return opt, sched


def _epochs(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches epoch after epoch (a fresh iterator each epoch, as Lightning cycles it)."""
    while True:
        yield from loader


class _Client:
    """One client's training state inside a fused fit."""

    def __init__(self, job: FusedJob, state: TrainableState, names: dict[str, str], t: TrainConfig,
                 rnd: int, rounds: int, rng: dict[str, torch.Tensor]) -> None:
        self.job, self.losses, self.grad_steps, self.done, self.tripped = job, [], 0, 0, False
        self.params = {k: job.start[k].detach().to(p.device, p.dtype, copy=True).requires_grad_(p.requires_grad)
                       for k, p in state.params.items()}
        self.trainable = [p for p in self.params.values() if p.requires_grad]
        self.opt, self.sched = make_optimizer(self.trainable, t, job.steps, rnd, rounds)
        self.factors = {layer: (self.params[f"{layer}.lora_A.weight"], self.params[f"{layer}.lora_B.weight"])
                        for layer in names}
        self.rng = {k: v.clone() for k, v in rng.items()}
        self.batches = _epochs(job.loader)

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The client's next batch, drawn under its own RNG stream: a loader without a generator of
        its own (``train.length_bucketing``) seeds each epoch's iterator from the global RNG, between
        the dropout masks of the last batch and the next, as it does in a fit alone."""
        outer = rng_snapshot(device)
        rng_restore(self.rng, device)
        try:
            return next(self.batches)
        finally:
            self.rng = rng_snapshot(device)
            rng_restore(outer, device)

    @property
    def active(self) -> bool:
        return self.done < self.job.steps and not self.tripped

    @torch.no_grad()
    def after_backward(self) -> None:
        """GradWitness's count (before the drift term), then the drift term on this client's gradients."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads and bool(torch.stack([g.ne(0).any() for g in grads]).any()):
            self.grad_steps += 1
        add_grad_term(self.params, self.job.grad_term)

    def step(self, max_grad_norm: float, window: list[float]) -> None:
        if max_grad_norm:
            clip_grad_norm_(self.trainable, max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.done += 1
        self.tripped = not all(math.isfinite(x) for x in window)

    def result(self) -> FusedResult:
        start = self.job.start
        delta = {k: p.detach().to("cpu", copy=True) - start[k] for k, p in self.params.items()}
        return FusedResult(list(self.losses), self.grad_steps, delta, self.tripped)


def _concat(batches: list[dict[str, torch.Tensor]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The batches stacked along rows, right-padded to the widest (pad id, mask 0, label ignored)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out = {}
    for key, value in fill.items():
        parts = [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches]
        out[key] = torch.cat(parts, dim=0).to(device)
    return out


def segment_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], segments: list[Segment],
                   labeled_only: bool = False) -> list[torch.Tensor]:
    """Each segment's mean next-token cross-entropy over its labelled tokens (HF's causal-LM loss).

    The decoder runs once over the fused batch; the LM head runs per segment on its own width, at
    every position (as ``model(**batch).loss``) or, with ``labeled_only`` (``train.head_positions``),
    only where the shifted label is not -100 (:func:`fedllm.client.lm.causal_lm_loss`).
    """
    causal = model.get_base_model()
    hidden = causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    head, losses = causal.get_output_embeddings(), []
    for seg in segments:
        h = hidden[seg.rows, : seg.width - 1]
        target = batch["labels"][seg.rows, 1: seg.width]
        if labeled_only:
            keep = target != IGNORE
            h, target = h[keep], target[keep]
        logits = head(h).float()
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                        ignore_index=IGNORE))
    return losses


def fit_fused(model: torch.nn.Module, state: TrainableState, jobs: list[FusedJob], t: TrainConfig,
              rnd: int, rounds: int, seed: int, pad_id: int, labeled_only: bool = False) -> list[FusedResult]:
    """Train every job's client together (see the module docstring); one result per job, in order.

    ``seed`` seeds every client's dropout stream (the round seed a client fit alone starts from);
    the global RNG is left where the last job's stream ends, as fitting the jobs one after another
    leaves it. The shared model's own LoRA factors are neither used nor changed.
    """
    check_exact_kernels(model)
    names = lora_layers(model)
    device = state.parameters()[0].device
    torch.manual_seed(seed)
    seeded = rng_snapshot(device)
    clients = [_Client(job, state, names, t, rnd, rounds, seeded) for job in jobs]
    was_training = model.training
    model.train()
    try:
        with routed_adapters(model) as routed:
            while active := [c for c in clients if c.active]:
                windows = [[] for _ in active]
                for _ in range(t.grad_accum):
                    _fused_backward(model, routed, active, windows, _Step(t.grad_accum, pad_id, labeled_only, device))
                for c, window in zip(active, windows):
                    c.step(t.max_grad_norm, window)
    finally:
        model.train(was_training)
        rng_restore(clients[-1].rng, device)
    return [c.result() for c in clients]


@dataclass(frozen=True)
class _Step:
    """How a fused backward runs: batches per optimizer step, pad id, head positions, device."""

    accumulate: int
    pad_id: int
    labeled_only: bool
    device: torch.device


def _fused_backward(model, routed: RoutedBatch, active: list[_Client], windows: list[list[float]],
                    how: _Step) -> None:
    """One forward and backward over the active clients' next batches; each client's loss recorded."""
    batches = [c.next_batch(how.device) for c in active]
    routed.segments, row = [], 0
    for c, b in zip(active, batches):
        n, width = b["input_ids"].shape
        routed.segments.append(Segment(slice(row, row + n), width, c.factors, c.rng))
        row += n
    batch = _concat(batches, how.pad_id, how.device)
    losses = segment_losses(model, batch, routed.segments, how.labeled_only)
    total = sum(loss / how.accumulate for loss in losses) if how.accumulate > 1 else sum(losses)
    total.backward()
    for c, seg, loss, window in zip(active, routed.segments, losses, windows):
        c.rng = seg.rng  # the stream advanced by this forward's masks
        value = float(loss.detach())
        c.losses.append(value)
        window.append(value)
        c.after_backward()
