import math

import pytest
import torch

from fedllm.algorithms.aggregate import ApplyDelta
from fedllm.algorithms.server_opt import (
    SERVER_UPDATES,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    build_server_update,
)


def seq(seed, n=3, shape=(4,)):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(shape, generator=g)} for _ in range(n)]


def test_fedavgm_without_momentum_equals_apply_delta():
    # Prepare
    theta_a = theta_b = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}
    opt, plain = FedAvgM(lr=1.0, momentum=0.0), ApplyDelta()
    # Execute: three rounds through both
    for delta in seq(0):
        theta_a, theta_b = opt.step(theta_a, delta), plain.step(theta_b, delta)
    # Assert
    assert torch.allclose(theta_a["w"], theta_b["w"], atol=1e-6)


def test_fedavgm_momentum_by_hand():
    # Prepare: β = 0.5, η = 2
    opt, theta = FedAvgM(lr=2.0, momentum=0.5), {"w": torch.tensor([0.0])}
    # Execute: Δ = 1 twice
    theta = opt.step(theta, {"w": torch.tensor([1.0])})  # v = 1,   θ = 0 + 2·1 = 2
    theta = opt.step(theta, {"w": torch.tensor([1.0])})  # v = 1.5, θ = 2 + 2·1.5 = 5
    # Assert
    assert torch.allclose(theta["w"], torch.tensor([5.0]))
    assert torch.allclose(opt.state_dict()["velocity"]["w"], torch.tensor([1.5]))


def test_fedadam_first_step_by_hand():
    # Prepare: β1 = 0.5, β2 = 0.75, τ = 0.5, η = 0.3, v₋₁ = 0
    opt = FedAdam(lr=0.3, beta1=0.5, beta2=0.75, tau=0.5, initial_accumulator=0.0)
    # Execute
    new = opt.step({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, -1.0])})
    # Assert: m = 0.5Δ = [1, −0.5]; v = 0.25Δ² = [1, 0.25]; √v = [1, 0.5]
    #         step = 0.3·m/(√v + 0.5) = 0.3·[1/1.5, −0.5/1.0] = [0.2, −0.15]
    assert torch.allclose(new["w"], torch.tensor([1.2, 0.85]), atol=1e-6)
    assert torch.allclose(opt.state_dict()["m"]["w"], torch.tensor([1.0, -0.5]))
    assert torch.allclose(opt.state_dict()["v"]["w"], torch.tensor([1.0, 0.25]))


def test_fedadam_default_accumulator_starts_at_tau_squared():
    # Prepare: the paper's v₋₁ = τ² with τ = 0.1, β1 = 0.9, β2 = 0.99, η = 0.1, Δ = 2
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    # Execute
    new = opt.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])})
    # Assert: m = 0.2; v = 0.99·0.01 + 0.01·4 = 0.0499; step = 0.1·0.2/(√0.0499 + 0.1)
    expected = 0.1 * 0.2 / (math.sqrt(0.0499) + 0.1)
    assert new["w"].item() == pytest.approx(expected, rel=1e-5)


def test_fedyogi_second_moment_by_hand():
    # Prepare: β2 = 0.75, v₋₁ = 0
    yogi = FedYogi(lr=0.1, beta1=0.5, beta2=0.75, tau=0.5, initial_accumulator=0.0)
    adam = FedAdam(lr=0.1, beta1=0.5, beta2=0.75, tau=0.5, initial_accumulator=0.0)
    theta = {"w": torch.tensor([0.0])}
    # Execute: Δ = 2 then Δ = 4
    first_y = yogi.step(theta, {"w": torch.tensor([2.0])})
    first_a = adam.step(theta, {"w": torch.tensor([2.0])})
    yogi.step(first_y, {"w": torch.tensor([4.0])})
    adam.step(first_a, {"w": torch.tensor([4.0])})
    # Assert: step 1 both v = 0.25·4 = 1 (same update);
    #         step 2 Yogi v = 1 − 0.25·16·sign(1 − 16) = 5, Adam v = 0.75·1 + 0.25·16 = 4.75
    assert torch.allclose(first_y["w"], first_a["w"])
    assert yogi.state_dict()["v"]["w"].item() == pytest.approx(5.0)
    assert adam.state_dict()["v"]["w"].item() == pytest.approx(4.75)


def test_fedadagrad_accumulates_squares():
    # Prepare
    opt, theta = FedAdagrad(lr=0.1, beta1=0.0, tau=1e-3, initial_accumulator=0.0), {"w": torch.tensor([0.0])}
    # Execute
    theta = opt.step(theta, {"w": torch.tensor([2.0])})
    theta = opt.step(theta, {"w": torch.tensor([1.0])})
    # Assert: v = 4 + 1 = 5; with β1 = 0, θ = 0.1·2/(2 + τ) + 0.1·1/(√5 + τ)
    assert opt.state_dict()["v"]["w"].item() == pytest.approx(5.0)
    assert opt.state_dict()["steps"] == 2
    assert theta["w"].item() == pytest.approx(0.2 / 2.001 + 0.1 / (math.sqrt(5) + 1e-3), rel=1e-5)


@pytest.mark.parametrize("make", [lambda: FedAvgM(lr=0.7, momentum=0.8), lambda: FedAdam(lr=0.1),
                                  lambda: FedYogi(lr=0.1), lambda: FedAdagrad(lr=0.1)])
def test_state_dict_round_trip_resumes_exactly(make):
    # Prepare: two rounds, then checkpoint
    deltas = seq(1, n=4)
    opt, theta = make(), {"w": torch.zeros(4)}
    for d in deltas[:2]:
        theta = opt.step(theta, d)
    saved = opt.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    # Execute: both continue for two more rounds (the saved copy must not alias the live state)
    theta_a = theta_b = theta
    for d in deltas[2:]:
        theta_a, theta_b = opt.step(theta_a, d), resumed.step(theta_b, d)
    # Assert
    assert torch.equal(theta_a["w"], theta_b["w"])
    assert not torch.equal(theta_a["w"], theta["w"])


def test_non_floating_entries_are_added_plainly():
    # Prepare: a BatchNorm-style counter next to a weight
    theta = {"w": torch.tensor([1.0]), "n": torch.tensor(3)}
    # Execute
    new = FedAdam(lr=0.1).step(theta, {"w": torch.tensor([0.5]), "n": torch.tensor(2)})
    # Assert
    assert new["n"].item() == 5 and new["n"].dtype == torch.int64


def test_build_server_update_names_and_errors():
    # Execute / Assert: every registered name builds; "none" is ApplyDelta
    assert set(SERVER_UPDATES) == {"none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    assert isinstance(build_server_update("none"), ApplyDelta)
    opt = build_server_update("fedadam", lr=0.05, tau=1e-2)
    assert isinstance(opt, FedAdam) and opt.lr == 0.05 and opt.tau == 1e-2
    with pytest.raises(ValueError, match="fedyogi"):
        build_server_update("adam")
    with pytest.raises(ValueError, match="bad options"):
        build_server_update("fedavgm", beta1=0.9)


@pytest.mark.parametrize("kw", [{"lr": 0.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}])
def test_bad_hyperparameters_are_rejected(kw):
    with pytest.raises(ValueError):
        FedAdam(**kw)


def test_key_mismatch_is_rejected():
    with pytest.raises(ValueError, match="missing"):
        FedAvgM().step({"w": torch.zeros(1)}, {"v": torch.zeros(1)})
