"""The client for vision baselines: a LightningModule training a small classifier (SGD or AdamW).

An optional pruning mask (HP-FL, SNIP, random) is re-applied after every optimizer step, so the
pruned weights stay exactly zero however the optimizer (momentum, weight decay) moves them.
The same module serves the federated, centralized and local modes. ``grad_term`` (FedProx's
μ(θ − θ_g), SCAFFOLD's c − cᵢ) is added to the gradients after every backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedllm.algorithms.prune import check_mask
from fedllm.client.fit import FitStats, add_grad_term, fit_module


@dataclass(frozen=True)
class VisionTrainConfig:
    """Local optimizer settings for the vision baselines."""

    lr: float = 0.1              # learning rate
    momentum: float = 0.0        # SGD momentum (AdamW ignores it)
    weight_decay: float = 0.0    # SGD: L2 penalty on the gradient; AdamW: decoupled decay
    batch_size: int = 60         # mini-batch size
    optimizer: Literal["sgd", "adamw"] = "sgd"  # torch.optim.SGD or torch.optim.AdamW

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class VisionClassifier(L.LightningModule):
    """Cross-entropy training of ``model``; ``mask`` is keyed like ``model.state_dict()``.

    ``grad_term(params) -> {name: tensor}``, if given, is added to ``p.grad`` after each backward.
    ``net`` (default: ``model``) is what the forward pass runs, e.g. opacus' GradSampleModule
    wrapping ``model``; ``optimizer`` replaces the one :func:`make_optimizer` builds from ``cfg``
    (e.g. opacus' DPOptimizer). The mask and ``grad_term`` always address ``model``'s own parameter
    names.
    """

    def __init__(self, model: nn.Module, cfg: VisionTrainConfig | None = None,
                 mask: Mapping[str, torch.Tensor] | None = None,
                 grad_term: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
                 net: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        self.model = model
        self.net = net if net is not None else model
        self.cfg = cfg or VisionTrainConfig()
        self.mask: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []
        self.grad_term = grad_term
        self._optimizer = optimizer
        self.set_mask(mask)

    def set_mask(self, mask: Mapping[str, torch.Tensor] | None) -> None:
        """Install (or clear, with ``None``) the pruning mask and zero the pruned weights now."""
        mask = dict(mask or {})
        check_mask(dict(self.model.named_parameters()), mask)
        self.mask = mask
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        params = dict(self.model.named_parameters())
        for k, m in self.mask.items():
            params[k].masked_fill_(~m.to(params[k].device), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_after_backward(self) -> None:
        add_grad_term(dict(self.model.named_parameters()), self.grad_term)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.apply_mask()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self._optimizer is not None:
            return self._optimizer
        return make_optimizer(self.model.parameters(), self.cfg)


def make_optimizer(params, cfg: VisionTrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``: SGD (lr, momentum, L2 weight decay) or AdamW (lr, weight decay)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def fit_classifier(module: VisionClassifier, loader: DataLoader, steps: int, callbacks: list | None = None,
                   accelerator: str = "cpu", max_grad_norm: float = 0.0) -> FitStats:
    """Run ``steps`` optimizer steps of ``module`` with a quiet Lightning Trainer (losses, grad steps)."""
    return fit_module(module, loader, steps, list(callbacks or []), accelerator, max_grad_norm)


def vision_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                  seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory tensors, shuffled from ``seed`` (no worker processes)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y); restores the model's train/eval mode."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need matching non-empty x and y, got {len(x)} and {len(y)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(x), correct / len(x)
