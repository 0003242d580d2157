import random
from collections import Counter

import numpy as np
import pytest

from fedllm.algorithms.selection import (
    SAMPLERS,
    Availability,
    ImportanceSampler,
    PowerOfChoiceSampler,
    RoundRobinSampler,
    UniformSampler,
    build_sampler,
)

IDS = list(range(10))


def test_uniform_is_reproducible_from_seed_and_round():
    # Prepare: disturb the global RNGs between the two calls
    s = UniformSampler(fraction=0.3, seed=7)
    # Execute
    first = s.sample(4, IDS)
    random.seed(123)
    np.random.seed(123)
    again = UniformSampler(fraction=0.3, seed=7).sample(4, list(reversed(IDS)))
    # Assert: ⌊0.3·10⌋ = 3 sorted ids, the same for the same (seed, round), whatever the input order
    assert first == again == sorted(first) and len(first) == 3 and set(first) <= set(IDS)
    assert len({tuple(s.sample(r, IDS)) for r in range(20)}) > 1  # rounds differ
    assert UniformSampler(0.01, 0).sample(0, IDS).__len__() == 1  # at least one client


def test_round_robin_by_hand_and_covers_everyone():
    # Prepare
    s, ids = RoundRobinSampler(per_round=2), [0, 1, 2, 3, 4]
    # Execute
    picks = [s.sample(r, ids) for r in range(3)]
    # Assert: positions 0-1, 2-3, then 4 and wrap to 0
    assert picks == [[0, 1], [2, 3], [0, 4]]
    covered = set().union(*[RoundRobinSampler(3).sample(r, IDS) for r in range(4)])
    assert covered == set(IDS)  # ⌈10/3⌉ = 4 rounds


def test_importance_follows_example_counts():
    # Prepare: client 0 has no data, client 9 most of it
    counts = {c: (0 if c == 0 else 100 if c == 9 else 5) for c in IDS}
    s = ImportanceSampler(fraction=0.2, seed=1, num_examples=counts)
    # Execute
    tally = Counter(c for r in range(200) for c in s.sample(r, IDS))
    # Assert
    assert tally[0] == 0
    assert tally[9] > 150 and tally[9] == max(tally.values())
    assert s.sample(3, IDS) == ImportanceSampler(0.2, 1, counts).sample(3, IDS)


def test_power_of_choice_keeps_highest_losses():
    # Prepare: d = all four clients, so the candidates are everyone
    losses = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7}
    s = PowerOfChoiceSampler(d=4, m=2, seed=0)
    # Execute / Assert: mapping, callback, then remembered losses
    assert s.sample(0, [0, 1, 2, 3], losses=losses) == [1, 3]
    seen = []
    assert s.sample(0, [0, 1, 2, 3], losses=lambda cands: seen.extend(cands) or losses) == [1, 3]
    assert seen == [0, 1, 2, 3]
    s.record_losses({0: 5.0, 1: 0.2, 2: 0.3})
    assert s.sample(1, [0, 1, 2, 3]) == [0, 3]  # client 3 has no known loss: it counts as +∞


def test_power_of_choice_candidates_are_seeded():
    # Prepare: d = 3 of 10 candidates, keep m = 1
    s = PowerOfChoiceSampler(d=3, m=1, seed=5, num_examples={c: c + 1 for c in IDS})
    # Execute / Assert
    twin = PowerOfChoiceSampler(3, 1, 5, {c: c + 1 for c in IDS})
    assert s.sample(2, IDS, losses={}) == twin.sample(2, IDS, losses={})
    assert len(s.sample(2, IDS, losses={})) == 1


def test_availability_dropouts_and_stragglers():
    # Execute / Assert: everyone drops; everyone straggles with half speed; too slow means dropped
    assert Availability(dropout_prob=1.0).decide(0, IDS, 5).dropped == IDS
    half = Availability(straggler_fraction=1.0, speed_factor=0.5).decide(0, IDS, 5)
    assert half.stragglers == IDS and set(half.steps.values()) == {2} and half.dropped == []
    assert Availability(straggler_fraction=1.0, speed_factor=0.1).decide(0, IDS, 5).dropped == IDS
    assert Availability().decide(0, IDS, 5).steps == {c: 5 for c in IDS}


def test_availability_is_reproducible_and_per_client():
    # Prepare
    av = Availability(dropout_prob=0.3, seed=2, straggler_fraction=0.3, speed_factor=0.5)
    # Execute
    full = av.decide(6, IDS, 4)
    part = av.decide(6, [1, 3, 5], 4)
    # Assert: a client's fate depends on (seed, round, id) only
    assert full == av.decide(6, IDS, 4)
    for c in [1, 3, 5]:
        assert (c in full.dropped) == (c in part.dropped) and full.steps.get(c) == part.steps.get(c)
    assert sorted(full.dropped + list(full.steps)) == IDS


@pytest.mark.parametrize("make", [lambda s: UniformSampler(0.5, s),
                                  lambda s: ImportanceSampler(0.5, s, {c: 1 for c in IDS}),
                                  lambda s: PowerOfChoiceSampler(5, 2, s), lambda s: RoundRobinSampler(3)])
def test_sampler_state_round_trip(make):
    # Prepare
    s = make(11)
    if isinstance(s, PowerOfChoiceSampler):
        s.record_losses({3: 1.0, 4: 2.0})
    # Execute
    other = make(99)
    other.load_state_dict(s.state_dict())
    # Assert
    assert all(other.sample(r, IDS) == s.sample(r, IDS) for r in range(5))
    assert other.state_dict() == s.state_dict()


def test_availability_state_round_trip():
    a, b = Availability(0.4, seed=3), Availability(0.4, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.decide(2, IDS, 3) == a.decide(2, IDS, 3)


def test_build_sampler_and_errors():
    assert set(SAMPLERS) == {"uniform", "poisson", "round_robin", "importance", "power_of_choice", "diversity"}
    assert isinstance(build_sampler("uniform", fraction=0.5, seed=1), UniformSampler)
    assert build_sampler("round_robin", per_round=4).per_round == 4
    with pytest.raises(ValueError, match="power_of_choice"):
        build_sampler("random")
    with pytest.raises(ValueError, match="fraction"):
        UniformSampler(0.0)
    with pytest.raises(ValueError, match="m <= d"):
        PowerOfChoiceSampler(d=2, m=3)
    with pytest.raises(ValueError, match="unique"):
        UniformSampler(0.5).sample(0, [1, 1])


def test_poisson_sampler_draws_each_client_independently_and_may_draw_none():
    from fedllm.algorithms.selection import PoissonSampler

    sampler = build_sampler("poisson", fraction=0.3, seed=4)
    assert isinstance(sampler, PoissonSampler)
    draws = [sampler.sample(t, list(range(10))) for t in range(2000)]
    counts = [len(d) for d in draws]
    assert abs(sum(counts) / len(counts) - 3.0) < 0.1  # E = q n
    assert 0 in counts and max(counts) > 6  # the size varies, down to none
    assert sampler.sample(7, list(range(10))) == draws[7]  # a pure function of (seed, round)
    inclusion = sum(3 in d for d in draws) / len(draws)
    assert abs(inclusion - 0.3) < 0.03
