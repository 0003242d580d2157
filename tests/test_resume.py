"""Crash and resume: a federated run killed with SIGKILL at a random point, then resumed with
``fedllm run ... --resume``, ends with the same global state and metrics as an uninterrupted run.

The runs are real processes killed with ``SIGKILL`` (no handler, no cleanup: the disk holds
whatever the process had written). To keep the test under its time budget, the runs are forked
from one driver process that has already imported torch, Lightning and transformers (an import
costs ~10 s of CPU per process); each forked child then calls ``fedllm.cli.main(argv)`` exactly
as ``python -m fedllm.cli`` would and leaves with ``os._exit``. The driver forks before any torch
computation, so the children start from a clean state (no OpenMP pool to inherit).

The recipe exercises every piece of state a resume must restore: a sampled fraction of clients
(sampler), SCAFFOLD control variates, FedAdam moments, 8-bit stochastic quantization (codec RNG)
with error-feedback residuals, and the metrics rows. Compared exactly (CPU): the saved adapter,
the last checkpoint's global and server state, and every metrics field except ``*_time_s``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ROUNDS = 3
DATA = [{"prompt": f"What is the colour of item {i}?", "response": f"Item {i} is {c} and weighs {i % 7} kilograms.",
         "topic": c} for i, c in enumerate(["red", "green", "blue"] * 14)]  # a small JSONL (coralmap loads slowly)
OVERRIDES = [f"federation.rounds={ROUNDS}", "partition.num_clients=3", "federation.fraction=0.67",
             "data.builtin=null", "partition.method=iid", "partition.column=null",
             "federation.algorithm=scaffold", "server.optimizer=fedadam", "server.lr=0.01",
             "compression.codec=q8", "compression.error_feedback=true", "checkpoint.keep=2",
             "train.local_steps=1", "train.batch_size=2", "data.max_examples=40", "data.eval_size=4",
             "data.max_length=48", "eval.bleu_samples=0", "output.plots=false",
             "eval.lora_error=false"]  # the server folds the mean as updates arrive (its own store, kill -9 too)
SEEDS = (0, 1, 2)
DATA_PATH = Path("/nonexistent")  # set by the driver fixture: one JSONL shared by every run (same fingerprint)

# ----------------------------------------------------------------------------- the fork driver


def _serve() -> None:
    """Driver loop: one JSON request per stdin line -> fork, run the CLI, maybe SIGKILL -> one reply.

    Request: ``{"argv": [...], "log": path, "kill": null | {"watch": metrics.jsonl, "rows": n,
    "delay": s, "ckpts": m}}``: the child is killed ``delay`` seconds after ``metrics.jsonl`` has
    ``n`` rows (and the checkpoint folder ``m`` files, default 0).
    Reply: ``{"rc": exit code (or -9), "killed": bool, "rows_at_kill": n}``.
    """
    import lightning.pytorch  # noqa: F401  (the imports the children share)
    import transformers  # noqa: F401

    import fedllm.cli
    import fedllm.experiments.lm  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # child: the CLI, with its output in the log file
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                code = fedllm.cli.main(req["argv"])
            except BaseException:  # a traceback is a test failure: keep it in the log, exit 99
                import traceback

                traceback.print_exc()
                code = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        reply = _watch(pid, req.get("kill"))
        print(json.dumps(reply), flush=True)


def _rows(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except OSError:
        return 0


def _watch(pid: int, kill: dict | None) -> dict:
    deadline = time.monotonic() + 240
    killed, rows_at_kill = False, None
    if kill is not None:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return {"rc": os.waitstatus_to_exitcode(status), "killed": False, "rows_at_kill": None}
            ckpts = Path(kill["watch"]).parent / "checkpoints"
            n_ckpt = len(list(ckpts.glob("ckpt_*.pt"))) if ckpts.is_dir() else 0
            if _rows(kill["watch"]) >= kill["rows"] and n_ckpt >= kill.get("ckpts", 0):
                break
            time.sleep(0.01)
        time.sleep(kill["delay"])
        rows_at_kill = _rows(kill["watch"])
        try:
            os.kill(pid, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"rc": code, "killed": killed and code == -signal.SIGKILL, "rows_at_kill": rows_at_kill}


class Driver:
    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, "-c", "import tests.test_resume as t; t._serve()"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], kill: dict | None = None) -> tuple[dict, str]:
        """Run ``fedllm <args>`` in a forked child; (reply, the child's stdout+stderr)."""
        self.n += 1
        log = self.tmp / f"run{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": args, "log": str(log), "kill": kill}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the driver process died"
        return json.loads(line), log.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------- comparisons


def _run_dir(out: Path) -> Path:
    return out / "tiny" / "federated"


def _run_args(out: Path, *extra: str) -> list[str]:
    return ["run", str(TINY), *OVERRIDES, f"data.path={DATA_PATH}", *extra, "--out", str(out)]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _last_checkpoint(run: Path):
    from fedllm.federation.checkpoint import checkpoint_dir, load_latest

    return load_latest(checkpoint_dir(run))


def _assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested tensors / numbers / containers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_run(run: Path, ref: Path) -> None:
    assert (run / "summary.json").is_file()
    assert _metrics(run) == _metrics(ref)
    _assert_same(_adapter(run), _adapter(ref), "adapter")
    got, want = _last_checkpoint(run), _last_checkpoint(ref)
    assert got.round == want.round == ROUNDS
    _assert_same(got.global_state, want.global_state, "global_state")
    _assert_same(got.server_state, want.server_state, "server_state")


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    global DATA_PATH
    tmp = tmp_path_factory.mktemp("driver")
    DATA_PATH = tmp / "data.jsonl"
    DATA_PATH.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    d = Driver(tmp)
    yield d
    d.close()


@pytest.fixture(scope="module")
def reference(driver, tmp_path_factory) -> Path:
    """One uninterrupted run, shared by every comparison."""
    out = tmp_path_factory.mktemp("reference")
    reply, log = driver.run(_run_args(out))
    assert reply["rc"] == 0, log
    return _run_dir(out)


def _kill_point(rng: random.Random, run: Path, ref: Path) -> dict:
    """After round r's row (r random in 1..ROUNDS-1) plus a random part of the next round."""
    rows = rng.randint(2, ROUNDS)  # rows = round-0 row + finished rounds
    next_round = json.loads((ref / "metrics.jsonl").read_text().splitlines()[rows - 1 + 1])
    return {"watch": str(run / "metrics.jsonl"), "rows": rows,
            "delay": rng.uniform(0.0, 0.8) * next_round["round_time_s"]}


def _rows_on_disk(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0


def _corrupt_newest(run: Path) -> Path | None:
    from fedllm.federation.checkpoint import checkpoint_dir, list_checkpoints

    ckpts = list_checkpoints(checkpoint_dir(run))
    if not ckpts:
        return None
    path = ckpts[-1][1]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the payload: the checksum must catch it
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_then_resume_equals_uninterrupted(driver, reference, tmp_path, seed):
    # Prepare: seed 1 is killed twice (the resumed process too); seed 2 resumes past a corrupt file
    rng = random.Random(seed)
    run = _run_dir(tmp_path)
    kills = 2 if seed == 1 else 1
    # Execute
    for i in range(kills):
        kill = _kill_point(rng, run, reference)
        if i:  # the resumed process must log a new round of its own before it can be killed
            kill["rows"] = max(kill["rows"], _rows_on_disk(run) + 1)
        if seed == 2:  # late enough that two checkpoints exist: the corrupt newest one has a fallback
            kill["ckpts"] = 2
        reply, log = driver.run(_run_args(tmp_path, *(["--resume"] if i else [])), kill)
        if i and reply["rc"] == 0:  # a resumed process may finish the last round before its kill point
            break
        assert reply["killed"], (reply, log)
        assert "Traceback" not in log
        assert not (run / "summary.json").exists(), "a killed run must not look complete"
    corrupt = _corrupt_newest(run) if seed == 2 else None
    assert seed != 2 or corrupt is not None
    reply, log = driver.run(_run_args(tmp_path, "--resume"))
    # Assert
    assert reply["rc"] == 0, log
    if corrupt is not None:
        bad = int(corrupt.stem.split("_")[1])
        assert f"skipping checkpoint of round {bad}" in log and "sha256 mismatch" in log, log
        assert f"after round {bad - 1}" in log, log
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_resume_of_completed_run_changes_nothing(driver, reference, tmp_path):
    run = _run_dir(tmp_path)
    shutil.copytree(reference, run)
    reply, log = driver.run(_run_args(tmp_path, "--resume"))
    assert reply["rc"] == 0, log
    assert "resuming" in log and f"after round {ROUNDS}" in log
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_resume_with_a_different_recipe_is_a_one_line_error(driver, reference, tmp_path):
    # Prepare: a finished run, minus its summary (as if interrupted), resumed with another lr
    run = _run_dir(tmp_path)
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    # Execute
    reply, log = driver.run(_run_args(tmp_path, "train.lr=0.002", "--resume"))
    # Assert: exit 2, one line naming the checkpoint folder; nothing was touched or completed
    errors = [x for x in log.splitlines() if x.startswith("fedllm: error:")]
    assert reply["rc"] == 2 and len(errors) == 1 and "different recipe" in errors[0], log
    assert "Traceback" not in log
    assert not (run / "summary.json").exists()
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_a_continued_run_stops_looking_complete(tmp_path):
    """Resuming (e.g. with more rounds) removes summary.json before the first new round runs, so a
    crash during the continuation never leaves the old completion marker next to new rows."""
    from fedllm.config import load_recipe
    from fedllm.federation.rundir import RunWriter

    # Prepare: a finished run directory
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    recipe = load_recipe(TINY, [*OVERRIDES, f"data.path={data}"])
    rows = [{"round": 0, "mode": "federated"}, {"round": 1, "mode": "federated"}]
    run = tmp_path / "run"
    first = RunWriter(run, recipe, {"clients": {}})
    first.finish({"rounds": 1})
    assert (run / "summary.json").is_file()
    # Execute: continue it from a checkpoint holding its rows, for more rounds
    more = load_recipe(TINY, [*OVERRIDES, f"data.path={data}", f"federation.rounds={recipe.federation.rounds + 2}"])
    RunWriter(run, more, {"clients": {}}, resume_rows=rows)
    # Assert: no completion marker; config.yaml is the recipe the run now continues under
    assert not (run / "summary.json").exists()
    assert _metrics(run) == rows
    assert load_recipe(run / "config.yaml") == more


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    """--resume must never wipe a finished run that has nothing to resume from."""
    # Prepare: a finished run directory (summary.json present) with checkpoints off
    from fedllm.cli import main

    run = tmp_path / "tiny" / "federated"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    # Execute
    code = main(["run", str(ROOT / "recipes" / "tiny.yaml"), "--resume", "--out", str(tmp_path),
                 "checkpoint.enabled=false", "federation.rounds=1", "train.local_steps=1",
                 "eval.bleu_samples=0"])
    # Assert: exit 2 and the run directory untouched
    assert code == 2
    assert (run / "summary.json").read_text() == "{}"
