"""Diversity sampling (fedllm.algorithms.diversity): facility location over label histograms, by hand."""

import numpy as np
import pytest

from fedllm.algorithms.diversity import DiversitySampler, facility_location_greedy, label_shares, similarity
from fedllm.config import RecipeError
from tests._toy import toy_recipe

# clients 0 and 1 hold only class 0, client 2 only class 1, client 3 only class 2
HIST = {0: [10, 0, 0], 1: [5, 0, 0], 2: [0, 7, 0], 3: [0, 0, 3]}


def test_similarity_is_histogram_intersection():
    shares = label_shares({0: [2, 2, 0], 1: [0, 1, 1], 2: [1, 0, 1]})
    sim = similarity(shares, [0, 1, 2])
    # sum_c min(h_i, h_j): (.5,.5,0) vs (0,.5,.5) -> .5; identical -> 1
    assert np.allclose(sim, [[1, .5, .5], [.5, 1, .5], [.5, .5, 1]])


def test_greedy_facility_location_by_hand():
    sim = similarity(label_shares(HIST), [0, 1, 2, 3])
    # F gains, step 1: j=0 covers clients 0 and 1 (2), j=1 also 2, j=2 and j=3 1 each -> 0 (lowest index);
    # step 2: covered (1,1,0,0): j=1 adds 0, j=2 and j=3 add 1 -> 2; step 3: j=3 adds 1
    assert facility_location_greedy(sim, 3) == [0, 2, 3]


def test_sampler_covers_the_labels_and_rotates_equivalent_clients():
    s = DiversitySampler(0.5, seed=3, label_histograms=HIST)
    picks = [s.sample(r, [0, 1, 2, 3]) for r in range(40)]
    # two clients of different classes every round (a uniform draw picks {0, 1} one time in six)
    assert all(p != [0, 1] and len(p) == 2 for p in picks)
    assert {c for p in picks for c in p} == {0, 1, 2, 3}  # ties broken by the seeded generator
    assert picks == [DiversitySampler(0.5, seed=3, label_histograms=HIST).sample(r, [0, 1, 2, 3]) for r in range(40)]


def test_stochastic_greedy_coverage_beats_uniform_on_dirichlet_labels():
    rng = np.random.default_rng(0)
    hist = {k: (rng.dirichlet([0.2] * 10) * 100).round().tolist() for k in range(30)}
    s = DiversitySampler(0.2, seed=0, label_histograms=hist)
    ids = list(range(30))
    sim = similarity(s.shares, ids)

    def coverage(chosen):
        return sim[:, chosen].max(axis=1).sum()

    div = np.mean([coverage(s.sample(r, ids)) for r in range(20)])
    uni = np.mean([coverage(sorted(rng.choice(30, 6, replace=False))) for _ in range(200)])
    assert div > uni


def test_diversity_is_refused_under_dp_and_for_language_models():
    with pytest.raises(RecipeError, match="selection.method: diversity picks clients by their label histograms"):
        toy_recipe(model={"preset": "lenet300100"}, data={"builtin": "fashion_mnist"}, selection={"method": "diversity"},
                   federation={"algorithm": "gradualdiff", "weighted": False}, privacy={"dp": "server"})
    with pytest.raises(RecipeError, match="selection.method: diversity covers the clients' class labels"):
        toy_recipe(selection={"method": "diversity"})
