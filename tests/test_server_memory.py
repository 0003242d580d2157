"""A server whose memory does not grow with its clients (issue 21).

- the round's mean is folded as updates arrive (:class:`~fedllm.types.RunningSum`) and equals the
  held mean bit for bit when every planned client reports, within one float64 rounding when some
  did not;
- SCAFFOLD controls, error-feedback residuals and personal factors live in a per-client
  safetensors store (:class:`~fedllm.federation.store.DiskStates`): checked on read, written
  atomically, and a checkpoint holds its index, so what a round writes grows with that round's
  clients, not with every client seen.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from fedllm import types
from fedllm.config import load_recipe
from fedllm.federation.server import FederatedServer
from fedllm.federation.store import DiskStates
from fedllm.types import ClientUpdate, RunningSum, serialized_bytes, weighted_sum

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHAPES = {"a.weight": (6, 5), "b.weight": (7,), "c.bias": (3, 2, 2)}


def _state(gen: torch.Generator, scale: float = 1.0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    return {k: scale * torch.randn(s, generator=gen) for k, s in shapes.items()}


def _round(server: FederatedServer, rnd: int, state, gen: torch.Generator, skip=(), huge=()):
    """One round of synthetic uploads (clients in ``skip`` fail; those in ``huge`` send a norm-1e6 update)."""
    plan = server.begin_round(rnd)
    for k in plan.training:
        if k in skip:
            continue
        delta = _state(gen, 1e6 if k in huge else 0.01, {key: v.shape for key, v in state.items()})
        server.upload(rnd, ClientUpdate(k, delta, server.client_sizes[k], 3, 1.0,
                                        bytes_up=serialized_bytes(delta)), state)
    return server.finish_round(rnd, state)


def _pair(overrides, sizes, tmp_path=None):
    """The same server twice: folding the mean as updates arrive, and holding every update."""
    recipe = load_recipe(TINY, ["checkpoint.keep=2", *overrides])
    state = {k: torch.zeros(s) for k, s in SHAPES.items()}
    folding = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "fold" if tmp_path else None)
    holding = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "hold" if tmp_path else None)
    holding.streams = False
    assert folding.streams, "this recipe's mean must be foldable"
    return folding, holding, state


def test_running_sum_is_weighted_sum_bit_for_bit(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    states = [_state(gen) for _ in range(10)]
    weights = torch.rand(10, generator=gen).tolist()
    # the reference: the key-by-key float64 loop weighted_sum always was
    want = {k: sum((float(w) * s[k].to(torch.float64) for s, w in zip(states, weights)),
                   torch.zeros(SHAPES[k], dtype=torch.float64)).float() for k in SHAPES}
    total = RunningSum()
    for s, w in zip(states, weights):
        total.add(s, w)
    got = total.result()
    assert all(torch.equal(got[k], want[k]) for k in SHAPES)
    assert all(torch.equal(weighted_sum(states, weights)[k], want[k]) for k in SHAPES)
    # the compiled one-pass fold and torch's convert-multiply-add give the same bits (float16: torch only)
    monkeypatch.setattr(types, "_NUMPY_FOLD", ())
    assert all(torch.equal(weighted_sum(states, weights)[k], want[k]) for k in SHAPES)
    halves = [{k: v.half() for k, v in st.items()} for st in states]
    want16 = {k: sum((float(w) * s[k].to(torch.float64) for s, w in zip(halves, weights)),
                     torch.zeros(SHAPES[k], dtype=torch.float64)).half() for k in SHAPES}
    assert all(torch.equal(weighted_sum(halves, weights)[k], want16[k]) for k in SHAPES)
    # a sum large enough to fold its tiles on several threads: still the sequential bits
    big = [{"w": torch.randn(1100, 1000, generator=gen), "b": torch.randn(70_000, generator=gen)} for _ in range(16)]
    assert 16 * 1_170_000 >= types._PARALLEL_FROM
    seq = RunningSum()
    for st, w in zip(big, weights + weights[:6]):
        seq.add(st, w)
    par, ref = weighted_sum(big, weights + weights[:6]), seq.result()
    assert all(torch.equal(par[k], ref[k]) for k in ref)
    with pytest.raises(KeyError):
        total.add({"a.weight": torch.zeros(6, 5)}, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        RunningSum().result()


VARIANTS = {"uniform": ["federation.weighted=false"], "weighted": ["federation.weighted=true"],
            "server_dp": ["privacy.dp=server", "privacy.noise_multiplier=0.5", "privacy.clip=0.05"],
            "server_dp_adaptive": ["privacy.dp=server", "privacy.noise_multiplier=0.5", "privacy.clip=0.05",
                                   "privacy.adaptive_clip=true"],
            "client_dp": ["privacy.dp=client", "privacy.noise_multiplier=0.5", "privacy.clip=0.05"],
            "fednova": ["federation.algorithm=fednova", "federation.reject_norm_factor=null"],  # spools anyway
            "fednova_weighted": ["federation.algorithm=fednova", "federation.weighted=true"],
            "scaffold_topk": ["federation.algorithm=scaffold", "compression.codec=topk", "compression.topk_fraction=0.3",
                              "compression.error_feedback=true", "server.optimizer=fedadam", "server.lr=0.01"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_folded_round_equals_the_held_round_bit_for_bit(variant):
    sizes = [5 + 3 * k for k in range(10)]
    folding, holding, state = _pair(["partition.num_clients=10", "federation.fraction=0.6", *VARIANTS[variant]],
                                    sizes)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = s2 = state
    for rnd in (1, 2, 3):
        (s1, m1), (s2, m2) = _round(folding, rnd, s1, g1), _round(holding, rnd, s2, g2)
        assert m1["applied"] and m1["aggregated_clients"] == m2["aggregated_clients"]
        assert {k: v for k, v in m1.items() if k.startswith("dp_")} == {k: v for k, v in m2.items() if k.startswith("dp_")}
        assert all(torch.equal(s1[k], s2[k]) for k in SHAPES), f"round {rnd} differs"
        assert not folding._arrived or all(u.delta == {} for u in folding._arrived)  # nothing held


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bound", ["absolute", "relative", "relative_on_disk"])
def test_a_folded_round_with_failed_and_rejected_clients(weighted, bound, tmp_path):
    # an outlier rejected on arrival by federation.reject_norm, or at the end by the round's median
    # (federation.reject_norm_factor, whose spool lets the sum be folded again without it)
    sizes = [5 + 3 * k for k in range(10)]
    rule = (["federation.reject_norm=100", "federation.reject_norm_factor=null"] if bound == "absolute"
            else ["federation.reject_norm_factor=100"])
    folding, holding, state = _pair(["partition.num_clients=10", "federation.fraction=0.6", *rule,
                                     f"federation.weighted={str(weighted).lower()}"], sizes,
                                    tmp_path if bound == "relative_on_disk" else None)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    planned = folding.begin_round(1).training
    skip, huge = planned[:1], planned[1:2]  # one fails, one sends a norm-1e6 update
    (s1, m1), (s2, m2) = _round(folding, 1, state, g1, skip, huge), _round(holding, 1, state, g2, skip, huge)
    assert m1["aggregated_clients"] == m2["aggregated_clients"] == planned[2:]
    assert m1["rejected"] == m2["rejected"] and list(m1["rejected"]) == huge
    if bound != "absolute":  # folded again from the spool: the held mean's bits
        assert all(torch.equal(s1[k], s2[k]) for k in SHAPES)
    for k in SHAPES:  # without a spool one float64 rescale, then the float32 cast: within one float32 ulp
        ulp = torch.finfo(torch.float32).eps * s2[k].abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((s1[k] - s2[k]).abs() <= ulp).all()
    if bound == "relative_on_disk":  # the round's spool is gone once the next round begins
        folding.begin_round(2)
        assert not (tmp_path / "fold" / "spool").exists()


def test_the_mean_is_held_where_the_rule_needs_every_update():
    state = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for overrides in (["robust.aggregator=median"],
                      ["privacy.secure_aggregation=true"], ["hierarchy.regions=2"]):
        recipe = load_recipe(TINY, ["partition.num_clients=6", *overrides])
        assert not FederatedServer(recipe, state, [10] * 6).streams, overrides
    for dp in ("client", "server"):  # the clients noised their uploads / the server clips each on arrival
        recipe = load_recipe(TINY, ["partition.num_clients=6", f"privacy.dp={dp}", "privacy.noise_multiplier=1.0"])
        assert FederatedServer(recipe, state, [10] * 6).streams
    lora = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    assert not FederatedServer(load_recipe(TINY), lora, [10] * 3).streams  # lora_aggregation_error
    assert FederatedServer(load_recipe(TINY, ["eval.lora_error=false"]), lora, [10] * 3).streams


def test_disk_states_read_back_checked_and_pruned(tmp_path):
    store = DiskStates(tmp_path / "s", keep=1)
    gen = torch.Generator().manual_seed(3)
    saved = {}
    for version in (1, 2, 3):
        store.version = version
        saved[version] = _state(gen)
        store[7] = saved[version]
    assert all(torch.equal(store[7][k], saved[3][k]) for k in SHAPES)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["7.2.safetensors", "7.3.safetensors"]
    assert 7 in store and 8 not in store and store.get(8) is None and list(store) == [7]
    index = store.state_dict()
    again = DiskStates(tmp_path / "s", keep=1)
    again.load_state_dict(index)
    assert all(torch.equal(again[7][k], saved[3][k]) for k in SHAPES)
    # a changed file is named, never read as a different state
    path = tmp_path / "s" / "7.3.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"7\.3\.safetensors.*sha256"):
        again[7]
    path.unlink()
    with pytest.raises(ValueError, match=r"7\.3\.safetensors: missing"):
        DiskStates(tmp_path / "s", keep=1).load_state_dict(index)


def test_server_state_on_disk_resumes_bit_for_bit_and_checkpoints_grow_with_the_round(tmp_path):
    overrides = ["partition.num_clients=60", "federation.fraction=0.1", "federation.algorithm=scaffold",
                 "compression.codec=topk", "compression.topk_fraction=0.2", "compression.error_feedback=true",
                 "checkpoint.keep=2"]
    recipe = load_recipe(TINY, overrides)
    sizes = [10] * 60
    state = {"w": torch.zeros(50, 200), "b": torch.zeros(100)}  # 10,100 entries
    memory = FederatedServer(recipe, state, sizes)  # the reference: every client's state in memory
    disk = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "run")
    gen_m, gen_d = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    sm, sd = state, state
    reference, ckpt_bytes = {}, {"disk": [], "memory": []}
    for rnd in range(1, 9):
        sm, _ = _round(memory, rnd, sm, gen_m)
        reference[rnd] = sm
        buf = io.BytesIO()
        torch.save(memory.state_dict(), buf)
        ckpt_bytes["memory"].append(buf.tell())
    for rnd in range(1, 5):
        sd, _ = _round(disk, rnd, sd, gen_d)
        assert all(torch.equal(sd[k], reference[rnd][k]) for k in state)
        buf = io.BytesIO()
        torch.save(disk.state_dict(), buf)
        ckpt_bytes["disk"].append(buf.tell())
    saved, gen_at4 = disk.state_dict(), gen_d.get_state()
    # killed in round 5, after some clients' residuals were written
    plan = disk.begin_round(5)
    for k in plan.training[:3]:
        delta = _state(gen_d, 0.01, {key: v.shape for key, v in state.items()})
        disk.upload(5, ClientUpdate(k, delta, 10, 3, 1.0, bytes_up=serialized_bytes(delta)), sd)
    # in memory every client seen so far is cloned into each checkpoint; on disk only their index
    # (on disk each round adds ~100 bytes of index per client it wrote, no tensors)
    assert ckpt_bytes["memory"][3] > 2.5 * ckpt_bytes["memory"][0], ckpt_bytes
    assert ckpt_bytes["disk"][3] - ckpt_bytes["disk"][0] < 0.02 * (ckpt_bytes["memory"][3] - ckpt_bytes["memory"][0])
    assert ckpt_bytes["disk"][3] < 1.1 * ckpt_bytes["disk"][0], ckpt_bytes
    assert len(disk.scaffold.clients) >= 18 and len(disk.uplink.feedback.residuals) >= 18
    # a fresh server resumes from round 4's checkpoint: rounds 5..8 give the reference's bits
    resumed = FederatedServer(recipe, state, sizes, state_dir=tmp_path / "run")
    resumed.load_state_dict(saved)
    gen_d.set_state(gen_at4)
    for rnd in range(5, 9):
        sd, _ = _round(resumed, rnd, sd, gen_d)
        assert all(torch.equal(sd[k], reference[rnd][k]) for k in state), f"round {rnd}"
    assert all(torch.equal(resumed.scaffold.c[k], memory.scaffold.c[k]) for k in state)


def test_secure_aggregation_folds_the_masked_inputs_as_they_arrive():
    from fedllm.algorithms.secure import MaskedSum, SecAggRound

    gen = torch.Generator().manual_seed(5)
    deltas = {k: _state(gen, 0.1) for k in range(5)}

    def unmask(summed: bool, order):
        rnd = SecAggRound(list(range(5)), 3, 62, 30, seed=7)
        rnd.advertise_keys()
        rnd.share_keys()
        masked = {k: rnd.masked_input(k, deltas[k]) for k in range(5)}
        if not summed:
            return rnd.unmask({k: masked[k] for k in order if k != 4}, dtype=torch.float64)
        total = MaskedSum(62)
        for k in order:
            if k != 4:  # client 4 dropped before sending
                total.add(k, masked[k])
        return rnd.unmask(total, dtype=torch.float64)

    held = unmask(False, range(5))
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):  # integers mod 2^62: any arrival order, the same bits
        folded = unmask(True, order)
        assert all(torch.equal(folded[k], held[k]) for k in SHAPES)
    # the server keeps the sum, not the masked tensors
    recipe = load_recipe(TINY, ["partition.num_clients=4", "privacy.secure_aggregation=true"])
    state = {k: torch.zeros(s) for k, s in SHAPES.items()}
    server = FederatedServer(recipe, state, [10] * 4)
    new, metrics = _round(server, 1, state, gen)
    assert metrics["applied"] and isinstance(server._masked, MaskedSum) and len(server._masked) == 4
    total = MaskedSum(62)
    total.add(0, {"w": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="different keys/shapes"):
        total.add(1, {"w": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="second masked input"):
        total.add(0, {"w": torch.zeros(2, dtype=torch.int64)})


def test_fednova_folds_and_refolds_exactly_when_a_client_runs_other_steps():
    # FedNova's coefficients need every client's step count: planned ones are folded with, and a
    # client that reports other steps (a straggler, a short dataset) makes the server fold again
    # from the spool with the coefficients that hold — the held FedNova's bits either way
    sizes = [5 + 3 * k for k in range(10)]
    folding, holding, state = _pair(["partition.num_clients=10", "federation.fraction=0.6",
                                     "federation.algorithm=fednova", "federation.reject_norm_factor=null"], sizes)
    assert folding._spool is not None
    planned = folding.begin_round(1).training
    holding.begin_round(1)
    gen = torch.Generator().manual_seed(6)
    for i, k in enumerate(planned):
        delta = _state(gen, 0.01)
        upd = ClientUpdate(k, delta, sizes[k], 1 if i == 2 else 3, 1.0)
        folding.upload(1, upd, state)
        holding.upload(1, upd, state)
    (s1, _), (s2, _) = folding.finish_round(1, state), holding.finish_round(1, state)
    assert all(torch.equal(s1[k], s2[k]) for k in SHAPES)
