"""Bulyan, centered clipping and the colluding attacks (ALIE, IPM), each against its paper's rule,
and through the server: the attackers send what the rule says, rows say whom a defense excluded."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from fedllm.algorithms.attacks import Attack, alie_z, collude
from fedllm.algorithms.cclip import CenteredClipping
from fedllm.algorithms.robust import Bulyan, Median, TrimmedMean, build_aggregator, cut_shares
from fedllm.config import RecipeError, load_recipe
from fedllm.federation.server import FederatedServer
from fedllm.types import ClientUpdate, serialized_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def upd(cid: int, *values: float) -> ClientUpdate:
    return ClientUpdate(cid, {"w": torch.tensor(values, dtype=torch.float64)}, 10, 1, 0.0)


def test_bulyan_follows_the_papers_two_stages_by_hand():
    # 7 updates, f = 1: theta = 5 picked by repeated Krum, then beta = 3 closest to the median
    pts = [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -40.0]
    ups = [upd(i, p, -p) for i, p in enumerate(pts)]
    agg = Bulyan(num_byzantine=1)
    out = agg(ups)
    assert agg.last_report == {"excluded": [5, 6]}  # the two far points are never picked
    # picked 0..4; per coordinate the 3 values closest to the median 2 are 1, 2, 3 -> mean 2
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"4f \+ 3 = 7"):
        agg(ups[:6])


def test_bulyan_is_registered_with_its_size_rule():
    assert isinstance(build_aggregator("bulyan", num_byzantine=2), Bulyan)
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["robust.aggregator=bulyan", "robust.byzantine=1"])  # 3 clients < 7
    assert err.value.where == "robust.byzantine"


def test_centered_clipping_moves_each_offset_at_most_tau_and_remembers_the_center():
    cc = CenteredClipping(tau=1.0, iterations=1)
    ups = [upd(0, 0.5, 0.0), upd(1, 0.0, 0.5), upd(2, 100.0, 0.0)]
    out = cc(ups)
    # from v = 0: offsets 0.5, 0.5 pass; the 100 is clipped to norm 1 -> v = (0.5 + 1, 0.5) / 3
    torch.testing.assert_close(out["w"], torch.tensor([1.5 / 3, 0.5 / 3], dtype=torch.float64))
    assert set(cc.last_report["clipped"]) == {2} and cc.last_report["clipped"][2] == pytest.approx(0.01)
    # the next round centers on that aggregate; a state round trip continues identically
    again = CenteredClipping(tau=1.0)
    again.load_state_dict(cc.state_dict())
    nxt = [upd(0, 1.0, 1.0), upd(1, 0.0, 0.0), upd(2, -100.0, 0.0)]
    a, b = cc(nxt), again(nxt)
    assert torch.equal(a["w"], b["w"])
    v = torch.tensor([0.5, 1 / 6], dtype=torch.float64)
    offs = [u.delta["w"] - v for u in nxt]
    want = v + sum(o * min(1.0, 1.0 / float(o.norm())) for o in offs) / 3
    torch.testing.assert_close(a["w"], want)


def test_alie_sends_mean_minus_z_std_with_the_papers_z_and_ipm_the_reversed_scaled_mean():
    # n = 10 clients, m = 2 attackers: s = floor(6) - 2 = 4, z = inverse Phi((10 - 4) / 10)
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    honest = [{"w": torch.tensor([float(i), 2.0 * i])} for i in range(8)]
    x = torch.stack([h["w"] for h in honest]).double()
    fake = collude(Attack("alie", 0.2), honest, 2)
    torch.testing.assert_close(fake["w"].double(), x.mean(0) - alie_z(10, 2) * x.std(0, unbiased=False),
                               rtol=1e-6, atol=1e-6)
    ipm = collude(Attack("ipm", 0.2, ipm_epsilon=0.1), honest, 2)
    torch.testing.assert_close(ipm["w"].double(), -0.1 * x.mean(0), rtol=1e-6, atol=1e-6)


def test_trimmed_rules_report_how_much_of_each_client_they_cut():
    ups = [upd(0, 0.0, 0.0), upd(1, 1.0, 1.0), upd(2, 2.0, 2.0), upd(3, 9.0, -9.0), upd(4, 3.0, 3.0)]
    tm = TrimmedMean(beta=0.2)
    tm(ups)
    assert tm.last_report["cut_share"][3] == 1.0 and tm.last_report["cut_share"][2] == 0.0
    med = Median()
    med(ups)
    assert med.last_report["cut_share"] == cut_shares(ups, 2)


@pytest.mark.parametrize("kind", ["alie", "ipm"])
def test_the_server_sends_the_colluders_vector_and_the_row_names_whom_bulyan_excluded(kind):
    recipe = load_recipe(TINY, ["partition.num_clients=7", "robust.aggregator=bulyan", "robust.byzantine=1",
                                f"attack.kind={kind}", "attack.fraction=0.15", "attack.ipm_epsilon=3.0"])
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.zeros(6)}
    server = FederatedServer(recipe, state, [10] * 7)
    (attacker,) = server.uplink.attackers
    plan = server.begin_round(1)
    honest = {}
    for k in plan.training:
        delta = {"w": 0.1 + 0.01 * torch.randn(6, generator=g)}
        if k != attacker:
            honest[k] = delta
        server.upload(1, ClientUpdate(k, delta, 10, 2, 1.0, bytes_up=serialized_bytes(delta)), state)
    new, metrics = server.finish_round(1, state)
    want = collude(server.uplink.attack, list(honest.values()), 1)
    sent = [u for u in server._arrived if u.client_id == attacker]
    assert len(sent) == 1 and torch.equal(sent[0].delta["w"], want["w"])
    assert metrics["applied"] and len(metrics["robust"]["excluded"]) == 2
    if kind == "ipm":  # -3 x the mean is far from the honest cloud: Bulyan's Krum stage drops it
        assert attacker in metrics["robust"]["excluded"]
        assert float(new["w"].min()) > 0.05


def test_colluding_attacks_are_refused_where_the_honest_updates_never_meet():
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["attack.kind=alie", "compression.codec=q8"])
    assert err.value.where == "compression.codec"


def test_centered_clipping_state_is_checkpointed_by_the_server():
    recipe = load_recipe(TINY, ["robust.aggregator=centered_clip", "robust.clip_radius=0.05"])
    state = {"w": torch.zeros(4)}
    server = FederatedServer(recipe, state, [10] * 3)
    server.begin_round(1)
    for k in range(3):
        server.upload(1, ClientUpdate(k, {"w": torch.full((4,), 0.1 * (k + 1))}, 10, 1, 1.0), state)
    new, metrics = server.finish_round(1, state)
    saved = server.state_dict()
    assert torch.equal(saved["aggregator"]["center"]["w"], server.aggregator.center["w"])
    assert set(metrics["robust"]["clipped"]) == {0, 1, 2}  # every offset from 0 exceeds 0.05
    fresh = FederatedServer(recipe, state, [10] * 3)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.aggregator.center["w"], server.aggregator.center["w"])
