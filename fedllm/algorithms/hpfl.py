"""HP-FL server side: find a lottery-ticket subnetwork with a denoising autoencoder on unlabeled data.

Itahara, Nishio, Morikura & Yamamoto (2020), "Lottery Hypothesis based Unsupervised Pre-training
for Model Compression in Federated Learning" (the brief's "Federated learning with lottery-ticket-
pruned subnetworks pretrained as a denoising autoencoder"). Before federated training the server
uses unlabeled open data X_o (20,000 Fashion-MNIST images in the paper) to choose a sparse
subnetwork, so clients download, train and upload only its surviving weights.

Protocol (server), with θ₀ the classifier's random initialization and m = 1:
  for n = 1 … N_p:
    1. DAE pretraining: encoder E = the classifier's body (all layers up to the last hidden one),
       decoder D = a fresh linear map from the hidden code to the 784 pixels, sigmoid output.
       For mini-batches x ⊂ X_o: x̃ = clip(x + ε, 0, 1), ε ~ N(μ = 0.5, σ = 0.25) per pixel
       (the paper writes N(0.5, 0.25); we read 0.25 as the standard deviation);
       minimise ‖D(E(x̃)) − x‖² (mean squared error) with Adam, keeping θ ⊙ (1 − m) = 0.
    2. Magnitude pruning: m ← m minus the fraction p of its survivors with the smallest |θ|
       (per layer by default; see :func:`fedllm.algorithms.prune.magnitude_prune`).
    3. Rewind: θ ← m ⊙ θ₀ (``rewind_to="init"``, the default: Frankle & Carbin's rewinding, which
       is also "the initialization of this prune cycle", since every cycle starts from m ⊙ θ₀),
       or θ ← m ⊙ θ_DAE (``rewind_to="none"``: keep the pretrained survivors).
  The result (m ⊙ θ, m) is what the clients start from; (1 − p)^N_p of the weights survive.

The classifier head (not part of the DAE) is pruned by magnitude like every other weight matrix,
so the remaining rate holds for the whole model. Biases and norm parameters are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedllm.algorithms.prune import Mask, full_mask, magnitude_prune, rewind
from fedllm.types import StateDict, clone_state

BODY = "body"


@dataclass(frozen=True)
class HPFLConfig:
    """Hyper-parameters of HP-FL's server-side lottery-ticket search."""

    noise_mean: float = 0.5     # μ of the additive Gaussian input noise
    noise_std: float = 0.25     # σ (standard deviation) of that noise
    prune_rate: float = 0.2     # p: fraction of the surviving weights pruned per iteration
    iterations: int = 5         # N_p: number of pretrain → prune → rewind cycles
    dae_epochs: int = 1         # passes over the unlabeled data per DAE pretraining
    lr: float = 1e-3            # Adam learning rate
    batch_size: int = 100       # DAE mini-batch size
    seed: int = 0               # seeds the decoder init, shuffling and noise
    scope: str = "layer"        # magnitude pruning per "layer" or "global"
    rewind_to: str = "init"     # "init": survivors back to θ₀; "none": keep the DAE weights

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in [0, 1), got {self.prune_rate}")
        for name in ("iterations", "dae_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.rewind_to not in ("init", "none"):
            raise ValueError(f"rewind_to must be 'init' or 'none', got {self.rewind_to!r}")

    def target_remaining(self) -> float:
        """(1 − p)^N_p: the fraction of prunable weights that survives (before rounding)."""
        return (1.0 - self.prune_rate) ** self.iterations


def encoder_of(model: nn.Module) -> nn.Module:
    """The classifier's body (its layers up to the last hidden one), used as the DAE encoder."""
    body = getattr(model, BODY, None)
    if not isinstance(body, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `.{BODY}` module; HP-FL expects head(body(x)) "
                         "models such as those from fedllm.models.vision")
    return body


@torch.no_grad()
def _zero_pruned(params: dict[str, nn.Parameter], mask: Mask) -> None:
    for k, m in mask.items():
        params[k].masked_fill_(~m.to(params[k].device), 0)


def pretrain_dae(encoder: nn.Module, unlabeled_x: torch.Tensor, cfg: HPFLConfig,
                 mask: Mask | None = None) -> list[float]:
    """Train ``encoder`` in place as a denoising autoencoder's encoder; returns each epoch's mean MSE.

    ``mask`` (keyed like ``encoder.state_dict()``) keeps pruned weights at exactly zero.
    """
    if unlabeled_x.ndim < 2 or len(unlabeled_x) == 0:
        raise ValueError("unlabeled_x must be a non-empty batch of images, "
                         f"got shape {tuple(unlabeled_x.shape)}")
    params = dict(encoder.named_parameters())
    mask = mask or {}
    unknown = sorted(set(mask) - set(params))
    if unknown:
        raise ValueError(f"mask keys {unknown[:3]} are not parameters of the encoder")
    device = next(iter(params.values())).device
    x_all = unlabeled_x.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        code_dim = encoder(x_all[:1].to(device)).flatten(1).shape[1]
    with torch.random.fork_rng(devices=[]):  # a seeded decoder init without touching the global RNG
        torch.manual_seed(cfg.seed)
        decoder = nn.Linear(code_dim, x_all[0].numel()).to(device)
    opt = torch.optim.Adam([*params.values(), *decoder.parameters()], lr=cfg.lr)
    _zero_pruned(params, mask)
    encoder.train()
    losses = []
    for _ in range(cfg.dae_epochs):
        order, total = torch.randperm(len(x_all), generator=gen), 0.0
        for start in range(0, len(x_all), cfg.batch_size):
            clean = x_all[order[start:start + cfg.batch_size]]
            noise = torch.randn(clean.shape, generator=gen) * cfg.noise_std + cfg.noise_mean
            noisy, clean = (clean + noise).clamp(0.0, 1.0).to(device), clean.to(device)
            recon = torch.sigmoid(decoder(encoder(noisy).flatten(1))).view_as(clean)
            loss = F.mse_loss(recon, clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _zero_pruned(params, mask)
            total += float(loss.detach()) * len(clean)
        losses.append(total / len(x_all))
    return losses


def lottery_ticket(model: nn.Module, unlabeled_x: torch.Tensor, cfg: HPFLConfig) -> tuple[StateDict, Mask]:
    """Run N_p DAE-pretrain → prune → rewind cycles; returns (initial state m ⊙ θ, mask m).

    The model's current weights are θ₀. On return the model holds the returned state.
    """
    body = encoder_of(model)
    prefix = BODY + "."
    theta0 = clone_state(model.state_dict())
    mask = full_mask(theta0)
    for cycle in range(cfg.iterations):
        body_mask = {k.removeprefix(prefix): m for k, m in mask.items() if k.startswith(prefix)}
        pretrain_dae(body, unlabeled_x, replace(cfg, seed=cfg.seed + cycle), mask=body_mask)
        trained = clone_state(model.state_dict())
        mask = magnitude_prune(trained, mask, cfg.prune_rate, cfg.scope)
        model.load_state_dict(rewind(theta0 if cfg.rewind_to == "init" else trained, mask))
    return clone_state(model.state_dict()), mask
