"""Crash-safe server checkpoints: one serializable object per round, written atomically.

A :class:`ServerState` holds everything the federated loop needs to continue exactly where it
stopped: the round, the global trainable state, the server optimizer's ``state_dict()``, each
client's persistent state (e.g. a SCAFFOLD control variate or an error-feedback residual), the
sampler's and the privacy ledger's states, the RNG states (torch, numpy, python) and the metrics
rows written so far. Every value is a tensor or a plain Python value, so the file loads with
``torch.load(weights_only=True)`` — no pickled code runs when a checkpoint is read.

File format of ``ckpt_<round>.pt``::

    b"FEDLLMCK" | sha256(payload) (32 bytes) | payload (torch.save of a plain dict)

Writing goes to a temp file in the same directory, is flushed and fsynced, renamed over the final
name with ``os.replace`` (atomic on POSIX and Windows) and the directory is fsynced, so a crash
leaves either the old set of checkpoints or the new one. Reading verifies the checksum and the
types of the fields: a torn or corrupted newest file is skipped with a warning and the previous
checkpoint is used; when none verifies, ``--resume`` is a one-line error naming the newest.

The checksum is an integrity check, not authentication: anyone who can write the run directory can
write a checkpoint with a valid checksum. Keep run directories where only you can write. On resume
the global state must also fit the model (same keys, shapes and dtypes, :func:`layout_problem`),
so a tampered or foreign checkpoint is refused instead of broadcast into the adapter.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedllm.config import Recipe, RecipeError
from fedllm.errors import read_regular
from fedllm.federation.rundir import row_problem, write_atomic
from fedllm.types import StateDict

log = logging.getLogger(__name__)

MAGIC = b"FEDLLMCK"
FORMAT_VERSION = 1
_DIGEST = 32  # sha256 bytes
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_TMP = re.compile(r"^\.ckpt_\d+\.pt\.tmp\d+$")
_SCALARS = (type(None), bool, int, float, str, bytes)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (truncated, corrupted, or not ours)."""


@dataclass
class ServerState:
    """Everything needed to resume a federated run after round ``round``."""

    round: int
    global_state: StateDict
    server_state: dict[str, Any] = field(default_factory=dict)  # ServerUpdate.state_dict()
    client_states: dict[int, dict[str, Any]] = field(default_factory=dict)  # client id -> its state
    sampler_state: dict[str, Any] = field(default_factory=dict)
    rng_states: dict[str, Any] = field(default_factory=dict)  # capture_rng()
    ledger_state: dict[str, Any] = field(default_factory=dict)  # privacy accountant, opaque
    metrics_rows: list[dict[str, Any]] = field(default_factory=list)  # rows 0..round
    fingerprint: str = ""  # recipe_fingerprint() of the recipe that wrote it

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"ServerState.round: expected an integer >= 0, got {self.round!r}")


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """The global torch / numpy / python RNG states as plain values (CUDA too when present)."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                        "pos": int(np_state["state"]["pos"])}},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; missing entries are left alone."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        s = states["numpy"]
        np.random.set_state({**s, "state": {"key": np.asarray(s["state"]["key"], dtype=np.uint32),
                                            "pos": s["state"]["pos"]}})
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- encoding


def _check_plain(value: Any, where: str) -> None:
    """Reject values that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, torch.Tensor) or isinstance(value, _SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, _SCALARS):
                raise ValueError(f"checkpoint {where}: key {k!r} must be a str/int/float/bool/None")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"checkpoint {where}: {type(value).__name__} is not a plain value; expected "
                     "tensors, numbers, strings, bytes, None, lists, tuples or dicts of those "
                     "(state_dict() should return plain values)")


def encode(state: ServerState) -> bytes:
    """The checksummed file content for ``state``."""
    payload = {f.name: getattr(state, f.name) for f in fields(state)}
    payload["global_state"] = {k: v.detach().cpu().clone() for k, v in state.global_state.items()}
    for name, value in payload.items():
        _check_plain(value, name)
    payload["format"] = FORMAT_VERSION
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return MAGIC + hashlib.sha256(body).digest() + body


def decode(blob: bytes, where: str = "checkpoint") -> ServerState:
    """Verify and parse :func:`encode`'s output; :class:`CheckpointError` when it cannot be trusted."""
    head = len(MAGIC) + _DIGEST
    if len(blob) < head or not blob.startswith(MAGIC):
        raise CheckpointError(f"{where}: not a fedllm checkpoint (bad header, {len(blob)} bytes)")
    digest, body = blob[len(MAGIC):head], blob[head:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{where}: sha256 mismatch (truncated or corrupted file)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum held, so this is a format/version problem
        raise CheckpointError(f"{where}: could not be unpickled ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.pop("format", None) != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported checkpoint format (expected version {FORMAT_VERSION})")
    known = {f.name for f in fields(ServerState)}
    try:
        state = ServerState(**{k: v for k, v in payload.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if (why := _type_problem(state)) is not None:
        raise CheckpointError(f"{where}: {why}")
    return state


def _type_problem(state: ServerState) -> str | None:
    """Why a decoded state's fields are not of the types :func:`encode` writes (None when they are)."""
    if not isinstance(state.global_state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.global_state.items()):
        return "global_state: expected a mapping of tensor names to tensors"
    for name in ("server_state", "client_states", "sampler_state", "rng_states", "ledger_state"):
        if not isinstance(getattr(state, name), dict):
            return f"{name}: expected a mapping, got {type(getattr(state, name)).__name__}"
    if not isinstance(state.fingerprint, str):
        return f"fingerprint: expected a string, got {type(state.fingerprint).__name__}"
    if not isinstance(state.metrics_rows, list) or not all(isinstance(r, dict) for r in state.metrics_rows):
        return "metrics_rows: expected a list of metrics rows"
    return None


def rows_problem(state: ServerState) -> str | None:
    """Why a checkpoint's metrics rows are not a run's rows 0..round (None when they are)."""
    rows = state.metrics_rows
    if len(rows) != state.round + 1:
        return f"metrics_rows: {len(rows)} rows, expected the {state.round + 1} of rounds 0..{state.round}"
    for i, row in enumerate(rows):
        why = row_problem(row)
        if why is None and row["round"] != i:
            why = f"holds round {row['round']}"
        if why is not None:
            return f"metrics_rows[{i}]: {why}"
    return None


# ----------------------------------------------------------------------------- files


def checkpoint_dir(run_path: str | Path) -> Path:
    """Where a run directory keeps its checkpoints."""
    return Path(run_path) / "checkpoints"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of every ``ckpt_<round>.pt`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, blob: bytes) -> None:
    write_atomic(path, blob, tmp=path.with_name(f".{path.name}.tmp{os.getpid()}"))
    _fsync_dir(path.parent)


def _prune(directory: Path, current: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``current``; later ones belong to an abandoned
    timeline (a resume from an earlier round) and go too, as do temp files of crashed writers."""
    ckpts = list_checkpoints(directory)
    stale = [p for r, p in ckpts if r > current]
    older = [p for r, p in ckpts if r <= current]
    doomed = stale + older[:-keep]
    doomed += [p for p in directory.iterdir() if _TMP.match(p.name)]
    for p in doomed:
        p.unlink(missing_ok=True)
    if doomed:
        _fsync_dir(directory)


def save_checkpoint(directory: str | Path, state: ServerState, keep: int = 2) -> Path:
    """Atomically write ``ckpt_<round>.pt`` and keep only the newest ``keep`` checkpoints."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an integer >= 1, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt_{state.round}.pt"
    _write_atomic(path, encode(state))
    _prune(directory, state.round, keep)
    return path


def read_checkpoint(path: str | Path) -> ServerState:
    """One checkpoint file, verified; :class:`CheckpointError` when it is torn or corrupt."""
    path = Path(path)
    try:
        blob = read_regular(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror or exc}") from None
    state = decode(blob, str(path))
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != state.round:
        raise CheckpointError(f"{path}: holds round {state.round}, not the round in its name")
    return state


def load_latest(directory: str | Path, problems: list[str] | None = None) -> ServerState | None:
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupt
    (each skipped one is logged, and its problem appended to ``problems`` when given)."""
    for rnd, path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint of round %d: %s", rnd, exc)
            if problems is not None:
                problems.append(str(exc))
    return None


# ----------------------------------------------------------------------------- resuming


def recipe_fingerprint(recipe: Recipe) -> str:
    """sha256 of the resolved recipe minus what may change on resume (more rounds, output)."""
    values = recipe.to_dict()
    values.pop("output", None)
    values["federation"] = {k: v for k, v in values["federation"].items() if k != "rounds"}
    return hashlib.sha256(yaml.safe_dump(values, sort_keys=True).encode()).hexdigest()


def layout_problem(state: dict, template: dict) -> str | None:
    """Why ``state`` does not fit a model whose trainable state is ``template`` (keys, shapes, dtypes)."""
    if state.keys() != template.keys():
        missing, extra = sorted(set(template) - set(state))[:2], sorted(set(state) - set(template))[:2]
        return f"its keys differ from the model's (missing {missing}, unexpected {extra})"
    for k, ref in template.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            return f"{k} is {got}, the model's is {tuple(ref.shape)} {ref.dtype}"
    return None


def resume_state(directory: str | Path, recipe: Recipe, template: dict | None = None) -> ServerState | None:
    """The checkpoint to resume ``recipe`` from, or ``None`` to start fresh.

    Refuses (RecipeError) a checkpoint written by a different recipe, past the last round, or whose
    global state does not fit ``template`` (the model's trainable state); and a directory whose
    checkpoints all fail to verify, naming the newest (resuming must not silently start over).
    """
    problems: list[str] = []
    state = load_latest(directory, problems)
    if state is None:
        if problems:  # never start over silently: that would delete the run the user asked to continue
            raise RecipeError(problems[0], f"no checkpoint in {directory} verifies ({len(problems)} tried; "
                              "the newest is named here); run without --resume to start over")
        return None
    if state.fingerprint and state.fingerprint != recipe_fingerprint(recipe):
        raise RecipeError(str(directory), "the checkpoint was written by a different recipe; "
                          "run without --resume to start over, or restore the original recipe")
    if template is not None and (why := layout_problem(state.global_state, template)) is not None:
        raise RecipeError(str(directory), f"the newest checkpoint does not fit the model: {why}")
    if state.round > recipe.federation.rounds:
        raise RecipeError("federation.rounds", f"the checkpoint is at round {state.round}; "
                          f"expected federation.rounds >= {state.round}, got {recipe.federation.rounds}")
    return state
