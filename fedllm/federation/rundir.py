"""The run directory: a file contract that reports, comparisons and other tools read.

``<output.dir>/<name>/<mode>/`` holds ``config.yaml``, ``partition.json``, ``metrics.jsonl`` (one
object per round, round 0 included), ``samples/round_<r>.jsonl``, ``adapter/`` and, written last and
atomically, ``summary.json``: a directory without it is an unfinished run, never mistaken for a
complete one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fedllm.config import Recipe, RecipeError, dump_recipe
from fedllm.errors import open_regular, read_regular_text
from fedllm.federation.runlog import RunLoggers
from fedllm.lockfile import LockFile

REQUIRED_METRICS = ("round", "mode", "train_loss", "eval_loss", "perplexity", "bleu", "round_time_s",
                    "train_time_s", "aggregate_time_s", "eval_time_s", "bytes_up", "bytes_down", "clients")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@contextlib.contextmanager
def naming(path: Path):
    """Give an OSError raised while writing ``path`` the file's name (a full disk often surfaces
    in ``flush``/``fsync``/``close``, whose errors carry none), so the CLI's one line names it."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def write_atomic(path: Path, data: bytes | str, tmp: Path | None = None) -> None:
    """Write ``data`` to a temp file (``tmp``, default ``path`` + ``.tmp``), fsync it, then rename it
    over ``path``: readers see the old or the new file, never half of one (a failed write, e.g. a
    full disk, leaves the old file and no temp)."""
    tmp = tmp or path.with_suffix(path.suffix + ".tmp")
    blob = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with naming(path), tmp.open("wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for text (UTF-8)."""
    write_atomic(path, text)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON (non-finite floats as null), written by :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(_clean(obj), indent=2))


def run_dir(recipe: Recipe, mode: str, out: str | None = None) -> Path:
    return Path(out or recipe.output.dir) / recipe.name / mode


class RunLock:
    """An exclusive lock on one run directory for as long as a writer holds it.

    The lock file sits beside the directory (``.<mode>.lock``), since a fresh run replaces the
    directory itself. A second ``fedllm`` writing the same run gets a one-line error instead of
    interleaving its rows with the first's. The OS releases it when the process dies; the file
    goes when the lock is released, or when the process exits (:mod:`fedllm.lockfile`).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = LockFile(path.parent / f".{path.name}.lock")
        if not self.lock.acquire(wait=False):
            raise RecipeError("--out", f"{path} is being written by {self.lock.holder or 'another process'}; "
                              "wait for it to finish or choose another --out") from None
        self.file = self.lock.file
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"fedllm pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        self.lock.release()  # removes the lock file, then drops the flock


class RunWriter:
    """Writes one mode's run files as the run goes (holding the directory's :class:`RunLock`)."""

    def __init__(self, path: Path, recipe: Recipe, partition: dict[str, Any],
                 resume_rows: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.lock = RunLock(path)
        self.loggers: RunLoggers | None = None  # output.loggers (Lightning's CSV / TensorBoard loggers)
        self.detach = lambda: None  # takes the loggers' step callback off the experiment (modes sets it)
        if resume_rows is not None:  # continue a run: keep its files, rows up to the checkpoint
            (path / "summary.json").unlink(missing_ok=True)
            # the recipe it continues under (only federation.rounds and output may differ: the checkpoint's fingerprint)
            (path / "config.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            (path / "samples").mkdir(parents=True, exist_ok=True)
            self.rows = [dict(r) for r in resume_rows]
            tmp = path / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(_clean(r)) + "\n" for r in self.rows), encoding="utf-8")
            os.replace(tmp, path / "metrics.jsonl")
            self._open_loggers(recipe)
            return
        if path.exists():
            shutil.rmtree(path)  # a fresh run replaces an old or unfinished one
        (path / "samples").mkdir(parents=True)
        (path / "config.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        write_json_atomic(path / "partition.json", partition)
        self.rows: list[dict[str, Any]] = []
        self._open_loggers(recipe)

    def _open_loggers(self, recipe: Recipe) -> None:
        if recipe.output.loggers:
            self.loggers = RunLoggers(list(recipe.output.loggers), self.path)

    def log_round(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        missing = [k for k in REQUIRED_METRICS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        self.rows.append(row)
        metrics = self.path / "metrics.jsonl"
        with naming(metrics), metrics.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(row)) + "\n")
        if self.loggers is not None:
            self.loggers.log_round(row)
        samples_file = self.path / "samples" / f"round_{row['round']}.jsonl"
        with naming(samples_file), samples_file.open("w", encoding="utf-8") as fh:
            for s in samples:
                fh.write(json.dumps(s, ensure_ascii=False) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        if self.loggers is not None:
            self.loggers.finish("success" if summary.get("status", "ok") == "ok" else "failed")
        write_json_atomic(self.path / "summary.json", summary)
        self.lock.release()

    def __del__(self) -> None:  # a run that stopped early (an error) lets go of its directory too
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()


def same_split(path: Path, partition: dict[str, Any]) -> bool:
    """Whether ``partition`` is the split the run in ``path`` recorded (``partition.json``)."""
    saved = path / "partition.json"
    if not saved.exists():
        return False
    try:
        recorded = json.loads(read_regular_text(saved))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise RecipeError(str(saved), "not readable JSON; expected the split the run recorded (run without "
                          "--resume to start over)") from None
    def split_of(p: Any) -> Any:  # client_names only labels the split (runs before it existed resume)
        return {k: v for k, v in p.items() if k != "client_names"} if isinstance(p, dict) else p

    return split_of(recorded) == split_of(json.loads(json.dumps(_clean(partition))))


# The types a metrics row's fields must have for a report (row_problem): ``fedllm report`` and
# ``--resume`` read rows written by a run that may have been killed or edited since.
METRICS = ("train_loss", "eval_loss", "perplexity", "bleu", "accuracy", "epsilon", "lora_aggregation_error",
           "lora_truncation_error", "train_time_s", "aggregate_time_s", "eval_time_s")
COUNTS = ("bytes_up", "bytes_down", "rejected_updates", "failed_clients", "skipped_nonfinite")
NOT_NULL = ("round_time_s", "bytes_up", "bytes_down")  # summed over rows by the comparison
MAX_COUNT = 2**63 - 1
MAX_ROUND = 10**9


def is_number(v: Any) -> bool:
    """An int or float (NaN/Inf included), not a bool nor an int beyond 64 bits."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (
        not isinstance(v, int) or abs(v) <= MAX_COUNT)


def is_count(v: Any) -> bool:
    """A non-negative integer of at most 64 bits, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a metrics row as fedllm writes it (None when it is)."""
    if not isinstance(row, dict):
        return f"expected a JSON object (one metrics row), got {type(row).__name__}"
    missing = [k for k in REQUIRED_METRICS if k not in row]
    if missing:
        return f"lacks {', '.join(missing[:4])}; expected the fields fedllm writes: {', '.join(REQUIRED_METRICS)}"
    if not is_count(row["round"]) or row["round"] > MAX_ROUND:
        return f"round: expected an integer in [0, {MAX_ROUND:,}], got {row['round']!r:.40}"
    if not isinstance(row["mode"], str):
        return f"mode: expected a string, got {row['mode']!r:.40}"
    for key in (*METRICS, "round_time_s", *COUNTS):
        v = row.get(key)
        if v is None and key not in NOT_NULL:
            continue
        ok = is_count(v) if key in COUNTS else is_number(v)
        if not ok:
            want = "a non-negative integer" if key in COUNTS else "a number"
            return f"{key}: expected {want}{'' if key in NOT_NULL else ' or null'}, got {v!r:.40}"
    if not isinstance(row["clients"], list):
        return f"clients: expected a list of client ids, got {row['clients']!r:.40}"
    per_client = row.get("per_client")
    if per_client is not None:
        if not isinstance(per_client, dict) or not all(isinstance(c, dict) for c in per_client.values()):
            return "per_client: expected an object of client id -> metrics"
        for c in per_client.values():
            bad = [k for k in METRICS if c.get(k) is not None and not is_number(c[k])]
            if bad:
                return f"per_client: {bad[0]}: expected a number or null, got {c[bad[0]]!r:.40}"
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open_regular(path / "metrics.jsonl", "r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final and initial metrics plus totals, from the metrics rows alone."""
    first, last = rows[0], rows[-1]
    trained = rows[1:]
    out = {
        "mode": last["mode"], "rounds": last["round"],
        "initial": {k: first.get(k) for k in ("eval_loss", "perplexity", "bleu", "accuracy")},
        "final": {k: last.get(k) for k in ("eval_loss", "perplexity", "bleu", "accuracy", "train_loss")},
        "total_bytes_up": sum(r["bytes_up"] for r in trained),
        "total_bytes_down": sum(r["bytes_down"] for r in trained),
        "total_time_s": sum(r["round_time_s"] for r in trained),
        "mean_round_time_s": sum(r["round_time_s"] for r in trained) / max(len(trained), 1),
        "skipped_updates": sum(r.get("skipped_nonfinite", 0) + r.get("failed_clients", 0) for r in trained),
    }
    if "epsilon" in last:  # the privacy spent by the whole run, at the recipe's delta
        out["final"]["epsilon"] = last["epsilon"]
    if "epsilon_central" in last:  # what holds against someone who sees only the aggregates
        out["final"]["epsilon_central"] = last["epsilon_central"]
    if "epsilon_dpsgd" in last:  # sample-level DP-SGD: the worst client's per-example epsilon
        out["final"]["epsilon_dpsgd"] = last["epsilon_dpsgd"]
    # eval.client_holdout: on each client's own held-out slice (the global model; the personal ones)
    for name in ("client_eval_loss", "personal_eval_loss"):
        if name in last:
            out["final"][name] = last[name]
            out["final"].update({f"{name}_{s}": last.get(f"{name}_{s}") for s in ("min", "max", "mean")})
    out.update(run_status(rows))
    out.update(extra or {})
    return out


def run_status(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``status`` ("ok" or why the run's result cannot be read as a result) and the final metrics that
    were NaN/Inf (JSON writes them as null, like "not evaluated"; this list tells them apart)."""
    last, trained = rows[-1], rows[1:]
    nonfinite = sorted(k for k in ("eval_loss", "perplexity", "bleu", "accuracy", "train_loss")
                       if isinstance(last.get(k), float) and not math.isfinite(last[k]))
    problems = []
    if trained and all(r.get("applied") is False for r in trained):
        problems.append("no round was applied (every round had too few valid updates)")
    if "eval_loss" in nonfinite:
        problems.append("the final eval loss is not finite")
    return {"status": "; ".join(problems) or "ok", "nonfinite_final": nonfinite}
