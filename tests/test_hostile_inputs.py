"""Inputs that used to hang, eat memory or be trusted: a FIFO as data, a 1 MB+ line, a checkpoint
with a valid checksum whose tensors do not fit the model."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest
import torch

from fedllm.config import RecipeError
from fedllm.data.text import MAX_ROW_CHARS, _read_file
from fedllm.federation.checkpoint import checkpoint_dir, load_latest, save_checkpoint
from fedllm.federation.modes import run_federated
from tests._toy import ToyExperiment, toy_recipe


def test_a_fifo_as_data_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    out: list[BaseException] = []
    reader = threading.Thread(target=lambda: out.append(pytest.raises(RecipeError, _read_file, fifo).value),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "not a regular file or directory" in str(out[0]) and str(fifo) in str(out[0])


def test_an_overlong_line_is_refused_by_its_size_before_parsing(tmp_path):
    path = tmp_path / "data.jsonl"
    ok = json.dumps({"prompt": "q", "response": "a"})
    path.write_text(ok + "\n" + json.dumps({"prompt": "x" * (MAX_ROW_CHARS + 10), "response": "a"}) + "\n")
    with pytest.raises(RecipeError, match=r"data.jsonl line 2: 1,000,0\d\d characters; expected a row of at most"):
        _read_file(path)


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_refused(tmp_path):
    # Prepare: a run with checkpoints; then its newest checkpoint rewritten (valid checksum) with a
    # global state of another shape, as a tampered or foreign file would be
    recipe = toy_recipe(checkpoint={"enabled": True}, federation={"rounds": 2})
    run_federated(ToyExperiment(recipe), out=str(tmp_path))
    run = tmp_path / "toy" / "federated"
    (run / "summary.json").unlink()
    state = load_latest(checkpoint_dir(run))
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:], dtype=v.dtype) for k, v in state.global_state.items()}
    save_checkpoint(checkpoint_dir(run), dataclasses.replace(state, global_state=bad), keep=5)
    # Execute / Assert
    with pytest.raises(RecipeError, match=r"the newest checkpoint does not fit the model: lin\.\w+ is \(\d+"):
        run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)
