"""``lora.client_ranks``: clients of different LoRA ranks in one federation (HetLoRA zero-padding with
``factorwise``, FlexLoRA with ``svd``); equal ranks reduce exactly to the ordinary aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedllm.algorithms.lora_agg import RankLayout, lora_aggregate
from fedllm.config import RecipeError, load_recipe
from fedllm.federation.server import FederatedServer
from fedllm.types import ClientUpdate, serialized_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
MIXED = ROOT / "recipes" / "examples" / "mixed_ranks.yaml"
R, OUT, IN = 6, 12, 14


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A.weight": scale * torch.randn(R, IN, generator=g),
            "layer.lora_B.weight": scale * torch.randn(OUT, R, generator=g),
            "head.bias": scale * torch.randn(3, generator=g)}


def _recipe(*overrides: str):
    return load_recipe(TINY, ["lora.r=6", "output.plots=false", *overrides])


def _round(recipe, global_state, deltas):
    """One server round over hand-made client deltas; returns (new state, metrics, server)."""
    server = FederatedServer(recipe, global_state, [10] * len(deltas))
    plan = server.begin_round(1)
    for k in plan.training:
        start = server.start_state(k, global_state)
        server.upload(1, ClientUpdate(k, deltas[k], 10, 3, 1.0, bytes_up=serialized_bytes(deltas[k])), start)
    new, metrics = server.finish_round(1, global_state)
    return new, metrics, server


def test_truncate_zeroes_the_slots_beyond_the_rank_and_wire_keeps_only_the_rest():
    layout = RankLayout(_state(0), [2, 6])
    cut = layout.truncate(_state(0), 0)
    assert torch.count_nonzero(cut["layer.lora_A.weight"][2:]) == 0
    assert torch.count_nonzero(cut["layer.lora_B.weight"][:, 2:]) == 0
    assert torch.equal(cut["layer.lora_A.weight"][:2], _state(0)["layer.lora_A.weight"][:2])
    assert torch.equal(cut["head.bias"], _state(0)["head.bias"])
    wire = layout.wire(_state(0), 0)
    assert wire["layer.lora_A.weight"].shape == (2, IN) and wire["layer.lora_B.weight"].shape == (OUT, 2)
    assert all(torch.equal(a, b) for a, b in zip(layout.truncate(_state(0), 1).values(), _state(0).values()))
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        RankLayout(_state(0), [7])


def test_equal_ranks_reduce_exactly_to_the_ordinary_aggregation():
    g = _state(0)
    updates = [ClientUpdate(k, _state(10 + k, 0.1), 10 + k, 3, 1.0) for k in range(3)]
    for mode in ("factorwise", "svd"):
        plain = lora_aggregate(g, updates, mode)
        started = lora_aggregate(g, updates, mode, starts=[RankLayout(g, [R] * 3).truncate(g, k) for k in range(3)])
        assert plain[1] == started[1]
        assert all(torch.equal(plain[0][k], started[0][k]) for k in g)
    # through the server: client_ranks all equal to lora.r builds no layout and changes no number
    deltas = [u.delta for u in updates]
    base, m0, _ = _round(_recipe(), g, deltas)
    same, m1, server = _round(_recipe("lora.client_ranks=[6,6,6]"), g, deltas)
    assert server.ranks is None and all(torch.equal(base[k], same[k]) for k in g)
    assert m0 == m1


def test_hetlora_zero_pads_each_delta_and_ignores_what_lies_beyond_a_rank():
    g = _state(0)
    ranks = [2, 4, 6]
    deltas = [_state(10 + k, 0.1) for k in range(3)]  # every slot nonzero: what a rank-2 client must not send
    new, metrics, server = _round(_recipe("lora.client_ranks=[2,4,6]"), g, deltas)
    layout = RankLayout(g, ranks)
    want = {k: g[k] + sum(layout.truncate(d, i)[k] for i, d in enumerate(deltas)) / 3 for k in g}
    for k in g:
        torch.testing.assert_close(new[k], want[k], rtol=0, atol=1e-6)
    # slot 5 is held by client 2 alone: it moves by a third of that client's change (zero padding)
    torch.testing.assert_close(new["layer.lora_A.weight"][5], g["layer.lora_A.weight"][5]
                               + deltas[2]["layer.lora_A.weight"][5] / 3)
    assert metrics["bytes_up"] == sum(serialized_bytes(layout.wire(d, i)) for i, d in enumerate(deltas))
    assert metrics["bytes_down"] == sum(serialized_bytes(layout.wire(g, i)) for i in range(3))
    assert set(metrics["lora_truncation_error_by_rank"]) == {"2", "4", "6"}
    assert metrics["lora_truncation_error_by_rank"]["6"] == 0.0
    assert 0 < metrics["lora_truncation_error_by_rank"]["4"] < metrics["lora_truncation_error_by_rank"]["2"] < 1
    # the error is measured against the clients' own products (their truncated starts + deltas)
    clients = [{k: layout.truncate(g, i)[k] + layout.truncate(d, i)[k] for k in g} for i, d in enumerate(deltas)]
    mean = sum(c["layer.lora_B.weight"].double() @ c["layer.lora_A.weight"].double() for c in clients) / 3
    got = new["layer.lora_B.weight"].double() @ new["layer.lora_A.weight"].double()
    assert metrics["lora_aggregation_error"] == pytest.approx(float((mean - got).norm() / mean.norm()), rel=1e-9)


def test_flexlora_keeps_the_best_rank_r_part_of_the_mean_product_in_singular_value_order():
    g = _state(0)
    ranks = [3, 5, 6]
    deltas = [_state(20 + k, 0.3) for k in range(3)]
    new, metrics, _ = _round(_recipe("lora.client_ranks=[3,5,6]", "federation.lora_aggregation=svd"), g, deltas)
    layout = RankLayout(g, ranks)
    locals_ = [{k: layout.truncate(g, i)[k] + layout.truncate(d, i)[k] for k in g} for i, d in enumerate(deltas)]
    mean = sum(c["layer.lora_B.weight"].double() @ c["layer.lora_A.weight"].double() for c in locals_) / 3
    s = torch.linalg.svdvals(mean)
    got = new["layer.lora_B.weight"].double() @ new["layer.lora_A.weight"].double()
    # Eckart-Young: the residual of the best rank-6 part is the tail of the singular values
    tail = float(s[R:].square().sum().sqrt() / s.square().sum().sqrt())
    assert tail > 0.01 and metrics["lora_aggregation_error"] == pytest.approx(tail, rel=1e-5)
    torch.testing.assert_close((mean - got).norm().item(), s[R:].square().sum().sqrt().item(), rtol=1e-5, atol=1e-6)
    # the slots are in singular-value order, so a rank-k client receives the best rank-k part of P
    p = torch.linalg.svdvals(got)
    for rk in (3, 5):
        want = float(p[rk:].square().sum().sqrt() / p.square().sum().sqrt())
        assert metrics["lora_truncation_error_by_rank"][str(rk)] == pytest.approx(want, rel=1e-4)


def test_a_low_rank_client_trains_only_its_own_slots():
    """No mask in training: zero rows of A and zero columns of B get zero gradients, so a client that
    starts from its truncation trains a rank-r_k adapter (the server's truncation is only a guard)."""
    from fedllm.experiments.lm import LMExperiment

    recipe = load_recipe(TINY, ["lora.client_ranks=[1,2,4]", "eval.bleu_samples=0", "train.lr=0.01"])
    exp = LMExperiment(recipe)
    layout = RankLayout(exp.initial_state, recipe.lora.client_ranks)
    start = layout.truncate(exp.initial_state, 1)
    upd = exp.fit(1, exp.data.client_examples(1), start, 1, 3)
    a_keys = [a for a, _ in layout.pairs]
    b_keys = [b for _, b in layout.pairs]
    assert all(torch.count_nonzero(upd.delta[a][2:]) == 0 for a in a_keys)
    assert all(torch.count_nonzero(upd.delta[b][:, 2:]) == 0 for b in b_keys)
    assert all(torch.count_nonzero(upd.delta[a][:2]) > 0 for a in a_keys)
    assert sum(int(torch.count_nonzero(upd.delta[b][:, :2])) for b in b_keys) > 0


@pytest.mark.parametrize(("overrides", "field"), [
    (["lora.client_ranks=[2,4]"], "lora.client_ranks"),  # tiny has 3 clients
    (["lora.client_ranks=[2,4,9]"], "lora.client_ranks[2]"),
    (["lora.client_ranks=[2,4,0]"], "lora.client_ranks[2]"),
    (["lora.client_ranks=[2,4,8]", "federation.algorithm=scaffold"], "lora.client_ranks"),
    (["lora.client_ranks=[2,4,8]", "federation.engine=flower"], "lora.client_ranks"),
])
def test_bad_client_ranks_name_the_field(overrides, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["lora.r=8", *overrides])
    assert err.value.where == field


@pytest.mark.parametrize("aggregation", ["factorwise", "svd"])
def test_the_mixed_ranks_recipe_runs_end_to_end(tmp_path, aggregation):
    from fedllm.cli import main

    assert main(["run", str(MIXED), "--out", str(tmp_path), "federation.rounds=2", "eval.bleu_samples=0",
                 f"federation.lora_aggregation={aggregation}", "output.plots=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "mixed_ranks" / "federated" / "metrics.jsonl").open()]
    full = serialized_bytes(load_recipe_state(tmp_path))
    for row in rows[1:]:
        assert row["applied"] and row["lora_truncation_error_by_rank"]["8"] == 0.0
        assert 0 < row["lora_truncation_error_by_rank"]["2"] < 1
        assert 0 <= row["lora_aggregation_error"] < 1
        assert row["bytes_up"] < 3 * full  # ranks 2, 4 and 8 send 2/8, 4/8 and all of the factors
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def load_recipe_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "mixed_ranks" / "federated" / "adapter" / "adapter_model.safetensors"))
