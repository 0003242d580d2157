import pytest
import torch

from fedllm.algorithms.attacks import Attack, attack_update, attackers, flip_labels
from fedllm.types import ClientUpdate

UPD = ClientUpdate(client_id=3, delta={"w": torch.tensor([1.0, -2.0])}, num_examples=8, local_steps=4,
                   train_loss=0.5, bytes_up=100)


def test_attackers_are_a_fixed_seeded_subset():
    # Prepare
    attack = Attack("sign_flip", fraction=0.2, seed=4)
    # Execute
    first = attackers(range(10), attack)
    # Assert: ⌊0.2·10⌋ = 2 clients, the same whatever the call or the id order
    assert len(first) == 2 and first <= set(range(10))
    assert attackers(list(reversed(range(10))), attack) == first
    assert attackers(range(10), Attack("scale", fraction=0.0)) == set()


def test_sign_flip_and_scale_by_hand():
    # Execute
    flipped = attack_update(UPD, Attack("sign_flip", fraction=1.0, scale=10.0))
    scaled = attack_update(UPD, Attack("scale", fraction=1.0, scale=3.0))
    # Assert: −10·[1, −2] and 3·[1, −2]; metadata untouched
    assert torch.equal(flipped.delta["w"], torch.tensor([-10.0, 20.0]))
    assert torch.equal(scaled.delta["w"], torch.tensor([3.0, -6.0]))
    assert (flipped.client_id, flipped.num_examples, flipped.local_steps) == (3, 8, 4)
    assert torch.equal(UPD.delta["w"], torch.tensor([1.0, -2.0]))  # the honest update is not modified


def test_noise_is_seeded_per_round_and_client():
    # Prepare
    attack = Attack("noise", fraction=1.0, noise_std=2.0, seed=1)
    big = ClientUpdate(0, {"w": torch.zeros(20000)}, 1, 1, 0.0)
    # Execute
    a, b = attack_update(UPD, attack, round=2), attack_update(UPD, attack, round=2)
    c = attack_update(UPD, attack, round=3)
    noise = attack_update(big, attack).delta["w"]
    # Assert
    assert torch.equal(a.delta["w"], b.delta["w"]) and not torch.equal(a.delta["w"], c.delta["w"])
    assert noise.std().item() == pytest.approx(2.0, rel=0.05)


def test_label_flip_is_a_data_transform():
    # Execute / Assert: updates pass unchanged; labels map y -> C − 1 − y
    assert attack_update(UPD, Attack("label_flip", fraction=0.5)) is UPD
    assert torch.equal(flip_labels(torch.tensor([0, 1, 9]), 10), torch.tensor([9, 8, 0]))
    with pytest.raises(ValueError, match="labels"):
        flip_labels(torch.tensor([10]), 10)


@pytest.mark.parametrize("kw", [{"kind": "gaussian", "fraction": 0.1}, {"kind": "scale", "fraction": 1.5},
                                {"kind": "noise", "fraction": 0.1, "noise_std": -1.0}])
def test_bad_attacks_are_rejected(kw):
    with pytest.raises(ValueError):
        Attack(**kw)
