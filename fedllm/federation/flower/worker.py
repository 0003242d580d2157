"""A site's warm worker: one long-lived process that keeps the site's model and data loaded.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message in both isolation
modes; a ClientApp whose node config names a ``worker`` socket forwards each request to this
process (:func:`forward_to_worker`) instead of loading the model itself. Started as
``python -m fedllm.federation.flower worker --socket PATH``. It serves subprocess isolation, whose
Runtime API has no authentication, so fedllm's SuperNode runs that mode only behind
``--allow-insecure`` (benchmarks on a machine of one's own); a deployment uses process isolation
and :mod:`fedllm.federation.flower.executor` (docs/deploy.md).
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_secret(path: Path) -> bytes:
    """Write a fresh 32-byte secret to ``path``, readable by this user only (mode 0600); return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def serve_worker(address: str) -> None:
    """Serve one site's ClientApp requests from this long-lived process until it is terminated.

    Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message in both isolation
    modes; this worker keeps the site's model and data loaded across them. It listens on a Unix
    socket (same machine, same user); the authentication key is written beside it
    (``<address>.key``, mode 0600) and read by :func:`forward_to_worker`.
    """
    from fedllm.federation.flower.site import handle_request  # noqa: PLC0415  (heavy: torch, the model)

    key = write_secret(Path(address + ".key"))
    Path(address).unlink(missing_ok=True)
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as exc:  # a failed handshake, a peer gone
                log.warning("fedllm worker: rejected a connection (%s: %s)", type(exc).__name__, exc)
                continue
            with conn:
                _serve_one(conn, handle_request)


def _serve_one(conn, handle_request) -> None:
    """Answer one authenticated request; a peer that hangs up or sends garbage costs only itself."""
    try:
        kind, cfg, node, content = conn.recv()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        log.warning("fedllm worker: dropped a malformed request (%s: %s)", type(exc).__name__, exc)
        return
    t0 = time.perf_counter()
    try:
        reply = ("ok", handle_request(kind, cfg, node, content))
        log.info("fedllm worker: %s request served in %.2f s", kind, time.perf_counter() - t0)
    except Exception as exc:  # the server counts it as a failed client
        log.warning("fedllm worker: %s request failed (%s: %s)", kind, type(exc).__name__, exc)
        reply = ("error", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(reply)
    except (OSError, EOFError) as exc:  # the ClientApp went away before the answer
        log.warning("fedllm worker: could not send the answer (%s: %s)", type(exc).__name__, exc)


def forward_to_worker(address: str, request: tuple) -> Any:
    """Send one request to a site's warm worker and return its answer (errors come back raised)."""
    key = Path(address + ".key").read_bytes()
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        conn.send(request)
        status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(f"fedllm worker at {address}: {payload}")
    return payload
