"""Per-client state on disk: what a server keeps for every client it has ever seen, off the heap.

SCAFFOLD's controls cᵢ, error-feedback residuals eᵢ and personal LoRA factors are one state dict
per client. In memory (:class:`~fedllm.types.ClientStates`) they grow with clients × adapter size
and every checkpoint clones all of them. :class:`DiskStates` is the same mapping kept as one
safetensors file per client and version under a folder of the run directory::

    <run>/client_state/<name>/<client>.<version>.safetensors     version = the round that wrote it

- Reading a client loads only its file (checked against the sha256 recorded when it was written:
  a torn, truncated or edited file is an error naming it, never a silently different state).
- Writing is atomic (temp file, fsync, rename), so a kill at any moment leaves every file whole.
- A checkpoint (:meth:`DiskStates.state_dict`) is the index — client → (version, sha256) — not the
  tensors: each round writes files only for the clients of that round.
- Older versions are kept for the checkpoints that may still name them: with a checkpoint every
  round and the newest ``keep`` checkpoints on disk, those name at most the newest ``keep``
  versions of a client, plus the one the round in progress writes (``keep + 1`` in all).

Nothing here is loaded as code: safetensors holds only tensors.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from fedllm.errors import read_regular
from fedllm.federation.rundir import write_atomic
from fedllm.types import StateDict

FORMAT = "fedllm-disk-states-1"


class DiskStates(MutableMapping[int, StateDict]):
    """client id → state dict, one safetensors file per client and version under ``root``.

    Set :attr:`version` (the round) before writing; a write of the same client in the same version
    replaces its file (a retried round attempt). ``keep``: versions kept besides the newest.
    ``durable=False`` (a round's spool, which never outlives the round): files are neither fsynced
    nor hashed.
    """

    def __init__(self, root: str | Path, keep: int = 2, durable: bool = True) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep: expected an integer >= 0, got {keep!r}")
        self.root, self.keep, self.durable = Path(root), keep, durable
        self.version = 0
        self._files: dict[int, list[tuple[int, bytes]]] = {}  # client -> [(version, sha256)], oldest first
        self.bytes_written = 0  # every byte this store has written (the benchmark's checkpoint cost)

    def _path(self, client_id: int, version: int) -> Path:
        return self.root / f"{client_id}.{version}.safetensors"

    def __getitem__(self, client_id: int) -> StateDict:
        version, digest = self._files[client_id][-1]  # KeyError: never written
        path = self._path(client_id, version)
        try:
            blob = read_regular(path)
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror or exc}; the client-state store lost a file this run "
                             "needs (was the run directory changed by hand?)") from None
        if self.durable and hashlib.sha256(blob).digest() != digest:
            raise ValueError(f"{path}: its contents differ from what this run wrote (sha256 mismatch); "
                             "the file was truncated or changed")
        try:
            return _safetensors_load(blob)
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from None

    def __setitem__(self, client_id: int, state: Mapping[str, torch.Tensor]) -> None:
        blob = _safetensors_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(client_id, self.version)
        write_atomic(path, blob) if self.durable else path.write_bytes(blob)
        self.bytes_written += len(blob)
        entries = [e for e in self._files.get(client_id, []) if e[0] != self.version]
        entries.append((self.version, hashlib.sha256(blob).digest() if self.durable else b""))
        for old, _ in entries[:-(self.keep + 1)]:
            self._path(client_id, old).unlink(missing_ok=True)
        self._files[client_id] = entries[-(self.keep + 1):]

    def __delitem__(self, client_id: int) -> None:
        for version, _ in self._files.pop(client_id):
            self._path(client_id, version).unlink(missing_ok=True)

    def __contains__(self, client_id: object) -> bool:  # without reading the file (Mapping's would)
        return client_id in self._files

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def clear(self) -> None:
        """Forget every client and delete the folder (a fresh run, or a round's spool)."""
        self._files = {}
        shutil.rmtree(self.root, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        """The index a checkpoint keeps: which file (and its sha256) holds each client's state."""
        return {"format": FORMAT, "files": {int(c): [[v, d] for v, d in e] for c, e in self._files.items()}}

    def load_state_dict(self, state: Mapping[Any, Any]) -> None:
        """Resume from a checkpoint's index (every newest file must be there), or import the
        in-memory form (client → tensors) an older checkpoint holds, writing it as this version."""
        if state.get("format") != FORMAT:
            self._files = {}
            for client_id, tensors in state.items():
                self[int(client_id)] = tensors
            return
        files = {int(c): [(int(v), bytes(d)) for v, d in e] for c, e in state["files"].items()}
        for client_id, entries in files.items():
            path = self._path(client_id, entries[-1][0])
            if not path.is_file():
                raise ValueError(f"{path}: missing; the checkpoint names it as client {client_id}'s state")
        self._files = files
