"""HP-FL's lottery-ticket search on real Fashion-MNIST images, and the masked vision client."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from fedllm.algorithms.hpfl import HPFLConfig, encoder_of, lottery_ticket, pretrain_dae
from fedllm.algorithms.prune import random_mask, remaining_rate
from fedllm.client.vision import VisionClassifier, VisionTrainConfig, evaluate_classifier, vision_loader
from fedllm.data.vision import FILES, load_fashion_mnist
from fedllm.models.vision import build_vision_model

needs_real = pytest.mark.skipif(
    not (Path("/usr/share/datasets/fashion-mnist") / FILES["train_x"]).is_file(),
    reason="dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_fashion_mnist().train_x[:2000]


@needs_real
def test_lottery_ticket_reaches_the_requested_remaining_rate(images):
    # Prepare
    torch.manual_seed(0)
    model = build_vision_model("lenet300100")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HPFLConfig(prune_rate=0.2, iterations=2, dae_epochs=1, batch_size=100, seed=0)
    rng_before = torch.random.get_rng_state()

    # Execute
    init_state, mask = lottery_ticket(model, images, cfg)

    # Assert: every layer's size makes 0.8² exact, so the rate is exactly 0.64
    assert remaining_rate(mask) == pytest.approx(cfg.target_remaining(), abs=1e-12)
    assert set(mask) == {"body.1.weight", "body.3.weight", "head.weight"}
    for k, v in init_state.items():
        if k in mask:
            assert bool((v[~mask[k]] == 0).all())
            assert torch.equal(v[mask[k]], theta0[k][mask[k]])  # rewound to θ₀
        else:
            assert torch.equal(v, theta0[k])  # biases never pruned, back at θ₀
    assert all(torch.equal(model.state_dict()[k], init_state[k]) for k in init_state)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no global RNG side effect


@needs_real
def test_dae_pretraining_lowers_reconstruction_error_and_respects_the_mask(images):
    # Prepare
    torch.manual_seed(1)
    model = build_vision_model("lenet300100")
    body = encoder_of(model)
    mask = random_mask(dict(body.named_parameters()), 0.5, seed=0)
    cfg = HPFLConfig(dae_epochs=2, batch_size=100)

    # Execute
    losses = pretrain_dae(body, images[:1000], cfg, mask=mask)

    # Assert
    assert len(losses) == 2 and losses[1] < losses[0]
    params = dict(body.named_parameters())
    assert all(bool((params[k][~m] == 0).all()) for k, m in mask.items())


@needs_real
def test_rewind_to_none_keeps_the_pretrained_survivors(images):
    torch.manual_seed(0)
    model = build_vision_model("lenet300100")
    theta0 = model.state_dict()["body.1.weight"].clone()
    state, mask = lottery_ticket(model, images[:500], HPFLConfig(iterations=1, rewind_to="none"))
    survivors = mask["body.1.weight"]
    assert not torch.equal(state["body.1.weight"][survivors], theta0[survivors])
    assert remaining_rate(mask) == pytest.approx(0.8, abs=1e-3)


def test_hpfl_config_and_model_checks():
    assert HPFLConfig(prune_rate=0.5, iterations=3).target_remaining() == 0.125
    with pytest.raises(ValueError, match="prune_rate"):
        HPFLConfig(prune_rate=1.0)
    with pytest.raises(ValueError, match="rewind_to"):
        HPFLConfig(rewind_to="late")
    with pytest.raises(ValueError, match="has no `.body`"):
        encoder_of(nn.Linear(3, 2))


def test_vision_classifier_keeps_pruned_weights_at_zero():
    # Prepare: momentum and weight decay would move pruned weights if the mask were not re-applied
    torch.manual_seed(0)
    model = build_vision_model("cnn")
    mask = random_mask(model.state_dict(), 0.3, seed=0)
    module = VisionClassifier(model, VisionTrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3,
                                                       batch_size=16), mask=mask)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")

    # Execute
    trainer.fit(module, vision_loader(x, y, batch_size=16, seed=0))

    # Assert
    state = model.state_dict()
    assert len(module.losses) == 4
    for k, m in mask.items():
        assert bool((state[k][~m] == 0).all())
        assert not torch.equal(state[k][m], before[k][m])  # survivors did train
    assert not torch.equal(state["head.bias"], before["head.bias"])


def test_vision_classifier_rejects_a_mask_for_another_model():
    with pytest.raises(ValueError, match="not in the state dict"):
        VisionClassifier(build_vision_model("cnn"), mask={"fc9.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_evaluate_classifier_hand_example():
    # Prepare: logits [0, ln 3] for every input -> p(class 1) = 3/4
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(x), 2)

    model = Fixed().train()
    x, y = torch.zeros(4, 1), torch.tensor([1, 1, 1, 0])

    # Execute
    loss, acc = evaluate_classifier(model, x, y, batch_size=3)

    # Assert: (3·ln(4/3) + ln 4) / 4
    expected = (3 * torch.log(torch.tensor(4 / 3)) + torch.log(torch.tensor(4.0))) / 4
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert acc == 0.75
    assert model.training
