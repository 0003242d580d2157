"""The lean bf16 LoRA step on a CPU (:mod:`fedllm.models.lean_lora`): the same function as peft's LoRA
layer over the bitsandbytes base, its hand-written backward against autograd, its 16-bit dropout masks,
and a whole fit through it against the same fit through peft with the same masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.config import load_recipe
from fedllm.experiments.lm import LMExperiment
from fedllm.models import lean_lora, precision
from fedllm.models.quant import linear4bit_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
HAS_BF16 = precision.cpu_has_bf16()


def _reference(x, a, b, weight, mask, c):
    """The LoRA layer by autograd: base in the weight's dtype, then the fp32 term on the masked input."""
    base = torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
    return base + (x * mask) @ a.t() @ b.t() * c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_hand_written_backward_is_autograd_of_the_same_function(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g)
    a, b = torch.randn(4, 24, generator=g) * 0.3, torch.randn(16, 4, generator=g) * 0.3
    weight = torch.randn(16, 24, generator=g).to(dtype)
    mask = (torch.rand(3, 5, 24, generator=g) > 0.2).float()
    grad = torch.randn(3, 5, 16, generator=g)

    xs = [x.clone().requires_grad_() for _ in range(2)]
    As = [a.clone().requires_grad_() for _ in range(2)]
    Bs = [b.clone().requires_grad_() for _ in range(2)]
    y = lean_lora.LoRALinear.apply(xs[0], As[0], Bs[0], weight, None, mask, 1.7)
    ref = _reference(xs[1], As[1], Bs[1], weight, mask, 1.7)
    (y * grad).sum().backward()
    (ref * grad).sum().backward()
    assert y.shape == ref.shape == (3, 5, 16)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((xs[0].grad, xs[1].grad), (As[0].grad, As[1].grad), (Bs[0].grad, Bs[1].grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_keep_mask_keeps_with_the_stated_rate_and_rescales_exactly():
    torch.manual_seed(0)
    mask, inv = lean_lora.keep_mask((400, 500), 0.1)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    t = round(0.1 * 65536)  # 6554: P(keep) = 1 - 6554/65536 = 0.899994
    assert inv == 65536 / (65536 - t)
    assert abs(float(mask.mean()) - (1 - t / 65536)) < 0.0027  # 6 sigma of a Bernoulli(0.9) mean of 2e5
    torch.manual_seed(0)
    again, _ = lean_lora.keep_mask((400, 500), 0.1)
    assert torch.equal(mask, again)  # drawn from torch's global generator: seeded runs repeat
    odd, _ = lean_lora.keep_mask((3, 7), 0.5)  # not a multiple of four elements
    assert odd.shape == (3, 7)
    drop = lean_lora.FastDropout(0.25).train()
    y = drop(torch.ones(200_000))
    assert set(y.unique().tolist()) <= {0.0, float(torch.tensor(65536 / (65536 - 16384)))}  # 1/(1 - p) in fp32
    assert abs(float((y > 0).float().mean()) - 0.75) < 0.006
    assert torch.equal(drop.eval()(torch.ones(5)), torch.ones(5))


def test_the_cached_base_weight_is_bitsandbytes_own_dequantization_bit_for_bit():
    exp = LMExperiment(load_recipe(TINY, []))
    layers = [layer for _, layer in linear4bit_layers(exp.model)]
    assert layers
    with precision.base_compute(exp.model, torch.bfloat16):
        for layer in layers[:4]:
            w = lean_lora.frozen_weight(layer, torch.bfloat16)
            assert w.dtype == torch.bfloat16 and w.shape == (layer.out_features, layer.in_features)
            xi = torch.randn(2, 7, layer.in_features)
            with torch.no_grad():
                want = layer(xi)  # bitsandbytes' forward: dequantize to bf16, then F.linear
                got = torch.nn.functional.linear(xi.to(torch.bfloat16), w).to(xi.dtype)
            assert torch.equal(got, want)


def _fit(exp, steps=3):
    return exp.fit(0, exp.data.client_examples(0), exp.initial_state, 1, steps)


def _rel(a, b) -> float:
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    return num / sum(float(v.double().norm() ** 2) for v in b.values()) ** 0.5


ALL_LINEAR = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def test_a_lean_fit_is_the_peft_fit_with_the_same_masks(monkeypatch):
    """Through peft (FastDropout draws the same masks in the same order) and through the lean layers,
    both over the fp32 base: the same Δ up to fp32 rounding; the layers are handed back after the fit."""
    import fedllm.client.lm as lm

    exp = LMExperiment(load_recipe(TINY, ["train.lr=0.01", ALL_LINEAR]))
    monkeypatch.setattr(lm, "fast_dropout", lambda model, on: precision.fast_dropout(model, True))
    monkeypatch.setattr(lm, "lean_lora", lambda model, on: lean_lora.lean_lora(model, True, torch.float32))
    lean = _fit(exp)
    monkeypatch.setattr(lm, "lean_lora", lambda model, on: lean_lora.lean_lora(model, False))
    peft_path = _fit(exp)
    assert max(float(v.abs().max()) for v in lean.delta.values()) > 0
    assert _rel(lean.delta, peft_path.delta) < 1e-4
    assert abs(lean.train_loss - peft_path.train_loss) < 1e-6 * abs(peft_path.train_loss)
    assert all("forward" not in vars(m) for m in exp.model.modules())  # every layer's own forward again


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16/AMX: bf16 training is refused here")
def test_a_lean_bf16_fit_stays_next_to_the_peft_bf16_fit(monkeypatch):
    """The same comparison on the bf16 base. Here a last-bit fp32 difference upstream can flip a bf16
    rounding of a gradient entry (a 2^-8 relative step), so the two agree to bf16's resolution, not fp32's:
    one step's gradients differ by ~5e-4 relative on the tiny model, three AdamW steps' Δ by ~1e-2."""
    import fedllm.client.lm as lm

    exp = LMExperiment(load_recipe(TINY, ["train.precision=bf16", "train.lr=0.01", ALL_LINEAR]))
    lean = _fit(exp)
    monkeypatch.setattr(lm, "lean_lora", lambda model, on: lean_lora.lean_lora(model, False))
    peft_path = _fit(exp)
    assert _rel(lean.delta, peft_path.delta) < 5e-2
    assert abs(lean.train_loss - peft_path.train_loss) < 1e-4 * abs(peft_path.train_loss)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16/AMX")
def test_lean_layers_replay_their_masks_under_gradient_checkpointing():
    plain = LMExperiment(load_recipe(TINY, ["train.precision=bf16", "train.lr=0.01"]))
    ckpt = LMExperiment(load_recipe(TINY, ["train.precision=bf16", "train.lr=0.01", "train.gradient_checkpointing=true"]))
    a, b = _fit(plain), _fit(ckpt)
    assert _rel(b.delta, a.delta) < 1e-5


def test_only_plain_lora_layers_are_taken_over():
    exp = LMExperiment(load_recipe(TINY, []))
    from peft.tuners.lora import LoraLayer

    layers = [m for m in exp.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(lean_lora.eligible(m, "default") for m in layers)
    assert not lean_lora.eligible(layers[0], "other")  # an adapter the layer does not hold
    layers[0].merged_adapters = ["default"]  # a merged layer computes with the merged weight: peft's own path
    try:
        assert not lean_lora.eligible(layers[0], "default")
        with lean_lora.lean_lora(exp.model, True) as installed:
            assert len(installed) == len(layers) - 1 and all(f.weight.dtype == torch.bfloat16 for f in installed)
        with lean_lora.lean_lora(exp.model, False) as installed:
            assert installed == []
    finally:
        layers[0].merged_adapters = []
    dora = LMExperiment(load_recipe(TINY, ["lora.method=dora"]))
    assert not any(lean_lora.eligible(m, "default") for m in dora.model.modules())
