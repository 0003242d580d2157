import pytest
import torch

from fedllm.algorithms.aggregate import ApplyDelta, MeanAggregator, client_weights, mean_delta
from fedllm.types import ClientUpdate, serialized_bytes


def upd(cid, values, n=1):
    return ClientUpdate(client_id=cid, delta={"w": torch.tensor(values)}, num_examples=n, local_steps=1,
                        train_loss=0.0)


def test_gradualdiff_is_unweighted_mean_of_deltas():
    # Prepare: three clients with hand-picked deltas and unequal sizes
    ups = [upd(0, [1.0, 2.0], 1), upd(1, [3.0, 0.0], 2), upd(2, [-1.0, 4.0], 7)]
    # Execute
    delta = MeanAggregator(weighted=False)(ups)
    new = ApplyDelta().step({"w": torch.tensor([10.0, 10.0])}, delta)
    # Assert: θ_g + (1/3) Σ Δ = [10 + 1, 10 + 2]
    assert torch.allclose(new["w"], torch.tensor([11.0, 12.0]))


def test_fedavg_weights_by_examples():
    ups = [upd(0, [1.0], 1), upd(1, [3.0], 3)]
    assert client_weights(ups, True) == [0.25, 0.75]
    assert torch.allclose(mean_delta(ups, weighted=True)["w"], torch.tensor([2.5]))


def test_identical_deltas_average_to_themselves():
    d = torch.randn(50, generator=torch.Generator().manual_seed(0))
    ups = [ClientUpdate(client_id=i, delta={"w": d.clone()}, num_examples=5, local_steps=1, train_loss=0.0)
           for i in range(4)]
    assert torch.allclose(mean_delta(ups)["w"], d, atol=1e-7)


def test_empty_round_is_an_error():
    with pytest.raises(ValueError):
        mean_delta([])


def test_nonfinite_update_detected():
    assert not upd(0, [float("nan"), 1.0]).is_finite()
    assert upd(0, [1.0, 1.0]).is_finite()


def test_serialized_bytes_counts_payload():
    small, big = {"w": torch.zeros(10)}, {"w": torch.zeros(1000)}
    # the payload grows by exactly 990 fp32 values; the JSON header differs only by the offsets' digits
    # and 8-byte alignment padding
    assert 0 <= serialized_bytes(big) - serialized_bytes(small) - 990 * 4 <= 16
