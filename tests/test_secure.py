"""Secure aggregation: Shamir, fixed point, mask cancellation, dropouts, and what the server sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedllm.algorithms.secure import (
    PRIME,
    SecAggRound,
    decode_fixed,
    encode_fixed,
    fixed_point_error_bound,
    pairwise_seed,
    prg_mask,
    shamir_reconstruct,
    shamir_split,
)
from fedllm.types import serialized_bytes

SCALE, MOD = 16, 40


def deltas(ids, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {u: {"lora.A": torch.randn(8, 3, generator=g), "lora.B": 4 * torch.randn(5, generator=g)}
            for u in ids}


def plain_sum(xs: dict[int, dict[str, torch.Tensor]], ids) -> dict[str, torch.Tensor]:
    return {k: sum(xs[u][k].double() for u in ids) for k in next(iter(xs.values()))}


def ready_round(n: int = 5, threshold: int = 3, seed: int = 0, modulus_bits: int = MOD,
                scale_bits: int = SCALE) -> SecAggRound:
    rnd = SecAggRound(list(range(n)), threshold, modulus_bits, scale_bits, seed)
    rnd.advertise_keys()
    rnd.share_keys()
    return rnd


def assert_within_fixed_point_bound(got, want, count):
    bound = fixed_point_error_bound(count, SCALE)
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= bound + 1e-12, k


# ------------------------------------------------------------------------- building blocks


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    # Prepare
    secret = int.from_bytes(bytes(range(32)), "big")
    rng = np.random.default_rng(0)
    shares = shamir_split(secret, [1, 2, 3, 4, 5], threshold=3, rand=lambda n: rng.bytes(n))

    # Execute / Assert
    for pick in ([1, 2, 3], [2, 4, 5], [1, 3, 4, 5]):
        assert shamir_reconstruct({x: shares[x] for x in pick}) == secret
    assert shamir_reconstruct({x: shares[x] for x in [1, 5]}) != secret
    assert all(0 <= y < PRIME for y in shares.values())
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(secret, [1, 2], threshold=3, rand=lambda n: rng.bytes(n))


def test_fixed_point_round_trip_handles_negatives_within_half_a_step():
    # Prepare
    x = {"w": torch.tensor([-3.25, -1e-6, 0.0, 2.0**-9, 7.1])}

    # Execute
    enc = encode_fixed(x, scale_bits=8, modulus_bits=20)
    back = decode_fixed(enc, scale_bits=8, modulus_bits=20, dtype=torch.float64)

    # Assert: −3.25·2^8 = −832 ≡ 2^20 − 832; every value within 2^-9 of the input
    assert enc["w"].dtype == torch.int64 and int(enc["w"][0]) == 2**20 - 832
    assert float((back["w"] - x["w"].double()).abs().max()) <= fixed_point_error_bound(1, 8)


def test_encode_refuses_values_whose_sum_could_wrap():
    # (2^19 − 1) // 4 = 131071 codes = 511.99 at scale 2^8
    encode_fixed({"w": torch.tensor([511.0])}, 8, 20, num_summands=4)
    with pytest.raises(ValueError, match="largest encodable"):
        encode_fixed({"w": torch.tensor([513.0])}, 8, 20, num_summands=4)
    with pytest.raises(ValueError, match="modulus_bits"):
        encode_fixed({"w": torch.zeros(1)}, 8, 63)


def test_pairwise_seeds_agree_and_prg_is_deterministic_mod_2b():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    s_ab = pairwise_seed(a, b.public_key().public_bytes_raw())
    assert s_ab == pairwise_seed(b, a.public_key().public_bytes_raw()) and len(s_ab) == 32
    m1 = prg_mask(s_ab, {"x": torch.Size([4, 5])}, 12)
    assert torch.equal(m1["x"], prg_mask(s_ab, {"x": torch.Size([4, 5])}, 12)["x"])
    assert int(m1["x"].min()) >= 0 and int(m1["x"].max()) < 2**12


# ------------------------------------------------------------------------- the protocol


def test_masked_sum_equals_plain_sum_within_the_fixed_point_bound():
    # Prepare
    rnd, xs = ready_round(), deltas(range(5))

    # Execute
    received = {u: rnd.masked_input(u, xs[u]) for u in range(5)}
    out = rnd.unmask(received, set(), dtype=torch.float64)

    # Assert
    assert_within_fixed_point_bound(out, plain_sum(xs, range(5)), count=5)
    assert rnd.unmask(received, set())["lora.A"].dtype == torch.float32


def test_client_dropped_before_sending_leaves_the_survivors_sum():
    # Prepare: client 3 never sends its masked input; the others' masks with it must be removed
    rnd, xs = ready_round(), deltas(range(5), seed=1)

    # Execute
    received = {u: rnd.masked_input(u, xs[u]) for u in (0, 1, 2, 4)}
    out = rnd.unmask(received, set(), dtype=torch.float64)

    # Assert
    assert_within_fixed_point_bound(out, plain_sum(xs, (0, 1, 2, 4)), count=4)
    assert 3 in rnd.server.recovered_keys


def test_client_dropped_after_sending_is_still_in_the_sum():
    # Prepare: client 3's masked input arrived, then it went silent (Bonawitz: it is in U3)
    rnd, xs = ready_round(), deltas(range(5), seed=2)

    # Execute
    received = {u: rnd.masked_input(u, xs[u]) for u in range(5)}
    out = rnd.unmask(received, dropped_after_masking={3}, dtype=torch.float64)

    # Assert: its b_3 came from the others' shares; nobody's s key was reconstructed
    assert_within_fixed_point_bound(out, plain_sum(xs, range(5)), count=5)
    assert rnd.server.recovered_keys == {} and rnd.bytes_up[3].unmask == 0


def test_fewer_than_threshold_survivors_raises():
    rnd, xs = ready_round(n=5, threshold=3), deltas(range(5))
    received = {u: rnd.masked_input(u, xs[u]) for u in range(5)}
    with pytest.raises(ValueError, match="threshold=3"):
        rnd.unmask({u: received[u] for u in (0, 1)}, set())
    with pytest.raises(ValueError, match="threshold=3"):
        rnd.unmask(received, dropped_after_masking={0, 1, 2})


def test_late_input_from_a_client_declared_dropped_stays_masked():
    # Prepare: client 4 is declared dropped; the server recovers its s key
    rnd, xs = ready_round(), deltas(range(5), seed=3)
    received = {u: rnd.masked_input(u, xs[u]) for u in range(4)}
    rnd.unmask(received, set())
    late = rnd.masked_input(4, xs[4])

    # Execute: the server strips every pairwise mask of the late input with the recovered key
    key, layout = rnd.server.recovered_keys[4], {k: t.shape for k, t in late.items()}
    stripped = dict(late)
    for u in range(4):  # client 4 subtracted PRG(s_4u) for every u < 4: add it back
        mask = prg_mask(pairwise_seed(key, rnd.server.adverts[u].s_public), layout, MOD)
        stripped = {k: (stripped[k] + mask[k]) & (2**MOD - 1) for k in late}
    plain = encode_fixed(xs[4], SCALE, MOD)

    # Assert: still hidden by PRG(b_4), and the clients refuse to reveal b_4's shares now
    assert not any(bool((stripped[k] == plain[k]).any()) for k in late)
    with pytest.raises(ValueError, match="refuses"):
        rnd.unmask({**received, 4: late}, set())


def test_a_masked_update_is_uniform_whatever_the_input():
    # Prepare: client 0's masked input over many rounds, for two very different inputs (b = 16)
    flat, signal = torch.zeros(256), torch.linspace(-40.0, 40.0, 256)

    def masked_values(x, seeds):
        out = []
        for s in seeds:
            rnd = ready_round(n=3, threshold=2, seed=s, modulus_bits=16, scale_bits=8)
            out.append(rnd.masked_input(0, {"w": x})["w"].numpy())
        return np.concatenate(out)

    # Execute
    a, b = masked_values(flat, range(25)), masked_values(signal, range(1000, 1025))
    hist_a, hist_b = np.bincount(a >> 11, minlength=32), np.bincount(b >> 11, minlength=32)

    # Assert: each histogram is uniform over Z_{2^16}, the two agree, and b is uncorrelated with x
    assert stats.chisquare(hist_a).pvalue > 1e-3 and stats.chisquare(hist_b).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([hist_a, hist_b])).pvalue > 1e-3
    assert abs(np.corrcoef(b, np.tile(signal.numpy(), 25))[0, 1]) < 0.05


def test_byte_accounting_uses_real_serialized_sizes():
    # Prepare
    rnd, xs = ready_round(n=5, threshold=3), deltas(range(5))

    # Execute
    received = {u: rnd.masked_input(u, xs[u]) for u in (0, 1, 2, 3)}
    rnd.unmask(received, set())

    # Assert: keys = id + 2 × 32; each share = receiver id + AES-GCM(8+8+66+66 bytes) with a 16-byte tag;
    # a revealed share = owner id + 66 bytes (1 s-key share for client 4, 4 b-seed shares)
    c0 = rnd.bytes_up[0]
    assert c0.keys == 8 + 64
    assert c0.shares == 4 * (8 + 148 + 16)
    assert c0.masked == serialized_bytes(received[0])
    assert c0.unmask == 8 + 5 * (8 + 66)
    assert c0.overhead == c0.keys + c0.shares + c0.unmask


def test_protocol_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="threshold"):
        SecAggRound([0, 1, 2], threshold=4, modulus_bits=MOD, scale_bits=SCALE)
    with pytest.raises(ValueError, match="distinct"):
        SecAggRound([0, 0, 1], threshold=2, modulus_bits=MOD, scale_bits=SCALE)
    fresh = SecAggRound([0, 1, 2], threshold=2, modulus_bits=MOD, scale_bits=SCALE)
    with pytest.raises(ValueError, match="share_keys"):
        fresh.masked_input(0, {"w": torch.zeros(2)})
    rnd = ready_round(n=3, threshold=2)
    y = rnd.masked_input(0, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="already sent"):
        rnd.masked_input(0, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="dropped after masking"):
        rnd.unmask({0: y}, dropped_after_masking={1})
