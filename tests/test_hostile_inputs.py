"""Inputs that used to hang, eat memory or be trusted: a FIFO as data, a 1 MB+ line, a checkpoint
with a valid checksum whose tensors do not fit the model, and data that `fedllm validate` never
read (it now loads, checks and partitions it as a run would, without the model's weights)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe
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


# ----------------------------------------------------------------------------- validate reads the data

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
ROW = '{"prompt": "p%d", "response": "r%d"}'
OWN_DATA = ["data.builtin=null", "partition.method=iid", "partition.column=null", "data.eval_size=1"]


def _validate(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("lines,overrides,expected", [
    ([ROW % (1, 1), '{"prompt": "p2"}', ROW % (3, 3)], [], "line 2: field 'response': expected a non-empty string"),
    ([ROW % (1, 1), "", '{"prompt": "p", "response": 7}'], [], "line 3: field 'response'"),
    ([ROW % (1, 1), "{oops"], [], "line 2: not valid JSON"),
    ([ROW % (1, 1), '{"prompt": "' + "word " * 200 + '", "response": "r"}'], ["data.max_length=64"],
     "line 2: the prompt takes"),
    ([], [], ": contains no rows"),
    ([ROW % (i, i) for i in range(4)], ["partition.num_clients=9"], "partition.num_clients: expected at most 3"),
    ([ROW % (i, i) for i in range(3)], ["data.eval_size=3"], "data.eval_size"),
    ([ROW % (1, 1), '{"prompt": "p2"}'], ["data.bad_rows=skip"], "only 1 usable examples"),
], ids=["missing field", "wrong type", "bad JSON", "prompt too long", "empty file", "more clients than examples",
        "no training split", "too few usable rows"])
def test_validate_reads_the_data_and_names_the_bad_row(tmp_path, lines, overrides, expected):
    # Prepare
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    args = [str(TINY), *OWN_DATA, f"data.path={path}", "partition.num_clients=1", *overrides]
    # Execute
    code, out, err = _validate(*args)
    # Assert: one line naming the file (or the field), exit 2; the recipe alone is fine
    assert code == 2 and out == "", (code, err)
    assert err.startswith("fedllm: error: ") and err.count("\n") == 1 and expected in err, err
    if "line" in expected or "rows" in expected:
        assert str(path) in err
    assert _validate(*args, "--recipe-only")[0] == 0


def test_validate_builds_no_model_weights(tmp_path, monkeypatch):
    # Prepare: a cache with only the tokenizer and the demo corpus in it
    from fedllm.data.coralmap import coralmap_records
    from fedllm.models.llm import cache_root, smollm2_tokenizer_dir

    coralmap_records()
    src = smollm2_tokenizer_dir()
    shutil.copytree(src, tmp_path / src.name)
    for pairs in cache_root().glob("coralmap-*.json"):
        shutil.copy2(pairs, tmp_path / pairs.name)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    # Execute
    code, out, err = _validate(str(TINY))
    # Assert: the data was read and partitioned, and no tiny llama was built to do it
    assert code == 0 and err == "", err
    assert out.startswith("ok: ") and "; data: 104 training examples, 32-38 per client" in out, out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == before


def test_validate_loads_the_same_data_as_a_run(tiny_recipe, tiny_experiment):
    from fedllm.experiments import load_data

    data = load_data(tiny_recipe)
    assert data.partition_json() == tiny_experiment.data.partition_json()
    assert data.stats == tiny_experiment.data.stats
    assert [e.input_ids for e in data.examples] == [e.input_ids for e in tiny_experiment.data.examples]


def test_validate_reads_a_vision_recipes_data(tmp_path):
    # the vision data (Fashion-MNIST IDX files) is read too: a missing folder is one line
    vision = TINY.parent / "vision" / "lenet_centralized.yaml"
    code, _, err = _validate(str(vision), f"data.root={tmp_path}")
    assert code == 2 and err.count("\n") == 1 and "train-images-idx3-ubyte.gz is missing" in err, err
    assert load_recipe(vision, [f"data.root={tmp_path}"]).data.root == str(tmp_path)
