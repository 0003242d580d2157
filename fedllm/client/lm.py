"""The client: a LightningModule for causal-LM LoRA training, and a callback that makes one
Lightning ``fit`` one client's federated round (load the global adapter, train, return Δ).

One model object per process serves every client: the callback swaps only the trainable state.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from fedllm.client.fit import add_grad_term
from fedllm.config import TrainConfig
from fedllm.data.text import Example, collate
from fedllm.models.quant import check_exact_kernels
from fedllm.models.state import TrainableState
from fedllm.types import StateDict, subtract


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then constant (HF's ``warmup_ratio`` semantics over a client's steps)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class CausalLMModule(L.LightningModule):
    """Trains the (shared, peft-wrapped) model's trainable parameters with ``train.optimizer``.

    AdamW (``auto``'s choice for language models) or SGD with ``train.momentum``; either with
    ``train.weight_decay`` and the linear warm-up over the first ``warmup_ratio`` of the steps.

    The same module serves the federated, centralized and local modes, so a comparison of the
    three differs only in orchestration.
    """

    def __init__(self, model: torch.nn.Module, state: TrainableState, train: TrainConfig, total_steps: int,
                 grad_term=None) -> None:
        super().__init__()
        self.model = model
        self.state = state
        self.train_cfg = train
        self.warmup_steps = math.ceil(train.warmup_ratio * total_steps)
        self.grad_term = grad_term  # e.g. FedProx's μ(θ − θ_g): f(named params) -> {name: tensor}
        self.losses: list[float] = []

    def on_fit_start(self) -> None:
        check_exact_kernels(self.model)  # a packed 4-bit layer has no backward: never train on one

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        add_grad_term(self.state.params, self.grad_term)

    def configure_optimizers(self):
        t = self.train_cfg
        params = [p for p in self.state.parameters() if p.requires_grad]
        if t.optimizer_for("lm") == "sgd":
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopOnNonFinite(L.Callback):
    """Stops a client's fit at the first NaN/Inf loss (its update is then left out of the round)."""

    def __init__(self) -> None:
        self.tripped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.losses and not math.isfinite(pl_module.losses[-1]):
            self.tripped = True
            trainer.should_stop = True


class FederatedRoundCallback(StopOnNonFinite):
    """Client side of one round: load the global state at fit start, compute Δ at fit end."""

    def __init__(self, global_state: StateDict) -> None:
        super().__init__()
        self.global_state = global_state
        self.delta: StateDict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.state.set(self.global_state)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.delta = subtract(pl_module.state.get(), self.global_state)


def make_loader(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> DataLoader:
    """A seeded, shuffling loader (same seed -> same batch order on every run)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=True, generator=gen,
                      collate_fn=lambda b: collate(b, pad_id), num_workers=0)
