"""AFA (Muñoz-González et al., 2019) against its Algorithm 1, worked by hand on 2-D deltas."""

import math

import pytest
import torch

from fedllm.algorithms.afa import AFA, afa_filter, beta_cdf_half
from fedllm.types import ClientUpdate


def ups(vectors, sizes=None):
    sizes = sizes or [10] * len(vectors)
    return [ClientUpdate(k, {"w": torch.tensor(v, dtype=torch.float64)}, n, 1, 0.0)
            for k, (v, n) in enumerate(zip(vectors, sizes))]


HONEST = [[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.9, 0.0]]
ATTACK = [-1.0, 0.0]


def test_beta_cdf_at_one_half_by_the_binomial_identity():
    # I_{1/2}(3, 4) = P(Bin(6, 1/2) >= 3) = (20 + 15 + 6 + 1) / 64
    assert beta_cdf_half(3, 4) == pytest.approx(42 / 64)
    assert beta_cdf_half(3, 3) == pytest.approx(0.5)
    # (3, 9): P(Bin(11) >= 3) = 1 - (1 + 11 + 55) / 2048 = 0.967 >= 0.95; (3, 8): 968/1024 = 0.945 < 0.95
    assert beta_cdf_half(3, 9) == pytest.approx(1981 / 2048)
    assert beta_cdf_half(3, 8) == pytest.approx(968 / 1024)


def test_low_tail_removed_then_filter_stops():
    # All 5 (equal weights): mean of deltas (0.58, 0); cosines 1, .99504, .99504, 1, -1.
    # mean of s 0.59801 < median 0.99504; sigma 0.79904 -> remove s < 0.99504 - 2 * 0.79904 = -0.60304:
    # the attacker. xi = 2.5; the honest four: mean 0.99752 == median 0.99752 (not <) -> high side,
    # s > 0.99752 + 2.5 * 0.00248: none. Aggregate: the honest mean (0.975, 0).
    u = ups(HONEST + [ATTACK])
    flats = {x.client_id: x.delta["w"] for x in u}
    good, removed = afa_filter(flats, {k: 1.0 for k in flats}, 2.0, 0.5)
    assert good == [0, 1, 2, 3] and removed == [4]
    agg = AFA()
    out = agg(u)
    assert torch.allclose(out["w"], torch.tensor([0.975, 0.0], dtype=torch.float64))
    assert agg.last_report == {"excluded": [4], "blocked": []}
    assert agg.reputation(0) == pytest.approx(4 / 7) and agg.reputation(4) == pytest.approx(3 / 7)


def test_high_tail_removed_when_mean_above_median():
    # (1,0), (0,1), (-1,0): mean (0, 1/3); cosines 0, 1, 0: mean 1/3 >= median 0, sigma 0.4714:
    # remove s > 0 + 2 * 0.4714 = 0.943 -> client 1. Then (1,0), (-1,0): mean 0, cosines 0, 0: stop.
    good, removed = afa_filter({0: torch.tensor([1.0, 0]), 1: torch.tensor([0.0, 1]), 2: torch.tensor([-1.0, 0])},
                               {0: 1.0, 1: 1.0, 2: 1.0}, 2.0, 0.5)
    assert good == [0, 2] and removed == [1]


def test_weights_are_reputation_times_examples():
    # nothing removed (all identical directions): the aggregate is sum p_k n_k D_k / sum p_k n_k, p_k = 1/2 each
    u = ups([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], sizes=[10, 30, 60])
    out = AFA()(u)
    assert out["w"][0].item() == pytest.approx((10 * 1 + 30 * 3 + 60 * 2) / 100)


def test_attacker_blocked_after_six_removals_and_checkpointed():
    agg = AFA()
    for rnd in range(1, 7):
        agg(ups(HONEST + [ATTACK]))
        # after round r the attacker's posterior is Beta(3, 3 + r): blocked when I_1/2 >= 0.95, i.e. r = 6
        assert (4 in agg.blocked) == (rnd == 6)
        assert math.isclose(agg.reputation(0), (3 + rnd) / (6 + rnd))
    restored = AFA()
    restored.load_state_dict(agg.state_dict())
    assert restored.blocked == {4} and restored.counts == agg.counts
    # a blocked client is left out before filtering; its Beta counts no longer move
    out = restored(ups(HONEST + [[100.0, 100.0]]))
    assert torch.allclose(out["w"], torch.tensor([0.975, 0.0], dtype=torch.float64))
    assert restored.counts[4] == [3, 9] and restored.last_report["excluded"] == [4]


def test_the_server_checkpoints_afa_reputations():
    from fedllm.federation.server import FederatedServer
    from tests._toy import toy_recipe

    recipe = toy_recipe(robust={"aggregator": "afa"})
    state = {"w": torch.zeros(2)}
    server = FederatedServer(recipe, state, [5, 5, 5, 5])
    server.aggregator(ups(HONEST))
    server.aggregator.blocked.add(3)
    saved = server.state_dict()
    fresh = FederatedServer(recipe, state, [5, 5, 5, 5])
    fresh.load_state_dict(saved)
    assert fresh.aggregator.blocked == {3} and fresh.aggregator.counts == server.aggregator.counts
