"""``federation.fused_clients``: a round's clients trained in one pass over the shared 4-bit base give
each client the update it gets alone (‖Δ_fused − Δ_seq‖ / ‖Δ_seq‖ ≤ 1e-4), for every drift term,
rank layout, straggler and training knob the fused loop supports; what cannot fuse is refused.

One tiny NF4 llama (built in-process, LoRA dropout 0.1 so every client draws dropout masks) serves
every test; a test that needs other training settings swaps the experiment's recipe, since the
model and the data do not depend on them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedllm.algorithms.drift import Correction, Proximal
from fedllm.algorithms.lora_agg import RankLayout
from fedllm.config import RecipeError, load_recipe
from fedllm.experiments.base import ClientFault, FitJob, fit_each
from fedllm.experiments.lm_fused import fused_fit_many
from fedllm.types import ClientUpdate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
BASE = ["lora.r=4", "lora.dropout=0.1", "train.local_steps=2", "eval.bleu_samples=0", "output.plots=false"]
TOL = 1e-4


@pytest.fixture(scope="module")
def exp():
    from fedllm.experiments.lm import LMExperiment

    return LMExperiment(load_recipe(TINY, BASE))


@pytest.fixture()
def with_recipe(exp):
    """Swap ``exp.recipe`` for one with extra overrides (restored after the test)."""
    original = exp.recipe

    def use(*overrides: str):
        exp.recipe = load_recipe(TINY, [*BASE, *overrides])
        return exp.recipe

    yield use
    exp.recipe = original


def _start(exp, scale: float = 0.02, seed: int = 1) -> dict[str, torch.Tensor]:
    """The initial adapter with non-zero B (so A gets gradients from the first step)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if ".lora_B" in k else v.clone()
            for k, v in exp.initial_state.items()}


def rel_diff(a: ClientUpdate, b: ClientUpdate) -> float:
    num = sum(float((a.delta[k] - b.delta[k]).double().norm() ** 2) for k in a.delta) ** 0.5
    den = sum(float(a.delta[k].double().norm() ** 2) for k in a.delta) ** 0.5
    return num / den


def both(exp, jobs: list[FitJob], rnd: int = 1):
    """(sequential, fused) results of the same jobs, and the global RNG state each leaves behind."""
    seq = fit_each(exp, jobs, rnd)
    seq_rng = torch.get_rng_state()
    torch.manual_seed(12345)  # the fused fit must not depend on the RNG it finds
    fused = fused_fit_many(exp, jobs, rnd)
    return seq, fused, seq_rng, torch.get_rng_state()


def assert_same_updates(seq, fused) -> None:
    for s, f in zip(seq, fused, strict=True):
        assert isinstance(s, ClientUpdate) and isinstance(f, ClientUpdate), (s, f)
        assert s.client_id == f.client_id and s.delta.keys() == f.delta.keys()
        assert rel_diff(s, f) <= TOL, (s.client_id, rel_diff(s, f))
        assert (s.local_steps, s.grad_steps, s.num_examples) == (f.local_steps, f.grad_steps, f.num_examples)
        assert f.train_loss == pytest.approx(s.train_loss, rel=1e-5)
        assert f.bytes_up == s.bytes_up


def _jobs(exp, steps=(2, 2, 2), starts=None, terms=None) -> list[FitJob]:
    starts = starts or [_start(exp)] * len(steps)
    terms = terms or [None] * len(steps)
    return [FitJob(k, exp.data.client_examples(k), starts[k], steps[k], terms[k]) for k in range(len(steps))]


# ----------------------------------------------------------------------------- the same Δ as alone


def test_gradualdiff_clients_fused_get_their_sequential_updates_and_rng(exp):
    seq, fused, seq_rng, fused_rng = both(exp, _jobs(exp))
    assert_same_updates(seq, fused)
    assert all(s.grad_steps == 2 for s in seq)
    assert torch.equal(seq_rng, fused_rng)  # the global RNG is left as the sequential fits leave it


def test_fedprox_fused(exp, with_recipe):
    with_recipe("federation.algorithm=fedprox", "federation.mu=0.5")
    start = _start(exp)
    seq, fused, *_ = both(exp, _jobs(exp, terms=[Proximal(0.5, start)] * 3))
    assert_same_updates(seq, fused)


def test_scaffold_fused_with_a_different_correction_per_client(exp, with_recipe):
    with_recipe("federation.algorithm=scaffold")
    gen = torch.Generator().manual_seed(7)
    terms = [Correction({k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in exp.initial_state.items()})
             for _ in range(3)]
    seq, fused, *_ = both(exp, _jobs(exp, terms=terms))
    assert_same_updates(seq, fused)


def test_mixed_ranks_fused_keep_the_slots_beyond_each_rank_zero(exp, with_recipe):
    with_recipe("lora.client_ranks=[1,2,4]")
    layout = RankLayout(exp.initial_state, [1, 2, 4])
    starts = [layout.truncate(_start(exp), k) for k in range(3)]
    seq, fused, *_ = both(exp, _jobs(exp, starts=starts))
    assert_same_updates(seq, fused)
    for upd in fused:
        rk = layout.rank(upd.client_id)
        for a_key, b_key in layout.pairs:
            assert torch.count_nonzero(upd.delta[a_key][rk:]) == 0
            assert torch.count_nonzero(upd.delta[b_key][:, rk:]) == 0


def test_a_straggler_leaves_the_fused_batch_after_its_own_steps(exp):
    seq, fused, *_ = both(exp, _jobs(exp, steps=(3, 1, 2)))
    assert_same_updates(seq, fused)
    assert [u.local_steps for u in fused] == [3, 1, 2]


def test_per_client_clipping_accumulation_schedule_and_warmup(exp, with_recipe):
    with_recipe("train.max_grad_norm=0.05", "train.grad_accum=2", "train.warmup_ratio=0.5",
                "train.schedule=cosine", "train.weight_decay=0.01")
    seq, fused, *_ = both(exp, _jobs(exp, steps=(2, 1, 2)), rnd=2)
    assert_same_updates(seq, fused)


def test_labelled_only_head_and_length_bucketing_follow_the_recipe(exp, with_recipe):
    with_recipe("train.head_positions=labeled", "train.length_bucketing=2")
    seq, fused, *_ = both(exp, _jobs(exp))
    assert_same_updates(seq, fused)


def test_sgd_with_momentum(exp, with_recipe):
    with_recipe("train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05")
    seq, fused, *_ = both(exp, _jobs(exp))
    assert_same_updates(seq, fused)


def test_injected_faults_hit_only_their_client(exp, with_recipe):
    with_recipe("faults.error_clients=[1]", "faults.nan_clients=[2]")
    seq, fused, *_ = both(exp, _jobs(exp))
    assert isinstance(seq[1], ClientFault) and isinstance(fused[1], ClientFault)
    assert rel_diff(seq[0], fused[0]) <= TOL
    assert torch.isnan(fused[2].delta[next(iter(fused[2].delta))]).all()


# ----------------------------------------------------------------------------- the whole run


def _rows(exp, recipe, out: Path) -> list[dict]:
    from fedllm.federation.modes import run_federated
    from fedllm.federation.rundir import read_metrics

    exp.recipe = recipe
    run_federated(exp, out=str(out))
    return read_metrics(out / recipe.name / "federated")


@pytest.mark.parametrize("algorithm", ["gradualdiff", "scaffold"])
def test_a_fused_federated_run_matches_the_sequential_run(exp, with_recipe, tmp_path, algorithm):
    # SCAFFOLD: every client's correction c - c_i is fixed before any upload; round 2 uses the controls
    # round 1's uploads produced
    common = ("federation.rounds=2", f"federation.algorithm={algorithm}")
    seq = _rows(exp, with_recipe(*common), tmp_path / "seq")
    fused = _rows(exp, with_recipe(*common, "federation.fused_clients=true"), tmp_path / "fused")
    assert [r["round"] for r in fused] == [r["round"] for r in seq] == [0, 1, 2]
    for s, f in zip(seq, fused):
        assert f["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
        if s["train_loss"] is not None:
            assert f["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
        assert f["bytes_up"] == s["bytes_up"]


def test_the_default_is_sequential():
    assert load_recipe(TINY).federation.fused_clients is False


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("overrides", "field"), [
    (["privacy.dpsgd=true"], "privacy.dpsgd"),
    (["lora.method=dora"], "lora.method"),
    (["train.gradient_checkpointing=true"], "train.gradient_checkpointing"),
    (["train.precision=bf16-mixed"], "train.precision"),
    (["output.loggers=[csv]"], "output.loggers"),
])
def test_what_cannot_fuse_is_refused_in_one_line(overrides, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["federation.fused_clients=true", *overrides])
    assert field in str(err.value) and "fused_clients" in str(err.value) and "\n" not in str(err.value)


def test_vision_recipes_cannot_fuse():
    vision = sorted((ROOT / "recipes" / "vision").glob("*.yaml"))
    assert vision
    with pytest.raises(RecipeError, match="model.task|fused_clients"):
        load_recipe(vision[0], ["federation.fused_clients=true"])


def test_fit_each_hands_back_a_clients_exception_and_runs_the_others():
    calls = []

    class Stub:
        def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
            calls.append(client_id)
            if client_id == 0:
                raise ValueError("boom")
            return client_id

    out = fit_each(Stub(), [FitJob(k, [], {}, 1) for k in range(3)], 1, on_client=calls.append)
    assert isinstance(out[0], ValueError) and out[1:] == [1, 2]
    assert calls == [0, 0, 1, 1, 2, 2]
    assert dataclasses.is_dataclass(FitJob)
