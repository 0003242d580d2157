"""The backdoor task of the model-replacement attack (Bagdasaryan et al., 2020, "How To Backdoor
Federated Learning", AISTATS), for image classifiers.

Trigger: a pixel pattern (the paper's "pixel-pattern" backdoor), here a 4×4 checkerboard of full
and zero intensity in the bottom-right corner of a [0, 1] image, where Fashion-MNIST's background
is dark. The attacker replaces a seeded ``fraction`` of its own examples by stamped copies
relabelled to ``target`` and keeps the rest clean, so that its model learns the backdoor and keeps
the main task (the paper mixes backdoor and clean inputs in every batch for the same reason); it
then boosts its update by γ (:mod:`fedllm.algorithms.attacks`, kind ``backdoor``).

Success rate: the fraction of test images whose true class is not ``target`` that the model
assigns to ``target`` once stamped (the paper's backdoor accuracy). A clean model scores near its
error rate into that one class; the attack aims at 100 %.
"""

from __future__ import annotations

import numpy as np
import torch

PATCH = 4  # trigger side, pixels


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A copy of images ``x`` ([N, C, H, W] in [0, 1]) with the checkerboard trigger in the bottom-right corner."""
    if x.dim() != 4 or x.shape[-1] < PATCH + 1 or x.shape[-2] < PATCH + 1:
        raise ValueError(f"expected images [N, C, H, W] of at least {PATCH + 1} pixels a side, got {tuple(x.shape)}")
    out = x.clone()
    ii, jj = torch.meshgrid(torch.arange(PATCH), torch.arange(PATCH), indexing="ij")
    pattern = ((ii + jj) % 2 == 0).to(x.dtype)
    out[..., -PATCH - 1:-1, -PATCH - 1:-1] = pattern
    return out


def poison(x: torch.Tensor, y: torch.Tensor, target: int, fraction: float,
           seed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` with ⌊fraction·N⌋ seeded examples stamped and relabelled to ``target``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"poison fraction must be in (0, 1], got {fraction}")
    n = len(y)
    pick = torch.as_tensor(np.random.default_rng(seed).permutation(n)[: int(fraction * n + 1e-9)], dtype=torch.long)
    x, y = x.clone(), y.clone()
    x[pick] = stamp(x[pick])
    y[pick] = target
    return x, y


@torch.no_grad()
def backdoor_success(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: int,
                     batch_size: int = 1000) -> float:
    """Fraction of the stamped images of a class other than ``target`` that ``model`` puts in ``target``."""
    keep = y != target
    if not bool(keep.any()):
        raise ValueError(f"no test image outside the target class {target}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits, xs = 0, x[keep]
    for i in range(0, len(xs), batch_size):
        hits += int((model(stamp(xs[i:i + batch_size]).to(device)).argmax(1) == target).sum())
    model.train(was_training)
    return hits / len(xs)
