"""Signal propagation in sparse networks: layerwise Jacobian singular values and an approximately
isometric initialization of a pruned network.

Lee, Ajanthan, Gould & Torr (2020), "A Signal Propagation Perspective for Pruning Neural Networks
at Initialization" (ICLR). With xˡ = φ(hˡ), hˡ = (Cˡ ⊙ Wˡ) xˡ⁻¹ + bˡ and Cˡ the layer's binary
mask, the layerwise input-output Jacobian is

    Jˡ = ∂xˡ/∂xˡ⁻¹ = Dˡ (Cˡ ⊙ Wˡ),   Dˡ = diag(φ'(hˡ)).

*Layerwise dynamical isometry* holds when the singular values of every Jˡ are close to 1, so
neither the forward signal nor the backward gradient shrinks or grows layer by layer; pruning
breaks it (removing entries of W shrinks its singular values, towards 0 for a row with no kept
entry). The paper restores it data-free, before training, by solving for every layer

    min_Wˡ ‖(Cˡ ⊙ Wˡ)ᵀ(Cˡ ⊙ Wˡ) − I‖_F                                             (AI)

by gradient descent on the kept entries, the pruned ones staying zero.

What is computed here, and why:

- **The Jacobian is taken with Dˡ = I**: the singular values of Cˡ ⊙ Wˡ, i.e. of ∂hˡ/∂xˡ⁻¹, the
  layer's linear map. For ReLU, Dˡ is an input-dependent 0/1 diagonal that keeps about half the
  rows; leaving it out makes the measure data-free and exactly what (AI) acts on.
- **Conv kernels** of shape out × in × k × k are read as the out × (in·k·k) matrix that maps one
  input patch to one output pixel's channels (the im2col view). That is the conv layer's exact
  Jacobian for 1×1 kernels and an approximation otherwise: the full operator on a feature map is
  a block-Toeplitz matrix whose singular values also depend on the image size and the padding.
- **Non-square layers** (m × n): an isometry means min(m, n) singular values equal to 1, i.e.
  orthonormal rows when m ≤ n. So (AI) uses the smaller Gram matrix, V Vᵀ (m × m) when m ≤ n and
  Vᵀ V (n × n) otherwise; the larger one has |m − n| zero eigenvalues that no W can lift.

A mask can make (AI) unreachable: a row of the smaller side with no kept entry keeps singular
value 0, and two rows whose only kept entries share a column cannot be orthogonal. The descent
then stops near the best it can reach, and :func:`network_jsv` shows how far that is.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

from fedllm.algorithms.prune import apply_mask, full_mask, prunable_keys, random_mask
from fedllm.models.vision import build_vision_model
from fedllm.types import StateDict

ISOMETRY_STEPS = 300  # the default of prune.isometry_steps (tests/test_signal.py pins what it reaches)
ISOMETRY_LR = 0.5  # unmasked, the step is then exactly one Newton–Schulz iteration (see below)
ISOMETRY_TOL = 1e-9  # stop once ‖G − I‖_F is below this (a dense 20 × 50 layer: within 40 steps)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the layer's linear map: out × in, or out × (in·k·k) for a conv kernel."""
    if weight.ndim < 2:
        raise ValueError(f"a layer Jacobian needs a weight with ndim >= 2, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def layer_jacobian(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cˡ ⊙ Wˡ as a matrix: the layerwise Jacobian ∂hˡ/∂xˡ⁻¹ (Dˡ = I; see the module docstring)."""
    w = weight.detach()
    if mask is not None:
        if mask.shape != w.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(w.shape)}")
        w = w.masked_fill(~mask.to(w.device, torch.bool), 0)
    return as_matrix(w)


def _gram(v: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``v`` (m × n): V Vᵀ when m ≤ n, else Vᵀ V."""
    return v @ v.T if v.shape[0] <= v.shape[1] else v.T @ v


def _singular_values(v: torch.Tensor) -> torch.Tensor:
    """σ(V), descending, as √ of the eigenvalues of the smaller Gram matrix.

    Equal to ``torch.linalg.svdvals`` up to float64 rounding (about √ε ≈ 1e-8 absolute for the
    smallest σ, since λ = σ²; tests/test_signal.py checks 1e-6), and cheaper on a CPU: one
    symmetric eigensolve of a min(m, n)-sized matrix instead of an SVD of the m × n one.
    """
    return torch.linalg.eigvalsh(_gram(v)).flip(0).clamp_min(0).sqrt()


def jacobian_singular_values(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The min(m, n) singular values of Cˡ ⊙ Wˡ, descending, in float64."""
    return _singular_values(layer_jacobian(weight, mask).to("cpu", torch.float64))


def jsv_stats(weight: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean, min and max Jacobian singular value of one layer."""
    s = jacobian_singular_values(weight, mask)
    return {"mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())}


def network_jsv(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, dict[str, float]]:
    """:func:`jsv_stats` of every prunable weight (``mask`` entries applied; absent keys are dense)."""
    mask = mask or {}
    return {k: jsv_stats(state[k], mask.get(k)) for k in prunable_keys(state)}


def _gram_residual(v: torch.Tensor) -> torch.Tensor:
    """G − I for the smaller Gram matrix G of ``v``."""
    gram = _gram(v)
    return gram - torch.eye(gram.shape[0], dtype=v.dtype, device=v.device)


def isometry_gap(weight: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """‖(C ⊙ W)ᵀ(C ⊙ W) − I‖_F on the smaller Gram side: the objective (AI); 0 for an isometry."""
    return float(torch.linalg.matrix_norm(_gram_residual(layer_jacobian(weight, mask).double())))


def approximate_isometry(weight: torch.Tensor, mask: torch.Tensor | None = None,
                         steps: int = ISOMETRY_STEPS, lr: float = ISOMETRY_LR) -> torch.Tensor:
    """Solve (AI) for one layer by at most ``steps`` of gradient descent; returns the new weight.

    Descends ¼‖G − I‖²_F (the same minimizers as (AI)), whose gradient in V = C ⊙ W is (G − I)V
    (V(G − I) on the tall side); the gradient in W is that masked by C, so pruned entries stay
    exactly zero. V is first divided by max(1, σ_max(V)), so every singular value starts in
    (0, 1]. Without a mask the step acts on each singular value alone, σ ← σ + lr·(1 − σ²)σ,
    which for lr ≤ 0.5 rises monotonically to 1 and never overshoots; at lr = 0.5 the step is
    V ← V(3I − VᵀV)/2, the Newton–Schulz iteration for the nearest orthogonal matrix (Björck &
    Bowie, 1971), which converges quadratically. With a mask it is that step projected back onto
    the mask's support. Deterministic: no randomness; the result depends only on the starting
    weight (itself seeded by the model's initialization). Runs in float64, returns ``weight.dtype``.
    """
    if steps < 0 or not 0 < lr <= 0.5:
        raise ValueError(f"expected steps >= 0 and lr in (0, 0.5], got steps={steps}, lr={lr}")
    v = layer_jacobian(weight, mask).to("cpu", torch.float64)
    keep = None if mask is None else as_matrix(mask.to("cpu", torch.bool))
    v = v / max(1.0, float(_singular_values(v)[0]))
    wide = v.shape[0] <= v.shape[1]
    for _ in range(steps):
        residual = _gram_residual(v)
        if float(torch.linalg.matrix_norm(residual)) < ISOMETRY_TOL:
            break
        v = v - lr * (residual @ v if wide else v @ residual)
        if keep is not None:
            v = v.masked_fill(~keep, 0)
    return v.to(weight.dtype).reshape(weight.shape).to(weight.device)


def isometric_init(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None,
                   steps: int = ISOMETRY_STEPS) -> StateDict:
    """A copy of ``state`` with every masked weight replaced by its (AI) solution.

    ``mask=None`` treats every prunable weight as dense (an orthogonal-like init); biases and
    norm scales are copied unchanged. Pruned entries are exactly zero in the result.
    """
    mask = full_mask(state) if mask is None else mask
    out = apply_mask(state, mask)
    for k, m in mask.items():
        out[k] = approximate_isometry(state[k], m, steps)
    return out


def signal_report(before: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None,
                  after: Mapping[str, torch.Tensor] | None = None) -> dict:
    """What a run records: per-layer JSV of the masked init (``before``), and of ``after`` if given."""
    report = {"before": network_jsv(before, mask)}
    if after is not None:
        report["after"] = network_jsv(after, mask)
    return report


# ---------------------------------------------------------------------------- init-time sweep


def jsv_sweep(sparsities: Sequence[float] = (0.0, 0.9, 0.95, 0.98, 0.99), preset: str = "lenet300100",
              seed: int = 0, steps: int = ISOMETRY_STEPS) -> list[dict]:
    """Mean JSV per layer of ``preset`` under random masks, plain vs isometric init (no data needed).

    One row per (sparsity, init): ``{"sparsity", "init", "layers": {key: mean JSV}}``. The model
    is initialized as a vision run with this seed initializes it; the caller's RNG is left as is.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v.detach().clone() for k, v in build_vision_model(preset).named_parameters()}
    rows = []
    for sparsity in sparsities:
        mask = random_mask(state, 1.0 - sparsity, seed)
        plain = apply_mask(state, mask)
        for init, init_state in (("plain", plain), ("isometry", isometric_init(plain, mask, steps))):
            layers = {k: s["mean"] for k, s in network_jsv(init_state, mask).items()}
            rows.append({"sparsity": sparsity, "init": init, "layers": layers})
    return rows


def format_sweep(rows: Sequence[dict]) -> str:
    """The sweep as a Markdown table: one row per (sparsity, init), one column per layer."""
    keys = list(rows[0]["layers"])
    lines = ["| sparsity | init | " + " | ".join(keys) + " | mean |",
             "|---:|---|" + "---:|" * (len(keys) + 1)]
    for r in rows:
        vals = [r["layers"][k] for k in keys]
        lines.append(f"| {r['sparsity']:.0%} | {r['init']} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {statistics.fmean(vals):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_sweep(jsv_sweep()))
