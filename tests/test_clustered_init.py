"""IFCA's ``cluster_init: farthest``: the k-means++-style (farthest-first) choice of the warm-start
clients by hand on small inputs, and on the toy two-population federation (it seeds one model from
each population, where ``clients`` can draw both seeds from one)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedllm.algorithms.clustered import cosine_distance, farthest_first
from fedllm.config import RecipeError
from fedllm.federation.modes import run_federated
from tests._toy import toy_recipe
from tests.test_topologies import TwoPopulations, _rows


def _sig(x: float, y: float) -> dict[str, torch.Tensor]:
    """A 2-d signature split over two tensors, so the distance must be taken over the whole state."""
    return {"a.lora_A.weight": torch.tensor([[x]]), "a.lora_B.weight": torch.tensor([y])}


# s0 = (1, 0); s1 = (10, 0): the same direction, 9 away in L2; s2 = (0, 1); s3 = (−1, 0); s4 = (1, 1)
SIGS = [_sig(1, 0), _sig(10, 0), _sig(0, 1), _sig(-1, 0), _sig(1, 1)]


def test_cosine_distance_by_hand():
    assert cosine_distance(SIGS[0], SIGS[1]) == pytest.approx(0.0, abs=1e-12)  # norm does not count
    assert cosine_distance(SIGS[0], SIGS[2]) == pytest.approx(1.0)  # orthogonal
    assert cosine_distance(SIGS[0], SIGS[3]) == pytest.approx(2.0)  # opposite
    assert cosine_distance(SIGS[0], SIGS[4]) == pytest.approx(1 - 1 / math.sqrt(2))
    assert cosine_distance(SIGS[0], _sig(0, 0)) == 1.0  # a zero update has no direction


def test_farthest_first_picks_the_expected_clients_by_hand():
    # first 0: distances to s0 are [0, 0, 1, 2, 0.293] -> s3 (2; L2 would take s1, 9 away);
    # then min over {s0, s3}: [0, 0, 1, 0, 0.293] -> s2 (1)
    assert farthest_first(SIGS, 3, first=0) == ([0, 3, 2], [0.0, pytest.approx(2.0), pytest.approx(1.0)])
    # first 2: s0, s1 and s3 all at 1 -> the lowest index, s0; then min over {s2, s0}: s1 0, s3 1, s4 0.293 -> s3
    assert farthest_first(SIGS, 3, first=2) == ([2, 0, 3], [0.0, pytest.approx(1.0), pytest.approx(1.0)])
    # k = n: every client, each once, even at distance 0 (s1 after s0)
    assert sorted(farthest_first(SIGS, 5, first=1)[0]) == [0, 1, 2, 3, 4]
    assert farthest_first(SIGS, 1, first=4) == ([4], [0.0])
    with pytest.raises(ValueError, match="k <= 5"):
        farthest_first(SIGS, 6, first=0)
    with pytest.raises(ValueError, match="first in"):
        farthest_first(SIGS, 2, first=5)


def _farthest_run(tmp_path, seed: int) -> tuple[TwoPopulations, dict, list[dict]]:
    recipe = toy_recipe(seed=seed, federation={"algorithm": "gradualdiff", "rounds": 2, "clusters": 2,
                                               "cluster_init": "farthest"},
                        partition={"num_clients": 4}, eval={"client_holdout": 0.2}, train={"local_steps": 5, "lr": 0.1})
    exp = TwoPopulations(recipe)
    out = tmp_path / f"seed{seed}"
    run_federated(exp, out=str(out))
    init = json.loads(next(out.rglob("clusters.json")).read_text())["init"]
    return exp, init, _rows(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_farthest_init_seeds_one_model_from_each_population(tmp_path, seed):
    exp, init, rows = _farthest_run(tmp_path, seed)
    warm = {f.update.client_id: f for f in exp.fits if f.round == 0}
    assert sorted(warm) == [0, 1, 2, 3]  # every client fits once from the shared initial state
    assert all(torch.equal(f.start["lin.weight"], exp.initial_state["lin.weight"]) for f in warm.values())
    first, second = init["clients"]
    assert init["kind"] == "farthest" and (first < 2) != (second < 2)  # one of {0, 1}, one of {2, 3}
    # the second is the farthest by hand from the same updates (the first is the seeded draw)
    deltas = {c: f.update.delta for c, f in warm.items()}
    far = max((c for c in range(4) if c != first), key=lambda c: (cosine_distance(deltas[c], deltas[first]), -c))
    assert second == far and init["cosine_distance_when_chosen"][1] == pytest.approx(
        cosine_distance(deltas[far], deltas[first]))
    for j, c in enumerate(init["clients"]):  # round 1 trains from θ₀ + Δ of the chosen client
        starts = [f.start["lin.weight"] for f in exp.fits if f.round == 1 and rows[1]["cluster_of"][str(f.update.client_id)] == j]
        assert starts and all(torch.allclose(s, exp.initial_state["lin.weight"] + deltas[c]["lin.weight"]) for s in starts)
    assert rows[1]["cluster_of"]["0"] == rows[1]["cluster_of"]["1"] != rows[1]["cluster_of"]["2"]


def test_an_unknown_cluster_init_is_refused_with_the_nearest_name():
    with pytest.raises(RecipeError, match="farthest"):
        toy_recipe(federation={"clusters": 2, "cluster_init": "farthes"}, eval={"client_holdout": 0.2})
