import pytest
import torch

from fedllm.algorithms.aggregate import mean_delta
from fedllm.algorithms.drift import (
    FedNovaAggregator,
    ScaffoldState,
    fednova_aggregate,
    prox_gradient,
    prox_penalty,
    scaffold_client_control,
    scaffold_correction,
)
from fedllm.types import ClientUpdate, serialized_bytes


def upd(cid, values, steps=1, n=1):
    return ClientUpdate(client_id=cid, delta={"w": torch.tensor(values)}, num_examples=n, local_steps=steps,
                        train_loss=0.0)


# ---------------------------------------------------------------------------- FedProx


def test_prox_by_hand():
    # Prepare: μ = 0.5, w − w_g = [2, 0]
    w, g = {"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}
    # Execute
    grad, pen = prox_gradient(w, g, 0.5), prox_penalty(w, g, 0.5)
    # Assert: gradient μ(w − w_g) = [1, 0]; penalty μ/2·‖w − w_g‖² = 0.25·4 = 1
    assert torch.allclose(grad["w"], torch.tensor([1.0, 0.0]))
    assert pen.item() == pytest.approx(1.0)


def test_prox_gradient_matches_autograd_of_penalty():
    # Prepare: two seeded parameter tensors
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=gen).requires_grad_(),
              "b": torch.randn(5, generator=gen).requires_grad_()}
    anchors = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen),
               "extra": torch.zeros(1)}
    # Execute
    prox_penalty(params, anchors, mu=0.3).backward()
    analytic = prox_gradient(params, anchors, mu=0.3)
    # Assert
    for k, p in params.items():
        assert torch.allclose(p.grad, analytic[k], atol=1e-6)


def test_prox_rejects_missing_anchor_and_negative_mu():
    with pytest.raises(ValueError, match="lacks"):
        prox_gradient({"w": torch.zeros(1)}, {}, 0.1)
    with pytest.raises(ValueError, match="mu"):
        prox_penalty({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, -1.0)


# ---------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_zero_controls_reduce_to_fedavg():
    # Prepare: two clients with quadratic losses ½‖w − tᵢ‖², fresh (zero) controls
    state = ScaffoldState({"w": torch.zeros(2)})
    w_g, lr = torch.tensor([1.0, -1.0]), 0.1
    targets = [torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 2.0])]
    # Execute: one local SGD step each, with and without the correction c − cᵢ
    corrected, plain = [], []
    for cid, t in enumerate(targets):
        corr = scaffold_correction(state.c, state.client_control(cid))
        grad = w_g - t
        corrected.append(upd(cid, (-lr * (grad + corr["w"])).tolist()))
        plain.append(upd(cid, (-lr * grad).tolist()))
        assert torch.equal(corr["w"], torch.zeros(2))
    # Assert
    assert torch.equal(mean_delta(corrected)["w"], mean_delta(plain)["w"])


def test_scaffold_client_control_by_hand():
    # Prepare: cᵢ = 1, c = 0.5, Δᵢ = −0.6 after K = 3 steps of η = 0.1
    c_i, c, delta = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, {"w": torch.tensor([-0.6])}
    # Execute
    new = scaffold_client_control(c_i, c, delta, local_steps=3, lr=0.1)
    # Assert: cᵢ⁺ = 1 − 0.5 + 0.6/(3·0.1) = 2.5
    assert torch.allclose(new["w"], torch.tensor([2.5]))


def test_scaffold_server_update_by_hand():
    # Prepare: N = 4 clients, all controls zero
    state = ScaffoldState({"w": torch.zeros(1)})
    # Execute: clients 0 and 2 report cᵢ⁺ = 2 and −1
    state.server_update([0, 2], [{"w": torch.tensor([2.0])}, {"w": torch.tensor([-1.0])}], 4)
    # Assert: c = 0 + (2/4)·mean(2, −1) = 0.25; the controls are stored as uploaded
    assert torch.allclose(state.c["w"], torch.tensor([0.25]))
    assert torch.equal(state.client_control(0)["w"], torch.tensor([2.0]))
    assert torch.equal(state.client_control(2)["w"], torch.tensor([-1.0]))
    assert serialized_bytes(state.client_control(0)) > 0
    # Execute: client 0 again, now cᵢ⁺ = 3 (Δc = 1), its controls as a generator (streamed)
    state.server_update([0], (c for c in [{"w": torch.tensor([3.0])}]), 4)
    # Assert: c = 0.25 + (1/4)·1 = 0.5; client 1 never reported, so its control is still zero
    assert torch.allclose(state.c["w"], torch.tensor([0.5]))
    assert torch.equal(state.client_control(1)["w"], torch.zeros(1))
    assert torch.equal(state.client_control(0)["w"], torch.tensor([3.0]))


def test_scaffold_state_round_trip():
    # Prepare
    state = ScaffoldState({"w": torch.zeros(2)})
    state.server_update([1, 3], [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, -4.0])}], 5)
    # Execute
    saved = state.state_dict()
    restored = ScaffoldState({"w": torch.zeros(2)})
    restored.load_state_dict(saved)
    state.server_update([1], [{"w": torch.tensor([9.0, 9.0])}], 5)  # must not leak into ``saved``
    # Assert
    assert torch.allclose(restored.c["w"], torch.tensor([0.2, -0.4]))
    assert torch.equal(restored.client_control(1)["w"], torch.tensor([1.0, 2.0]))
    assert sorted(restored.clients) == [1, 3]


def test_scaffold_rejects_bad_input():
    state = ScaffoldState({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="unique"):
        state.server_update([0, 0], [{"w": torch.zeros(1)}] * 2, 4)
    with pytest.raises(ValueError, match="num_clients_total"):
        state.server_update([0, 1], [{"w": torch.zeros(1)}] * 2, 1)
    with pytest.raises(ValueError, match="local_steps"):
        scaffold_client_control({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 0, 0.1)


# ---------------------------------------------------------------------------- FedNova


@pytest.mark.parametrize("weighted", [False, True])
def test_fednova_with_equal_steps_is_the_mean(weighted):
    # Prepare: everyone ran τ = 5 steps
    ups = [upd(0, [1.0, 2.0], 5, 1), upd(1, [3.0, 0.0], 5, 2), upd(2, [-1.0, 4.0], 5, 7)]
    # Execute / Assert
    assert torch.allclose(fednova_aggregate(ups, weighted)["w"], mean_delta(ups, weighted)["w"], atol=1e-6)


def test_fednova_normalizes_by_local_steps_by_hand():
    # Prepare: Δ₁ = 2 after τ₁ = 1, Δ₂ = 4 after τ₂ = 4, uniform p = ½
    ups = [upd(0, [2.0], 1), upd(1, [4.0], 4)]
    # Execute
    delta = FedNovaAggregator(weighted=False)(ups)
    # Assert: τ_eff = 2.5; Σ pᵢΔᵢ/τᵢ = 1 + 0.5 = 1.5; Δ = 3.75 (plain mean would be 3)
    assert delta["w"].item() == pytest.approx(3.75)


def test_fednova_rejects_zero_steps():
    with pytest.raises(ValueError, match="local_steps=0"):
        fednova_aggregate([upd(0, [1.0], 0)])
