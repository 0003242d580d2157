"""One client fit with Lightning, shared by the LM and vision clients.

:func:`fit_module` runs a LightningModule for a number of optimizer steps on the shared model
(:class:`~fedllm.client.strategy.SharedModelStrategy`: the model never moves) and reports what the
engine needs to trust the result: the step losses and how many backward passes actually left a
non-zero gradient on a trainable parameter (:class:`GradWitness`). A fit whose backward passes
never reach a trainable parameter trains nothing; the engine turns that into an error instead of
a row of unchanged metrics (:mod:`fedllm.federation.guard`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from fedllm.client.strategy import SharedModelStrategy, trainer_device


@torch.no_grad()
def add_grad_term(params: dict[str, torch.nn.Parameter], grad_term) -> None:
    """p.grad += grad_term(params)[name] for every trainable parameter that has a gradient."""
    if grad_term is None:
        return
    extra = grad_term(params)
    for name, p in params.items():
        if p.grad is not None and name in extra:
            p.grad.add_(extra[name].to(p.grad.device, p.grad.dtype))


class GradWitness(L.Callback):
    """Counts the backward passes after which some trainable parameter holds a non-zero gradient."""

    def __init__(self) -> None:
        self.backward_passes = 0
        self.grad_steps = 0

    @torch.no_grad()
    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward_passes += 1
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        if grads and bool(torch.stack([g.ne(0).any() for g in grads]).any()):
            self.grad_steps += 1


@dataclass(frozen=True)
class FitStats:
    """What one fit did: its step losses and the backward passes that reached a trainable parameter."""

    losses: list[float]
    grad_steps: int


# train.precision -> Lightning's. Under bf16 the LM module switches the 4-bit layers to bf16 for the fit
# (fedllm.models.precision); on a GPU bf16-mixed's autocast runs the rest in bf16 too, on a CPU the rest
# stays fp32 (lightning_precision says why).
PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def lightning_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for ``train.precision`` on ``accelerator``.

    ``bf16`` on a CPU is the bf16 base without autocast: the base's matmuls are where bf16 pays, and
    autocast's bf16 LoRA, attention and head matmuls gain nothing measurable there (study-recipe step
    on an AVX512-BF16 CPU, best of 3: 166 tokens/s without autocast, 162 with, exact fp32 112;
    docs/benchmarks.md), so those parts stay exact fp32 at the same speed.
    """
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision == "bf16" and on_cpu:
        return "32-true"
    return PRECISION[precision]


def make_trainer(steps: int, max_grad_norm: float, callbacks: list, accelerator: str, accumulate: int = 1,
                 precision: str = "32") -> L.Trainer:
    """A quiet Trainer for ``steps`` optimizer steps (cycling the loader as needed) on the shared model;
    each step averages the gradients of ``accumulate`` batches, under Lightning's ``precision``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1,
                         accumulate_grad_batches=accumulate, precision=lightning_precision(precision, accelerator),
                         strategy=SharedModelStrategy(device=trainer_device(accelerator)),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         gradient_clip_val=max_grad_norm or None, callbacks=callbacks,
                         limit_val_batches=0)


def fit_module(module: L.LightningModule, loader: DataLoader, steps: int, callbacks: list,
               accelerator: str, max_grad_norm: float = 0.0, accumulate: int = 1, precision: str = "32") -> FitStats:
    """Run ``steps`` optimizer steps of ``module`` (which appends each batch's loss to ``module.losses``)."""
    module.losses = []
    witness = GradWitness()
    trainer = make_trainer(steps, max_grad_norm, [witness, *callbacks], accelerator, accumulate, precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    module.zero_grad(set_to_none=True)  # the shared model holds no client's gradients between fits
    return FitStats(list(module.losses), witness.grad_steps)
