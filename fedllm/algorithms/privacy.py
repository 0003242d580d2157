"""Differential privacy: client-level DP-FedAvg, adaptive clipping, opacus accounting, DP-SGD.

Client-level DP (DP-FedAvg; McMahan et al., 2018, "Learning Differentially Private Recurrent
Language Models"). Each client's delta is clipped to L2 norm C over the whole update,
Δ̃ᵢ = Δᵢ·min(1, C/‖Δᵢ‖₂), so adding or removing one client moves the sum Σ Δ̃ᵢ by at most C.
The Gaussian mechanism then adds N(0, σ²C²) to that sum; the mean over K clients gets
N(0, (σC/K)²) per coordinate:

- ``mode="server"`` (trusted server): Δ = inner(Δ̃₁..Δ̃_K) + N(0, (σC/K)²), K = updates aggregated.
- ``mode="client"`` (distributed DP, composes with secure aggregation): client i sends
  Δ̃ᵢ + N(0, σ²C²/K) with K = ``num_sampled``, so the K noises sum to N(0, σ²C²) and the server,
  which may only see the masked sum, adds nothing. If clients drop out the realised noise is
  smaller than planned (K'/K of the variance); size K for the survivors you expect.

The noise is calibrated to a sensitivity of C/K on the aggregate, which holds for the uniform
mean; ``DPAggregator`` therefore refuses an inner aggregator with ``weighted=True``.

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping"), server mode: with bᵢ = 1[‖Δᵢ‖ ≤ C] and b̄ = (Σ bᵢ + N(0, σ_b²))/K, the clip follows
the geometric rule C ← C·exp(−η(b̄ − γ)), tracking the γ-quantile of the update norms. Releasing
b̄ costs privacy too; the paper's Theorem 1 keeps the total at noise multiplier σ by using
σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) on the deltas (needs 2σ_b > σ; default σ_b = K/20 as in the paper).

Accounting uses opacus' accountants (RDP, or PRV of Gopi et al., 2021); we never re-derive them.
Sample-level DP-SGD (Abadi et al., 2016) for small vision models goes through opacus'
``PrivacyEngine``. opacus is imported where it is used: importing it costs seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedllm.algorithms.aggregate import Aggregator
from fedllm.types import ClientUpdate, StateDict, global_norm

MODES = ("server", "client")
ACCOUNTANTS = ("rdp", "prv")


def clip_delta(delta: Mapping[str, torch.Tensor], max_norm: float) -> tuple[StateDict, float]:
    """Scale ``delta`` so its L2 norm over all entries is ≤ ``max_norm``; returns (clipped, factor).

    factor = min(1, C/‖Δ‖₂); an update already inside the ball is returned unchanged (factor 1).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a delta with NaN/Inf entries; expected finite values")
    if norm <= max_norm:
        return {k: v for k, v in delta.items()}, 1.0
    factor = max_norm / norm
    return {k: (v.double() * factor).to(v.dtype) for k, v in delta.items()}, factor


def gaussian_noise_like(state: Mapping[str, torch.Tensor], std: float,
                        generator: torch.Generator) -> StateDict:
    """i.i.d. N(0, std²) with each tensor's shape and dtype, drawn from ``generator`` (on CPU)."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    out: StateDict = {}
    for k, v in state.items():
        if not v.is_floating_point():
            raise ValueError(f"state[{k!r}] has dtype {v.dtype}; expected a floating tensor")
        z = torch.randn(v.shape, generator=generator, dtype=torch.float64)
        out[k] = (z * std).to(device=v.device, dtype=v.dtype)
    return out


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP settings (one field, one meaning; ranges checked on construction)."""

    noise_multiplier: float  # σ: noise std on the clipped sum, in units of C (0 = no noise)
    clip_norm: float  # C: L2 bound on each client's whole delta (the initial C when adaptive)
    mode: str = "server"  # "server": trusted server adds noise; "client": each client adds its share
    adaptive: bool = False  # track the target_quantile of update norms (Andrew et al., 2021)
    target_quantile: float = 0.5  # γ: fraction of updates that should be left unclipped
    clip_lr: float = 0.2  # η: geometric step of the clip update
    count_noise_std: float | None = None  # σ_b on the unclipped count; None = K/20 (the paper's)
    delta: float = 1e-5  # δ of the (ε, δ) guarantee reported by the ledger
    target_epsilon: float | None = None  # if set, σ is solved for this ε (resolve_noise_multiplier)

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.adaptive and self.mode != "server":
            raise ValueError("adaptive clipping needs each update's norm at the server; use mode='server'")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ValueError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.count_noise_std is not None and not self.count_noise_std >= 0:
            raise ValueError(f"count_noise_std must be >= 0 or None, got {self.count_noise_std}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 or None, got {self.target_epsilon}")


def adaptive_delta_noise(sigma: float, count_std: float) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2): Andrew et al.'s Theorem 1 split of a total multiplier σ."""
    if sigma == 0:
        return 0.0
    if not 2 * count_std > sigma:
        raise ValueError(f"adaptive clipping with noise_multiplier {sigma} needs count_noise_std > "
                         f"{sigma / 2} (2σ_b > σ), got {count_std}")
    return (sigma ** -2 - (2 * count_std) ** -2) ** -0.5


class DPAggregator:
    """DP(inner): clip each delta to C, aggregate with ``inner``, add Gaussian noise (server mode).

    Wraps any :class:`~fedllm.algorithms.aggregate.Aggregator` by composition. In client mode the
    clients call :meth:`client_noise` and ``__call__`` only aggregates what arrives.
    """

    def __init__(self, inner: Aggregator, cfg: DPConfig, num_sampled: int, seed: int,
                 expected: float | None = None) -> None:
        if num_sampled < 1:
            raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
        if expected is not None and not (expected > 0 and cfg.mode == "server"):
            raise ValueError("a fixed denominator (Poisson sampling) needs expected > 0 and mode='server'")
        # Poisson sampling: the mean is the clipped sum over qK, the expected count (sensitivity C/(qK)
        # whatever the round's count); fixed-size sampling divides by the count itself
        self.expected = expected
        if getattr(inner, "weighted", False):
            raise ValueError("DP noise is calibrated to the uniform mean (sensitivity C/K); "
                             "use an inner aggregator with weighted=False")
        self.inner, self.cfg, self.num_sampled = inner, cfg, num_sampled
        self.count_std = num_sampled / 20 if cfg.count_noise_std is None else cfg.count_noise_std
        self.delta_sigma = (adaptive_delta_noise(cfg.noise_multiplier, self.count_std)
                            if cfg.adaptive else cfg.noise_multiplier)
        self.clip = float(cfg.clip_norm)
        self.round = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last_stats: dict[str, float] = {}

    def client_noise(self, delta: Mapping[str, torch.Tensor], generator: torch.Generator) -> StateDict:
        """Client side of client mode: clip to the current C, then add N(0, σ²C²/K)."""
        clipped, _ = clip_delta(delta, self.clip)
        std = self.cfg.noise_multiplier * self.clip / math.sqrt(self.num_sampled)
        if std == 0:
            return clipped
        noise = gaussian_noise_like(clipped, std, generator)
        return {k: clipped[k] + noise[k] for k in clipped}

    def __call__(self, updates: Sequence[ClientUpdate]) -> StateDict:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        if self.cfg.mode == "client":
            self.round += 1
            return self.inner(updates)
        norms = [global_norm(u.delta) for u in updates]
        clipped = [dataclasses.replace(u, delta=self.clip_update(u.delta)) for u in updates]
        return self.release(self.inner(clipped), norms)

    def clip_update(self, delta: Mapping[str, torch.Tensor]) -> StateDict:
        """Server mode: one delta clipped to this round's C (a streaming server clips each on arrival)."""
        return clip_delta(delta, self.clip)[0]

    def release(self, mean: Mapping[str, torch.Tensor], norms: Sequence[float]) -> StateDict:
        """One round of the mechanism on the mean of the clipped deltas whose unclipped norms are
        ``norms``: server mode scales (Poisson), noises and adapts C; client mode (the clients
        clipped and noised their own uploads) only counts the round."""
        self.round += 1
        if self.cfg.mode == "client":
            return dict(mean)
        count, clip = len(norms), self.clip
        if self.expected is not None:  # the sum over the expected count
            mean = {k: v * (count / self.expected) for k, v in mean.items()}
        out, std = self.noise_mean(mean, count if self.expected is None else self.expected)
        unclipped = sum(n <= clip for n in norms)
        if self.cfg.adaptive:
            self._update_clip(unclipped, count)
        self.last_stats = {"clip": clip, "unclipped_fraction": unclipped / count, "noise_std": std,
                           "mean_update_norm": sum(norms) / count}
        return out

    def noise_mean(self, mean: Mapping[str, torch.Tensor], count: float) -> tuple[StateDict, float]:
        """(mean + N(0, (σ·C/count)²), the std): the server's noise on the mean of ``count`` deltas
        already clipped to C — by this aggregator, or by the clients themselves under secure
        aggregation, where the server only ever sees the sum."""
        std = self.delta_sigma * self.clip / count
        if std == 0:
            return dict(mean), std
        noise = gaussian_noise_like(mean, std, self.generator)
        return {k: mean[k] + noise[k] for k in mean}, std

    def clip_before_masking(self, delta: Mapping[str, torch.Tensor]) -> StateDict:
        """Server mode under secure aggregation: the client clips to the current C itself, since the
        server will only ever see the masked sum."""
        return clip_delta(delta, self.clip)[0]

    def noise_secure_sum(self, mean: Mapping[str, torch.Tensor], count: int) -> StateDict:
        """Server mode under secure aggregation: noise the unmasked mean of ``count`` deltas that
        the clients clipped (:meth:`clip_before_masking`); one round of the mechanism is spent."""
        out, std = self.noise_mean(mean, count)
        self.last_stats = {"clip": self.clip, "noise_std": std}
        self.round += 1
        return out

    def _update_clip(self, unclipped_count: int, k: int) -> None:
        """C ← C·exp(−η(b̄ − γ)) with b̄ the noised fraction of unclipped updates."""
        noise = 0.0
        if self.count_std > 0:
            noise = float(torch.randn((), generator=self.generator, dtype=torch.float64)) * self.count_std
        b_bar = (unclipped_count + noise) / k
        self.clip *= math.exp(-self.cfg.clip_lr * (b_bar - self.cfg.target_quantile))

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "round": self.round, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
        self.round = int(state["round"])
        self.generator.set_state(state["generator"])


SAMPLINGS = ("poisson", "without_replacement", "full")


class PrivacyLedger:
    """(ε, δ) spent so far, for the way clients were really chosen.

    One :meth:`step` per round records a subsampled Gaussian mechanism with noise multiplier σ:

    - ``poisson``: each client joins independently with probability q; opacus' accountant (RDP or
      PRV), add/remove-one neighbours;
    - ``without_replacement``: a fixed-size sample of m = q·n of the n clients (fedllm's uniform
      sampler); the RDP bound for sampling without replacement (Wang, Balle & Kasiviswanathan, 2019,
      "Subsampled Rényi Differential Privacy and Analytical Moments Accountant"), computed by
      Google's ``dp_accounting`` under the replace-one relation that sampling assumes;
    - ``full``: no amplification claimed (q = 1 every round): deterministic or data-size-weighted
      selection, or every client every round.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float,
                 accountant: str = "rdp", sampling: str = "poisson", population: int | None = None) -> None:
        from opacus.accountants import create_accountant

        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if sampling == "without_replacement" and (population is None or population < 1):
            raise ValueError("sampling without replacement needs the population size (number of clients)")
        if sampling == "without_replacement" and accountant != "rdp":
            raise ValueError("the PRV accountant models Poisson sampling only; sampling without replacement "
                             "is accounted with RDP")
        _check_rate_delta(sample_rate, delta)
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.sample_rate = 1.0 if sampling == "full" else sample_rate
        self.mechanism, self.sampling, self.population = accountant, sampling, population
        self.accountant = create_accountant(mechanism=accountant)  # an opacus IAccountant (keeps the history)

    def step(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        """Record one round (defaults: the ledger's σ and q)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        rate = self.sample_rate if sample_rate is None else sample_rate
        self.accountant.step(noise_multiplier=sigma, sample_rate=rate)

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε at ``delta`` (default: the ledger's δ); 0 before the first step, inf when σ = 0."""
        if not self.accountant.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.accountant.history):
            return math.inf
        delta = self.delta if delta is None else delta
        if self.sampling == "without_replacement":
            return without_replacement_epsilon(self.accountant.history, self.population, delta)
        return float(self.accountant.get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "delta": self.delta, "accountant": self.mechanism, "sampling": self.sampling,
                "population": self.population, "history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] != self.mechanism:
            raise ValueError(f"ledger state is for accountant {state['accountant']!r}, "
                             f"this ledger uses {self.mechanism!r}")
        if state.get("sampling", "poisson") != self.sampling:
            raise ValueError(f"ledger state is for {state.get('sampling', 'poisson')!r} sampling, "
                             f"this ledger accounts {self.sampling!r}")
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate, self.delta = float(state["sample_rate"]), float(state["delta"])
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def history_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """opacus' RDP ε of a Poisson-sampled Gaussian history [(σ, q, steps), ...]; inf when some σ is 0.

    A DP-SGD client's cumulative spend over every step it took in the run (LoRA and vision clients).
    """
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def without_replacement_epsilon(history: Sequence[tuple[float, float, int]], population: int, delta: float) -> float:
    """ε of rounds (σ, q, count) that each drew round(q·n) of ``population`` n clients without replacement."""
    import logging

    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # per-order convergence notes, not errors
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, q, count in history:
        m = max(1, round(q * population))
        event = dp_accounting.GaussianDpEvent(sigma)
        if m < population:
            event = dp_accounting.SampledWithoutReplacementDpEvent(population, m, event)
        acc.compose(event, int(count))
    return float(acc.get_epsilon(delta))


def _check_rate_delta(sample_rate: float, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def sigma_for_target(target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                     accountant: str = "rdp", sampling: str = "poisson", population: int | None = None) -> float:
    """Smallest σ (tolerance 0.01 in ε) with ε(σ, q, rounds, δ) ≤ target, for the sampling scheme.

    Poisson and full participation use opacus' own search; sampling without replacement bisects σ
    over :func:`without_replacement_epsilon`.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    _check_rate_delta(sample_rate, delta)
    if sampling != "without_replacement":
        rate = 1.0 if sampling == "full" else sample_rate
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=rate, steps=rounds, accountant=accountant))
    if population is None:
        raise ValueError("sampling without replacement needs the population size (number of clients)")

    def eps(sigma: float) -> float:
        return without_replacement_epsilon([(sigma, sample_rate, rounds)], population, delta)

    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    for _ in range(60):  # eps(hi) <= target < eps(lo)
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if target_epsilon - eps(hi) < 0.01:
            break
    return hi


def resolve_noise_multiplier(cfg: DPConfig, sample_rate: float, rounds: int,
                             accountant: str = "rdp", sampling: str = "poisson", population: int | None = None) -> float:
    """σ to use: ``cfg.noise_multiplier``, or the σ that reaches ``cfg.target_epsilon`` when set."""
    if cfg.target_epsilon is None:
        return cfg.noise_multiplier
    return sigma_for_target(cfg.target_epsilon, sample_rate, rounds, cfg.delta, accountant, sampling, population)


# ------------------------------------------------------------------- sample-level DP-SGD (opacus)

_NOT_DP_SGD_PACKAGES = ("bitsandbytes", "peft")


def check_dpsgd_supported(module: nn.Module) -> None:
    """Raise ``ValueError`` naming every layer opacus' per-sample gradients cannot handle here.

    Accepted: trainable layers with a hand-written opacus grad sampler (Linear, Conv, GroupNorm,
    LayerNorm, Embedding, ...) that opacus' ModuleValidator passes. Rejected: BatchNorm, LSTM, ...
    (ModuleValidator), custom parametrized layers (we do not rely on the functorch fallback),
    quantized (non-float) parameters, and LoRA / 4-bit layers: use client-level DP for those.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    if not module.training:
        problems.append("<root>: module is in eval mode; call .train() first")
    for name, sub in module.named_modules():
        label = f"{name or '<root>'} ({type(sub).__name__})"
        own = list(sub.parameters(recurse=False))
        if type(sub).__module__.split(".")[0] in _NOT_DP_SGD_PACKAGES:
            problems.append(f"{label}: LoRA/4-bit layer; use client-level DP instead")
            continue
        if any(not p.is_floating_point() for p in own):
            problems.append(f"{label}: quantized (non-float) parameters")
        if not any(p.requires_grad for p in own):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        errors = validator(sub) if validator else []
        problems.extend(f"{label}: {str(err).split('.')[0]}" for err in errors)
        if not errors and type(sub) not in GradSampleModule.GRAD_SAMPLERS:
            problems.append(f"{label}: no opacus per-sample gradient rule for this layer type")
    if problems:
        raise ValueError("DP-SGD (opacus) cannot train this module: " + "; ".join(problems))


def make_private_dpsgd(module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: Any,
                       noise_multiplier: float, max_grad_norm: float,
                       delta: float = 1e-5) -> tuple[nn.Module, Any, Any, PrivacyLedger]:
    """DP-SGD via opacus: returns (GradSampleModule, DPOptimizer, Poisson DataLoader, ledger).

    Each optimizer step clips per-sample gradients to ``max_grad_norm`` and adds
    N(0, σ²·max_grad_norm²) to their sum; the ledger's accountant is the one opacus steps on
    every optimizer step (q = 1/len(loader)), so ``ledger.epsilon()`` is the spend so far.
    """
    from opacus import PrivacyEngine

    check_dpsgd_supported(module)
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    ledger = PrivacyLedger(noise_multiplier, 1.0 / max(len(data_loader), 1), delta, "rdp")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = ledger.accountant  # the optimizer hook steps the ledger's own accountant
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=data_loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    ledger.sample_rate = 1.0 / len(loader)
    return module, optimizer, loader, ledger
