"""Memory and schedule knobs of the language-model client, each through Lightning's own mechanism:
``train.grad_accum`` (accumulate_grad_batches), ``train.gradient_checkpointing`` (transformers'),
``train.precision`` (Lightning's precision plugins, checked against the device) and
``train.schedule`` (the learning rate across rounds by global step)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from fedllm.client.lm import make_loader, round_schedule, warmup_factor
from fedllm.config import RecipeError, load_recipe
from fedllm.experiments.base import round_seed
from fedllm.experiments.lm import LMExperiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
NO_DROPOUT = ["lora.dropout=0.0", "model.quantization=none", "train.warmup_ratio=0.0"]


def _exp(*overrides: str) -> LMExperiment:
    return LMExperiment(load_recipe(TINY, [*NO_DROPOUT, *overrides]))


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _hand_accumulated(exp: LMExperiment, examples, start, rnd: int, steps: int, accum: int):
    """Plain torch: each optimizer step averages ``accum`` consecutive batches' gradients."""
    cfg = exp.recipe.train
    exp.state.set(start)
    loader = make_loader(examples, cfg.batch_size, exp.tokenizer.pad_token_id, round_seed(exp.recipe.seed, rnd))
    params = [p for p in exp.state.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = iter(loader)
    exp.model.train()
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accum):
            (exp.model(**next(batches)).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
    new = exp.state.get()
    return {k: new[k] - start[k] for k in new}


def test_grad_accum_averages_that_many_batches_into_each_optimizer_step():
    exp = _exp("train.grad_accum=2", "train.batch_size=2")
    examples, start = exp.data.client_examples(0), exp.initial_state
    assert len(examples) >= 2 * 2 * 3  # three steps of two batches of two without wrapping around
    upd = exp.fit(0, examples, start, 1, 3)
    want = _hand_accumulated(exp, examples, start, 1, 3, accum=2)
    assert _max_diff(upd.delta, want) < 1e-6 < max(float(v.abs().max()) for v in want.values())
    assert upd.local_steps == 3  # optimizer steps, as FedNova and the guards count them
    one = exp.fit(0, examples, start, 1, 3)  # deterministic
    assert _max_diff(one.delta, upd.delta) == 0.0


def _kept_by_layers(exp: LMExperiment, batch) -> int:
    """Elements autograd saves for backward inside the decoder layers during one training forward."""
    inside, kept = {"on": False}, {"n": 0}
    layers = exp.model.get_base_model().model.layers
    hooks = [m.register_forward_pre_hook(lambda *a: inside.__setitem__("on", True)) for m in layers]
    hooks += [m.register_forward_hook(lambda *a: inside.__setitem__("on", False)) for m in layers]

    def pack(t):
        kept["n"] += t.numel() if inside["on"] else 0
        return t

    exp.model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = exp.model(**batch).loss
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    exp.model.zero_grad(set_to_none=True)
    return kept["n"]


def test_gradient_checkpointing_keeps_fewer_activations_and_changes_no_gradient():
    plain, ckpt = _exp(), _exp("train.gradient_checkpointing=true")
    examples, start = plain.data.client_examples(0), plain.initial_state
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    batch = next(iter(make_loader(examples, 4, plain.tokenizer.pad_token_id, 0)))
    kept_plain, kept_ckpt = _kept_by_layers(plain, batch), _kept_by_layers(ckpt, batch)
    assert kept_plain > 0 and kept_ckpt < 0.2 * kept_plain  # the layers' activations are recomputed instead
    got, want = ckpt.fit(0, examples, start, 1, 2), plain.fit(0, examples, start, 1, 2)
    assert _max_diff(got.delta, want.delta) < 1e-6 < max(float(v.abs().max()) for v in want.delta.values())


def test_precision_is_checked_against_the_device_and_bf16_mixed_trains_on_cpu():
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match=r"^train\.precision: 16-mixed needs a CUDA device"):
            _exp("train.precision=16-mixed")
    full, bf16 = _exp(), _exp("train.precision=bf16-mixed")
    examples, start = full.data.client_examples(0), full.initial_state
    a, b = full.fit(0, examples, start, 1, 2), bf16.fit(0, examples, start, 1, 2)
    assert all(torch.isfinite(v).all() for v in b.delta.values()) and _max_diff(b.delta, a.delta) > 0
    num = math.sqrt(sum(float((a.delta[k] - b.delta[k]).pow(2).sum()) for k in a.delta))
    den = math.sqrt(sum(float(v.pow(2).sum()) for v in a.delta.values()))
    assert num / den < 0.5  # the same training, in lower precision
    with pytest.raises(RecipeError, match="precision"):
        load_recipe(TINY, ["train.precision=8-true"])


def test_schedules_are_the_stated_functions_of_the_global_step():
    assert round_schedule("constant", 3, 4, 1, 5) == 1.0
    assert round_schedule("linear", 1, 4, 0, 5) == 1.0
    assert math.isclose(round_schedule("linear", 3, 4, 0, 5), 0.5)  # g = 10 of 20
    assert math.isclose(round_schedule("cosine", 3, 4, 0, 5), 0.5)
    assert math.isclose(round_schedule("cosine", 2, 4, 0, 5), 0.5 * (1 + math.cos(math.pi / 4)))
    assert round_schedule("linear", 4, 4, 4, 5) == pytest.approx(1 / 20)


class _SeenLr(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_the_client_steps_at_the_scheduled_learning_rate(kind):
    exp = _exp(f"train.schedule={kind}", "federation.rounds=3", "train.warmup_ratio=0.5")
    seen = _SeenLr()
    exp.step_callbacks.append(seen)
    exp.fit(0, exp.data.client_examples(0), exp.initial_state, 2, 4)
    lr = exp.recipe.train.lr
    want = [lr * warmup_factor(s, 2) * round_schedule(kind, 2, 3, s, 4) for s in range(4)]
    assert seen.lrs == pytest.approx(want, rel=1e-12)


def test_vision_and_dp_sgd_refuse_the_knobs_they_do_not_honour():
    vision = ROOT / "recipes" / "studies" / "fmnist_noniid.yaml"
    for knob in ("train.grad_accum=2", "train.gradient_checkpointing=true", "train.precision=bf16-mixed",
                 "train.schedule=cosine"):
        with pytest.raises(RecipeError, match=f"^{knob.split('=')[0]}: implemented for the language-model client"):
            load_recipe(vision, [knob])
    with pytest.raises(RecipeError, match="^train.grad_accum: DP-SGD"):
        load_recipe(TINY, ["privacy.dpsgd=true", "train.grad_accum=2"])
    with pytest.raises(RecipeError, match="train.grad_accum"):
        load_recipe(TINY, ["train.grad_accum=0"])
