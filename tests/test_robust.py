import pytest
import torch

from fedllm.algorithms.aggregate import MeanAggregator, mean_delta
from fedllm.algorithms.attacks import Attack, attack_update, attackers
from fedllm.algorithms.drift import FedNovaAggregator
from fedllm.algorithms.robust import (
    AGGREGATORS,
    Krum,
    Median,
    NormBound,
    TrimmedMean,
    build_aggregator,
    krum_select,
)
from fedllm.types import ClientUpdate, global_norm


def upd(cid, values, n=1):
    return ClientUpdate(client_id=cid, delta={"w": torch.tensor(values)}, num_examples=n, local_steps=1,
                        train_loss=0.0)


FIVE = [upd(0, [1.0, -5.0]), upd(1, [2.0, 0.0]), upd(2, [3.0, 7.0]), upd(3, [4.0, 1.0]), upd(4, [100.0, 5.0])]


def test_median_by_hand():
    # Execute / Assert: column 0 sorted [1,2,3,4,100] -> 3; column 1 sorted [-5,0,1,5,7] -> 1
    assert torch.equal(Median()(FIVE)["w"], torch.tensor([3.0, 1.0]))


def test_median_of_an_even_count_averages_the_middle_pair():
    assert torch.equal(Median()([upd(i, [v]) for i, v in enumerate([10.0, 1.0, 3.0, 2.0])])["w"],
                       torch.tensor([2.5]))


def test_trimmed_mean_by_hand():
    # Execute: β = 0.2 of 5 drops one value at each end
    got = TrimmedMean(beta=0.2)(FIVE)["w"]
    # Assert: column 0 keeps [2,3,4] -> 3; column 1 keeps [0,1,5] -> 2
    assert torch.allclose(got, torch.tensor([3.0, 2.0]))
    # β = 0 is the plain mean
    assert torch.allclose(TrimmedMean(0.0)(FIVE)["w"], mean_delta(FIVE)["w"])


def test_krum_picks_the_honest_cluster():
    # Prepare: four honest deltas near (1, 1) and one outlier, f = 1 (so 5 − 1 − 2 = 2 neighbours)
    points = [[1.0, 1.0], [1.1, 1.0], [0.9, 1.0], [1.0, 1.2], [50.0, 50.0]]
    ups = [upd(i, p) for i, p in enumerate(points)]
    # Execute
    best = krum_select(ups, num_byzantine=1, multi=5)
    # Assert: scores a=.01+.01, b=.01+.04, c=.01+.04, d=.04+.05, outlier huge (ties by index)
    assert best == [0, 1, 2, 3, 4]
    assert torch.equal(Krum(1)(ups)["w"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(Krum(1, multi=3)(ups)["w"], torch.tensor([1.0, 1.0]))


def test_krum_distance_spans_all_keys():
    # Prepare: the same deltas split over two keys and kept as one key
    rows = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    rows[5] += 10.0
    one = [ClientUpdate(i, {"w": r}, 1, 1, 0.0) for i, r in enumerate(rows)]
    two = [ClientUpdate(i, {"a": r[:2], "b": r[2:]}, 1, 1, 0.0) for i, r in enumerate(rows)]
    # Execute / Assert
    assert krum_select(one, 1, 6) == krum_select(two, 1, 6)
    assert krum_select(one, 1, 6)[-1] == 5


def test_robust_rules_resist_two_of_ten_sign_flippers():
    # Prepare: ten honest deltas around a common direction; two attackers send −10·Δ
    gen = torch.Generator().manual_seed(0)
    base = torch.linspace(0.5, 1.5, 20)
    honest = [ClientUpdate(i, {"w": base + 0.1 * torch.randn(20, generator=gen)}, 10, 1, 0.0)
              for i in range(10)]
    attack = Attack("sign_flip", fraction=0.2, scale=10.0, seed=1)
    bad = attackers(range(10), attack)
    sent = [attack_update(u, attack) if u.client_id in bad else u for u in honest]
    target = mean_delta([u for u in honest if u.client_id not in bad])["w"]
    scale = target.norm()
    # Execute
    results = {name: agg(sent)["w"] for name, agg in {
        "mean": MeanAggregator(), "median": Median(), "trimmed": TrimmedMean(0.2),
        "krum": Krum(2), "multi_krum": Krum(2, multi=None)}.items()}
    # Assert: robust rules land near the honest mean, the plain mean far from it
    assert len(bad) == 2
    assert (results.pop("mean") - target).norm() > 1.0 * scale
    for name, got in results.items():
        assert (got - target).norm() < 0.15 * scale, name


def test_norm_bound_clips_then_delegates():
    # Prepare: ‖(3, 4)‖ = 5 is clipped to 1 -> (0.6, 0.8); (0.3, 0) is left alone
    ups = [upd(0, [3.0, 4.0]), upd(1, [0.3, 0.0])]
    # Execute
    got = NormBound(1.0, MeanAggregator())(ups)["w"]
    # Assert
    assert torch.allclose(got, torch.tensor([0.45, 0.4]))
    assert global_norm(ups[0].delta) == pytest.approx(5.0)  # the input is not modified


def test_build_aggregator_names_and_options():
    # Execute / Assert
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "fednova", "geomed",
                                "bulyan", "centered_clip", "afa"}
    assert build_aggregator("mean", weighted=True).weighted is True
    assert isinstance(build_aggregator("median"), Median)
    assert build_aggregator("trimmed_mean", beta=0.3).beta == 0.3
    assert build_aggregator("krum", num_byzantine=2).multi == 1
    assert build_aggregator("multi_krum", num_byzantine=1).multi is None
    nova = build_aggregator("fednova", weighted=False)
    assert isinstance(nova, FedNovaAggregator) and nova.weighted is False
    clipped = build_aggregator("median", max_norm=2.0)
    assert isinstance(clipped, NormBound) and isinstance(clipped.inner, Median)
    with pytest.raises(ValueError, match="trimmed_mean"):
        build_aggregator("zeno")  # unknown: the error lists the known names
    with pytest.raises(ValueError, match="bad options"):
        build_aggregator("median", beta=0.1)


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(0.5)
    with pytest.raises(ValueError, match="2f"):
        Krum(2)(FIVE)  # 5 <= 2·2 + 2
    with pytest.raises(ValueError, match="zero updates"):
        Median()([])
    with pytest.raises(ValueError, match="keys"):
        Median()([upd(0, [1.0]), ClientUpdate(1, {"v": torch.zeros(1)}, 1, 1, 0.0)])
