"""Update codecs: real payload sizes, unbiased quantization, sign/top-k, and error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from fedllm.algorithms.compress import (
    ErrorFeedback,
    Float16,
    Identity,
    SignSGD,
    StochasticQuantizer,
    TopK,
    build_codec,
    pack_codes,
    unpack_codes,
)
from fedllm.types import serialized_bytes


def delta_of(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(n // 4, 3, generator=g),
            "a.bias": torch.randn(n - 3 * (n // 4), generator=g)}


def test_identity_is_exact_and_sized_like_serialized_bytes():
    # Prepare
    delta = delta_of(1000)

    # Execute
    enc = Identity().encode(delta)
    back = Identity().decode(enc)

    # Assert
    assert enc.nbytes == len(enc.payload) == serialized_bytes(delta)
    assert list(back) == list(delta) and all(torch.equal(back[k], delta[k]) for k in delta)
    assert enc.shapes == {"a.weight": (250, 3), "a.bias": (250,)}


def test_fp16_round_trip_within_half_precision_and_half_the_bytes():
    delta = delta_of(10_000)
    enc = Float16().encode(delta)
    back = Float16().decode(enc)
    for k in delta:
        assert back[k].dtype == torch.float32
        assert torch.allclose(back[k], delta[k], rtol=1e-3, atol=1e-4)
    assert enc.nbytes < 0.52 * serialized_bytes(delta)


def test_pack_codes_hand_example():
    # 2-bit codes 1, 2, 3, 0 | 1 -> 1 + 2·4 + 3·16 + 0·64 = 57, then 1
    codes = np.array([1, 2, 3, 0, 1], dtype=np.uint8)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [57, 1]
    assert unpack_codes(packed, 2, 5).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantizer_is_within_one_step_and_hits_the_ends_exactly(bits):
    # Prepare
    delta = delta_of(1000, seed=bits)
    codec = StochasticQuantizer(bits, seed=0)

    # Execute
    back = codec.decode(codec.encode(delta))

    # Assert
    for k, x in delta.items():
        step = float(x.max() - x.min()) / (2**bits - 1)
        assert float((back[k] - x).abs().max()) <= step * (1 + 1e-5)
        assert float(back[k].min()) == pytest.approx(float(x.min()), abs=1e-6)
        assert float(back[k].max()) == pytest.approx(float(x.max()), abs=1e-6)


@pytest.mark.parametrize("bits", [4, 2])
def test_quantizer_is_unbiased(bits):
    # Prepare: 200 independent draws of the same tensor
    x = {"w": torch.linspace(-1.0, 2.0, 997)}
    step = 3.0 / (2**bits - 1)
    codec = StochasticQuantizer(bits, seed=1)

    # Execute
    mean = torch.stack([codec.decode(codec.encode(x))["w"] for _ in range(200)]).mean(0)

    # Assert: per-entry sd of the mean <= step / (2·√200) ≈ 0.035·step
    assert float((mean - x["w"]).abs().max()) < 0.2 * step
    assert float((mean - x["w"]).mean().abs()) < 0.01 * step


def test_q8_payload_is_about_four_times_smaller_and_q4_q2_halve_it():
    # Prepare
    delta = delta_of(100_000)
    fp32 = Identity().encode(delta).nbytes

    # Execute
    sizes = {b: StochasticQuantizer(b).encode(delta).nbytes for b in (8, 4, 2)}

    # Assert
    assert fp32 / sizes[8] >= 3.9
    assert sizes[4] <= sizes[8] / 2 + 512
    assert sizes[2] <= sizes[4] / 2 + 512


def test_quantizer_state_dict_resumes_the_random_stream():
    delta = delta_of(500)
    codec = StochasticQuantizer(4, seed=5)
    codec.encode(delta)
    saved = codec.state_dict()
    expected = codec.encode(delta).payload
    resumed = StochasticQuantizer(4, seed=99)
    resumed.load_state_dict(saved)
    assert resumed.encode(delta).payload == expected


def test_constant_tensor_quantizes_exactly():
    x = {"w": torch.full((10,), 0.25)}
    codec = StochasticQuantizer(2)
    assert torch.equal(codec.decode(codec.encode(x))["w"], x["w"])


def test_sign_hand_example():
    # Prepare: mean |x| = 3
    delta = {"w": torch.tensor([[1.0, -2.0], [3.0, -6.0]]), "b": torch.tensor([0.0, -1.0])}

    # Execute
    codec = SignSGD()
    enc = codec.encode(delta)
    back = codec.decode(enc)

    # Assert: 0 maps to +scale; the 6 signs take one byte
    assert back["w"].tolist() == [[3.0, -3.0], [3.0, -3.0]]
    assert back["b"].tolist() == [0.5, -0.5]
    assert st_load(enc.payload)["signs"].numel() == 1


def test_sign_payload_is_one_bit_per_weight():
    delta = delta_of(100_000)
    assert SignSGD().encode(delta).nbytes <= 100_000 / 8 + 512


def test_topk_hand_example():
    # Prepare / Execute: fraction 0.4 of 5 entries -> the 2 largest |x|
    codec = TopK(0.4)
    back = codec.decode(codec.encode({"w": torch.tensor([0.1, -5.0, 2.0, 0.3, -1.0])}))

    # Assert
    assert back["w"].tolist() == [0.0, -5.0, 2.0, 0.0, 0.0]


def test_topk_sizes_are_index_plus_value():
    delta = delta_of(100_000)
    enc = TopK(0.01).encode(delta)
    assert 1000 * 8 <= enc.nbytes <= 1000 * 8 + 512


def test_error_feedback_conserves_the_sum_of_inputs():
    # Prepare
    ef, codec = ErrorFeedback(), SignSGD()
    steps = [delta_of(200, seed=s) for s in range(6)]
    sent = {k: torch.zeros_like(v) for k, v in steps[0].items()}

    # Execute
    for d in steps:
        dec = codec.decode(ef.compress(client_id=3, delta=d, codec=codec))
        sent = {k: sent[k] + dec[k] for k in sent}

    # Assert: Σ decoded + residual == Σ inputs
    residual = ef.residuals[3]
    for k in sent:
        total = sum(d[k] for d in steps)
        assert torch.allclose(sent[k] + residual[k], total, atol=1e-5)
    assert 7 not in ef.residuals


def test_error_feedback_first_residual_is_the_compression_error():
    ef, codec = ErrorFeedback(), TopK(0.4)
    d = {"w": torch.tensor([0.1, -5.0, 2.0, 0.3, -1.0])}
    ef.compress(0, d, codec)
    assert torch.allclose(ef.residuals[0]["w"], torch.tensor([0.1, 0.0, 0.0, 0.3, -1.0]))


def test_error_feedback_state_dict_round_trip():
    # Prepare
    ef, codec = ErrorFeedback(), TopK(0.1)
    ef.compress(1, delta_of(100, 0), codec)
    ef.compress(2, delta_of(100, 1), codec)

    # Execute
    restored = ErrorFeedback()
    restored.load_state_dict(ef.state_dict())
    a = ef.compress(1, delta_of(100, 2), codec).payload
    b = restored.compress(1, delta_of(100, 2), codec).payload

    # Assert
    assert a == b
    assert torch.equal(ef.residuals[2]["a.bias"], restored.residuals[2]["a.bias"])


@pytest.mark.parametrize("name", ["none", "fp16", "q8", "q4", "q2", "sign", "topk"])
def test_build_codec_names_round_trip_shapes_and_dtypes(name):
    delta = {"x": torch.randn(3, 4, dtype=torch.float64), "y": torch.randn(5)}
    codec = build_codec(name)
    back = codec.decode(codec.encode(delta))
    assert list(back) == ["x", "y"]
    assert back["x"].shape == (3, 4) and back["x"].dtype == torch.float64
    assert back["y"].dtype == torch.float32


def test_bad_codec_requests_are_value_errors():
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        build_codec("zip")
    with pytest.raises(ValueError, match="does not accept options"):
        build_codec("sign", fraction=0.1)
    with pytest.raises(ValueError, match="bits must be"):
        StochasticQuantizer(3)
    with pytest.raises(ValueError, match="NaN/Inf"):
        build_codec("q8").encode({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="encoded by 'q8'"):
        SignSGD().decode(build_codec("q8").encode({"w": torch.ones(2)}))


@pytest.mark.parametrize("name", ["none", "fp16", "sign", "topk"])
def test_deterministic_codecs_give_byte_identical_payloads(name):
    delta = {f"layer{i}.weight": t for i, t in enumerate(delta_of(300, seed=4).values())}
    payloads = {build_codec(name).encode(delta).payload for _ in range(20)}
    assert len(payloads) == 1
