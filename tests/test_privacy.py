"""Client-level DP (clip, noise, adaptive clip), opacus accounting, and the DP-SGD helper."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn

from fedllm.algorithms.aggregate import MeanAggregator
from fedllm.algorithms.privacy import (
    DPAggregator,
    DPConfig,
    PrivacyLedger,
    adaptive_delta_noise,
    check_dpsgd_supported,
    clip_delta,
    gaussian_noise_like,
    make_private_dpsgd,
    resolve_noise_multiplier,
    sigma_for_target,
)
from fedllm.types import ClientUpdate, global_norm


def update(cid: int, delta: dict[str, torch.Tensor]) -> ClientUpdate:
    return ClientUpdate(client_id=cid, delta=delta, num_examples=10, local_steps=1, train_loss=0.0)


def random_updates(k: int, seed: int = 0, scale: float = 1.0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [update(i, {"w": scale * torch.randn(6, 4, generator=g), "b": scale * torch.randn(4, generator=g)})
            for i in range(k)]


# ------------------------------------------------------------------------- clipping and noise


def test_clip_delta_scales_to_the_bound_and_leaves_small_updates_alone():
    # Prepare: ‖(3, 4)‖ = 5
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}

    # Execute
    clipped, factor = clip_delta(delta, 1.0)
    same, one = clip_delta(delta, 10.0)

    # Assert
    assert factor == pytest.approx(0.2)
    assert torch.allclose(clipped["a"], torch.tensor([0.6]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert one == 1.0 and all(torch.equal(same[k], delta[k]) for k in delta)


def test_clipping_bounds_every_norm_by_c():
    for u in random_updates(8, scale=5.0):
        clipped, factor = clip_delta(u.delta, 0.7)
        assert global_norm(clipped) <= 0.7 * (1 + 1e-6)
        assert factor < 1


def test_clip_delta_rejects_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        clip_delta({"a": torch.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        clip_delta({"a": torch.tensor([float("nan")])}, 1.0)


def test_gaussian_noise_like_is_seeded_and_shaped():
    state = {"a": torch.zeros(3, 2), "b": torch.zeros(5, dtype=torch.float16)}
    n1 = gaussian_noise_like(state, 2.0, torch.Generator().manual_seed(3))
    n2 = gaussian_noise_like(state, 2.0, torch.Generator().manual_seed(3))
    assert n1["a"].shape == (3, 2) and n1["b"].dtype == torch.float16
    assert all(torch.equal(n1[k], n2[k]) for k in state)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(state, -1.0, torch.Generator())


# ------------------------------------------------------------------------- DPAggregator


def test_no_noise_and_a_clip_that_never_binds_equals_the_plain_mean_exactly():
    # Prepare
    updates = random_updates(5)
    dp = DPAggregator(MeanAggregator(), DPConfig(noise_multiplier=0.0, clip_norm=1e9), num_sampled=5, seed=0)

    # Execute
    got, want = dp(updates), MeanAggregator()(updates)

    # Assert
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_server_mode_noise_has_std_sigma_c_over_k():
    # Prepare: zero deltas, so the output is the noise alone; σC/K = 1.5·2/4 = 0.75
    zeros = [update(i, {"w": torch.zeros(200_000)}) for i in range(4)]
    dp = DPAggregator(MeanAggregator(), DPConfig(noise_multiplier=1.5, clip_norm=2.0), num_sampled=4, seed=0)

    # Execute
    noise = dp(zeros)["w"].double()

    # Assert: within 4 standard errors (of the std: 0.75/√(2n) ≈ 0.0012; of the mean: 0.75/√n ≈ 0.0017)
    assert abs(float(noise.std()) - 0.75) < 4 * 0.0012
    assert abs(float(noise.mean())) < 4 * 0.0017
    assert dp.last_stats["noise_std"] == pytest.approx(0.75)


def test_server_mode_clips_before_averaging():
    # Prepare: one huge update; without noise the mean is the mean of the clipped deltas
    updates = [update(0, {"w": torch.tensor([30.0, 40.0])}), update(1, {"w": torch.tensor([0.3, 0.4])})]
    dp = DPAggregator(MeanAggregator(), DPConfig(noise_multiplier=0.0, clip_norm=1.0), num_sampled=2, seed=0)

    # Execute
    out = dp(updates)

    # Assert: (0.6, 0.8) and (0.3, 0.4) averaged
    assert torch.allclose(out["w"], torch.tensor([0.45, 0.6]))
    assert dp.last_stats["unclipped_fraction"] == 0.5


def test_client_mode_noise_sums_to_sigma_c():
    # Prepare: K = 4 clients each add N(0, σ²C²/K); σ = 2, C = 0.5 → std per client 0.5, sum std 1.0
    cfg = DPConfig(noise_multiplier=2.0, clip_norm=0.5, mode="client")
    dp = DPAggregator(MeanAggregator(), cfg, num_sampled=4, seed=0)
    zero = {"w": torch.zeros(100_000)}

    # Execute
    noised = [dp.client_noise(zero, torch.Generator().manual_seed(i)) for i in range(4)]
    total = sum(n["w"].double() for n in noised)

    # Assert
    assert abs(float(noised[0]["w"].std()) - 0.5) < 0.01
    assert abs(float(total.std()) - 1.0) < 0.02


def test_client_mode_server_only_aggregates():
    updates = random_updates(3)
    dp = DPAggregator(MeanAggregator(), DPConfig(1.0, 1.0, mode="client"), num_sampled=3, seed=0)
    got, want = dp(updates), MeanAggregator()(updates)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_adaptive_clipping_moves_c_to_the_target_quantile():
    # Prepare: norms 1..10, so the median lies between 5 and 6; start far above and far below
    updates = [update(i, {"w": torch.tensor([float(i + 1)])}) for i in range(10)]
    cfg = DPConfig(noise_multiplier=0.0, clip_norm=100.0, adaptive=True, count_noise_std=0.0)
    high = DPAggregator(MeanAggregator(), cfg, num_sampled=10, seed=0)
    low = DPAggregator(MeanAggregator(), DPConfig(0.0, 0.01, adaptive=True, count_noise_std=0.0), 10, seed=0)

    # Execute
    high(updates)
    first = high.clip
    for _ in range(80):
        high(updates)
        low(updates)

    # Assert: one step from C = 100 with b̄ = 1 is 100·exp(−0.2·0.5); both end near the median
    assert first == pytest.approx(100 * math.exp(-0.1))
    assert 4.0 < high.clip < 7.0 and 4.0 < low.clip < 7.0


def test_adaptive_noise_split_and_its_checks():
    # Andrew et al. Thm 1: σ_Δ^-2 + (2σ_b)^-2 = σ^-2
    s = adaptive_delta_noise(1.0, 2.0)
    assert s ** -2 + 4.0 ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count_noise_std"):
        adaptive_delta_noise(1.0, 0.4)
    with pytest.raises(ValueError, match="count_noise_std"):
        DPAggregator(MeanAggregator(), DPConfig(1.0, 1.0, adaptive=True), num_sampled=10, seed=0)


def test_dp_aggregator_state_round_trip_resumes_identically():
    # Prepare
    cfg = DPConfig(noise_multiplier=1.0, clip_norm=0.5, adaptive=True, count_noise_std=5.0)
    a = DPAggregator(MeanAggregator(), cfg, num_sampled=4, seed=11)
    a(random_updates(4, seed=1))
    b = DPAggregator(MeanAggregator(), cfg, num_sampled=4, seed=999)

    # Execute
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(random_updates(4, seed=2)), b(random_updates(4, seed=2))

    # Assert
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert a.clip == b.clip and a.round == b.round == 2


def test_dp_config_and_aggregator_reject_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        DPConfig(1.0, 1.0, mode="edge")
    with pytest.raises(ValueError, match="adaptive"):
        DPConfig(1.0, 1.0, mode="client", adaptive=True)
    with pytest.raises(ValueError, match="clip_norm"):
        DPConfig(1.0, -1.0)
    with pytest.raises(ValueError, match="target_quantile"):
        DPConfig(1.0, 1.0, target_quantile=1.0)
    with pytest.raises(ValueError, match="weighted"):
        DPAggregator(MeanAggregator(weighted=True), DPConfig(1.0, 1.0), num_sampled=2, seed=0)


# ------------------------------------------------------------------------- accounting


def test_rdp_epsilon_equals_opacus_own_answer():
    # Prepare
    sigma, q, rounds, delta = 1.1, 0.05, 200, 1e-5
    ledger = PrivacyLedger(sigma, q, delta, accountant="rdp")
    reference = RDPAccountant()

    # Execute
    for _ in range(rounds):
        ledger.step()
        reference.step(noise_multiplier=sigma, sample_rate=q)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=orders)
    analytic, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)

    # Assert
    assert ledger.rounds == rounds
    assert abs(ledger.epsilon() - reference.get_epsilon(delta)) <= 1e-6
    assert abs(ledger.epsilon() - float(analytic)) <= 1e-6
    assert 0 < ledger.epsilon() < 10


def test_prv_epsilon_equals_opacus_own_answer():
    sigma, q, rounds, delta = 1.0, 0.1, 50, 1e-5
    ledger = PrivacyLedger(sigma, q, delta, accountant="prv")
    reference = PRVAccountant()
    for _ in range(rounds):
        ledger.step()
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert abs(ledger.epsilon() - reference.get_epsilon(delta)) <= 1e-6


def test_ledger_state_round_trip_reports_the_same_epsilon():
    # Prepare: two σ phases, so the history has two entries
    ledger = PrivacyLedger(1.2, 0.1, 1e-5)
    for _ in range(30):
        ledger.step()
    for _ in range(10):
        ledger.step(noise_multiplier=2.0)
    resumed = PrivacyLedger(1.2, 0.1, 1e-5)

    # Execute
    resumed.load_state_dict(ledger.state_dict())

    # Assert
    assert resumed.epsilon() == ledger.epsilon() and resumed.rounds == 40
    resumed.step()
    ledger.step()
    assert resumed.epsilon() == ledger.epsilon()


def test_ledger_edge_cases():
    assert PrivacyLedger(1.0, 0.1, 1e-5).epsilon() == 0.0
    no_noise = PrivacyLedger(0.0, 0.1, 1e-5)
    no_noise.step()
    assert no_noise.epsilon() == math.inf
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(1.0, 0.1, 1e-5, accountant="gdp2")
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyLedger(1.0, 1.5, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(1.0, 0.1, 1e-5).load_state_dict(PrivacyLedger(1.0, 0.1, 1e-5, "prv").state_dict())


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_sigma_for_target_reaches_the_target():
    # Prepare
    target, q, rounds, delta = 3.0, 0.1, 100, 1e-5

    # Execute
    sigma = sigma_for_target(target, q, rounds, delta)
    ledger = PrivacyLedger(sigma, q, delta)
    for _ in range(rounds):
        ledger.step()

    # Assert: at the target, but not by more than opacus' search tolerance (0.01 in ε)
    assert target - 0.01 <= ledger.epsilon() <= target
    cfg = DPConfig(noise_multiplier=0.0, clip_norm=1.0, target_epsilon=target, delta=delta)
    assert resolve_noise_multiplier(cfg, q, rounds) == sigma
    assert resolve_noise_multiplier(DPConfig(0.7, 1.0), q, rounds) == 0.7


# ------------------------------------------------------------------------- DP-SGD (opacus)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class ScaledLinear(nn.Module):
    """A custom parametrized layer: opacus has no per-sample-gradient rule for it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x @ self.weight


def test_check_dpsgd_accepts_a_small_cnn():
    check_dpsgd_supported(TinyCNN())


def test_check_dpsgd_names_unsupported_layers():
    model = nn.Sequential(nn.Linear(3, 3), ScaledLinear(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError) as err:
        check_dpsgd_supported(model)
    assert "1 (ScaledLinear)" in str(err.value) and "2 (BatchNorm1d)" in str(err.value)
    assert "0 (Linear)" not in str(err.value)


def test_check_dpsgd_rejects_lora_layers():
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"0 \(Linear\): LoRA/4-bit layer"):
        check_dpsgd_supported(model)


def test_make_private_dpsgd_trains_and_accounts_like_opacus():
    # Prepare
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
        data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
        loader = torch.utils.data.DataLoader(data, batch_size=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        # Execute
        model, opt, loader, ledger = make_private_dpsgd(model, opt, loader, 1.3, max_grad_norm=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    # Assert
    reference = RDPAccountant()
    for _ in range(len(loader)):
        reference.step(noise_multiplier=1.3, sample_rate=1 / len(loader))
    assert ledger.rounds == len(loader) == 4
    assert abs(ledger.epsilon() - reference.get_epsilon(1e-5)) <= 1e-6
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
