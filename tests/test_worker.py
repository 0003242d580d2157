"""A site's warm worker survives a failed handshake, a peer that hangs up and a request that fails."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from fedllm.federation.flower import worker


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and Path(str(path) + ".key").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker socket {path} did not appear")
        time.sleep(0.02)


def test_the_worker_survives_bad_peers(tmp_path, monkeypatch):
    # Prepare: a worker whose site code answers "prepare" with 7 and fails on anything else
    def handle(kind, cfg, node, content):
        if kind != "prepare":
            raise ValueError(f"unknown client request {kind!r}")
        return 7

    monkeypatch.setattr("fedllm.federation.flower.site.handle_request", handle)
    address = tmp_path / "w.sock"
    threading.Thread(target=worker.serve_worker, args=(str(address),), daemon=True).start()
    _wait_for(address)
    # Execute: a wrong key, a peer that connects and hangs up, a raw socket sending garbage
    with pytest.raises(AuthenticationError):
        Client(str(address), family="AF_UNIX", authkey=b"not the key")
    key = Path(str(address) + ".key").read_bytes()
    Client(str(address), family="AF_UNIX", authkey=key).close()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(address))
    raw.sendall(b"\x00\x00\x00\x05hello")
    raw.close()
    # Assert: it still answers, and a failing request comes back as an error, not a dead worker
    assert worker.forward_to_worker(str(address), ("prepare", None, None, None)) == 7
    with pytest.raises(RuntimeError, match="unknown client request 'train'"):
        worker.forward_to_worker(str(address), ("train", None, None, None))
    assert worker.forward_to_worker(str(address), ("prepare", None, None, None)) == 7
