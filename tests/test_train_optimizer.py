"""``train.optimizer`` is what the clients build: AdamW or SGD (momentum, weight decay) for both tasks.

``auto`` (the default) keeps each task's historical optimizer: AdamW for LoRA language models, SGD
for the vision baselines. Each optimizer's steps through the Lightning client equal a hand-written
torch loop on the same batch (for the LM module with its linear warm-up).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedllm.client.fit import fit_module
from fedllm.client.lm import CausalLMModule
from fedllm.client.vision import VisionClassifier, VisionTrainConfig, fit_classifier, vision_loader
from fedllm.config import Recipe, RecipeError, TrainConfig, build, load_recipe
from fedllm.models.state import TrainableState

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class SeenOptimizer(L.Callback):
    """Records the optimizer the trainer ran (class and its hyper-parameters)."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]


class ToyLM(nn.Module):
    """A stand-in for the peft model: ``model(**batch).loss`` like a Hugging Face causal LM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 4)

    def forward(self, x, y):
        return SimpleNamespace(loss=F.cross_entropy(self.lin(x), y))


def _batch(n: int = 16, features: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _hand_steps(model: nn.Module, loss_fn, opt: torch.optim.Optimizer, lrs: list[float]) -> None:
    """Plain torch: one full-batch step per entry of ``lrs`` (the learning rate of that step)."""
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()


# ----------------------------------------------------------------------------- the recipe field


def test_auto_is_adamw_for_language_models_and_sgd_for_vision():
    # Prepare / Execute
    auto, sgd, adamw = TrainConfig(), TrainConfig(optimizer="sgd"), TrainConfig(optimizer="adamw")
    # Assert
    assert auto.optimizer == "auto"
    assert (auto.optimizer_for("lm"), auto.optimizer_for("vision")) == ("adamw", "sgd")
    assert (sgd.optimizer_for("lm"), sgd.optimizer_for("vision")) == ("sgd", "sgd")
    assert (adamw.optimizer_for("lm"), adamw.optimizer_for("vision")) == ("adamw", "adamw")


def test_an_unknown_optimizer_names_the_field():
    with pytest.raises(RecipeError, match="train.optimizer"):
        load_recipe(ROOT / "recipes" / "tiny.yaml", ["train.optimizer=adam"])


# ----------------------------------------------------------------------------- LM client


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lm_steps_equal_a_hand_written_torch_loop(name):
    # Prepare: 2 steps with warm-up over the first 2 of 4 steps (lr x 0.5, then x 1.0), momentum, decay
    x, y = _batch()
    train = TrainConfig(optimizer=name, lr=0.05, momentum=0.9, weight_decay=0.01, warmup_ratio=0.5)
    model, ref = ToyLM(), ToyLM()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False,
                        collate_fn=lambda b: {"x": torch.stack([r[0] for r in b]), "y": torch.stack([r[1] for r in b])})
    module = CausalLMModule(model, TrainableState(model, adapter_name=None), train, total_steps=4)
    seen = SeenOptimizer()
    ref_opt = (torch.optim.SGD(ref.parameters(), lr=train.lr, momentum=0.9, weight_decay=0.01) if name == "sgd"
               else torch.optim.AdamW(ref.parameters(), lr=train.lr, weight_decay=0.01))
    # Execute
    fitted = fit_module(module, loader, 2, [seen], "cpu")
    _hand_steps(ref, lambda m: m(x, y).loss, ref_opt, [0.5 * train.lr, train.lr])
    # Assert
    assert type(seen.optimizer) is CLASSES[name] and len(fitted.losses) == 2
    group = seen.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and (name != "sgd" or group["momentum"] == 0.9)
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def tiny_lm():
    from fedllm.experiments.lm import LMExperiment

    return LMExperiment(load_recipe(ROOT / "recipes" / "tiny.yaml", ["train.optimizer=sgd", "train.momentum=0.9"]))


@pytest.mark.parametrize("name", ["sgd", "adamw", "auto"])
def test_an_lm_fit_builds_the_named_optimizer(tiny_lm, name):
    # Prepare: one experiment (one 4-bit base), its recipe's optimizer switched per case
    exp = copy.copy(tiny_lm)
    exp.recipe = dataclasses.replace(tiny_lm.recipe, train=dataclasses.replace(tiny_lm.recipe.train, optimizer=name))
    seen = SeenOptimizer()
    exp.step_callbacks = [seen]
    # Execute
    update = exp.fit(0, exp.data.client_examples(0), exp.initial_state, 1, 1)
    # Assert
    assert type(seen.optimizer) is (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
    assert update.local_steps == 1 and any(bool(v.ne(0).any()) for v in update.delta.values())
    if name == "sgd":
        assert seen.optimizer.param_groups[0]["momentum"] == 0.9


# ----------------------------------------------------------------------------- vision client


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_vision_steps_equal_a_hand_written_torch_loop(name):
    # Prepare
    x, y = _batch(features=8, classes=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    ref = copy.deepcopy(model)
    cfg = VisionTrainConfig(lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=len(x), optimizer=name)
    seen = SeenOptimizer()
    ref_opt = (torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01) if name == "sgd"
               else torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.01))
    # Execute
    fit_classifier(VisionClassifier(model, cfg), vision_loader(x, y, len(x), shuffle=False), 2, [seen])
    _hand_steps(ref, lambda m: F.cross_entropy(m(x), y), ref_opt, [0.05, 0.05])
    # Assert
    assert type(seen.optimizer) is CLASSES[name]
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=k)


def test_vision_config_rejects_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        VisionTrainConfig(optimizer="adam")


@pytest.mark.skipif(not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("name", ["adamw", "sgd", "auto"])
def test_a_vision_fit_builds_the_named_optimizer(name):
    # Prepare
    from fedllm.experiments import make_experiment

    exp = make_experiment(build(Recipe, {
        "name": "optimizer_test", "seed": 0, "model": {"preset": "lenet300100"},
        "data": {"builtin": "fashion_mnist", "max_examples": 200, "eval_size": 100},
        "partition": {"method": "iid", "num_clients": 2},
        "train": {"optimizer": name, "lr": 0.01, "momentum": 0.5, "batch_size": 20, "local_steps": 2,
                  "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_ratio": 0.0},
        "checkpoint": {"enabled": False}, "output": {"save_adapter": False, "plots": False}}))
    seen = SeenOptimizer()
    exp.step_callbacks.append(seen)
    # Execute
    update = exp.fit(0, exp.data.client_examples(0), exp.initial_state, 1, 2)
    # Assert
    assert type(seen.optimizer) is (torch.optim.AdamW if name == "adamw" else torch.optim.SGD)
    assert update.local_steps == 2 and all(torch.isfinite(v).all() for v in update.delta.values())
