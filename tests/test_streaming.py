"""``data.streaming``: rows memory-mapped from Arrow, tokenized only when read, and the same split,
examples and batches as reading the file whole; bad rows are named when first read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fedllm.data.stream as stream
from fedllm.cli import main
from fedllm.client.lm import make_loader, make_poisson_loader
from fedllm.config import RecipeError, load_recipe
from fedllm.data.build import build_text_data
from fedllm.data.stream import LazyExamples
from fedllm.data.text import StreamedRowError
from fedllm.errors import IntegrityError
from fedllm.models.llm import load_tokenizer, smollm2_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SPLIT = ["data.builtin=null", "data.max_examples=50", "data.eval_size=6", "partition.method=dirichlet",
         "partition.column=topic", "partition.num_clients=3", "eval.client_holdout=0.2"]


def _rows(n: int = 60) -> list[dict]:
    return [{"prompt": f"Question {i} about topic {i % 3}?", "response": f"answer {i} " * (1 + i % 4),
             "topic": f"t{i % 3}", "extra": i} for i in range(n)]


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(autouse=True)
def arrow_cache(tmp_path, monkeypatch):
    """Converted parquet copies go under the test's own directory, not $FEDLLM_CACHE."""
    monkeypatch.setattr(stream, "arrow_cache", lambda: tmp_path / "arrow")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir(), user=False)


def _both(path: Path, tokenizer, *extra: str):
    """(in-memory, streaming) TextData of the same recipe."""
    recipe = [*SPLIT, f"data.path={path}", *extra]
    return (build_text_data(load_recipe(TINY, recipe), tokenizer),
            build_text_data(load_recipe(TINY, [*recipe, "data.streaming=true"]), tokenizer))


def _sources(tmp_path: Path) -> dict[str, Path]:
    """The same rows as a parquet file, a directory of two parquet files, and a saved datasets directory."""
    import datasets

    rows = _rows()
    parts = tmp_path / "parts"
    parts.mkdir()
    _parquet(parts / "a.parquet", rows[:25])
    _parquet(parts / "b.parquet", rows[25:])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return {"file": _parquet(tmp_path / "rows.parquet", rows), "dir": parts, "saved": tmp_path / "saved"}


def _batches(loader) -> list[dict]:
    return [{k: v.tolist() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("kind", ["file", "dir", "saved"])
def test_streaming_builds_the_same_split_examples_and_batches(kind, tmp_path, tokenizer, monkeypatch):
    # Setup: the mapped pages are handed back every 5 reads (every RELEASE_EVERY in a run)
    monkeypatch.setattr(stream, "RELEASE_EVERY", 5)
    released, release = [], stream.ArrowRows.release
    monkeypatch.setattr(stream.ArrowRows, "release", lambda self: released.append(1) or release(self))
    whole, lazy = _both(_sources(tmp_path)[kind], tokenizer)
    # Assert: same partition.json, same examples everywhere, same loader batches
    assert isinstance(lazy.examples, LazyExamples) and isinstance(whole.examples, list)
    assert lazy.partition_json() == whole.partition_json()
    assert list(lazy.examples) == whole.examples
    assert list(lazy.eval_examples) == whole.eval_examples and list(lazy.train_examples) == whole.train_examples
    for k in range(3):
        ours, theirs = lazy.client_examples(k), whole.client_examples(k)
        assert isinstance(ours, LazyExamples) and list(ours) == theirs
        assert list(lazy.client_eval_examples(k)) == whole.client_eval_examples(k)
        assert _batches(make_loader(ours, 4, 0, seed=k)) == _batches(make_loader(theirs, 4, 0, seed=k))
        assert _batches(make_poisson_loader(ours, 4, 0, seed=k)) == _batches(make_poisson_loader(theirs, 4, 0, seed=k))
    assert lazy.stats == {k: v for k, v in whole.stats.items() if k != "truncated"}
    assert lazy.check_rows() == whole.check_rows()
    assert len(released) > 20


def test_building_tokenizes_nothing_and_reading_tokenizes_one_row(tmp_path, tokenizer, monkeypatch):
    # Setup: count the calls of the tokenize the streamed rows go through
    calls = []
    real = stream.tokenize
    monkeypatch.setattr(stream, "tokenize", lambda row, i, *a: calls.append(i) or real(row, i, *a))
    # Execute
    data = build_text_data(load_recipe(TINY, [*SPLIT, f"data.path={_parquet(tmp_path / 'r.parquet', _rows())}",
                                              "data.streaming=true"]), tokenizer)
    part = data.client_examples(1)
    sizes = [len(data.client_examples(k)) for k in range(3)]
    ids = data.partition_json()
    # Assert: sizes, slices and partition.json need no tokenizing; an item is tokenized when read, each time
    assert calls == [] and sum(sizes) + 6 + sum(len(v) for v in ids["client_eval"].values()) == 50
    first = part[0]
    assert calls == [first.index] == [ids["clients"]["1"][0]]
    assert isinstance(part[1:3], LazyExamples) and calls == [first.index]
    assert part[0] == first and calls == [first.index] * 2


def test_max_examples_and_column_mean_the_same_rows_and_labels(tmp_path, tokenizer):
    path = _parquet(tmp_path / "r.parquet", _rows(200))
    for extra in (["data.max_examples=null"], ["data.max_examples=40", "partition.method=natural"]):
        whole, lazy = _both(path, tokenizer, *extra)
        assert lazy.partition_json() == whole.partition_json()
        assert [e.topic for e in lazy.train_examples] == [e.topic for e in whole.train_examples]


EXPECTED = "expected data.path to be a .parquet file, a directory of parquet files or a saved datasets directory"


@pytest.mark.parametrize("over, message", [
    (["data.builtin=null", f"data.path={ROOT / 'data' / 'helpdesk.jsonl'}"], f"{EXPECTED} (save_to_disk), got '"),
    ([], "built-in data is not streamed"),
])
def test_streaming_refuses_files_it_cannot_map(over, message):
    with pytest.raises(RecipeError, match="^data.streaming: ") as err:
        load_recipe(TINY, [*over, "data.streaming=true"])
    assert message in str(err.value) and EXPECTED in str(err.value)


def test_streaming_refuses_skipping_bad_rows(tmp_path):
    path = _parquet(tmp_path / "r.parquet", _rows())
    with pytest.raises(RecipeError, match=r"^data.streaming: expected data.bad_rows: error; skipping a bad row"):
        load_recipe(TINY, [*SPLIT, f"data.path={path}", "data.streaming=true", "data.bad_rows=skip"])


def test_a_bad_row_is_named_when_first_read_and_by_validate(tmp_path, tokenizer, capsys):
    # Setup: one of client 0's rows gets an empty response (the split does not read responses)
    rows, over = _rows(), [*SPLIT, "data.max_examples=null", "data.streaming=true"]
    clean = _parquet(tmp_path / "clean.parquet", rows)
    row = build_text_data(load_recipe(TINY, [*over, f"data.path={clean}"]), tokenizer).partition_json()["clients"]["0"][3]
    rows[row]["response"] = " "
    path = _parquet(tmp_path / "data.parquet", rows)
    data = build_text_data(load_recipe(TINY, [*over, f"data.path={path}"]), tokenizer)  # nothing read yet
    wanted = f"{path} row {row + 1}: field 'response': expected a non-empty string"
    # Execute / Assert: a loader over the client, check_rows and fedllm validate all name the row
    examples = data.client_examples(0)
    with pytest.raises(StreamedRowError) as err:
        list(make_loader(examples, len(examples), 0, seed=0))
    assert str(err.value) == wanted
    assert isinstance(err.value, IntegrityError) and isinstance(err.value, RecipeError)  # no engine skips it
    with pytest.raises(StreamedRowError, match=f"^{wanted}$"):
        data.check_rows()
    assert main(["validate", str(TINY), *over, f"data.path={path}"]) == 2
    assert capsys.readouterr().err.strip() == f"fedllm: error: {wanted}"
    # the same file in memory stops on the same row, when it is built
    with pytest.raises(RecipeError, match=f"^{wanted}$"):
        build_text_data(load_recipe(TINY, [*SPLIT, "data.max_examples=null", f"data.path={path}"]), tokenizer)


def test_a_bad_label_or_missing_column_is_reported_up_front(tmp_path, tokenizer):
    rows = _rows()
    rows[4]["topic"] = None
    path = _parquet(tmp_path / "r.parquet", rows)
    base = [*SPLIT, "data.max_examples=null", f"data.path={path}", "data.streaming=true"]
    with pytest.raises(RecipeError, match=rf"^{path} row 5: field 'topic': expected a string or number label"):
        build_text_data(load_recipe(TINY, base), tokenizer)
    with pytest.raises(RecipeError, match=r"^partition.column: column 'nope' not found in .*available: "
                                          r"\['extra', 'prompt', 'response', 'topic'\]"):
        build_text_data(load_recipe(TINY, [*base, "partition.column=nope"]), tokenizer)


def test_empty_and_damaged_sources_are_one_line_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), empty)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    for path, message in ((empty, "contains no rows"), (junk, "could not be read as parquet")):
        with pytest.raises(RecipeError, match=f"^{path}: {message}"):
            build_text_data(load_recipe(TINY, ["data.builtin=null", f"data.path={path}", "data.streaming=true",
                                               "partition.column=null", "partition.method=iid"]), tokenizer)


RUN = ["federation.rounds=1", "train.local_steps=2", "eval.bleu_samples=2", "output.save_adapter=false",
       "output.plots=false", "partition.num_clients=2", "data.eval_size=6", "data.max_examples=null"]
TIMES = {"eval_time_s", "round_time_s", "train_time_s", "aggregate_time_s"}


def _run(tmp_path: Path, path: Path, name: str, *extra: str) -> int:
    return main(["run", str(TINY), *RUN, "data.builtin=null", f"data.path={path}", f"name={name}",
                 "--out", str(tmp_path), *extra])


@pytest.mark.slow
def test_a_federated_run_streams_to_the_same_numbers_and_stops_on_a_bad_row(tmp_path, capsys):
    # Setup
    rows = _rows(40)
    path = _parquet(tmp_path / "r.parquet", rows)
    # Execute: the same run in memory and streamed
    assert _run(tmp_path, path, "whole") == 0
    assert _run(tmp_path, path, "lazy", "data.streaming=true") == 0
    # Assert: every metric but the timings is identical, and so is the split
    def rows_of(name):
        lines = (tmp_path / name / "federated" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in TIMES} for x in lines]

    assert rows_of("lazy") == rows_of("whole")
    assert [r["eval_loss"] for r in rows_of("lazy")] and all(r["eval_loss"] for r in rows_of("lazy"))
    split = [json.loads((tmp_path / n / "federated" / "partition.json").read_text()) for n in ("whole", "lazy")]
    assert split[0] == split[1]
    # a training row that is bad stops the run (exit 2, the row named), never "client failed, carry on"
    train_row = split[1]["clients"]["0"][0]
    rows[train_row]["response"] = ""
    bad = _parquet(tmp_path / "bad.parquet", rows)
    capsys.readouterr()
    assert _run(tmp_path, bad, "bad", "data.streaming=true", "train.batch_size=64") == 2
    assert f"fedllm: error: {bad} row {train_row + 1}: field 'response'" in capsys.readouterr().err
