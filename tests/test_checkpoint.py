"""Server checkpoints: exact round trip, atomic writes, corrupt/truncated files skipped, pruning."""

from __future__ import annotations

import io
import logging
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.config import RecipeError, load_recipe
from fedllm.federation import checkpoint as ck
from fedllm.federation.checkpoint import (
    MAGIC,
    CheckpointError,
    ServerState,
    capture_rng,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    recipe_fingerprint,
    restore_rng,
    resume_state,
    save_checkpoint,
)

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _state(rnd: int, seed: int = 0) -> ServerState:
    g = torch.Generator().manual_seed(seed + rnd)
    return ServerState(
        round=rnd,
        global_state={"lora_A": torch.randn(4, 3, generator=g), "lora_B": torch.zeros(3, 4)},
        server_state={"momentum": {"lora_A": torch.randn(4, 3, generator=g)}, "step": rnd},
        client_states={0: {"c": torch.ones(2)}, 7: {"c": torch.full((2,), -1.5)}},
        sampler_state={"order": [2, 0, 1], "pos": 1},
        rng_states=capture_rng(),
        ledger_state={"history": [(1.1, 0.5, rnd)], "delta": 1e-5},
        metrics_rows=[{"round": r, "eval_loss": 2.0 - 0.1 * r, "bleu": None, "clients": [0, 7],
                       "train_loss": float("nan")} for r in range(rnd + 1)],
        fingerprint="abc",
    )


def _assert_same(a: ServerState, b: ServerState) -> None:
    assert a.round == b.round and a.fingerprint == b.fingerprint
    assert a.global_state.keys() == b.global_state.keys()
    for k in a.global_state:
        assert torch.equal(a.global_state[k], b.global_state[k])
    assert torch.equal(a.server_state["momentum"]["lora_A"], b.server_state["momentum"]["lora_A"])
    assert a.server_state["step"] == b.server_state["step"]
    assert sorted(a.client_states) == sorted(b.client_states) == [0, 7]
    assert torch.equal(a.client_states[7]["c"], b.client_states[7]["c"])
    assert a.sampler_state == b.sampler_state and a.ledger_state == b.ledger_state
    assert [r["eval_loss"] for r in a.metrics_rows] == [r["eval_loss"] for r in b.metrics_rows]
    assert all(np.isnan(r["train_loss"]) for r in b.metrics_rows)


def test_round_trip_is_exact(tmp_path):
    # Prepare
    state = _state(3)
    # Execute
    path = save_checkpoint(tmp_path, state)
    loaded = load_latest(tmp_path)
    # Assert
    assert path == tmp_path / "ckpt_3.pt" and path.read_bytes().startswith(MAGIC)
    _assert_same(state, loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_restored_rng_replays_the_same_draws(tmp_path):
    # Prepare: capture, draw, then restore from a checkpoint
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path, ServerState(round=1, global_state={}, rng_states=capture_rng()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    # Execute
    restore_rng(load_latest(tmp_path).rng_states)
    again = (torch.rand(3), np.random.rand(3), random.random())
    # Assert
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
    # Prepare: rounds 1 and 2; flip one byte inside round 2's payload
    save_checkpoint(tmp_path, _state(1))
    newest = save_checkpoint(tmp_path, _state(2))
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedllm.federation.checkpoint"):
        loaded = load_latest(tmp_path)
    # Assert
    assert loaded.round == 1
    _assert_same(_state(1), loaded)
    assert "round 2" in caplog.text and "sha256 mismatch" in caplog.text


@pytest.mark.parametrize("keep_bytes", [0, 5, len(MAGIC) + 10, -1])
def test_truncated_file_is_detected(tmp_path, keep_bytes):
    # Prepare: a torn write cut at various points (header, digest, payload)
    path = save_checkpoint(tmp_path, _state(4))
    blob = path.read_bytes()
    path.write_bytes(blob[:keep_bytes] if keep_bytes >= 0 else blob[:-100])
    # Execute / Assert
    with pytest.raises(CheckpointError, match="ckpt_4.pt"):
        read_checkpoint(path)
    assert load_latest(tmp_path) is None


def test_keep_n_prunes_oldest(tmp_path):
    # Execute
    for r in range(1, 6):
        save_checkpoint(tmp_path, _state(r), keep=2)
    # Assert
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert load_latest(tmp_path).round == 5


def test_saving_an_earlier_round_drops_the_abandoned_later_ones(tmp_path):
    # Prepare: checkpoints 1..3 and a temp file left by a crashed writer
    for r in range(1, 4):
        save_checkpoint(tmp_path, _state(r), keep=5)
    (tmp_path / ".ckpt_4.pt.tmp12345").write_bytes(b"half")
    # Execute: a run resumed from round 1 writes round 2 again
    save_checkpoint(tmp_path, _state(2, seed=10), keep=5)
    # Assert
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt", "ckpt_2.pt"]
    _assert_same(_state(2, seed=10), load_latest(tmp_path))


def test_crash_during_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    # Prepare
    save_checkpoint(tmp_path, _state(1))

    def crash(src, dst):
        raise OSError("disk pulled")

    monkeypatch.setattr(ck.os, "replace", crash)
    # Execute
    with pytest.raises(OSError, match="disk pulled"):
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.undo()
    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt"]
    assert load_latest(tmp_path).round == 1


def test_missing_or_empty_directory_gives_none(tmp_path):
    assert load_latest(tmp_path / "nope") is None
    assert load_latest(tmp_path) is None


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, _state(1), keep=0)
    with pytest.raises(ValueError, match="round"):
        ServerState(round=-1, global_state={})
    with pytest.raises(ValueError, match=r"sampler_state\['order'\]: ndarray is not a plain value"):
        save_checkpoint(tmp_path, ServerState(round=1, global_state={}, sampler_state={"order": np.arange(3)}))
    assert list_checkpoints(tmp_path) == []


def test_checksummed_but_unsafe_pickle_is_refused(tmp_path):
    # Prepare: a valid header and checksum around a payload weights_only must not unpickle
    buf = io.BytesIO()
    torch.save({"format": 1, "round": 1, "global_state": {}, "x": Fraction(1, 2)}, buf)
    body = buf.getvalue()
    path = tmp_path / "ckpt_1.pt"
    path.write_bytes(MAGIC + ck.hashlib.sha256(body).digest() + body)
    # Execute / Assert
    with pytest.raises(CheckpointError, match="could not be unpickled"):
        read_checkpoint(path)


def test_file_name_must_match_round(tmp_path):
    path = save_checkpoint(tmp_path, _state(2))
    os.replace(path, tmp_path / "ckpt_9.pt")
    with pytest.raises(CheckpointError, match="holds round 2"):
        read_checkpoint(tmp_path / "ckpt_9.pt")


def test_resume_state_checks_recipe_and_rounds(tmp_path):
    # Prepare
    recipe = load_recipe(TINY)  # federation.rounds = 2
    more_rounds = load_recipe(TINY, ["federation.rounds=5"])
    other = load_recipe(TINY, ["lora.r=8"])
    state = _state(2)
    state.fingerprint = recipe_fingerprint(recipe)
    save_checkpoint(tmp_path, state)
    # Execute / Assert
    assert resume_state(tmp_path, recipe).round == 2
    assert resume_state(tmp_path, more_rounds).round == 2  # extending a run is allowed
    with pytest.raises(RecipeError, match="different recipe"):
        resume_state(tmp_path, other)
    with pytest.raises(RecipeError, match="federation.rounds"):
        resume_state(tmp_path, load_recipe(TINY, ["federation.rounds=1"]))
    assert resume_state(tmp_path / "empty", recipe) is None
