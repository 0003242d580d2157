"""Damaged files: fedllm's own caches are rebuilt; the user's files (model.path, IDX, checkpoints,
run files given to ``report``) are named in one line with exit 2; a full disk is one line too.

Each test truncates, garbles or removes one file and checks the outcome: the rebuilt cache equals
the original (its tensors are deterministic from the seed), or ``fedllm`` exits 2 (4 for a run
that could not write its files) with exactly one ``fedllm: error:`` line naming the file.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.cli import EXIT_BAD_INPUT, EXIT_WRITE, main
from fedllm.config import RecipeError, dump_recipe, load_recipe
from fedllm.federation import checkpoint as ck
from fedllm.federation.modes import run_federated
from fedllm.models.files import MANIFEST, cache_problem
from tests._toy import ToyExperiment, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _cli(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


def _one_line(err: str, *parts: str) -> None:
    assert err.startswith("fedllm: error: ") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)


# ----------------------------------------------------------------------------- fedllm's caches


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private FEDLLM_CACHE holding copies (mtimes kept) of the tokenizer and tiny-llama caches."""
    from fedllm.models.llm import smollm2_tokenizer_dir, tiny_dir

    root = tmp_path / "cache"
    root.mkdir()
    for src in (smollm2_tokenizer_dir(), tiny_dir(0)):
        shutil.copytree(src, root / src.name)
    monkeypatch.setenv("FEDLLM_CACHE", str(root))
    return root


def _cut(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def _garble(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid: mid + 64] = bytes(b ^ 0x5A for b in blob[mid: mid + 64])  # same size, other bytes
    path.write_bytes(bytes(blob))


DAMAGE = {
    "truncated weights": lambda d: _cut(d / "model.safetensors"),
    "garbled weights (same size)": lambda d: _garble(d / "model.safetensors"),
    "missing tokenizer.json": lambda d: (d / "tokenizer.json").unlink(),
    "garbage config.json": lambda d: (d / "config.json").write_text("{"),
    "old cache without manifest, truncated": lambda d: ((d / MANIFEST).unlink(), _cut(d / "model.safetensors", 0.9)),
    "a file instead of the directory": lambda d: (shutil.rmtree(d), d.write_text("x")),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_model_cache_is_rebuilt(cache, caplog, damage):
    # Prepare
    from fedllm.models.llm import MODEL_FILES, tiny_dir

    target = cache / "tiny-llama-seed0"
    original = {k: v.clone() for k, v in load_file(target / "model.safetensors").items()}  # not the mmap
    DAMAGE[damage](target)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedllm.models.files"):
        path = tiny_dir(0)
    # Assert: warned, rebuilt, verifies, and holds the same weights (seeded)
    assert path == target and ("rebuilding" in caplog.text or "replacing" in caplog.text), caplog.text
    assert cache_problem(path, MODEL_FILES) is None
    rebuilt = load_file(path / "model.safetensors")
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_a_sound_cache_from_before_manifests_is_adopted_not_rebuilt(cache, caplog):
    from fedllm.models.llm import tiny_dir

    target = cache / "tiny-llama-seed0"
    (target / MANIFEST).unlink()
    before = (target / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="fedllm.models.files"):
        tiny_dir(0)
    assert caplog.text == "" and (target / MANIFEST).is_file()
    assert (target / "model.safetensors").stat().st_mtime_ns == before


def test_a_cache_copied_with_new_mtimes_is_checked_by_sha256_not_rebuilt(cache, caplog):
    from fedllm.models.llm import tiny_dir

    weights = cache / "tiny-llama-seed0" / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # same bytes, another mtime (cp without -p, a restore)
    with caplog.at_level(logging.WARNING, logger="fedllm.models.files"):
        tiny_dir(0)
    assert caplog.text == "" and weights.stat().st_mtime_ns == 1  # not rebuilt
    recorded = json.loads((weights.parent / MANIFEST).read_text())["files"]["model.safetensors"]
    assert recorded["mtime_ns"] == 1  # the new mtime is recorded: the next check does not hash


def test_a_missing_cached_weight_file_is_rebuilt_not_blamed_on_model_path(cache, caplog):
    # Prepare: the preset's cached weights vanish (a cleaned disk, a cut copy)
    from fedllm.config import ModelConfig
    from fedllm.models.llm import load_base

    (cache / "tiny-llama-seed0" / "model.safetensors").unlink()
    # Execute: loading the preset still works
    with caplog.at_level(logging.WARNING, logger="fedllm.models.files"):
        model, tok = load_base(ModelConfig(preset="tiny", quantization="none", device="cpu"), 0)
    # Assert
    assert "model.safetensors is missing" in caplog.text and "model.path" not in caplog.text
    assert model.config.hidden_size == 64 and tok.chat_template


@pytest.mark.slow
def test_a_damaged_tokenizer_cache_is_rebuilt_from_the_gguf_wheel(cache, caplog):
    from fedllm.models.llm import TOKENIZER_FILES, load_tokenizer, smollm2_tokenizer_dir

    _cut(cache / "smollm2-135m-instruct-tokenizer" / "tokenizer.json")
    with caplog.at_level(logging.WARNING, logger="fedllm.models.files"):
        path = smollm2_tokenizer_dir()
    assert "tokenizer.json has" in caplog.text and "rebuilding" in caplog.text
    assert cache_problem(path, TOKENIZER_FILES) is None and load_tokenizer(path, user=False).chat_template


@pytest.mark.parametrize("blob", [b"", b"[{\"id\": 1", b"\xff\xfe", b"{}", b"[1, 2]", b'[{"id": "a"}]'],
                         ids=["empty", "cut", "binary", "object", "not pairs", "missing fields"])
def test_a_damaged_coralmap_cache_is_rebuilt(tmp_path, monkeypatch, caplog, blob):
    # Prepare: the cache file is damaged; building the pairs (10-60 s) is stubbed
    from importlib.metadata import version

    import fedllm.data.coralmap as cm

    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    pairs = [{"id": "x:define", "prompt": "p", "response": "r", "topic": "t", "kind": "define"}]
    monkeypatch.setattr(cm, "_build_records", lambda coralmap: pairs)
    path = tmp_path / f"coralmap-{version('coralmap')}-pairs-v{cm.PAIRS_VERSION}.json"
    path.write_bytes(blob)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedllm.data.coralmap"):
        records = cm.coralmap_records()
    # Assert: rebuilt and rewritten; the next read uses the cache
    assert records == pairs and "damaged" in caplog.text
    assert json.loads(path.read_text(encoding="utf-8")) == pairs
    monkeypatch.setattr(cm, "_build_records", lambda coralmap: pytest.fail("rebuilt a sound cache"))
    assert cm.coralmap_records() == pairs


# ----------------------------------------------------------------------------- the user's model files


@pytest.fixture
def user_model(tmp_path) -> Path:
    from fedllm.models.llm import tiny_dir

    path = tmp_path / "my-model"
    shutil.copytree(tiny_dir(0), path)
    (path / MANIFEST).unlink()  # a user's directory has no fedllm manifest
    return path


USER_DAMAGE = {
    "truncated weights": (lambda d: _cut(d / "model.safetensors"), "model.safetensors: truncated or padded"),
    "garbage weights header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 4096),
                               "model.safetensors: not a safetensors file"),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors: not a safetensors"),
}


@pytest.mark.parametrize("damage", USER_DAMAGE, ids=list(USER_DAMAGE))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_damaged_weights_under_model_path_are_named_in_one_line(tmp_path, user_model, damage, command):
    # Prepare
    spoil, expected = USER_DAMAGE[damage]
    spoil(user_model)
    out = ["--out", str(tmp_path / "runs")] if command == "run" else []
    # Execute
    code, err = _cli([command, str(TINY), f"model.path={user_model}", *out])
    # Assert: the field, the file and what is wrong; and run wrote nothing
    assert code == EXIT_BAD_INPUT
    _one_line(err, "model.path", str(user_model / "model.safetensors"), expected.split(": ", 1)[1])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spoil,expected", [
    (lambda d: _cut(d / "tokenizer.json"), "could not load a tokenizer from"),
    (lambda d: (d / "tokenizer.json").write_text('{"model": 5}'), "could not load a tokenizer from"),
    (lambda d: (d / "config.json").write_text("{"), "model.path"),
], ids=["cut tokenizer.json", "wrong tokenizer.json", "garbage config.json"])
def test_damaged_tokenizer_or_config_under_model_path_is_one_line(user_model, spoil, expected):
    spoil(user_model)
    code, err = _cli(["validate", str(TINY), f"model.path={user_model}"])
    assert code == EXIT_BAD_INPUT
    _one_line(err, "model.path", expected, str(user_model))


def test_load_base_names_a_damaged_config_under_model_path(user_model):
    from fedllm.config import ModelConfig
    from fedllm.models.llm import load_base

    (user_model / "config.json").write_text("{")
    with pytest.raises(RecipeError, match=r"^model\.path: could not load a causal LM from .*my-model"):
        load_base(ModelConfig(path=str(user_model), quantization="none", device="cpu"), 0)


def test_a_damaged_adapter_is_named_by_export(tmp_path):
    # Prepare: a run directory whose adapter weights were cut short
    run = tmp_path / "tiny" / "centralized"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(load_recipe(TINY)), encoding="utf-8")
    (run / "summary.json").write_text("{}", encoding="utf-8")  # a finished run (export refuses unfinished ones)
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    # Execute / Assert
    code, err = _cli(["export", str(run), "--out", str(tmp_path / "x")])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / "adapter" / "adapter_model.safetensors"), "not a safetensors file")
    (run / "adapter" / "adapter_config.json").write_text("{", encoding="utf-8")
    code, err = _cli(["export", str(run), "--out", str(tmp_path / "x")])
    assert code == EXIT_BAD_INPUT
    _one_line(err, "adapter_config.json: not a JSON object")


# ----------------------------------------------------------------------------- Fashion-MNIST IDX files


def _tiny_idx(root: Path) -> None:
    from tests.test_vision_data_models import write_tiny_dataset

    root.mkdir(parents=True, exist_ok=True)
    write_tiny_dataset(root)


@pytest.mark.parametrize("spoil,expected", [
    (lambda p: _cut(p, 0.6), "not a complete gzip file"),
    (lambda p: p.write_bytes(b"not gzip at all"), "not a complete gzip file"),
    (lambda p: p.write_bytes(__import__("gzip").compress(b"\x00\x00\x08\x03" + b"\x00" * 20)),
     "header says"),
    (lambda p: p.write_bytes(__import__("gzip").compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc")),
     "IDX magic number 0x00000801, expected 0x00000803"),
], ids=["cut", "not gzip", "short data", "labels as images"])
def test_a_damaged_idx_file_is_a_one_line_error_naming_it(tmp_path, spoil, expected):
    from fedllm.data.vision import FILES, load_fashion_mnist

    _tiny_idx(tmp_path)
    spoil(tmp_path / FILES["train_x"])
    with pytest.raises(RecipeError) as info:
        load_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / FILES["train_x"])) and expected in msg and "\n" not in msg, msg
    assert "reinstall" in msg


@pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing")
def test_validate_names_a_cut_idx_file_of_a_vision_recipe(tmp_path):
    # Prepare: the real images (linked), and a labels file cut in half
    for name in FMNIST.iterdir():
        (tmp_path / name.name).symlink_to(name)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.unlink()
    labels.write_bytes((FMNIST / labels.name).read_bytes()[:10_000])
    # Execute
    code, err = _cli(["validate", str(ROOT / "recipes/vision/lenet_centralized.yaml"), f"data.root={tmp_path}"])
    # Assert
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(labels), "not a complete gzip file")


# ----------------------------------------------------------------------------- checkpoints


def _toy_run(tmp_path) -> tuple:
    recipe = toy_recipe(checkpoint={"enabled": True, "keep": 2}, federation={"rounds": 3})
    run_federated(ToyExperiment(recipe), out=str(tmp_path))
    run = tmp_path / "toy" / "federated"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    return recipe, run


def test_resume_with_every_checkpoint_corrupt_names_the_newest(tmp_path):
    # Prepare: both kept checkpoints (rounds 2, 3) get a flipped byte
    recipe, run = _toy_run(tmp_path)
    for _, path in ck.list_checkpoints(ck.checkpoint_dir(run)):
        _garble(path)
    # Execute / Assert: never a silent fresh start over the run the user asked to continue
    with pytest.raises(RecipeError) as info:
        run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)
    msg = str(info.value)
    assert msg.startswith(str(run / "checkpoints" / "ckpt_3.pt")) and "sha256 mismatch" in msg, msg
    assert "no checkpoint in" in msg and "2 tried" in msg and "without --resume" in msg
    assert (run / "metrics.jsonl").is_file()  # the run directory is untouched


@pytest.mark.parametrize("tamper,expected", [
    (lambda s: {"metrics_rows": s.metrics_rows[:-1]}, "metrics_rows: 3 rows, expected the 4"),
    (lambda s: {"metrics_rows": [*s.metrics_rows[:-1], {**s.metrics_rows[-1], "bytes_up": "x"}]},
     "metrics_rows[3]: bytes_up: expected a non-negative integer"),
    (lambda s: {"server_state": {"server_opt": 1}}, "does not fit this run's server"),
    (lambda s: {"rng_states": {"torch": torch.zeros(3)}}, "does not fit this run's server"),
], ids=["rows missing", "row junk", "server state junk", "rng junk"])
def test_a_tampered_checkpoint_is_a_one_line_error(tmp_path, tamper, expected):
    recipe, run = _toy_run(tmp_path)
    newest = ck.list_checkpoints(ck.checkpoint_dir(run))[-1][1]
    state = ck.read_checkpoint(newest)
    newest.write_bytes(ck.encode(__import__("dataclasses").replace(state, **tamper(state))))
    with pytest.raises(RecipeError) as info:
        run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_checkpoint_of_the_wrong_types_is_skipped_for_the_previous_one(tmp_path, caplog):
    recipe, run = _toy_run(tmp_path)
    newest = ck.list_checkpoints(ck.checkpoint_dir(run))[-1][1]
    state = ck.read_checkpoint(newest)
    newest.write_bytes(ck.encode(__import__("dataclasses").replace(state, metrics_rows="rows")))
    with caplog.at_level(logging.WARNING, logger="fedllm.federation.checkpoint"):
        summary = run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)
    assert "metrics_rows: expected a list of metrics rows" in caplog.text and summary["rounds"] == 3


def test_resume_names_a_garbled_partition_json(tmp_path):
    recipe, run = _toy_run(tmp_path)
    (run / "partition.json").write_bytes(b"\x00{")
    with pytest.raises(RecipeError, match=r"partition\.json: not readable JSON"):
        run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)


# ----------------------------------------------------------------------------- fedllm report


def _row(r: int, **extra) -> dict:
    row = {"round": r, "mode": "federated", "train_loss": None if r == 0 else 2.0, "eval_loss": 2.5 - 0.1 * r,
           "perplexity": 12.0, "bleu": 0.0, "round_time_s": 1.0 * (r > 0), "train_time_s": 0.5,
           "aggregate_time_s": 0.1, "eval_time_s": 0.1, "bytes_up": 100 * r, "bytes_down": 100 * r,
           "clients": [0, 1]}
    return {**row, **extra}


def _run_dir(tmp_path, text: str | bytes) -> Path:
    run = tmp_path / "demo" / "federated"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
    return run


GOOD = "".join(json.dumps(_row(r)) + "\n" for r in range(3))


def test_report_skips_a_last_line_cut_off_mid_write(tmp_path, caplog):
    run = _run_dir(tmp_path, GOOD + json.dumps(_row(3))[:37])  # killed while writing round 3
    with caplog.at_level(logging.WARNING, logger="fedllm.metrics.runfiles"):
        code, err = _cli(["report", str(run)])
    assert code == 0 and err == ""
    assert "metrics.jsonl line 4 is cut off" in caplog.text and "the 3 complete rows" in caplog.text
    table = [line for line in (run / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| 0", "| 1", "| 2"]


@pytest.mark.parametrize("text,expected", [
    (json.dumps(_row(0)) + "\n{garbage\n" + json.dumps(_row(2)) + "\n", "metrics.jsonl line 2: not valid JSON"),
    (GOOD + "{garbage\n", "metrics.jsonl line 4: not valid JSON"),  # complete (newline-ended): not a cut write
    (GOOD.encode() + b"\xff\xfe{}\n", "metrics.jsonl line 4: not UTF-8 text"),
    (GOOD + json.dumps(_row(3, eval_loss="low")) + "\n", "line 4: eval_loss: expected a number or null"),
    (GOOD + json.dumps(_row(3, round=-1)) + "\n", "line 4: round: expected an integer"),
    (GOOD + json.dumps(_row(3, round=True)) + "\n", "line 4: round: expected an integer"),
    (GOOD + json.dumps(_row(3, bytes_up=1.5)) + "\n", "line 4: bytes_up: expected a non-negative integer"),
    (GOOD + json.dumps({k: v for k, v in _row(3).items() if k != "mode"}) + "\n", "line 4: lacks mode"),
    (GOOD + "[1, 2]\n", "line 4: expected a JSON object"),
    (GOOD + json.dumps(_row(3, per_client={"0": {"eval_loss": "x"}})) + "\n", "line 4: per_client: eval_loss"),
    ("\n\n", "holds no metrics rows"),
], ids=["garbage middle", "garbage last complete", "binary", "string metric", "negative round", "bool round",
        "float bytes", "missing mode", "not an object", "per_client junk", "blank"])
def test_report_on_a_bad_metrics_line_is_one_line_naming_it(tmp_path, text, expected):
    run = _run_dir(tmp_path, text)
    code, err = _cli(["report", str(run)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / "metrics.jsonl"), expected)
    assert not (run / "report.md").exists()


def test_report_shows_nan_and_infinity_tokens(tmp_path):
    text = GOOD + json.dumps(_row(3, eval_loss=7.5, perplexity=8.5)).replace("7.5", "NaN").replace(
        "8.5", "Infinity") + "\n"
    run = _run_dir(tmp_path, text)
    code, err = _cli(["report", str(run)])
    assert code == 0 and err == ""
    last = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| 3 |"))
    assert last.startswith("| 3 | 2 | nan | inf |"), last
    assert (run / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize("name,blob,expected", [
    ("summary.json", b"{", "summary.json: not a JSON object"),
    ("summary.json", b'{"total_bytes_up": "many", "total_bytes_down": 0, "mean_round_time_s": 1, '
                     b'"skipped_updates": 0}', "summary.json total_bytes_up: expected a non-negative integer"),
    ("config.yaml", b"eval: {targets: [", "config.yaml: not valid YAML"),
    ("config.yaml", b"eval: {targets: [2]}", "config.yaml eval.targets: expected a list of accuracies"),
], ids=["summary cut", "summary types", "config cut", "config targets"])
def test_report_on_a_bad_summary_or_config_is_one_line(tmp_path, name, blob, expected):
    run = _run_dir(tmp_path, GOOD)
    (run / name).write_bytes(blob)
    code, err = _cli(["report", str(run)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, expected)


# ----------------------------------------------------------------------------- a full disk


def _full_disk_after(monkeypatch, calls: int) -> None:
    """``os.fsync`` fails with ENOSPC from call ``calls + 1`` on (a full disk shows at flush/fsync)."""
    real, seen = os.fsync, []

    def fsync(fd):
        seen.append(fd)
        if len(seen) > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_report_on_a_full_disk_is_one_line_and_keeps_the_old_report(tmp_path, monkeypatch):
    run = _run_dir(tmp_path, GOOD)
    (run / "report.md").write_text("old report\n")
    _full_disk_after(monkeypatch, 0)
    code, err = _cli(["report", str(run)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / "report.md"), "no space left on device")
    assert (run / "report.md").read_text() == "old report\n" and not (run / "report.md.tmp").exists()


def test_report_writing_a_plot_to_dev_full_is_one_line(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    run = _run_dir(tmp_path, GOOD)
    (run / "metrics.png").symlink_to("/dev/full")  # a real ENOSPC from the kernel
    code, err = _cli(["report", str(run)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / "metrics.png"), "no space left on device")


@pytest.fixture
def toy_cli(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A recipe file whose `fedllm run` trains the in-test toy experiment (milliseconds, no LLM)."""
    import fedllm.experiments

    monkeypatch.setattr(fedllm.experiments, "make_experiment", ToyExperiment)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(dump_recipe(toy_recipe(federation={"rounds": 3}, output={"plots": False})), encoding="utf-8")
    return recipe, tmp_path / "runs"


def test_a_full_disk_when_the_summary_is_written_leaves_no_summary(toy_cli, monkeypatch):
    # Prepare: partition.json is written (fsync 1); summary.json's fsync (2) hits a full disk
    recipe, out = toy_cli
    _full_disk_after(monkeypatch, 1)
    # Execute
    code, err = _cli(["run", str(recipe), "--out", str(out)])
    # Assert: one line naming the file, exit 4, and nothing that claims the run finished
    run = out / "toy" / "federated"
    assert code == EXIT_WRITE
    _one_line(err, str(run / "summary.json"), "no space left on device", "without summary.json is unfinished")
    assert (run / "metrics.jsonl").is_file() and not (run / "summary.json").exists()
    assert not (run / "summary.json.tmp").exists()


def test_a_full_disk_while_appending_metrics_stops_the_run_in_one_line(toy_cli, monkeypatch):
    # Prepare: from round 2 on, metrics.jsonl appends go to /dev/full (the kernel's own ENOSPC)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    recipe, out = toy_cli
    real_open, appends = Path.open, []

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            appends.append(self)
            if len(appends) > 2:
                return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    # Execute
    code, err = _cli(["run", str(recipe), "--out", str(out)])
    # Assert
    run = out / "toy" / "federated"
    assert code == EXIT_WRITE
    _one_line(err, str(run / "metrics.jsonl"), "no space left on device")
    assert not (run / "summary.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # rounds 0 and 1


# ----------------------------------------------------------------------------- FIFOs and devices (issue 32)


def _within(seconds: float, args: list[str]) -> tuple[int, str]:
    """``_cli(args)`` on a thread that must finish within ``seconds`` (a FIFO read would block forever)."""
    import threading

    got: list = []
    worker = threading.Thread(target=lambda: got.append(_cli(args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive() and got, f"fedllm {args[0]} did not finish within {seconds} s (blocked on a FIFO?)"
    return got[0]


def test_open_regular_refuses_fifos_devices_and_folders_unread(tmp_path):
    from fedllm.errors import NotRegularFile, read_regular

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/null"), "a character device"), (tmp_path, "a directory")):
        with pytest.raises(NotRegularFile, match=f"{kind}, not a regular file"):
            read_regular(path)
    (tmp_path / "f").write_bytes(b"ok")
    assert read_regular(tmp_path / "f") == b"ok"


def _lm_run_dir(tmp_path) -> Path:
    run = tmp_path / "tiny" / "federated"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(load_recipe(TINY)), encoding="utf-8")
    (run / "summary.json").write_text("{}", encoding="utf-8")  # a finished run (export refuses unfinished ones)
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run


def test_export_of_an_adapter_that_is_a_fifo_is_one_line_within_a_second(tmp_path):
    run = _lm_run_dir(tmp_path)
    os.mkfifo(run / "adapter" / "adapter_model.safetensors")
    args = ["export", str(run), "--out", str(tmp_path / "x")]
    _within(300.0, args)  # the first call imports what export needs (a minute on a busy machine)
    code, err = _within(1.0, args)
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / "adapter" / "adapter_model.safetensors"), "a FIFO, not a regular file")


@pytest.mark.parametrize("name", ["summary.json", "config.yaml"])
def test_report_on_a_run_file_that_is_a_fifo_is_one_line_within_a_second(tmp_path, name):
    run = _run_dir(tmp_path, GOOD)
    os.mkfifo(run / name)
    _within(300.0, ["report", str(run)])  # the first call imports what report needs
    code, err = _within(1.0, ["report", str(run)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(run / name), "a FIFO, not a regular file")


def test_a_recipe_that_is_a_fifo_is_one_line_within_a_second(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    _within(300.0, ["validate", str(fifo)])  # the first call imports what validate needs
    code, err = _within(1.0, ["validate", str(fifo)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, str(fifo), "a FIFO, not a regular file")


def test_a_checkpoint_or_partition_json_that_is_a_fifo_is_refused_unread(tmp_path):
    recipe, run = _toy_run(tmp_path)
    newest = ck.list_checkpoints(ck.checkpoint_dir(run))[-1][1]
    newest.unlink()
    os.mkfifo(newest)
    with pytest.raises(ck.CheckpointError, match="a FIFO, not a regular file"):
        ck.read_checkpoint(newest)
    (run / "partition.json").unlink()
    os.mkfifo(run / "partition.json")
    with pytest.raises(RecipeError, match=r"partition\.json: not readable JSON"):
        run_federated(ToyExperiment(recipe), out=str(tmp_path), resume=True)


def test_a_fifo_as_data_under_the_flower_engine_is_one_line_before_flower_starts(tmp_path):
    """In a subprocess, as a user runs it: exit 2, one line, nothing from Flower or Ray before it."""
    import subprocess
    import sys
    import time

    pytest.importorskip("flwr")
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedllm.cli", "run", str(TINY), "data.builtin=null",
                           f"data.path={fifo}", "partition.method=iid", "partition.column=null",
                           "--engine", "flower", "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    output = (done.stdout + done.stderr).strip()
    assert output.count("\n") == 0 and output.startswith("fedllm: error: "), output[-2000:]
    assert str(fifo) in output and "FIFO" in output and "flwr" not in output.lower()
    assert not (tmp_path / "runs").exists() and time.monotonic() - t0 < 300
