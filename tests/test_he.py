"""Secure aggregation by CKKS homomorphic encryption (fedllm.algorithms.he): the decrypted sum equals
the plain sum within the stated CKKS error, the server never holds the secret key, and the engine's
round with ``privacy.secagg_scheme: he`` gives the plain mean within that error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tenseal")

from fedllm.algorithms.he import CKKSParams, HERound, KeyHolder, encrypt_delta  # noqa: E402
from fedllm.config import RecipeError  # noqa: E402
from fedllm.federation.modes import run_federated  # noqa: E402
from fedllm.federation.rundir import read_metrics  # noqa: E402
from tests._toy import ToyExperiment, toy_recipe  # noqa: E402

# Stated bound (docs/benchmarks.md): CKKS noise plus half the release grid 2^-25, measured at most
# 5.8e-8 on 4.9 M coordinates of a sum of 5; 1e-7 per coordinate of the sum leaves a margin.
SUM_BOUND = 2.0**-25 + 7e-8


def deltas(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # 5000 + 7 values: more than one 4096-slot chunk, the last one partial
    return [{"b.w": torch.randn(50, 100, generator=g) * 0.01, "a.bias": torch.randn(7, generator=g)} for _ in range(k)]


def test_decrypted_sum_equals_the_plain_sum_within_the_ckks_bound():
    ds = deltas(5)
    rnd = HERound(range(5))
    public = rnd.advertise_keys()
    total = rnd.new_sum()
    for k, d in enumerate(ds):
        ct = rnd.masked_input(k, d)
        assert len(ct.chunks) == 2 and rnd.bytes_up[k].masked == ct.nbytes > 8 * 5007  # ~32 B per value
        total.add(k, ct)
    out = rnd.unmask(total, dtype=torch.float64)
    for key in ds[0]:
        plain = sum(d[key].double() for d in ds)
        err = float((out[key] - plain).abs().max())
        assert 0 < err <= SUM_BOUND, (key, err)
    assert rnd.bytes_up[0].keys == len(public) and rnd.sum_bytes > 0


def test_the_server_side_has_no_secret_key_and_cannot_decrypt():
    import tenseal as ts

    holder = KeyHolder(CKKSParams())
    public = ts.context_from(holder.public)
    assert not public.is_private()
    ct = encrypt_delta(holder.public, 0, {"w": torch.ones(3)}, holder.params, 2)
    with pytest.raises(ValueError):  # decrypting without the secret key is refused by TenSEAL
        ts.ckks_vector_from(public, ct.chunks[0]).decrypt()
    # the key holder can (the one party that decrypts)
    assert holder.decrypt_sum(ct.chunks, 3) == pytest.approx([1.0, 1.0, 1.0], abs=1e-7)


def test_inputs_that_could_leave_the_modulus_and_misuse_are_refused():
    params = CKKSParams()
    holder = KeyHolder(params)
    limit = params.max_abs(4)
    with pytest.raises(ValueError, match="largest encodable"):
        encrypt_delta(holder.public, 0, {"w": torch.tensor([2 * limit])}, params, 4)
    with pytest.raises(ValueError, match="finite"):
        encrypt_delta(holder.public, 0, {"w": torch.tensor([float("nan")])}, params, 4)
    rnd = HERound([0, 1])
    rnd.advertise_keys()
    s = rnd.new_sum()
    s.add(0, rnd.masked_input(0, {"w": torch.ones(2)}))
    with pytest.raises(ValueError, match="second"):
        s.add(0, rnd.masked_input(1, {"w": torch.ones(2)}))
    with pytest.raises(ValueError, match="keys/shapes"):
        s.add(1, rnd.masked_input(1, {"w": torch.ones(3)}))


def test_engine_round_with_he_equals_the_plain_mean(tmp_path):
    uniform = {"algorithm": "gradualdiff", "weighted": False, "rounds": 1}
    plain, he = toy_recipe(name="plain", federation=uniform), toy_recipe(
        name="he", federation=uniform, privacy={"secure_aggregation": True, "secagg_scheme": "he"})
    e_plain, e_he = ToyExperiment(plain), ToyExperiment(he)
    run_federated(e_plain, out=str(tmp_path))
    run_federated(e_he, out=str(tmp_path))
    diff = max(float((e_he.saved[k] - e_plain.saved[k]).abs().max()) for k in e_plain.saved)
    assert 0 < diff <= SUM_BOUND / 4 + 1e-7  # the mean of 4: the sum's error / 4, then the float32 cast
    row = read_metrics(tmp_path / "he" / "federated")[1]
    assert row["aggregated_clients"] == [0, 1, 2, 3] and row["he_sum_bytes"] > 0
    assert row["bytes_up"] > read_metrics(tmp_path / "plain" / "federated")[1]["bytes_up"] * 4


def test_he_without_secure_aggregation_is_a_one_line_error():
    with pytest.raises(RecipeError, match="privacy.secagg_scheme: he is a secure-aggregation scheme"):
        toy_recipe(privacy={"secagg_scheme": "he"})
