"""Masks: magnitude pruning, rewinding, random masks, SNIP, and the mask wire format."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedllm.algorithms.prune import (
    TAG_BITMAP,
    TAG_VARINT,
    apply_mask,
    decode_mask,
    encode_mask,
    full_mask,
    magnitude_prune,
    masked_update_bytes,
    masked_values,
    prunable_keys,
    random_mask,
    remaining_rate,
    rewind,
    snip_mask,
    snip_scores,
    unmask_values,
)
from fedllm.types import serialized_bytes


def tiny_state() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.tensor([[0.5, -0.1], [0.3, -0.9]]),
        "fc.bias": torch.tensor([0.01, -0.02]),
        "out.weight": torch.tensor([[0.2, -0.05, 0.7]]),
        "out.bias": torch.tensor([0.0]),
    }


def seeded_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": torch.randn(30, 40, generator=g),
        "fc.bias": torch.randn(30, generator=g),
        "norm.weight": torch.randn(30, generator=g),
    }


def test_only_weight_matrices_and_kernels_are_prunable():
    assert prunable_keys(seeded_state()) == ["conv.weight", "fc.weight"]
    assert set(full_mask(seeded_state())) == {"conv.weight", "fc.weight"}


def test_layer_magnitude_prune_hand_example():
    # Prepare
    state = tiny_state()
    mask = full_mask(state)

    # Execute: half of each layer's survivors; then half again
    first = magnitude_prune(state, mask, 0.5)
    second = magnitude_prune(state, first, 0.5)

    # Assert: fc drops |−0.1|, |0.3|; out drops round(1.5) = 2 of 3: |−0.05|, |0.2|
    assert first["fc.weight"].tolist() == [[True, False], [False, True]]
    assert first["out.weight"].tolist() == [[False, False, True]]
    assert second["fc.weight"].tolist() == [[False, False], [False, True]]  # |0.5| < |−0.9|
    assert second["out.weight"].tolist() == [[False, False, True]]  # round(0.5) = 0 removed
    assert "fc.bias" not in first and "out.bias" not in first


def test_layer_prune_removes_round_rate_of_survivors_and_the_smallest():
    # Prepare: start from a random 70% mask
    state = seeded_state()
    mask = random_mask(state, 0.7, seed=1)

    # Execute
    pruned = magnitude_prune(state, mask, 0.3)

    # Assert
    for k, m in mask.items():
        surviving = int(m.sum())
        assert surviving - int(pruned[k].sum()) == round(0.3 * surviving)
        assert not bool((pruned[k] & ~m).any())  # nothing comes back
        removed = state[k][m & ~pruned[k]].abs()
        kept = state[k][pruned[k]].abs()
        assert float(removed.max()) <= float(kept.min())


def test_global_prune_ranks_across_layers():
    # Prepare
    state = tiny_state()

    # Execute: 3 of the 7 weights go: |0.05|, |0.1|, |0.2|
    mask = magnitude_prune(state, full_mask(state), 3 / 7, scope="global")

    # Assert
    assert mask["fc.weight"].tolist() == [[True, False], [True, True]]
    assert mask["out.weight"].tolist() == [[False, False, True]]
    assert remaining_rate(mask) == pytest.approx(4 / 7)


def test_bad_prune_arguments_are_rejected():
    state = tiny_state()
    with pytest.raises(ValueError, match="prune rate"):
        magnitude_prune(state, full_mask(state), 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(state, full_mask(state), 0.1, scope="row")
    with pytest.raises(ValueError, match="shape"):
        magnitude_prune(state, {"fc.weight": torch.ones(3, dtype=torch.bool)}, 0.1)


def test_apply_mask_zeros_pruned_entries_only():
    # Prepare
    state = tiny_state()
    mask = {"fc.weight": torch.tensor([[True, False], [False, True]])}

    # Execute
    out = apply_mask(state, mask)

    # Assert
    assert torch.equal(out["fc.weight"], torch.tensor([[0.5, 0.0], [0.0, -0.9]]))
    assert torch.equal(out["fc.bias"], state["fc.bias"])
    assert torch.equal(out["out.weight"], state["out.weight"])
    assert state["fc.weight"][0, 1] == -0.1  # input untouched


def test_rewind_restores_initial_values_of_survivors():
    # Prepare
    init = seeded_state(0)
    trained = {k: v + 1.0 for k, v in init.items()}
    mask = magnitude_prune(trained, full_mask(trained), 0.5)

    # Execute
    rewound = rewind(init, mask)

    # Assert
    for k, v in rewound.items():
        if k in mask:
            assert torch.equal(v[mask[k]], init[k][mask[k]])
            assert bool((v[~mask[k]] == 0).all())
        else:
            assert torch.equal(v, init[k])


def test_random_mask_matches_remaining_rate_per_layer():
    # Prepare
    state = seeded_state()

    # Execute
    mask = random_mask(state, 0.25, seed=7)

    # Assert
    for k, m in mask.items():
        assert int(m.sum()) == round(0.25 * state[k].numel())
    assert torch.equal(mask["fc.weight"], random_mask(state, 0.25, seed=7)["fc.weight"])
    assert not torch.equal(mask["fc.weight"], random_mask(state, 0.25, seed=8)["fc.weight"])


def test_snip_scores_are_abs_grad_times_weight_hand_example():
    # Prepare: out = w·x = 3 − 2 + 1 + 0.2 = 2.2; L = out²/2; ∂L/∂w = 2.2·x
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -4.0, 0.5, 2.0]]))
    x, target = torch.tensor([[3.0, 0.5, 2.0, 0.1]]), torch.zeros(1, 1)

    # Execute
    scores = snip_scores(model, x, target, lambda out, t: 0.5 * ((out - t) ** 2).sum())
    mask = snip_mask(scores, keep=0.5)

    # Assert: |g ⊙ w| = [6.6, 4.4, 2.2, 0.44]; magnitude alone would keep −4 and 2 instead
    assert torch.allclose(scores["weight"], torch.tensor([[6.6, 4.4, 2.2, 0.44]]))
    assert mask["weight"].tolist() == [[True, True, False, False]]
    assert model.weight.grad is None


def test_snip_mask_keeps_global_top_kappa():
    scores = {"a": torch.tensor([[1.0, 5.0]]), "b": torch.tensor([[3.0], [0.5]])}
    mask = snip_mask(scores, keep=0.5)
    assert mask["a"].tolist() == [[False, True]]
    assert mask["b"].tolist() == [[True], [False]]


def test_varint_encoding_hand_example():
    # Prepare: survivors at 0, 1, 200 of 1000 -> gaps 0, 0, 198; 198 = 0b1_1000110 -> 0xC6 0x01
    flat = torch.zeros(1000, dtype=torch.bool)
    flat[[0, 1, 200]] = True
    mask = {"w": flat.view(10, 100)}

    # Execute
    data = encode_mask(mask)

    # Assert
    assert data == bytes([TAG_VARINT, 0x00, 0x00, 0xC6, 0x01])
    assert torch.equal(decode_mask(data, {"w": (10, 100)})["w"], mask["w"])


@pytest.mark.parametrize("keep, tag", [(0.5, TAG_BITMAP), (0.01, TAG_VARINT)])
def test_mask_round_trip_picks_the_smaller_encoding(keep, tag):
    # Prepare
    state = seeded_state()
    mask = random_mask(state, keep, seed=3)
    shapes = {k: tuple(v.shape) for k, v in mask.items()}
    n = sum(v.numel() for v in mask.values())

    # Execute
    data = encode_mask(mask)
    back = decode_mask(data, shapes)

    # Assert
    assert data[0] == tag
    assert len(data) <= 1 + math.ceil(n / 8)
    assert back.keys() == mask.keys() and all(torch.equal(back[k], mask[k]) for k in mask)


def test_decode_mask_rejects_bad_payloads():
    with pytest.raises(ValueError, match="unknown mask encoding tag 7"):
        decode_mask(b"\x07", {"w": (2, 2)})
    with pytest.raises(ValueError, match="bitmap mask has 2 bytes, expected 1"):
        decode_mask(b"\x00\xff\xff", {"w": (2, 2)})
    with pytest.raises(ValueError, match="out of range"):
        decode_mask(bytes([TAG_VARINT, 9]), {"w": (2, 2)})


def test_masked_values_round_trip_and_real_sizes():
    # Prepare
    state = seeded_state()
    mask = random_mask(state, 0.1, seed=0)
    sparse = apply_mask(state, mask)

    # Execute
    values = masked_values(sparse, mask)
    back = unmask_values(values, mask, state)
    size = masked_update_bytes(sparse, mask)

    # Assert
    assert values["fc.weight"].shape == (round(0.1 * 1200),)
    assert torch.equal(values["fc.bias"], state["fc.bias"])
    assert all(torch.equal(back[k], sparse[k]) for k in state)
    assert size == serialized_bytes(values) + len(encode_mask(mask))
    assert size < serialized_bytes(state) / 3
