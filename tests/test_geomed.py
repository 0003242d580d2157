"""RFA's geometric median (Pillutla et al., 2022): the minimizer of Σ‖v − Δᵢ‖, robust to outliers."""

import math

import pytest
import torch

from fedllm.algorithms.geomed import GeometricMedian, geometric_median
from fedllm.algorithms.robust import build_aggregator
from fedllm.types import ClientUpdate


def upd(cid: int, w, b) -> ClientUpdate:
    return ClientUpdate(cid, {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor([b], dtype=torch.float32)},
                        num_examples=10 ** cid, local_steps=1, train_loss=0.0)


def test_equilateral_triangle_has_its_centroid_as_median():
    # Prepare: the Fermat point of an equilateral triangle is its centroid
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    # Execute
    v, _ = geometric_median(pts)
    # Assert
    assert torch.allclose(v, pts.mean(0), atol=1e-6)


def test_points_on_a_line_give_the_middle_one():
    pts = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    v, _ = geometric_median(pts, nu=1e-12, max_iter=1000)
    assert float(v) == pytest.approx(1.0, abs=1e-6)


def test_the_result_minimizes_the_sum_of_distances():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    v, _ = geometric_median(pts)
    cost = lambda x: float((pts - x).norm(dim=1).sum())  # noqa: E731
    assert cost(v) <= cost(pts.mean(0))
    for _ in range(50):  # no nearby point is better
        assert cost(v) <= cost(v + 1e-4 * torch.randn(5, generator=gen, dtype=torch.float64)) + 1e-12


def test_a_huge_minority_barely_moves_it_and_keys_and_dtypes_are_kept():
    # Prepare: 4 honest updates near (1, 1 | 1) and one at 3e38-scale in float32
    honest = [upd(i, [1.0 + 0.01 * i, 1.0 - 0.01 * i], 1.0) for i in range(4)]
    attacker = upd(9, [3e30, -3e30], 3e30)
    # Execute
    agg = GeometricMedian()
    out = agg([*honest, attacker])
    # Assert: within the honest points' spread, not pulled towards the attacker; uniform weights
    assert set(out) == {"w", "b"} and out["w"].dtype == torch.float32 and out["w"].shape == (2,)
    assert torch.allclose(out["w"], torch.tensor([1.015, 0.985]), atol=0.05)
    assert float(out["b"]) == pytest.approx(1.0, abs=0.05)
    assert 1 <= agg.last_iterations <= 100


def test_it_is_registered_for_recipes():
    assert isinstance(build_aggregator("geomed"), GeometricMedian)
    with pytest.raises(ValueError, match="nu"):
        GeometricMedian(nu=0.0)
