"""No single site can crash, stall or outweigh a federation (issue 32, breaks 3, 4 and 5).

- break 3: a site whose discovery answer says num-examples 1e20 (a float) ended the ServerApp with
  an OverflowError; every count a site reports is now an integer in 1 .. federation.max_client_examples,
  and a site whose report is not is left out (its rounds are failed clients), never the run;
- break 4: a site that claims 1e9 examples at discovery and in every reply is left out by that range,
  and inside the range ``federation.max_client_weight`` caps the share it carries (clipped, the
  excess shared by the others, exactly as the held aggregator would on the fold-on-arrival path);
- break 5: with two sites, one sending 3e38 every round, the round rejects the outlier (a bound from
  the norms accepted in earlier rounds, or before any, the change bound x the state's norm), so
  the honest site still trains, and resume keeps that history exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedllm.algorithms.aggregate import cap_weights, client_weights
from fedllm.config import RecipeError, load_recipe
from fedllm.federation.modes import run_federated
from fedllm.federation.rundir import read_metrics
from fedllm.federation.screening import check_counts, few_norm_violations
from fedllm.federation.server import FederatedServer
from fedllm.types import ClientUpdate, weighted_sum
from tests._toy import ToyExperiment, toy_recipe

ROOT = Path(__file__).resolve().parents[1]


def _upd(k: int, n=10, steps=3, **kw) -> ClientUpdate:
    return ClientUpdate(k, {"w": torch.ones(2)}, n, steps, 1.0, **kw)


# ----------------------------------------------------------------------------- counts are integers in range


@pytest.mark.parametrize("value", [1e20, 12.0, math.nan, math.inf, True, "12", 0, -1, 10 ** 7 + 1, 10 ** 20])
def test_a_site_count_must_be_an_integer_in_range(value):
    pytest.importorskip("flwr")
    from fedllm.federation.flower.coordinator import site_count

    why = site_count(value, "num-examples", 10 ** 7)
    assert why is not None and "num-examples=" in why and "expected an integer in 1 .. 10000000" in why
    assert site_count(12, "num-examples", 10 ** 7) is None and site_count(10 ** 7, "num-examples", 10 ** 7) is None


@pytest.mark.parametrize(("lie", "reason"), [
    ({"num_examples": 1e20}, "num_examples=1e+20; expected an integer"),
    ({"num_examples": 12.0}, "num_examples=12.0; expected an integer"),
    ({"num_examples": True}, "num_examples=True; expected an integer"),
    ({"local_steps": 3.0}, "local_steps=3.0; expected an integer"),
    ({"num_examples": 10 ** 8}, "num_examples=100000000; expected 1 .. 10000000"),
    ({"metrics": {"dpsgd_epsilon": math.nan}}, "dpsgd_epsilon=nan; expected a number >= 0"),
    ({"metrics": {"dpsgd_epsilon": -1.0}}, "dpsgd_epsilon=-1.0"),
])
def test_reported_counts_of_the_wrong_type_or_range_are_refused(lie, reason):
    upd = dataclasses.replace(_upd(0), **lie)
    assert reason in check_counts(upd, None)
    assert check_counts(_upd(0), None) is None and check_counts(_upd(0, metrics={"dpsgd_epsilon": math.inf}), 10) is None


def test_the_range_is_a_recipe_field():
    assert toy_recipe().federation.max_client_examples == 10_000_000
    with pytest.raises(RecipeError, match="federation.max_client_examples"):
        toy_recipe(federation={"max_client_examples": 0})
    with pytest.raises(RecipeError, match="federation.max_client_weight"):
        toy_recipe(federation={"max_client_weight": 0})


# ----------------------------------------------------------------------------- the Flower engine, over records


class _HostileGrid:
    """A Grid whose nodes are in-test sites speaking the real records, at discovery and in rounds.

    ``record``: node -> what its discovery answer says instead of the truth (partial overrides);
    ``reply``: node -> ``f(content) -> content`` applied to its honest train reply.
    """

    def __init__(self, site_exp, record=None, reply=None) -> None:
        self.site_exp, self.pending, self.next_id = site_exp, {}, 0
        self.record, self.reply = record or {}, reply or {}

    def get_node_ids(self):
        return [100 + k for k in range(self.site_exp.recipe.partition.num_clients)]

    def push_messages(self, messages):
        for msg in messages:
            self.next_id += 1
            self.pending[str(self.next_id)] = msg
        return [str(i) for i in range(self.next_id - len(messages) + 1, self.next_id + 1)]

    def pull_messages(self, ids):
        from flwr.app import ConfigRecord, MessageType, RecordDict

        from fedllm.federation.flower.run_config import NODE_RECORD
        from fedllm.federation.flower.site import site_train

        replies = []
        for i in list(ids):
            msg = self.pending.pop(i)
            node = msg.metadata.dst_node_id
            k = node - 100
            examples = self.site_exp.data.client_examples(k)
            if msg.metadata.message_type == MessageType.QUERY:
                record = {"partition-id": k, "num-examples": len(examples), "own-data": True,
                          **self.record.get(node, {})}
                content = RecordDict({NODE_RECORD: ConfigRecord(record)})
            else:
                content = self.reply.get(node, lambda c: c)(site_train(self.site_exp, k, examples, msg.content))
            replies.append(SimpleNamespace(content=content, has_error=lambda: False,
                                           metadata=SimpleNamespace(reply_to_message_id=i, src_node_id=node)))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds Messages only inside a task; give this test process a task identity."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _flower_run(recipe, grid, out: Path):
    from fedllm.federation.flower.coordinator import RemoteExperiment, discover_sites

    server_side = ToyExperiment(recipe)
    sites = discover_sites(grid, recipe.partition.num_clients, 5.0, recipe.federation.max_client_examples)
    summary = run_federated(RemoteExperiment(server_side, grid, sites, timeout_s=5), str(out))
    return sites, summary, read_metrics(next(out.glob("*/federated"))), server_side


def test_a_site_reporting_1e20_examples_is_left_out_not_the_run(task_identity, tmp_path, caplog):
    # Prepare: node 101 (client 1) answers discovery with num-examples 1e20, a float
    recipe = toy_recipe(federation={"rounds": 2})
    grid = _HostileGrid(ToyExperiment(recipe), record={101: {"num-examples": 1e20}})
    # Execute
    with caplog.at_level(logging.WARNING):
        sites, summary, rows, _ = _flower_run(recipe, grid, tmp_path)
    # Assert: the run finished; client 1 failed every round, the others were applied; the log names it
    assert sites[1].problem is not None and "num-examples=1e+20" in sites[1].problem
    for r in rows[1:]:
        assert r["applied"] and r["failed_clients"] == 1 and r["aggregated_clients"] == [0, 2, 3], r
    assert "node 101 (client 1) reported num-examples=1e+20" in caplog.text
    assert "client 1 failed" in caplog.text and "left out at discovery" in caplog.text
    assert math.isfinite(summary["final"]["eval_loss"])


def test_discovery_survives_a_bad_partition_id_and_a_double_claim(task_identity, caplog):
    from fedllm.federation.flower.coordinator import discover_sites

    recipe = toy_recipe()  # 4 clients; node 103 claims client 2 as well, then a string id is ignored
    grid = _HostileGrid(ToyExperiment(recipe), record={103: {"partition-id": 2}})
    with caplog.at_level(logging.WARNING), pytest.raises(TimeoutError, match=r"only clients \[0, 1, 2\] of 4"):
        discover_sites(grid, 4, 0.5)  # client 3 never answered: the one clear error there is
    assert "both claim partition-id=2" in caplog.text
    grid = _HostileGrid(ToyExperiment(recipe), record={103: {"partition-id": "3"}, 102: {"own-data": 1}})
    with caplog.at_level(logging.WARNING), pytest.raises(TimeoutError):
        discover_sites(grid, 4, 0.5)
    assert "partition-id='3'" in caplog.text and "own-data=1" in caplog.text


def test_a_reply_with_a_float_count_is_a_failed_client(task_identity, tmp_path, caplog):
    from flwr.app import MetricRecord

    def float_count(content):
        content["update"] = MetricRecord({**dict(content["update"]), "num-examples": 1e20})
        return content

    recipe = toy_recipe(federation={"rounds": 1})
    grid = _HostileGrid(ToyExperiment(recipe), reply={100: float_count})
    with caplog.at_level(logging.WARNING):
        _, _, rows, _ = _flower_run(recipe, grid, tmp_path)
    assert rows[1]["applied"] and rows[1]["failed_clients"] == 1 and 0 not in rows[1]["aggregated_clients"]
    assert "client 0 (node 100): the reply's num-examples=1e+20: expected an integer" in caplog.text


@pytest.mark.parametrize(("lie", "said"), [
    ({"grad-steps": 0}, "reported grad-steps=0 for 3 local steps"),
    ({"zero": True}, "sent an update that is exactly zero"),
])
def test_a_site_reporting_no_training_fails_its_round_not_the_run(task_identity, tmp_path, caplog, lie, said):
    """In-process, no gradient or an all-zero update ends the run (the numeric path is broken); from a
    site it was a way for one site to stop every run: now that site's client fails the round."""
    from flwr.app import MetricRecord

    from fedllm.federation.flower.codec import pack_state, unpack_state

    def no_training(content):
        if lie.get("zero"):
            content["delta"] = pack_state({k: v * 0 for k, v in unpack_state(content["delta"]).items()})
        else:
            content["update"] = MetricRecord({**dict(content["update"]), **lie})
        return content

    recipe = toy_recipe(federation={"rounds": 2})
    with caplog.at_level(logging.WARNING):
        _, summary, rows, _ = _flower_run(recipe, _HostileGrid(ToyExperiment(recipe), reply={102: no_training}),
                                          tmp_path)
    assert all(r["applied"] and r["failed_clients"] == 1 and 2 not in r["aggregated_clients"] for r in rows[1:])
    assert f"client 2 (node 102) {said}" in caplog.text and summary["status"] == "ok"


def _liar_reply(claim: int, scale: float):
    from flwr.app import MetricRecord

    from fedllm.federation.flower.codec import pack_state, unpack_state

    def lie(content):
        content["update"] = MetricRecord({**dict(content["update"]), "num-examples": claim})
        content["delta"] = pack_state({k: v * scale for k, v in unpack_state(content["delta"]).items()})
        return content

    return lie


def test_a_consistent_liar_of_1e9_examples_is_left_out(task_identity, tmp_path):
    # Prepare: client 0 claims 1e9 examples at discovery and in every reply, with a -50x delta
    recipe = toy_recipe(federation={"rounds": 2})
    grid = _HostileGrid(ToyExperiment(recipe), record={100: {"num-examples": 10 ** 9}},
                        reply={100: _liar_reply(10 ** 9, -50.0)})
    honest = _flower_run(recipe, _HostileGrid(ToyExperiment(recipe)), tmp_path / "honest")[1]
    # Execute
    sites, summary, rows, _ = _flower_run(recipe, grid, tmp_path / "liar")
    # Assert: over federation.max_client_examples: left out, the others train as without it
    assert "num-examples=1000000000" in sites[0].problem
    assert all(r["aggregated_clients"] == [1, 2, 3] for r in rows[1:])
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    assert summary["final"]["eval_loss"] < 2 * honest["final"]["eval_loss"]


def test_a_liar_inside_the_range_carries_at_most_max_client_weight(task_identity, tmp_path):
    """Claiming 10^6 examples (in range) against sites of 8..20: capped to the share the recipe allows."""
    def final(cap, out):
        recipe = toy_recipe(federation={"rounds": 1, "max_client_weight": cap})
        grid = _HostileGrid(ToyExperiment(recipe), record={100: {"num-examples": 10 ** 6}},
                            reply={100: _liar_reply(10 ** 6, 1.0)})  # the claim alone, an honest delta
        _, _, _, server_side = _flower_run(recipe, grid, out)
        return server_side.saved

    capped, uncapped = final(0.25, tmp_path / "capped"), final(None, tmp_path / "uncapped")
    # the same round by hand: the clients' own deltas weighed by the capped and the raw claims
    fits = ToyExperiment(toy_recipe(federation={"rounds": 1}))
    start = fits.initial_state
    ups = [dataclasses.replace(fits.fit(k, fits.data.client_examples(k), start, 1, 3),
                               num_examples=10 ** 6 if k == 0 else len(fits.data.client_examples(k)))
           for k in range(4)]
    for cap, got in ((0.25, capped), (None, uncapped)):
        w = client_weights(ups, True, cap)
        want = weighted_sum([u.delta for u in ups], w)
        assert all(torch.equal(got[k], start[k] + want[k]) for k in start), cap
    assert client_weights(ups, True, 0.25) == [0.25] * 4 and client_weights(ups, True)[0] > 0.9999


# ----------------------------------------------------------------------------- the weight cap


def test_cap_weights_clips_and_redistributes():
    assert cap_weights([0.9, 0.05, 0.05], 0.5) == [0.5, 0.25, 0.25]
    got = cap_weights([0.7, 0.2, 0.06, 0.04], 0.3)  # two rounds of water-filling: 0.7 then 0.2's share
    assert got[:2] == [0.3, 0.3] and math.isclose(sum(got), 1.0) and math.isclose(got[2] / got[3], 1.5)
    assert cap_weights([0.6, 0.4], 0.1) == [0.5, 0.5]  # a cap below 1/K is 1/K
    w = [1 / 3, 0.2, 7 / 15]
    assert cap_weights(w, 0.5) == w and cap_weights(w, None) == w  # under the cap: the same floats


def _servers(tmp_path, overrides, sizes):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["checkpoint.keep=2", *overrides])
    state = {"a": torch.zeros(5, 3), "b": torch.zeros(4)}
    folding = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "fold")
    holding = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "hold")
    holding.streams = False
    assert folding.streams
    return folding, holding, state


@pytest.mark.parametrize("algorithm", ["fedavg", "fednova"])
@pytest.mark.parametrize("skip", [(), (1,)])
def test_the_capped_mean_folded_on_arrival_equals_the_held_one_bit_for_bit(algorithm, skip, tmp_path):
    # Prepare: client 0 claims (and the server knows) 10^6 examples; the others 10..12
    sizes = [10 ** 6, 10, 11, 12]
    folding, holding, state = _servers(tmp_path, [f"federation.algorithm={algorithm}",
                                                  "federation.max_client_weight=0.4"], sizes)
    gen = torch.Generator().manual_seed(3)
    deltas = {k: {n: 0.01 * torch.randn(v.shape, generator=gen) for n, v in state.items()} for k in range(3)}
    deltas[3] = {n: 0.01 * torch.randn(v.shape, generator=gen) for n, v in state.items()}
    # Execute
    outs = []
    for server in (folding, holding):
        plan = server.begin_round(1)
        for k in plan.training:
            if k not in skip:
                server.upload(1, ClientUpdate(k, deltas[k], sizes[k], plan.steps[k], 1.0), state)
        outs.append(server.finish_round(1, state)[0])
    # Assert: bit-identical, and the liar's coefficient is the cap (FedAvg: the weights themselves)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in state)
    if algorithm == "fedavg":
        ups = [ClientUpdate(k, deltas[k], sizes[k], 3, 1.0) for k in range(4) if k not in skip]
        want = weighted_sum([u.delta for u in ups], client_weights(ups, True, 0.4))
        assert client_weights(ups, True, 0.4)[0] == 0.4
        assert all(torch.equal(outs[0][k], state[k] + want[k]) for k in state)


# ----------------------------------------------------------------------------- two sites, one sends 3e38


def test_few_norm_violations_rule():
    assert few_norm_violations({0: 1e38, 1: 0.5}, 100.0, [0.4, 0.6], 1.0, 10.0) == {
        0: "L2 norm 1e+38 exceeds federation.reject_norm_factor=100 x the median 0.5 of the norms accepted "
           "in earlier rounds"}
    assert few_norm_violations({0: 1e38, 1: 0.5}, 100.0, [], 2.0, 10.0) == {  # 2 updates x 10 x the state's norm 2
        0: "L2 norm 1e+38 exceeds 2 x federation.max_change_ratio=10 x the global state's norm 2 (2 updates, "
           "no round applied yet)"}
    assert few_norm_violations({0: 39.0, 1: 0.5}, 100.0, [], 2.0, 10.0) == {}
    assert list(few_norm_violations({0: 21.0}, 100.0, [], 2.0, 10.0)) == [0]
    assert few_norm_violations({0: 1e38}, None, [1.0], 2.0, 10.0) == {}  # the rule is off
    assert few_norm_violations({0: 1e38, 1: 1.0}, 100.0, [], 0.0, 10.0) == {}  # no scale to compare with
    assert few_norm_violations({0: 1e38, 1: 1.0, 2: 1.0}, 100.0, [1.0], 1.0, 10.0) == {}  # the round's median's job


class _Flooder(ToyExperiment):
    """Client 0 sends 3e38 in every coordinate, every round."""

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        upd = super().fit(client_id, examples, start, rnd, steps, grad_term)
        if client_id == 0:
            upd = dataclasses.replace(upd, delta={k: torch.full_like(v, 3e38) for k, v in upd.delta.items()})
        return upd



class _Stop(BaseException):
    """Ends a run mid-way as a kill would (no engine catches a BaseException)."""


class _FloodThenStop(_Flooder):
    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        if rnd == 3:
            raise _Stop
        return super().fit(client_id, examples, start, rnd, steps, grad_term)


def _two_sites(**federation):
    return toy_recipe(partition={"method": "iid", "num_clients": 2}, train={"lr": 0.01},
                      federation={"rounds": 5, **federation}, checkpoint={"enabled": True})


def test_two_sites_one_sends_3e38_every_round_the_other_still_trains(tmp_path):
    # Prepare: two sites (no median of the round), client 0 floods every round
    exp = _Flooder(_two_sites(), lora=True)
    # Execute
    run_federated(exp, out=str(tmp_path))
    rows = read_metrics(next(tmp_path.glob("*/federated")))
    # Assert: the flooder is rejected every round (first by the change bound x the state's norm, then
    # by the accepted norms' median), each round applies the honest update, the eval loss falls
    assert "2 x federation.max_change_ratio=10 x the global state's norm" in rows[1]["rejected"]["0"]
    for r in rows[2:]:
        assert "median" in r["rejected"]["0"] and "earlier rounds" in r["rejected"]["0"], r
    assert all(r["applied"] and r["aggregated_clients"] == [1] for r in rows[1:])
    losses = [r["eval_loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(bool(torch.isfinite(v).all()) for v in exp.saved.values())


def test_the_norm_history_is_checkpointed_and_resume_is_exact(tmp_path):
    from fedllm.federation.checkpoint import checkpoint_dir, load_latest

    reference = _Flooder(_two_sites(), lora=True)
    run_federated(reference, out=str(tmp_path / "a"))
    # the same run stopped in round 3 (its newest checkpoint is round 2's), then resumed
    with pytest.raises(_Stop):
        run_federated(_FloodThenStop(_two_sites(), lora=True), out=str(tmp_path / "b"))
    run = next((tmp_path / "b").glob("*/federated"))
    assert len(load_latest(checkpoint_dir(run)).server_state["norm_history"]) == 2  # client 1, rounds 1-2
    resumed = _Flooder(_two_sites(), lora=True)
    run_federated(resumed, out=str(tmp_path / "b"), resume=True)
    drop = ("round_time_s", "train_time_s", "aggregate_time_s", "eval_time_s")
    a, b = (read_metrics(next((tmp_path / d).glob("*/federated"))) for d in "ab")
    assert [{k: v for k, v in r.items() if k not in drop} for r in b] == \
        [{k: v for k, v in r.items() if k not in drop} for r in a]
    assert all(torch.equal(resumed.saved[k], reference.saved[k]) for k in reference.saved)


def test_two_sites_over_the_flower_records_one_sends_3e38(task_identity, tmp_path):
    """The same over the wire format: the honest site's update is applied every round."""
    recipe = _two_sites(rounds=3)
    grid = _HostileGrid(ToyExperiment(recipe, lora=True), reply={100: _liar_reply(
        len(ToyExperiment(recipe).data.client_examples(0)), 3e38)})
    from fedllm.federation.flower.coordinator import RemoteExperiment, discover_sites

    server_side = ToyExperiment(recipe, lora=True)
    sites = discover_sites(grid, 2, 5.0)
    run_federated(RemoteExperiment(server_side, grid, sites, timeout_s=5), str(tmp_path))
    rows = read_metrics(next(tmp_path.glob("*/federated")))
    assert all(r["applied"] and r["aggregated_clients"] == [1] and "0" in r["rejected"] for r in rows[1:])
    losses = [r["eval_loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
