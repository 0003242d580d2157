"""Signal propagation (Lee et al. 2020): layerwise Jacobian singular values, the approximately
isometric init of a pruned network, and ``prune.init: isometry`` in vision runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedllm.algorithms.prune import apply_mask, random_mask
from fedllm.algorithms.signal import (
    ISOMETRY_TOL,
    approximate_isometry,
    format_sweep,
    isometric_init,
    isometry_gap,
    jacobian_singular_values,
    jsv_stats,
    jsv_sweep,
    network_jsv,
)
from fedllm.config import Recipe, RecipeError, build
from fedllm.models.vision import build_vision_model
from tests.test_vision_experiment import experiment, small  # the shared 4-client, 600-image LeNet recipe

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (REAL_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The descent is many mid-sized matmuls: on a shared 2-core CI machine two OpenMP threads
    contend and run several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lenet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_vision_model("lenet300100").named_parameters()}


def empty_rows(mask: torch.Tensor) -> int:
    """Rows of the smaller Gram side with no kept entry (each forces a singular value 0)."""
    m = mask.reshape(mask.shape[0], -1)
    m = m if m.shape[0] <= m.shape[1] else m.T
    return int((m.sum(dim=1) == 0).sum())


def reachable(mask: torch.Tensor) -> float:
    """The mean JSV an isometric init can reach when empty rows are the only obstacle: 1 − empty / rows."""
    return 1 - empty_rows(mask) / min(mask.shape[0], mask[0].numel())


# ---------------------------------------------------------------------------- JSV on known layers


def test_orthogonal_and_scaled_identity_layers():
    # Prepare
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    # Execute / Assert
    assert jsv_stats(q) == pytest.approx({"mean": 1.0, "min": 1.0, "max": 1.0}, abs=1e-6)
    assert jsv_stats(2.5 * torch.eye(4)) == pytest.approx({"mean": 2.5, "min": 2.5, "max": 2.5})
    assert isometry_gap(q) == pytest.approx(0.0, abs=1e-6)
    assert isometry_gap(2.0 * torch.eye(3)) == pytest.approx(3 ** 0.5 * 3)  # ‖4I − I‖_F = 3·√3


def test_masked_and_non_square_layers_match_svdvals():
    # Prepare
    g = torch.Generator().manual_seed(1)
    w, tall = torch.randn(5, 8, generator=g), torch.randn(9, 4, generator=g)
    mask = torch.rand(5, 8, generator=g) < 0.5
    # Execute
    s = jacobian_singular_values(w, mask)
    # Assert: min(m, n) values, of C ⊙ W, in float64
    torch.testing.assert_close(s, torch.linalg.svdvals((w * mask).double()), atol=1e-6, rtol=0)
    assert len(jacobian_singular_values(tall)) == 4
    assert jsv_stats(w, mask)["max"] == pytest.approx(float(s[0]))


def test_conv_kernel_is_read_as_out_by_in_k_k_and_exact_for_1x1():
    # Prepare: a 1×1 conv is the same 3×2 map at every pixel, so its exact Jacobian on a 2×2
    # image is that map repeated four times (same singular values, each four times)
    conv = nn.Conv2d(2, 3, 1, bias=False)
    x = torch.randn(1, 2, 2, 2)
    exact = torch.autograd.functional.jacobian(conv, x).reshape(3 * 4, 2 * 4)
    kernel = torch.randn(4, 2, 3, 3)
    # Execute
    s = jacobian_singular_values(conv.weight)
    # Assert
    torch.testing.assert_close(torch.linalg.svdvals(exact.double()), s.repeat_interleave(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(jacobian_singular_values(kernel), torch.linalg.svdvals(kernel.reshape(4, 18).double()),
                               atol=1e-6, rtol=0)


def test_lenet_jsv_falls_with_sparsity_as_the_square_root_of_density():
    # Prepare
    state = lenet_state()
    # Execute
    jsv = {s: network_jsv(state, random_mask(state, 1 - s, seed=0)) for s in (0.0, 0.9, 0.99)}
    # Assert: a random mask keeps iid entries of variance (1 − s)σ², so σ scales by about √(1 − s)
    # while rows keep many entries; at 99 % body.3 and head keep ~3 and ~1 a row (some none), and fall below
    assert set(jsv[0.0]) == {"body.1.weight", "body.3.weight", "head.weight"}
    for k in jsv[0.0]:
        dense, p90, p99 = (jsv[s][k]["mean"] for s in (0.0, 0.9, 0.99))
        assert dense > p90 > p99 > 0
        assert p90 == pytest.approx(dense * 0.1 ** 0.5, rel=0.1)
        assert p99 <= dense * 0.1 * 1.1
    assert jsv[0.99]["body.1.weight"]["mean"] == pytest.approx(jsv[0.0]["body.1.weight"]["mean"] * 0.1, rel=0.1)


# ---------------------------------------------------------------------------- the isometric init


def test_unmasked_step_is_newton_schulz_and_converges_to_an_isometry():
    # Prepare
    g = torch.Generator().manual_seed(2)
    wide, tall = torch.randn(20, 50, generator=g, dtype=torch.float64), torch.randn(50, 20, generator=g)
    v = wide / torch.linalg.matrix_norm(wide, ord=2)
    # Execute
    one = approximate_isometry(wide, steps=1)
    wide_iso, tall_iso = approximate_isometry(wide), approximate_isometry(tall)
    # Assert: V(3I − VᵀV)/2 = (3I − VVᵀ)V/2; then singular values 1 on the smaller side, and the
    # Gram residual below ISOMETRY_TOL within 40 steps
    torch.testing.assert_close(one, (3 * torch.eye(20, dtype=torch.float64) - v @ v.T) @ v / 2)
    assert isometry_gap(approximate_isometry(wide, steps=40)) < ISOMETRY_TOL
    assert jsv_stats(wide_iso) == pytest.approx({"mean": 1.0, "min": 1.0, "max": 1.0}, abs=1e-6)
    assert jsv_stats(tall_iso) == pytest.approx({"mean": 1.0, "min": 1.0, "max": 1.0}, abs=1e-5)
    assert tall_iso.dtype == torch.float32


def test_a_mask_that_forbids_isometry_reaches_its_nearest_point():
    # Prepare: both rows keep only column 0, so they cannot be orthogonal: the best is σ = (1, 0)
    w = torch.tensor([[0.3, 0.5, -0.2], [0.4, 0.1, 0.7]])
    mask = torch.tensor([[True, False, False], [True, False, False]])
    # Execute
    out = approximate_isometry(w, mask)
    # Assert
    assert jsv_stats(out, mask) == pytest.approx({"mean": 0.5, "min": 0.0, "max": 1.0}, abs=1e-6)
    assert isometry_gap(out, mask) == pytest.approx(1.0, abs=1e-6)
    assert bool((out[~mask] == 0).all())


@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_isometric_init_of_a_sparse_lenet(sparsity):
    # Prepare
    state = lenet_state()
    mask = random_mask(state, 1 - sparsity, seed=0)
    plain = apply_mask(state, mask)
    # Execute
    iso = isometric_init(plain, mask, steps=150)
    # Assert: pruned entries exactly 0, biases untouched; each layer as near 1 as its mask allows
    before, after = network_jsv(plain, mask), network_jsv(iso, mask)
    assert all(torch.equal(iso[k], state[k]) for k in state if k not in mask)
    for k, m in mask.items():
        assert bool((iso[k][~m] == 0).all()) and iso[k].dtype == state[k].dtype
        assert isometry_gap(iso[k], m) < isometry_gap(plain[k], m)
        # an empty row keeps σ = 0 (LeNet at 99 %: 6 of 100 in body.3, 5 of 10 in head)
        assert after[k]["mean"] == pytest.approx(reachable(m), abs=0.05), (k, before[k], after[k])
        if empty_rows(m) == 0:
            assert after[k]["min"] > 0.7 and before[k]["mean"] < 0.2
    assert [empty_rows(m) for m in mask.values()] == ([0, 6, 5] if sparsity == 0.99 else [0, 0, 0])


def test_sweep_rows_and_table():
    rng = torch.random.get_rng_state()
    rows = jsv_sweep((0.0, 0.9), steps=60)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [(r["sparsity"], r["init"]) for r in rows] == [(0.0, "plain"), (0.0, "isometry"),
                                                         (0.9, "plain"), (0.9, "isometry")]
    assert rows[1]["layers"]["body.1.weight"] == pytest.approx(1.0, abs=1e-6)
    assert rows[2]["layers"]["head.weight"] < rows[0]["layers"]["head.weight"] < rows[3]["layers"]["head.weight"]
    assert format_sweep(rows).splitlines()[4].startswith("| 90% | plain | 0.173 | 0.174 | 0.162 |")


# ---------------------------------------------------------------------------- prune.init in recipes


def test_prune_init_is_checked():
    with pytest.raises(RecipeError, match="prune.isometry_steps"):
        small(prune={"method": "random", "init": "isometry", "isometry_steps": 0})
    with pytest.raises(RecipeError, match="prune.init"):
        build(Recipe, {"name": "lm", "model": {"preset": "tiny"}, "data": {"builtin": "coralmap"},
                       "prune": {"init": "isometry"}})


@needs_data
def test_init_none_is_todays_initial_state():
    # Prepare: the recipe without the field, and with it set to its default
    today = experiment(prune={"method": "random", "remaining": 0.1})
    explicit = experiment(prune={"method": "random", "remaining": 0.1, "init": "none"})
    state = lenet_state()
    # Execute
    expected = apply_mask(state, random_mask(state, 0.1, seed=0))
    # Assert
    assert today.initial_state.keys() == explicit.initial_state.keys() == expected.keys()
    assert all(torch.equal(today.initial_state[k], explicit.initial_state[k]) for k in expected)
    assert all(torch.equal(today.initial_state[k], expected[k]) for k in expected)
    assert today.runtime_info()["signal"]["init"] == "none" and "after" not in today.runtime_info()["signal"]
    assert "signal" not in experiment().runtime_info()  # dense, plain init: nothing to report


@needs_data
@pytest.mark.parametrize("method", ["random", "snip", "hpfl"])
def test_isometry_init_with_every_mask(method):
    # Prepare
    prune = {"method": method, "remaining": 0.1, "iterations": 1, "dae_epochs": 1}
    plain = experiment(prune=prune)
    # Execute
    iso = experiment(prune={**prune, "init": "isometry", "isometry_steps": 100})
    # Assert: the same mask, pruned entries exactly 0, biases as in the plain init, and every layer
    # as isometric as its mask allows (SNIP at 10 % empties 73 of body.1's 300 rows: mean 0.76)
    signal = iso.runtime_info()["signal"]
    assert signal["before"] == plain.runtime_info()["signal"]["before"]
    for k, m in iso.mask.items():
        assert torch.equal(m, plain.mask[k]) and bool((iso.initial_state[k][~m] == 0).all())
        assert signal["after"][k]["mean"] == pytest.approx(reachable(m), abs=0.05)
        assert signal["after"][k]["mean"] > signal["before"][k]["mean"] + 0.4
    assert empty_rows(iso.mask["body.1.weight"]) == (73 if method == "snip" else 0)
    assert all(torch.equal(iso.initial_state[k], plain.initial_state[k]) for k in iso.initial_state
               if k not in iso.mask)


@needs_data
@pytest.mark.parametrize("mode", ["federated", "centralized"])
def test_isometry_runs_end_to_end_and_reports_the_jsv(mode, tmp_path):
    # Prepare
    from fedllm.federation.modes import RUNNERS

    exp = experiment(prune={"method": "snip", "remaining": 0.1, "init": "isometry", "isometry_steps": 50})
    # Execute
    summary = RUNNERS[mode](exp, out=str(tmp_path))
    written = json.loads((tmp_path / "vision_test" / mode / "summary.json").read_text())
    # Assert
    signal = written["machine"]["signal"]
    assert signal == json.loads(json.dumps(summary["machine"]["signal"]))
    assert signal["init"] == "isometry" and signal["steps"] == 50
    assert set(signal["before"]) == set(signal["after"]) == set(exp.mask)
    assert all(signal["after"][k]["mean"] > signal["before"][k]["mean"] for k in exp.mask)
    assert summary["final"]["accuracy"] is not None
