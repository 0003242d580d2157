import pytest
import torch

from fedllm.algorithms.aggregate import mean_delta
from fedllm.algorithms.lora_agg import aggregation_error, lora_aggregate, lora_pairs
from fedllm.types import ClientUpdate

A, B, HEAD = "model.layers.0.q_proj.lora_A.weight", "model.layers.0.q_proj.lora_B.weight", "head.weight"
OUT, IN, R, K = 6, 5, 2, 3


def make(seed, shared_a=False, weights=None):
    """A global LoRA state (B out×r, A r×in, plus a non-LoRA key) and K client deltas."""
    g = torch.Generator().manual_seed(seed)
    glob = {A: torch.randn(R, IN, generator=g), B: torch.randn(OUT, R, generator=g),
            HEAD: torch.randn(3, generator=g)}
    ups = []
    for i in range(K):
        d_a = torch.zeros(R, IN) if shared_a else torch.randn(R, IN, generator=g)
        delta = {A: d_a, B: torch.randn(OUT, R, generator=g), HEAD: torch.randn(3, generator=g)}
        n = (weights or [1] * K)[i]
        ups.append(ClientUpdate(i, delta, num_examples=n, local_steps=1, train_loss=0.0))
    return glob, ups


def dense_mean_product(glob, ups, w):
    return sum(wi * product_after(glob, u.delta) for wi, u in zip(w, ups))


def product_after(glob, delta):
    return (glob[B] + delta[B]).double() @ (glob[A] + delta[A]).double()


def test_svd_is_exact_when_the_mean_product_has_rank_r():
    # Prepare: all clients share A, so mean(BᵢA) = mean(Bᵢ)·A has rank <= r
    glob, ups = make(0, shared_a=True)
    # Execute
    delta, err = lora_aggregate(glob, ups, "svd")
    # Assert: the new factors multiply to the dense mean of the client products
    assert err < 1e-5
    assert torch.allclose(product_after(glob, delta), dense_mean_product(glob, ups, [1 / K] * K), atol=1e-5)
    assert torch.allclose(delta[HEAD], mean_delta(ups)[HEAD])


def test_svd_keeps_the_best_rank_r_part_when_rank_is_higher():
    # Prepare: generic clients, so rank(M) = min(K·r, out, in) = 5 > r
    glob, ups = make(1)
    m = dense_mean_product(glob, ups, [1 / K] * K)
    u, s, vh = torch.linalg.svd(m)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    # Execute
    delta, err = lora_aggregate(glob, ups, "svd")
    # Assert: Eckart–Young: the residual is √(Σ_{j>r} σ_j²)/‖M‖, the product the truncated SVD
    assert err == pytest.approx(float(s[R:].norm() / s.norm()), rel=1e-4)
    assert torch.allclose(product_after(glob, delta), best, atol=1e-5)
    assert delta[A].shape == (R, IN) and delta[B].shape == (OUT, R)


def test_svd_respects_example_weights():
    # Prepare
    glob, ups = make(2, shared_a=True, weights=[1, 2, 7])
    # Execute
    delta, err = lora_aggregate(glob, ups, "svd", weighted=True)
    # Assert
    assert err < 1e-5
    expected = dense_mean_product(glob, ups, [0.1, 0.2, 0.7])
    assert torch.allclose(product_after(glob, delta), expected, atol=1e-5)


def test_frozen_a_averages_b_exactly():
    # Prepare
    glob, ups = make(3, shared_a=True)
    # Execute
    delta, err = lora_aggregate(glob, ups, "frozen_a")
    # Assert
    assert err < 1e-5
    assert torch.equal(delta[A], torch.zeros(R, IN))
    assert torch.allclose(delta[B], mean_delta(ups)[B])


def test_frozen_a_rejects_a_moved_a():
    glob, ups = make(4)
    with pytest.raises(ValueError, match="frozen_a: client 0"):
        lora_aggregate(glob, ups, "frozen_a")


def test_factorwise_is_the_mean_of_deltas_and_inexact():
    # Prepare: generic clients
    glob, ups = make(5)
    # Execute
    delta, err = lora_aggregate(glob, ups, "factorwise")
    # Assert: the cross terms BᵢAⱼ make the product differ from the mean product
    for key in (A, B, HEAD):
        assert torch.allclose(delta[key], mean_delta(ups)[key])
    assert err > 1e-3
    _, svd_err = lora_aggregate(glob, ups, "svd")
    assert svd_err <= err


def test_aggregation_error_by_hand_over_two_pairs():
    # Prepare: 1×1 factors. Pair p: client products 2·3 = 6 and 1·2 = 2 (mean 4), global 3·1 = 3.
    #          Pair q: client products 3 and 3 (mean 3), global 3.
    pa, pb, qa, qb = "p.lora_A.weight", "p.lora_B.weight", "q.lora_A.weight", "q.lora_B.weight"
    t = lambda x: torch.tensor([[x]])  # noqa: E731
    clients = [{pa: t(3.0), pb: t(2.0), qa: t(1.0), qb: t(3.0)},
               {pa: t(2.0), pb: t(1.0), qa: t(3.0), qb: t(1.0)}]
    glob = {pa: t(1.0), pb: t(3.0), qa: t(1.0), qb: t(3.0)}
    # Execute
    err = aggregation_error(glob, clients)
    # Assert: √((4 − 3)² + 0) / √(4² + 3²) = 1/5
    assert err == pytest.approx(0.2)
    # peft's α/r scale multiplies every product alike: the ratio does not move
    scaled = [{k: 2.0 * v if "lora_B" in k else v for k, v in s.items()} for s in [glob, *clients]]
    assert aggregation_error(scaled[0], scaled[1:]) == pytest.approx(0.2)


def test_pairs_follow_peft_key_styles():
    # Prepare: a get_peft_model_state_dict key and a state_dict key with an adapter name
    state = {"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(3, 2),
             "y.lora_A.default.weight": torch.zeros(2, 4), "y.lora_B.default.weight": torch.zeros(3, 2),
             "z.bias": torch.zeros(3)}
    # Execute / Assert
    assert lora_pairs(state) == [("x.lora_A.weight", "x.lora_B.weight"),
                                 ("y.lora_A.default.weight", "y.lora_B.default.weight")]


def test_bad_input_is_rejected():
    glob, ups = make(6)
    with pytest.raises(ValueError, match="mode"):
        lora_aggregate(glob, ups, "stacked")
    with pytest.raises(ValueError, match="no partner"):
        lora_pairs({A: torch.zeros(R, IN)})
    with pytest.raises(ValueError, match="r×in"):
        lora_pairs({A: torch.zeros(R, IN), B: torch.zeros(OUT, R + 1)})
