"""Gossip FL and clustered FL (IFCA): the update rules by hand on small inputs, the round loop on the
toy experiment, and the recipe rules that refuse what has no meaning without one server model.

The tiny-LM end-to-end runs are in ``tests/test_topologies_e2e.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedllm.algorithms.clustered import assign, cluster_means, perturbed_inits, representative
from fedllm.algorithms.gossip import (
    consensus_distance,
    mean_state,
    metropolis_weights,
    mix,
    normalize_edges,
    random_k,
    ring,
    unreachable,
)
from fedllm.config import RecipeError
from fedllm.federation.modes import run_federated
from fedllm.types import ClientUpdate
from tests._toy import ToyExperiment, toy_recipe

# ----------------------------------------------------------------------------- gossip: the math


def test_metropolis_weights_on_a_ring_and_a_star_by_hand():
    w = metropolis_weights(4, ring(4))  # every degree 2: 1/(1+2) to each neighbour, 1/3 left on itself
    third = 1 / 3
    assert torch.allclose(w, torch.tensor([[third, third, 0, third], [third, third, third, 0],
                                           [0, third, third, third], [third, 0, third, third]], dtype=torch.float64))
    star = metropolis_weights(4, [(0, 1), (0, 2), (0, 3)])  # hub degree 3, leaves 1: 1/(1+3) on each spoke
    assert torch.allclose(star, torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0],
                                              [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]], dtype=torch.float64))
    for m in (w, star):  # symmetric, doubly stochastic
        assert torch.allclose(m, m.T) and torch.allclose(m.sum(0), torch.ones(4, dtype=torch.float64))


def test_one_gossip_step_on_a_path_by_hand():
    # path 0 - 1 - 2: degrees 1, 2, 1 -> W01 = W12 = 1/3, W00 = W22 = 2/3, W11 = 1/3
    states = [{"w": torch.tensor([0.0, 3.0]), "b": torch.tensor(1.0)},
              {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor(4.0)},
              {"w": torch.tensor([6.0, 3.0]), "b": torch.tensor(7.0)}]
    before = consensus_distance(states)
    # x̄ = ([3, 2], 4); Σ‖xᵢ − x̄‖² = (9 + 0 + 9) + (1 + 4 + 1) + (9 + 0 + 9) = 42 -> / 3
    assert before == pytest.approx(14.0)
    out = mix(states, metropolis_weights(3, [(0, 1), (1, 2)]))
    assert torch.allclose(out[0]["w"], torch.tensor([1.0, 2.0]))  # 2/3·[0,3] + 1/3·[3,0]
    assert torch.allclose(out[1]["w"], torch.tensor([3.0, 2.0]))  # ([0,3] + [3,0] + [6,3]) / 3
    assert torch.allclose(out[2]["w"], torch.tensor([5.0, 2.0]))  # 1/3·[3,0] + 2/3·[6,3]
    assert [float(o["b"]) for o in out] == pytest.approx([2.0, 4.0, 6.0])
    assert out[0]["w"].dtype == torch.float32  # computed in float64, cast back
    mean = mean_state(out)  # the mean is kept by a doubly stochastic step
    assert torch.allclose(mean["w"], torch.tensor([3.0, 2.0])) and float(mean["b"]) == pytest.approx(4.0)
    assert consensus_distance(out) == pytest.approx((4 + 0 + 4 + 4 + 0 + 4) / 3)


def test_graphs_edges_and_connectivity():
    assert ring(1) == [] and ring(2) == [(0, 1)] and ring(4) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert normalize_edges(3, [[1, 0], [0, 1], [2, 1]]) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="different client ids"):
        normalize_edges(3, [[0, 3]])
    assert unreachable(4, [(0, 1), (2, 3)]) == [2, 3]
    edges = random_k(10, 2, seed=3)
    assert edges == random_k(10, 2, seed=3) and not unreachable(10, edges)  # seeded, connected
    degrees = [sum(i in e for e in edges) for i in range(10)]
    assert min(degrees) >= 2


# ----------------------------------------------------------------------------- IFCA: the math


def test_ifca_assignment_by_lowest_loss():
    assert assign([0.9, 0.2, 0.5]) == 1
    assert assign([0.3, 0.3]) == 0  # ties: the lowest index
    assert assign([math.nan, 0.7, math.inf]) == 1 and assign([math.nan, math.nan]) == 0


def test_ifca_per_cluster_means_by_hand():
    ups = [ClientUpdate(k, {"w": torch.tensor([float(v)])}, n, 1, 0.0)
           for k, v, n in ((0, 1, 10), (1, 3, 30), (2, 5, 10), (3, 7, 10))]
    cluster_of = {0: 1, 1: 1, 2: 0, 3: 2}
    means = cluster_means(ups, cluster_of, k=4)  # GradualDiff: the plain mean within each cluster
    assert sorted(means) == [0, 1, 2]  # cluster 3: nobody chose it, no mean
    assert float(means[1]["w"]) == pytest.approx(2.0) and float(means[0]["w"]) == 5.0 and float(means[2]["w"]) == 7.0
    weighted = cluster_means(ups, cluster_of, k=4, weighted=True)  # FedAvg: (10·1 + 30·3) / 40
    assert float(weighted[1]["w"]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="cluster 5"):
        cluster_means(ups, {**cluster_of, 3: 5}, k=4)
    assert representative([1, 3, 3]) == 1 and representative([0, 0]) == 0


def test_ifca_init_perturbs_lora_b_only_and_is_seeded():
    state = {"x.lora_A.weight": torch.randn(2, 4), "x.lora_B.weight": torch.zeros(4, 2)}
    inits = perturbed_inits(state, 3, 0.5, seed=7)
    assert all(torch.equal(m["x.lora_A.weight"], state["x.lora_A.weight"]) for m in inits)
    bs = [m["x.lora_B.weight"] for m in inits]
    assert not torch.equal(bs[0], bs[1]) and 0.2 < float(bs[0].std()) < 1.0
    assert torch.equal(perturbed_inits(state, 3, 0.5, seed=7)[2]["x.lora_B.weight"], bs[2])
    dense = perturbed_inits({"w": torch.zeros(3)}, 2, 0.1, seed=0)
    assert not torch.equal(dense[0]["w"], torch.zeros(3))


# ----------------------------------------------------------------------------- the round loop on the toy


def _gossip_toy(rounds: int = 2) -> ToyExperiment:
    return ToyExperiment(toy_recipe(federation={"algorithm": "gradualdiff", "topology": "gossip",
                                                "rounds": rounds}, partition={"num_clients": 4}))


def test_gossip_rounds_follow_the_update_rule(tmp_path):
    exp = _gossip_toy()
    run_federated(exp, out=str(tmp_path))
    row = [r for r in _rows(tmp_path) if r["round"] == 2][0]
    models = [exp.initial_state] * 4
    for rnd in (1, 2):
        fits = {f.update.client_id: f for f in exp.fits if f.round == rnd}
        assert sorted(fits) == [0, 1, 2, 3]  # every client trains every round
        for k in range(4):  # each trains from its own model
            assert all(torch.allclose(fits[k].start[key], models[k][key]) for key in models[k])
        trained = [{key: models[k][key] + fits[k].update.delta[key] for key in models[k]} for k in range(4)]
        # ring of 4, Metropolis: (x_{i-1} + x_i + x_{i+1}) / 3
        models = [{key: (trained[(i - 1) % 4][key] + trained[i][key] + trained[(i + 1) % 4][key]) / 3
                   for key in trained[i]} for i in range(4)]
    mean = {key: sum(m[key] for m in models) / 4 for key in models[0]}
    assert all(torch.allclose(exp.evaluated[-1][key], mean[key]) for key in mean)  # x̄ is what is evaluated
    expected = sum(float(((m[key] - mean[key]) ** 2).sum()) for m in models for key in m) / 4
    assert row["consensus_distance"] == pytest.approx(expected, rel=1e-9)
    assert row["consensus_distance"] < row["consensus_distance_trained"]  # mixing pulled them together
    assert row["bytes_down"] == 0 and row["bytes_up"] == 8 * exp.payload_bytes(exp.initial_state)  # 8 directed edges
    assert (tmp_path / "toy" / "federated" / "personal" / "client_3").is_dir()


class TwoPopulations(ToyExperiment):
    """Clients 0, 1 fit y = W x, clients 2, 3 fit y = −W x (a synthetic two-population federation where
    one global model must average opposite maps); each client has 8 held-out examples of its own map."""

    def __init__(self, recipe):
        super().__init__(recipe, sizes=[16] * 4)
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        sign = [1.0, 1.0, -1.0, -1.0]
        self.data.y = torch.stack([sign[int(o)] * (w @ x) for o, x in zip(self.data.owner, self.data.x)])
        hx = torch.randn(4, 8, 6, generator=gen, dtype=torch.float64)
        self.holdout = {k: (hx[k], sign[k] * hx[k] @ w.T) for k in range(4)}

    def evaluate_clients(self, state, clients=None):
        ids = range(4) if clients is None else clients
        return {k: float(((self._predict(state, self.holdout[k][0]) - self.holdout[k][1]) ** 2).mean()) for k in ids}


def _two_populations(clusters: int) -> TwoPopulations:
    return TwoPopulations(toy_recipe(federation={"algorithm": "gradualdiff", "rounds": 6, "clusters": clusters},
                                     partition={"num_clients": 4}, eval={"client_holdout": 0.2},
                                     train={"local_steps": 5, "lr": 0.1}))


def test_ifca_separates_two_populations_and_beats_one_global_model(tmp_path):
    exp = _two_populations(2)
    run_federated(exp, out=str(tmp_path / "ifca"))
    rows = _rows(tmp_path / "ifca")
    assign_1 = rows[1]["cluster_of"]
    assert assign_1["0"] == assign_1["1"] != assign_1["2"] == assign_1["3"]  # split by population in round 1
    last = rows[-1]
    assert last["cluster_assignment"] == assign_1 and sorted(last["cluster_sizes"]) == [2, 2]
    # the round's per-cluster mean by hand: cluster j's new model = its start + mean of its members' deltas
    fits = [f for f in exp.fits if f.round == 1]
    for j in (0, 1):
        members = [f for f in fits if assign_1[str(f.update.client_id)] == j]
        start = members[0].start
        assert all(torch.equal(f.start["lin.weight"], start["lin.weight"]) for f in members)
        expected = start["lin.weight"] + sum(f.update.delta["lin.weight"] for f in members) / len(members)
        assert torch.allclose(_start_of(exp, 2, j, rows[2]["cluster_of"]), expected)
    baseline = _two_populations(1)
    run_federated(baseline, out=str(tmp_path / "global"))
    one = _rows(tmp_path / "global")[-1]
    assert last["personal_eval_loss_mean"] < 0.2 * one["client_eval_loss_mean"]  # clustering wins per client
    clusters_json = (tmp_path / "ifca" / "toy" / "federated" / "clusters.json").read_text()
    assert '"probe_losses"' in clusters_json and '"kind": "perturbation"' in clusters_json


def _start_of(exp: ToyExperiment, rnd: int, cluster: int, assignment: dict[str, int]) -> torch.Tensor:
    """The model a client of ``cluster`` trained from in round ``rnd``."""
    fit = next(f for f in exp.fits if f.round == rnd and assignment[str(f.update.client_id)] == cluster)
    return fit.start["lin.weight"]


def _rows(out) -> list[dict]:
    import json

    path = next(out.rglob("metrics.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- recipe rules


@pytest.mark.parametrize(("groups", "field"), [
    ({"federation": {"topology": "gossip", "algorithm": "gradualdiff"}, "server": {"optimizer": "fedadam"}},
     "server.optimizer"),
    ({"federation": {"topology": "gossip"}}, "federation.algorithm"),  # fedavg's example weights
    ({"federation": {"topology": "gossip", "engine": "flower"}}, "federation.topology"),
    ({"federation": {"topology": "gossip", "algorithm": "scaffold"}}, "federation.algorithm"),
    ({"federation": {"topology": "gossip", "algorithm": "gradualdiff"}, "privacy": {"dp": "server"}}, "privacy.dp"),
    ({"federation": {"topology": "gossip", "algorithm": "gradualdiff", "fraction": 0.5}}, "federation.fraction"),
    ({"federation": {"topology": "gossip", "algorithm": "gradualdiff", "graph": [[0, 9]]}}, "federation.graph"),
    ({"federation": {"topology": "gossip", "clusters": 2}, "eval": {"client_holdout": 0.2}}, "federation.clusters"),
    ({"federation": {"clusters": 2}}, "eval.client_holdout"),
    ({"federation": {"clusters": 9}, "eval": {"client_holdout": 0.2}}, "federation.clusters"),
    ({"federation": {"clusters": 2, "algorithm": "gradualdiff"}, "eval": {"client_holdout": 0.2},
      "privacy": {"secure_aggregation": True}}, "privacy.secure_aggregation"),
    ({"federation": {"clusters": 2, "engine": "flower"}}, "federation.clusters"),
])
def test_what_has_no_meaning_without_one_server_model_is_refused_in_one_line(groups, field):
    with pytest.raises(RecipeError) as err:
        toy_recipe(**groups)
    assert err.value.where == field and "\n" not in str(err.value)


def test_a_disconnected_edge_list_is_refused():
    from fedllm.federation.gossip import GossipPeers

    with pytest.raises(RecipeError, match=r"federation.graph: clients \[2, 3\] have no path"):
        toy_recipe(federation={"algorithm": "gradualdiff", "topology": "gossip", "graph": [[0, 1], [2, 3]]})
    recipe = toy_recipe(federation={"algorithm": "gradualdiff", "topology": "gossip", "graph": [[0, 1], [1, 2], [2, 3]]})
    with pytest.raises(RecipeError, match=r"federation.graph: clients \[4\] have no path"):  # the builder checks too
        GossipPeers(recipe, {"w": torch.zeros(1)}, [4, 4, 4, 4, 4])


def test_ifca_clients_init_starts_each_cluster_from_one_local_fit(tmp_path):
    recipe = toy_recipe(federation={"algorithm": "gradualdiff", "rounds": 2, "clusters": 2, "cluster_init": "clients"},
                        partition={"num_clients": 4}, eval={"client_holdout": 0.2}, train={"local_steps": 5, "lr": 0.1})
    exp = TwoPopulations(recipe)
    run_federated(exp, out=str(tmp_path))
    warm = [f for f in exp.fits if f.round == 0]  # the warm-start fits, from the shared initial state
    assert len({f.update.client_id for f in warm}) == 2
    assert all(torch.equal(f.start["lin.weight"], exp.initial_state["lin.weight"]) for f in warm)
    starts = {tuple(f.start["lin.weight"].flatten().tolist()) for f in exp.fits if f.round == 1}
    expected = {tuple((exp.initial_state["lin.weight"] + f.update.delta["lin.weight"]).flatten().tolist()) for f in warm}
    assert starts <= expected  # round 1 trains from the warm-started models
    init = json.loads((tmp_path / "toy" / "federated" / "clusters.json").read_text())["init"]
    assert init["kind"] == "clients" and sorted(init["clients"]) == sorted(f.update.client_id for f in warm)


@pytest.mark.parametrize("federation", [
    {"topology": "gossip", "graph": "random-k", "graph_k": 1},
    {"clusters": 2, "cluster_init": "clients"},
    {"clusters": 2, "cluster_init": "farthest"},
])
def test_a_killed_topology_run_resumes_to_the_same_result(tmp_path, federation):
    from tests._resume import at_round, untimed, whole_and_resumed

    def make():
        recipe = toy_recipe(federation={"algorithm": "gradualdiff", "rounds": 4, **federation},
                            partition={"num_clients": 4}, eval={"client_holdout": 0.2},
                            checkpoint={"enabled": True}, train={"local_steps": 2, "lr": 0.1})
        return TwoPopulations(recipe)

    _, resumed = whole_and_resumed(make, tmp_path, at_round(3))
    assert not [f for f in resumed.fits if f.round < 3]  # nothing before the checkpoint runs again
    assert untimed(_rows(tmp_path / "whole")) == untimed(_rows(tmp_path / "cut"))
