"""``train.devices``: one client fit on two gloo processes equals one process with twice the batch.

The tiny llama client trains 5 AdamW steps (warm-up, gradient clipping at 0.3, a FedProx term) on 9
examples: big batches of 4, 4 and 1, so the run crosses an epoch boundary and its last batch leaves
rank 1 without an example. LoRA dropout is 0: with dropout each rank draws its own masks, and the
two runs would agree only up to that noise. What is left is float rounding (each rank's matmuls
over a shard instead of the big batch, a sum of two partial sums instead of one), 3.6e-6 relative
after 5 steps here (on this machine); the bound is 1e-4.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from fedllm.algorithms.drift import Proximal
from fedllm.client.ddp import rank_loader
from fedllm.client.lm import IGNORE_INDEX, make_loader
from fedllm.config import RecipeError, load_recipe
from fedllm.federation.build import steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
EXACT = ["lora.dropout=0.0", "train.lr=0.01", "train.max_grad_norm=0.3", "train.warmup_ratio=0.2",
         "data.max_examples=60", "eval.bleu_samples=0"]


def _norm(state) -> float:
    return float(sum((v.double() ** 2).sum() for v in state.values()) ** 0.5)


@pytest.fixture(scope="module")
def two_ranks():
    from fedllm.experiments.lm import LMExperiment

    exp = LMExperiment(load_recipe(TINY, [*EXACT, "train.batch_size=2", "train.devices=2"]))
    yield exp
    exp.ranks.close()


def test_two_gloo_ranks_match_one_process_with_twice_the_batch(two_ranks):
    exp = two_ranks
    one = copy.copy(exp)  # the same shared model, trained by the default one-process path
    one.recipe = dataclasses.replace(exp.recipe, train=dataclasses.replace(exp.recipe.train, batch_size=4, devices=1))
    examples = list(exp.data.client_examples(0))[:9]
    start = exp.initial_state
    prox = Proximal(0.1, start)

    ref = one.fit(0, examples, start, 1, 5, grad_term=prox)
    ddp = exp.fit(0, examples, start, 1, 5, grad_term=prox)
    helpers = [p.pid for p in exp.ranks.procs]
    again = exp.fit(0, examples, start, 1, 5, grad_term=prox)

    assert ddp.delta.keys() == ref.delta.keys() and _norm(ref.delta) > 0
    rel = _norm({k: ddp.delta[k] - ref.delta[k] for k in ref.delta}) / _norm(ref.delta)
    assert rel <= 1e-4, rel
    assert (ddp.local_steps, ddp.grad_steps, ddp.num_examples) == (ref.local_steps, ref.grad_steps, 9)
    assert ddp.train_loss == pytest.approx(ref.train_loss, rel=1e-6)  # the big batches' mean loss
    # the helper rank stays up between fits, and the same fit gives the same Δ
    assert [p.pid for p in exp.ranks.procs] == helpers and all(p.is_alive() for p in exp.ranks.procs)
    assert all(torch.equal(again.delta[k], ddp.delta[k]) for k in ddp.delta)


@pytest.mark.parametrize("labeled_only", [False, True])
def test_token_loss_sum_is_the_mean_loss_times_its_count(two_ranks, labeled_only):
    """Each rank's token-loss sum / count is HF's mean loss; a batch without labels sums to 0 and still
    reaches every LoRA factor (a zero gradient), which is what an empty shard's rank runs."""
    from fedllm.client.ddp import token_loss_sum
    from fedllm.client.lm import causal_lm_loss
    from fedllm.data.text import collate

    exp = two_ranks
    batch = collate(list(exp.data.client_examples(0))[:3], exp.tokenizer.pad_token_id)
    total, count = token_loss_sum(exp.model, batch, labeled_only)
    assert int(count) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    mean = causal_lm_loss(exp.model, batch, labeled_only).detach()
    assert float(total.detach() / count) == pytest.approx(float(mean), rel=1e-6)
    empty = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    total, count = token_loss_sum(exp.model, empty, labeled_only)
    total.backward()
    grads = [p.grad for p in exp.state.parameters()]
    assert float(total.detach()) == 0 and int(count) == 0 and all(g is not None and not g.any() for g in grads)
    exp.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("bucketing", [0, 2])
def test_rank_shards_are_the_big_batches_split(tiny_recipe, bucketing):
    """Over three passes, the two ranks' batches of each step together are the one-process loader's
    batch of twice the size (same seed); a rank with nothing left gets a batch without labels."""
    examples = [dataclasses.replace(e, index=i) for i, e in enumerate(_examples(9))]
    big = make_loader(examples, 4, 0, seed=7, bucketing=bucketing)
    ranks = [rank_loader(examples, 2, 2, r, 0, seed=7, bucketing=bucketing) for r in (0, 1)]
    for _ in range(3):
        for want, *shards in zip(big, *ranks):
            rows = [row for shard in shards for row, keep in zip(shard["input_ids"].tolist(),
                                                                 (shard["labels"] != IGNORE_INDEX).any(1).tolist())
                    if keep]
            assert sorted(_strip(rows)) == sorted(_strip(want["input_ids"].tolist()))
    weightless = [bool((b["labels"] == IGNORE_INDEX).all()) for b in ranks[1]]
    assert sorted(len(b["input_ids"]) for b in ranks[1]) == [1, 2, 2] and sum(weightless) == 1  # one big batch of 1


def _examples(n: int):
    from fedllm.data.text import Example

    return [Example(index=i, input_ids=[i + 1] * (i % 4 + 2), labels=[i + 1] * (i % 4 + 2), prompt_ids=[],
                    prompt="", reference="") for i in range(n)]


def _strip(rows):
    return [tuple(t for t in row if t != 0) for row in rows]


def test_an_epoch_counts_every_process_batch(tiny_recipe):
    two = load_recipe(TINY, ["train.devices=2", "train.batch_size=2"])
    assert steps_per_epoch(two, 9) == 3 == steps_per_epoch(load_recipe(TINY, ["train.batch_size=4"]), 9)


@pytest.mark.parametrize(("overrides", "field"), [
    (["privacy.dpsgd=true", "privacy.dpsgd_noise=1.0"], "privacy.dpsgd"),
    (["federation.fused_clients=true"], "federation.fused_clients"),
    (["train.devices=0"], "train.devices"),
])
def test_combinations_that_cannot_split_are_refused_in_one_line(overrides, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["train.devices=2", *overrides] if "train.devices=0" not in overrides else overrides)
    assert str(err.value).startswith(f"{field}:") and "\n" not in str(err.value)


def test_vision_clients_train_on_one_process():
    vision = sorted((ROOT / "recipes" / "vision").glob("*.yaml"))[0]
    with pytest.raises(RecipeError, match=r"^train.devices: implemented for the language-model client; expected 1"):
        load_recipe(vision, ["train.devices=2"])


def test_more_processes_than_cores_is_refused():
    from fedllm.experiments.lm_ddp import check_devices

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(RecipeError, match=rf"^train.devices: {cores + 1} training processes need {cores + 1} CPU cores; "
                                          rf"this machine has {cores}$"):
        check_devices(cores + 1, "cpu")
    check_devices(cores, "cpu")
