"""The recipe compatibility matrix: every combination loads, or fails with a field and a reason.

Walks algorithm × robust aggregator × privacy (DP mode, secure aggregation) × LoRA aggregation ×
compression × hierarchy × model task. For each combination:

- rejected: the :class:`RecipeError` names a real recipe field (``group.field``) and says why;
- accepted: a :class:`FederatedServer` built from it runs a real round on synthetic client updates
  (a LoRA-shaped state for language models, plain weights for vision) and applies a finite state,
  so "the validator lets it through" means "the server can actually run it".

Known-bad and known-good combinations are pinned by name below.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from fedllm.cli import main
from fedllm.config import Recipe, RecipeError, RobustConfig, build
from fedllm.federation.server import FederatedServer
from fedllm.types import ClientUpdate

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 6

ALGORITHMS = ("gradualdiff", "fedavg", "fedprox", "scaffold", "fednova")
AGGREGATORS = tuple(sorted(get_args(get_type_hints(RobustConfig)["aggregator"])))  # every name a recipe accepts
PRIVACY = tuple(itertools.product(("none", "server", "client"), (False, True)))  # (dp, secure_aggregation)
LORA_MODES = ("factorwise", "svd", "frozen_a")
CODECS = ("none", "q8", "topk")  # fp16 behaves as none for every rule; pinned in known-good below
REGIONS = (0, 2)
TASKS = ("lm", "vision")

MATRIX = list(itertools.product(ALGORITHMS, AGGREGATORS, PRIVACY, LORA_MODES, CODECS, REGIONS, TASKS))


def values(algorithm="fedavg", aggregator="mean", privacy=("none", False), lora="factorwise", codec="none",
           regions=0, task="lm", **extra) -> dict:
    """A raw recipe mapping for one point of the matrix (weighted follows what DP/secagg need)."""
    dp, secagg = privacy
    model = {"preset": "tiny"} if task == "lm" else {"preset": "cnn"}
    data = {"builtin": "coralmap"} if task == "lm" else {"builtin": "fashion_mnist"}
    out = {
        "name": "matrix", "model": model, "data": data,
        "partition": {"method": "iid", "num_clients": NUM_CLIENTS},
        "federation": {"algorithm": algorithm, "rounds": 2, "fraction": 1.0, "lora_aggregation": lora},
        "train": {"local_steps": 2, "lr": 0.1},
        "robust": {"aggregator": aggregator, "byzantine": 1, "trim_ratio": 0.2},
        "privacy": {"dp": dp, "secure_aggregation": secagg, "clip": 1.0, "noise_multiplier": 0.5},
        "compression": {"codec": codec, "topk_fraction": 0.5},
        "hierarchy": {"regions": regions},
        "checkpoint": {"enabled": False},
    }
    for group, fields in extra.items():
        out[group] = {**out.get(group, {}), **fields}
    return out


def field_exists(where: str) -> bool:
    """True when ``where`` is a recipe group, or ``group.field`` of a recipe group."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    head, _, tail = where.partition(".")
    if head not in fields:
        return False
    if not tail:
        return True
    group = fields[head].default if fields[head].default is not dataclasses.MISSING else None
    cls = type(group) if group is not None else fields[head].type
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return tail in names


def synthetic_round(recipe: Recipe) -> tuple[dict, dict]:
    """One server round on seeded synthetic updates; (new global state, round metrics)."""
    gen = torch.Generator().manual_seed(0)
    if recipe.model.task == "lm":
        state = {"m.q_proj.lora_A.weight": torch.randn(2, 6, generator=gen),
                 "m.q_proj.lora_B.weight": torch.zeros(5, 2)}
    else:
        state = {"conv.weight": torch.randn(4, 1, 3, 3, generator=gen), "fc.bias": torch.zeros(10)}
    server = FederatedServer(recipe, state, [10 + k for k in range(NUM_CLIENTS)])
    plan = server.begin_round(1)
    for k in plan.training:
        start = server.start_state(k, state)
        term = server.grad_term(k, start)
        if term is not None:
            assert term(start).keys() == state.keys()
        delta = {key: 0.01 * torch.randn(v.shape, generator=gen) for key, v in state.items()}
        if recipe.federation.lora_aggregation == "frozen_a":
            delta = {key: torch.zeros_like(v) if "lora_A" in key else v for key, v in delta.items()}
        server.upload(1, ClientUpdate(k, delta, 10 + k, plan.steps[k], 1.0), start)
    return server.finish_round(1, state)


@functools.cache
def classify(combo) -> RecipeError | Recipe:
    """The recipe for ``combo``, or the RecipeError it raises (cached: the matrix is walked once)."""
    try:
        return build(Recipe, values(*combo))
    except RecipeError as err:
        return err


def test_the_matrix_is_walked_and_mixed():
    outcomes = [classify(c) for c in MATRIX]
    accepted = sum(isinstance(o, Recipe) for o in outcomes)
    assert len(MATRIX) == 5 * len(AGGREGATORS) * 6 * 3 * 3 * 2 * 2 and len(AGGREGATORS) == 9  # + afa (issue 38)
    assert 0 < accepted < len(MATRIX)


def test_every_rejection_names_a_field_and_a_reason():
    for combo in MATRIX:
        out = classify(combo)
        if isinstance(out, RecipeError):
            where, _, reason = str(out).partition(": ")
            assert where == out.where and field_exists(where), (combo, str(out))
            assert len(reason.split()) >= 3 and "\n" not in str(out), (combo, str(out))


def test_every_rejection_is_for_a_rule_that_applies():
    """Each rejection matches one of the reasons a combination genuinely cannot work."""
    for combo in MATRIX:
        algorithm, aggregator, (dp, secagg), lora, codec, regions, task = combo
        out = classify(combo)
        if isinstance(out, Recipe):
            continue
        weighted = algorithm != "gradualdiff"
        reasons = [
            task == "vision" and lora != "factorwise",
            algorithm == "fednova" and (aggregator != "mean" or lora == "svd"),
            aggregator != "mean" and lora == "svd",
            secagg and (aggregator != "mean" or algorithm == "fednova" or lora == "svd"
                        or codec not in ("none", "fp16") or regions > 0 or weighted),
            dp != "none" and (aggregator != "mean" or algorithm == "fednova" or weighted or regions > 0
                              or lora == "svd"),
            regions > 0 and algorithm in ("scaffold", "fednova"),
            aggregator == "bulyan",  # the matrix's 6 clients per round are fewer than Bulyan's 4f + 3 = 7
        ]
        assert any(reasons), (combo, str(out))


def test_accepted_combinations_run_a_server_round():
    """A seeded sample of the accepted combinations (every option value included) runs a round."""
    accepted = [c for c in MATRIX if isinstance(classify(c), Recipe)]
    sample = random.Random(0).sample(accepted, k=min(90, len(accepted)))
    for axis in range(len(MATRIX[0])):  # every value an accepted combination takes, at least once
        for value in {c[axis] for c in accepted} - {c[axis] for c in sample}:
            sample.append(next(c for c in accepted if c[axis] == value))
    for combo in sample:
        state, metrics = synthetic_round(classify(combo))
        assert metrics["applied"], combo
        assert all(bool(torch.isfinite(v).all()) for v in state.values()), combo
        flat_mean = combo[1] == "mean" and combo[2] == ("none", False) and combo[0] != "fednova" and not combo[5]
        if combo[-1] == "lm" and flat_mean:
            assert math.isfinite(metrics["lora_aggregation_error"]), combo


def test_krum_with_regions_runs_a_round():
    combo = ("gradualdiff", "krum", ("none", False), "factorwise", "none", 2, "lm")
    assert isinstance(classify(combo), Recipe)
    _, metrics = synthetic_round(classify(combo))
    assert metrics["applied"]


def test_frozen_a_with_client_dp_runs_a_round():
    combo = ("gradualdiff", "mean", ("client", False), "frozen_a", "none", 0, "lm")
    assert isinstance(classify(combo), Recipe)
    _, metrics = synthetic_round(classify(combo))
    assert metrics["applied"]


def test_fednova_with_svd_lora_is_rejected_or_normalized():
    with pytest.raises(RecipeError) as err:
        build(Recipe, values(algorithm="fednova", lora="svd"))
    assert err.value.where == "federation.lora_aggregation"


@pytest.mark.parametrize("bad,field", [
    (dict(aggregator="median", privacy=("none", True), algorithm="gradualdiff"), "privacy.secure_aggregation"),
    (dict(algorithm="fednova", aggregator="krum"), "robust.aggregator"),
    (dict(algorithm="fedavg", privacy=("server", False)), "federation.weighted"),
    (dict(algorithm="gradualdiff", task="vision", lora="svd"), "federation.lora_aggregation"),
    (dict(algorithm="scaffold", regions=2), "hierarchy.regions"),
    (dict(algorithm="gradualdiff", privacy=("none", True), codec="q8"), "compression.codec"),
    (dict(aggregator="krum", partition={"num_clients": 4}), "robust.byzantine"),
])
def test_known_bad_combinations_are_rejected(bad, field):
    with pytest.raises(RecipeError) as err:
        build(Recipe, values(**bad))
    assert err.value.where == field


@pytest.mark.parametrize("good", [
    dict(algorithm="gradualdiff", privacy=("server", True)),              # DP + secagg, uniform mean
    dict(algorithm="gradualdiff", privacy=("none", True), codec="fp16"),  # secagg over fp16 updates
    dict(algorithm="fedprox", aggregator="trimmed_mean", codec="q8"),     # robust + compression
    dict(algorithm="scaffold", lora="frozen_a", codec="topk"),
    dict(algorithm="fedavg", aggregator="krum", task="vision"),
    dict(algorithm="gradualdiff", privacy=("server", False), lora="frozen_a", regions=0),
    dict(algorithm="fedavg", regions=2, aggregator="median"),
])
def test_known_good_combinations_are_accepted(good):
    recipe = build(Recipe, values(**good))
    state, metrics = synthetic_round(recipe)
    assert metrics["applied"]


def test_validate_cli_exits_2_with_one_line(capsys):
    code = main(["validate", str(ROOT / "recipes" / "tiny.yaml"), "robust.aggregator=median",
                 "privacy.secure_aggregation=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "privacy.secure_aggregation" in err[0] and "sum" in err[0]
